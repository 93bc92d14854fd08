"""Unit tests for samplers.steps: hand-derived values, rescoring, reductions, shapes and dtypes."""

import math

import pytest
import torch

from samplers import (
    DEFAULT_NOISE_LEVELS,
    STEP_FUNCTIONS,
    StepOutput,
    cps_step,
    dance_grpo_step,
    dmean_dv,
    euler_step,
    flow_grpo_sde_step,
    flow_grpo_sigma_t,
    get_step_fn,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
STOCHASTIC = ["sde", "cps", "dance"]

# Two latent elements, one sample: x = [1, -2], v = [0.5, 1], eps = [1, -0.5]; sigma 0.5 -> 0.25 (dt 0.25).
X = torch.tensor([[1.0, -2.0]])
V = torch.tensor([[0.5, 1.0]])
EPS = torch.tensor([[1.0, -0.5]])


def _rand(b=3, shape=(2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)


def _assert_list_close(t, expected, tol=1e-6):
    assert t.dtype == torch.float32
    assert t.flatten().tolist() == pytest.approx(expected, abs=tol)


# ------------------------------------------------------------------------------------------------ hand values


def test_euler_hand_values():
    out = euler_step(V, X, 0.5, 0.25)
    assert isinstance(out, StepOutput)
    # x - dt v = [1 - 0.125, -2 - 0.25]
    _assert_list_close(out.prev_sample, [0.875, -2.25])
    _assert_list_close(out.mean, [0.875, -2.25])
    assert out.log_prob.shape == (1,) and out.log_prob.item() == 0.0
    assert out.std.shape == (1,) and out.std.item() == 0.0


def test_flow_grpo_sde_hand_values():
    out = flow_grpo_sde_step(V, X, 0.5, 0.25, 0.7, noise=EPS)
    # sigma_t = 0.7 * sqrt(0.5 / 0.5) = 0.7, sigma_t^2 / (2 sigma) = 0.49
    # element 0: 1 + (-0.5 - 0.49 * (1 + 0.5 * 0.5)) * 0.25 = 1 - 0.278125
    # element 1: -2 + (-1 - 0.49 * (-2 + 0.5 * 1)) * 0.25 = -2 + (-1 + 0.735) * 0.25
    mean = [0.721875, -2.06625]
    std = 0.35  # 0.7 * sqrt(0.25)
    prev = [mean[0] + std * 1.0, mean[1] - std * 0.5]
    # log N per element: -eps^2 / 2 - log std - 1/2 log 2 pi
    lp = [-0.5 - math.log(std) - HALF_LOG_2PI, -0.125 - math.log(std) - HALF_LOG_2PI]
    _assert_list_close(out.mean, mean)
    _assert_list_close(out.prev_sample, prev)
    _assert_list_close(out.std, [std])
    _assert_list_close(out.log_prob, [(lp[0] + lp[1]) / 2], tol=1e-5)


def test_flow_grpo_sigma_t_at_sigma_one():
    # sigma = 1: reference puts sigmas[1] (= sigma_next for the first step) in the denominator
    assert flow_grpo_sigma_t(1.0, 0.8, 0.7).item() == pytest.approx(0.7 * math.sqrt(1.0 / 0.2), rel=1e-6)
    assert flow_grpo_sigma_t(1.0, 0.8, 0.7, sigma_max_clamp=0.9).item() == pytest.approx(
        0.7 * math.sqrt(1.0 / 0.1), rel=1e-6
    )
    assert flow_grpo_sigma_t(0.8, 0.6, 0.7).item() == pytest.approx(0.7 * 2.0, rel=1e-6)
    out = flow_grpo_sde_step(V, X, 1.0, 0.8, 0.7, noise=EPS)
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.mean).all()
    assert out.std.item() == pytest.approx(0.7 * math.sqrt(5.0) * math.sqrt(0.2), rel=1e-6)


def test_cps_hand_values():
    out = cps_step(V, X, 0.5, 0.25, 0.5, noise=EPS)
    sigma_c = 0.25 * math.sin(0.25 * math.pi)  # = 0.25 / sqrt 2
    root = math.sqrt(0.25**2 - sigma_c**2)
    x0 = [1 - 0.5 * 0.5, -2 - 0.5 * 1.0]  # x - sigma v
    x1 = [1 + 0.5 * 0.5, -2 + 0.5 * 1.0]  # x + (1 - sigma) v
    mean = [0.75 * x0[i] + root * x1[i] for i in range(2)]
    prev = [mean[0] + sigma_c * 1.0, mean[1] - sigma_c * 0.5]
    _assert_list_close(out.mean, mean)
    _assert_list_close(out.prev_sample, prev)
    _assert_list_close(out.std, [sigma_c])
    # reference log-prob: -mean((x' - mean)^2), no variance, no constants
    _assert_list_close(out.log_prob, [-(sigma_c**2 * 1.0 + sigma_c**2 * 0.25) / 2])
    gauss = cps_step(V, X, 0.5, 0.25, 0.5, noise=EPS, log_prob_type="gaussian")
    lp = [-0.5 - math.log(sigma_c) - HALF_LOG_2PI, -0.125 - math.log(sigma_c) - HALF_LOG_2PI]
    _assert_list_close(gauss.log_prob, [(lp[0] + lp[1]) / 2], tol=1e-5)


def test_dance_hand_values():
    out = dance_grpo_step(V, X, 0.5, 0.25, 0.3, noise=EPS)
    # x0 = x - sigma v = [0.75, -2.5]; score = -(x - 0.5 x0) / 0.25 = [-2.5, 3.0]
    # mean = x - 0.25 (v - 0.5 * 0.09 * score)
    mean = [1 - 0.25 * (0.5 + 0.045 * 2.5), -2 - 0.25 * (1.0 - 0.045 * 3.0)]
    std = 0.15  # 0.3 * sqrt(0.25)
    prev = [mean[0] + std, mean[1] - 0.5 * std]
    lp = [-0.5 - math.log(std) - HALF_LOG_2PI, -0.125 - math.log(std) - HALF_LOG_2PI]
    _assert_list_close(out.mean, mean)
    _assert_list_close(out.prev_sample, prev)
    _assert_list_close(out.std, [std])
    _assert_list_close(out.log_prob, [(lp[0] + lp[1]) / 2], tol=1e-5)


# ------------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_rescoring_returns_identical_log_prob(kind):
    fn = get_step_fn(kind)
    v, x = _rand()
    sampled = fn(v, x, 0.6, 0.45, generator=torch.Generator().manual_seed(1))
    rescored = fn(v, x, 0.6, 0.45, prev_sample=sampled.prev_sample)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    assert torch.equal(rescored.mean, sampled.mean)
    assert torch.equal(rescored.prev_sample, sampled.prev_sample)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_rescoring_low_precision_inputs(kind):
    fn = get_step_fn(kind)
    v, x = _rand()
    v, x = v.bfloat16(), x.bfloat16()
    sampled = fn(v, x, 0.6, 0.45, generator=torch.Generator().manual_seed(2))
    for t in (sampled.prev_sample, sampled.log_prob, sampled.mean, sampled.std):
        assert t.dtype == torch.float32
    rescored = fn(v, x, 0.6, 0.45, prev_sample=sampled.prev_sample)
    assert torch.equal(rescored.log_prob, sampled.log_prob)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_noise_and_generator_agree(kind):
    fn = get_step_fn(kind)
    v, x = _rand()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    a = fn(v, x, 0.6, 0.45, noise=noise)
    b = fn(v, x, 0.6, 0.45, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("kind", STOCHASTIC + ["ode"])
def test_sum_vs_mean_reduction(kind):
    fn = get_step_fn(kind)
    v, x = _rand()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    m = fn(v, x, 0.6, 0.45, noise=noise, reduction="mean")
    s = fn(v, x, 0.6, 0.45, noise=noise, reduction="sum")
    assert torch.allclose(s.log_prob, m.log_prob * x[0].numel(), rtol=1e-5, atol=1e-5)
    assert torch.equal(s.prev_sample, m.prev_sample)
    with pytest.raises(ValueError, match="reduction"):
        fn(v, x, 0.6, 0.45, noise=noise, reduction="max")


@pytest.mark.parametrize("sigma,sigma_next", [(0.6, 0.45), (1.0, 0.9), (0.1, 0.0)])
def test_cps_eta_zero_is_euler_exactly(sigma, sigma_next):
    v, x = _rand()
    cps = cps_step(v, x, sigma, sigma_next, 0.0, generator=torch.Generator().manual_seed(5))
    euler = euler_step(v, x, sigma, sigma_next)
    assert torch.equal(cps.prev_sample, euler.prev_sample)
    assert torch.equal(cps.mean, euler.mean)
    assert torch.equal(cps.log_prob, torch.zeros(3)) and torch.equal(cps.std, torch.zeros(3))


def test_flow_grpo_log_prob_matches_torch_normal():
    v, x = _rand()
    out = flow_grpo_sde_step(v, x, 0.7, 0.55, 0.7, generator=torch.Generator().manual_seed(6))
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1))
    expected = normal.log_prob(out.prev_sample).flatten(1)
    assert torch.allclose(out.log_prob, expected.mean(1), atol=1e-5)
    out_sum = flow_grpo_sde_step(v, x, 0.7, 0.55, 0.7, prev_sample=out.prev_sample, reduction="sum")
    assert torch.allclose(out_sum.log_prob, expected.sum(1), rtol=1e-5)


