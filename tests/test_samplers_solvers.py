"""Unit tests for samplers.solvers: DPM-Solver++ 2M and the Euler ODE loop."""

import math

import pytest
import torch

from samplers import dpm_solver_2m, dpm_solver_2m_step, euler_ode, euler_step, nfe

# Analytic flow: data x0 ~ N(M, S0^2) per element, noise eps ~ N(0, 1). The marginal at sigma is
# N(mu(sigma), S(sigma)^2) with mu = (1 - sigma) M and S = sqrt((1 - sigma)^2 S0^2 + sigma^2); the ODE flow
# transports quantiles: x(sigma) = mu(sigma) + S(sigma) * x(1). Its velocity dx/dsigma is
#   v(x, sigma) = mu'(sigma) + S'(sigma) / S(sigma) * (x - mu(sigma)),  mu' = -M,  S' = (sigma - (1 - sigma) S0^2) / S.
M, S0 = 2.0, 0.3


def _mu(s):
    return (1 - s) * M


def _S(s):
    return math.sqrt((1 - s) ** 2 * S0**2 + s**2)


def _velocity(x, sigma):
    s = float(sigma)
    return -M + (s - (1 - s) * S0**2) / _S(s) ** 2 * (x - _mu(s))


X1 = torch.tensor([[-1.5, 0.2, 1.0], [0.3, -0.7, 2.1]])


def _exact(sigma_end):
    return _mu(sigma_end) + _S(sigma_end) * X1.double()


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.sigmas = fn, 0, []

    def __call__(self, x, sigma):
        assert isinstance(sigma, torch.Tensor) and sigma.dim() == 0 and sigma.dtype == torch.float32
        self.calls += 1
        self.sigmas.append(float(sigma))
        return self.fn(x, sigma)


def test_nfe():
    assert nfe(torch.linspace(1, 0, 11)) == 10
    assert nfe([0.8, 0.5]) == 1
    assert nfe([0.5]) == 0
    f = _Counter(_velocity)
    dpm_solver_2m(f, X1, torch.linspace(1, 0, 7))
    assert f.calls == 6 == nfe(torch.linspace(1, 0, 7))
    g = _Counter(_velocity)
    euler_ode(g, X1, torch.linspace(0.9, 0.3, 5))
    assert g.calls == 4


def test_dpm_2m_hand_value():
    # sigma_prev 0.75, sigma 0.5, sigma_next 0.25: lambda = -log 3, 0, log 3, so h = h_prev = log 3, r = 1,
    # e^{-h} = 1/3. x' = (0.25 / 0.5) x + 0.75 (1 - 1/3) (x0 + (x0 - prev_x0) / 2)
    x, x0, prev = torch.tensor([[1.0]]), torch.tensor([[0.6]]), torch.tensor([[0.4]])
    out = dpm_solver_2m_step(x, x0, prev, 0.75, 0.5, 0.25)
    assert out.item() == pytest.approx(0.5 * 1.0 + 0.75 * (2 / 3) * (0.6 + 0.1), rel=1e-6)
    first = dpm_solver_2m_step(x, x0, None, None, 0.5, 0.25)
    assert first.item() == pytest.approx(0.5 * 1.0 + 0.75 * (2 / 3) * 0.6, rel=1e-6)


def test_first_order_step_is_euler():
    x = X1
    v = _velocity(x, 0.7)
    first = dpm_solver_2m_step(x, x - 0.7 * v, None, None, 0.7, 0.4)
    assert torch.allclose(first, euler_step(v, x, 0.7, 0.4).prev_sample, atol=1e-6)
    # starting at sigma = 1 (lambda = -inf) is well defined
    v1 = _velocity(x, 1.0)
    first1 = dpm_solver_2m_step(x, x - v1, None, None, 1.0, 0.8)
    assert torch.allclose(first1, euler_step(v1, x, 1.0, 0.8).prev_sample, atol=1e-6)


def test_final_step_to_zero_returns_x0():
    x0 = torch.randn(2, 3)
    prev = torch.randn(2, 3)
    assert torch.equal(dpm_solver_2m_step(X1, x0, prev, 0.3, 0.1, 0.0), x0)
    assert torch.equal(dpm_solver_2m_step(X1, x0, None, None, 0.1, 0.0), x0)
    # per-sample sigmas, only the second sample finishes
    out = dpm_solver_2m_step(X1, x0, prev, torch.tensor([0.3, 0.3]), 0.2, torch.tensor([0.1, 0.0]))
    assert torch.equal(out[1], x0[1]) and torch.isfinite(out).all()
    ref0 = dpm_solver_2m_step(X1[:1], x0[:1], prev[:1], 0.3, 0.2, 0.1)
    assert torch.allclose(out[:1], ref0)


def test_loop_ending_at_zero_returns_last_data_prediction():
    sigmas = torch.linspace(1, 0, 6)
    f = _Counter(_velocity)
    out = dpm_solver_2m(f, X1, sigmas)
    # rerun the first 4 steps, then the last x0_hat = x - sigma v
    x = dpm_solver_2m(_velocity, X1, sigmas[:-1])
    assert torch.allclose(out, x - sigmas[-2] * _velocity(x, sigmas[-2]), atol=1e-6)
    assert f.sigmas == pytest.approx(sigmas[:-1].tolist())
    # the result is closer to the exact flow than Euler's
    err_dpm = (out.double() - _exact(0.0)).abs().max()
    err_euler = (euler_ode(_velocity, X1, sigmas).double() - _exact(0.0)).abs().max()
    assert err_dpm < err_euler


def test_second_order_convergence():
    # sigmas 1 -> 0.2: away from sigma = 0, where uniform sigma steps stay O(1) long in lambda.
    errs_dpm, errs_euler = [], []
    for n in (32, 64, 128):
        sigmas = torch.linspace(1.0, 0.2, n + 1)
        errs_dpm.append((dpm_solver_2m(_velocity, X1, sigmas).double() - _exact(0.2)).abs().max().item())
        errs_euler.append((euler_ode(_velocity, X1, sigmas).double() - _exact(0.2)).abs().max().item())
    for a, b in zip(errs_dpm, errs_dpm[1:]):
        assert 3.5 < a / b < 4.8, errs_dpm
    for a, b in zip(errs_euler, errs_euler[1:]):
        assert 1.8 < a / b < 2.2, errs_euler
    assert errs_dpm[-1] < errs_euler[-1] / 50


def test_euler_loop_reproduces_repeated_euler_step():
    sigmas = torch.tensor([1.0, 0.83, 0.6, 0.41, 0.2, 0.07, 0.0])
    x = X1.bfloat16()
    expected = x.float()
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        expected = euler_step(_velocity(expected, s), expected, s, sn).prev_sample
    out = euler_ode(_velocity, x, sigmas)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_stretch_not_ending_at_zero_and_bad_sigmas():
    sigmas = torch.linspace(0.7, 0.3, 9)  # an ODE stretch inside a plan
    x_start = _mu(0.7) + _S(0.7) * X1
    err_dpm = (dpm_solver_2m(_velocity, x_start, sigmas).double() - _exact(0.3)).abs().max()
    err_euler = (euler_ode(_velocity, x_start, sigmas).double() - _exact(0.3)).abs().max()
    assert err_dpm < 5e-3 and err_dpm < err_euler / 3
    with pytest.raises(ValueError, match="decreasing"):
        dpm_solver_2m(_velocity, X1, torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        euler_ode(_velocity, X1, torch.ones(2, 2))
    with pytest.raises(ValueError, match="sigma_prev"):
        dpm_solver_2m_step(X1, X1, X1, None, 0.5, 0.3)