@pytest.mark.parametrize("kind", STOCHASTIC + ["ode"])
def test_per_sample_sigma_tensor(kind):
    fn = get_step_fn(kind)
    v, x = _rand()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    sig = torch.tensor([0.9, 0.6, 0.3])
    sig_next = torch.tensor([0.8, 0.45, 0.0])
    batched = fn(v, x, sig, sig_next, noise=noise)
    assert batched.prev_sample.shape == x.shape and batched.log_prob.shape == (3,) and batched.std.shape == (3,)
    for i in range(3):
        single = fn(v[i : i + 1], x[i : i + 1], float(sig[i]), float(sig_next[i]), noise=noise[i : i + 1])
        assert torch.allclose(batched.mean[i], single.mean[0], atol=1e-6)
        assert torch.allclose(batched.std[i], single.std[0], atol=1e-7)
        assert torch.allclose(batched.log_prob[i], single.log_prob[0], atol=1e-5)
    # 0-dim tensors behave like floats
    scalar = fn(v, x, torch.tensor(0.6), torch.tensor(0.45), noise=noise)
    floats = fn(v, x, 0.6, 0.45, noise=noise)
    assert torch.equal(scalar.prev_sample, floats.prev_sample)
    with pytest.raises(ValueError, match="sigma"):
        fn(v, x, torch.tensor([0.6, 0.5]), 0.45, noise=noise)


def test_exactly_one_source_of_next_sample():
    v, x = _rand()
    with pytest.raises(ValueError, match="at most one"):
        flow_grpo_sde_step(v, x, 0.6, 0.45, noise=torch.zeros_like(x), prev_sample=x)
    with pytest.raises(ValueError, match="at most one"):
        cps_step(v, x, 0.6, 0.45, prev_sample=x, generator=torch.Generator())


def test_log_prob_gradient_flows_to_velocity_only():
    v, x = _rand()
    prev = flow_grpo_sde_step(v, x, 0.6, 0.45, generator=torch.Generator().manual_seed(8)).prev_sample
    v = v.clone().requires_grad_(True)
    out = flow_grpo_sde_step(v, x, 0.6, 0.45, prev_sample=prev.requires_grad_(True))
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None  # the scored sample is a constant


def test_registry_and_bad_names():
    assert set(STEP_FUNCTIONS) == {"ode", "sde", "cps", "dance"}
    assert get_step_fn("sde") is flow_grpo_sde_step and get_step_fn("ode") is euler_step
    with pytest.raises(ValueError, match="allowed: cps, dance, ode, sde"):
        get_step_fn("ddim")
    with pytest.raises(ValueError, match="allowed: cps, dance, ode, sde"):
        dmean_dv("flow", 0.5, 0.25)


# ------------------------------------------------------------------------------------------------ dmean_dv


def test_dmean_dv_hand_values():
    assert dmean_dv("ode", 0.5, 0.25).item() == pytest.approx(0.25)
    # sigma_t = 0.7 -> 0.25 * (1 + 0.49 * 0.5 / 1.0)
    assert dmean_dv("sde", 0.5, 0.25, 0.7).item() == pytest.approx(0.25 * 1.245, rel=1e-6)
    # dance: 0.25 * (1 + 0.09 * 0.5 / 1.0)
    assert dmean_dv("dance", 0.5, 0.25, 0.3).item() == pytest.approx(0.25 * 1.045, rel=1e-6)
    sigma_c = 0.25 * math.sin(0.25 * math.pi)
    expected = abs(-0.75 * 0.5 + math.sqrt(0.0625 - sigma_c**2) * 0.5)
    assert dmean_dv("cps", 0.5, 0.25, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # eta = 0: CPS is Euler
    assert dmean_dv("cps", 0.5, 0.25, 0.0).item() == pytest.approx(0.25, rel=1e-6)
    assert dmean_dv("sde", 0.5, 0.25).item() == dmean_dv("sde", 0.5, 0.25, DEFAULT_NOISE_LEVELS["sde"]).item()


@pytest.mark.parametrize("kind", STOCHASTIC + ["ode"])
def test_dmean_dv_matches_autograd(kind):
    sig = torch.tensor([1.0, 0.6, 0.3])
    sig_next = torch.tensor([0.9, 0.45, 0.0])
    v, x = _rand(shape=(2,))
    v.requires_grad_(True)
    out = get_step_fn(kind)(v, x, sig, sig_next, noise=torch.zeros_like(x))
    (grad,) = torch.autograd.grad(out.mean.sum(), v)  # mean is affine in v with a per-sample coefficient
    expected = grad.abs()[:, 0]
    assert torch.allclose(grad.abs(), expected[:, None].expand_as(grad))
    got = dmean_dv(kind, sig, sig_next)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
