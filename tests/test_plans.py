"""Plans (samplers.plans) and their execution (samplers.rollout.sample): window schedules over iterations, the
MixGRPO-Flash ODE tail (rebuilt sigmas, DPM-Solver++ 2M inside the rollout loop), step kinds, NFE counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from samplers import dpm_solver_2m, euler_ode
from samplers.plans import (
    FullSDEPlan,
    Plan,
    PlannedStep,
    WindowPlan,
    flash_num_steps,
    flash_sigmas,
    ode_tail,
)
from samplers.rollout import Rollout, rescore, sample

# Analytic flow (as in test_samplers_solvers): data ~ N(M, S0^2) per element; the ODE moves quantiles.
M, S0 = 2.0, 0.3


def _mu(s):
    return (1 - s) * M


def _S(s):
    return math.sqrt((1 - s) ** 2 * S0**2 + s**2)


def _velocity(x, sigma):
    s = float(sigma)
    return -M + (s - (1 - s) * S0**2) / _S(s) ** 2 * (x - _mu(s))


X1 = torch.tensor([[-1.5, 0.2, 1.0], [0.3, -0.7, 2.1]])
SIG10 = [1.0, 0.96, 0.91, 0.85, 0.77, 0.68, 0.57, 0.44, 0.3, 0.15, 0.0]  # a shifted-looking T = 10 schedule


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def _noise_fn(seed=0):
    def fn(j: int) -> torch.Tensor:
        return torch.randn(X1.shape, generator=torch.Generator().manual_seed(seed * 1000 + j))

    return fn


def _window(**kw) -> WindowPlan:
    return WindowPlan(**{"width": 4, "schedule": "progressive", "tau": 2, **kw})


# ------------------------------------------------------------------------------------------------ window schedules
def test_progressive_schedule_hand_listed():
    T = 10  # w = 4 -> starts 0..6
    assert [_window().window_start(T, k) for k in range(16)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0]
    assert [_window(wrap=False).window_start(T, k) for k in range(18)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 6, 6]
    assert [_window(tau=1, shift=2).window_start(T, k) for k in range(6)] == [0, 2, 4, 6, 0, 2]
    assert [_window(tau=1, shift=2, start=1).window_start(T, k) for k in range(5)] == [1, 3, 5, 1, 3]
    assert [_window(tau=1, shift=4, wrap=False).window_start(T, k) for k in range(4)] == [0, 4, 6, 6]
    assert [_window(tau=3, schedule="fixed", start=2).window_start(T, k) for k in range(5)] == [2] * 5
    # the closed form (progressive + wrap) agrees with walking the schedule far out
    p = _window(tau=3, shift=2, start=1)
    walk, l = [], 1
    while len(walk) < 200:
        walk += [l] * 3
        l = l + 2 if l + 2 <= 6 else 1
    assert [p.window_start(T, k) for k in range(200)] == walk[:200]


def test_decay_schedules_hand_listed():
    T = 25  # w = 4 -> starts 0..21; tau shrinks once l > 13
    # decay: tau(l) = max(1, tau - relu(l - 13)): l = 12, 13 held 3, l = 14 held 2, then 1 each
    d = _window(schedule="decay", tau=3, start=12)
    assert [d.window_start(T, k) for k in range(12)] == [12, 12, 12, 13, 13, 13, 14, 14, 15, 16, 17, 18]
    # exp_decay: tau(l) = ceil(10 exp(-0.1 relu(l - 13))): 10, 10, 9, 8, 7 iterations at l = 13..17
    e = _window(schedule="exp_decay", tau=10, start=13)
    starts = [e.window_start(T, k) for k in range(44)]
    assert starts == [13] * 10 + [14] * 10 + [15] * 9 + [16] * 8 + [17] * 7
    assert e.window_start(T, 10_000) in range(22)  # wraps and keeps going


def test_random_schedule_is_a_pure_function_of_seed_and_iteration():
    p = _window(schedule="random", seed=3)
    starts = [p.window_start(10, k) for k in range(200)]
    assert set(starts) == set(range(7))  # uniform over [0, T - w]
    assert [p.window_start(10, k) for k in reversed(range(200))] == starts[::-1]
    assert starts != [_window(schedule="random", seed=4).window_start(10, k) for k in range(200)]


@pytest.mark.parametrize("schedule", ["fixed", "random", "progressive", "decay", "exp_decay"])
def test_plan_at_iteration_k_does_not_depend_on_earlier_calls(schedule):
    kw = dict(schedule=schedule, tau=3, start=1, seed=7, ode_solver="dpm2m", flash_ratio=0.4)
    for k in (0, 5, 37, 123):
        fresh = WindowPlan(**kw)(SIG10, k)
        used = WindowPlan(**kw)
        for j in range(k):
            used(SIG10, j)
        assert used(SIG10, k) == fresh
        assert used(SIG10, k) == fresh  # calling twice changes nothing either
    # the plan object carries no mutable state: its fields are unchanged by use
    p = WindowPlan(**kw)
    before = dataclasses.asdict(p)
    p(SIG10, 50)
    assert dataclasses.asdict(p) == before


# ------------------------------------------------------------------------------------------------ plan structure
def test_window_plan_structure():
    plan = WindowPlan(width=4, start=3)(SIG10)
    assert plan.kinds == ("ode",) * 3 + ("sde",) * 4 + ("ode",) * 3
    assert plan.train_indices == [3, 4, 5, 6] and plan.num_train_steps == 4
    assert [s.sigma for s in plan.steps] == SIG10[:-1] and [s.sigma_next for s in plan.steps] == SIG10[1:]
    assert all(s.noise_level == 0.7 for s in plan.steps if s.train)
    assert all(s.noise_level is None for s in plan.steps if not s.train)
    dance = WindowPlan("dance", 0.3, width=2, start=0)(SIG10)
    assert dance.kinds[:2] == ("dance", "dance") and dance.steps[0].noise_level == 0.3


def test_full_plan_train_fraction_and_tail():
    assert FullSDEPlan(train_fraction=0.9)(SIG10).train_indices == list(range(9))
    plan = FullSDEPlan("dance", 0.3, 0.6)(SIG10)
    assert plan.kinds == ("dance",) * 10 and plan.train_indices == [0, 1, 2, 3, 4, 5]
    tail = FullSDEPlan(train_fraction=0.4, ode_after_train=True, ode_solver="dpm2m", flash_ratio=0.5)(SIG10)
    assert tail.kinds == ("sde",) * 4 + ("dpm2m",) * 3 and tail.nfe == 7
    with pytest.raises(ValueError, match="ode_after_train"):
        FullSDEPlan(ode_solver="dpm2m")


def test_invalid_plans_and_steps():
    with pytest.raises(ValueError, match="cannot be trained"):
        PlannedStep(0, 1.0, 0.5, "dpm2m", None, True)
    with pytest.raises(ValueError, match="unknown"):
        PlannedStep(0, 1.0, 0.5, "heun", None, False)
    with pytest.raises(ValueError, match="flash_ratio"):
        WindowPlan(flash_ratio=0.0)
    with pytest.raises(ValueError, match="ode_solver"):
        WindowPlan(ode_solver="rk4")
    with pytest.raises(ValueError, match="not allowed"):
        WindowPlan(kind="dpm2m")
    with pytest.raises(ValueError, match="exceeds"):
        WindowPlan(width=11)(SIG10)


# ------------------------------------------------------------------------------------------------ Flash
def test_flash_sigmas_rebuild():
    tail = SIG10[4:]  # 6 remaining steps from 0.77
    assert flash_sigmas(tail, 1.0) == tail
    assert flash_sigmas(tail, 0.5) == [tail[0], tail[2], tail[4], tail[6]]  # n = 3 divides m = 6: a sub-sample
    two = flash_sigmas(tail, 0.4)  # n = int(2.4) = 2: positions 0, 3, 6
    assert two == [tail[0], tail[3], tail[6]]
    four = flash_sigmas(tail, 0.7)  # n = 4: positions 0, 1.5, 3, 4.5, 6 (linear between neighbours)
    assert four == pytest.approx([0.77, (0.68 + 0.57) / 2, 0.44, (0.3 + 0.15) / 2, 0.0])
    assert four[0] == 0.77 and four[-1] == 0.0
    assert flash_sigmas(tail, 0.01) == [0.77, 0.0]  # at least one step
    assert flash_sigmas([0.3], 0.4) == [0.3]  # nothing left
    assert [flash_num_steps(m, 0.4) for m in range(8)] == [0, 1, 1, 1, 1, 2, 2, 2]
    assert flash_num_steps(100, 0.29) == 29  # no float-artefact floor (0.29 * 100 = 28.999...)


@pytest.mark.parametrize(
    "T, start, ratio, expected_tail",
    [
        (10, 0, 0.4, 2),  # MixGRPO-Flash at T = 10: m = 6 -> int(2.4) = 2
        (10, 3, 0.4, 1),  # m = 3 -> int(1.2) = 1
        (10, 5, 0.4, 1),  # m = 1 -> max(int(0.4), 1) = 1
        (10, 6, 0.4, 0),  # window at the end: no tail
        (10, 0, 0.2, 1),  # Flash*: m = 6 -> int(1.2) = 1
        (25, 0, 0.4, 8),  # the paper's T = 25: m = 21 -> int(8.4) = 8
        (25, 10, 0.4, 4),  # m = 11 -> int(4.4) = 4
        (25, 0, 0.2, 4),  # Flash* at T = 25: int(4.2) = 4
        (6, 0, 0.4, 1),  # the test pipeline's T = 6
    ],
)
def test_flash_plan_step_counts(T, start, ratio, expected_tail):
    sig = torch.linspace(1, 0, T + 1).tolist()
    plan = WindowPlan(width=4, start=start, ode_solver="dpm2m", flash_ratio=ratio)(sig)
    n_before = start
    assert plan.kinds == ("ode",) * n_before + ("sde",) * 4 + ("dpm2m",) * expected_tail
    assert plan.nfe == len(plan.steps) == n_before + 4 + expected_tail
    # steps before the window are never accelerated: plain Euler on the original sigmas
    assert [(s.sigma, s.sigma_next) for s in plan.steps[: n_before + 4]] == list(zip(sig[: n_before + 4], sig[1 : n_before + 5]))
    if expected_tail:
        tail = plan.steps[n_before + 4 :]
        assert tail[0].sigma == sig[start + 4] and tail[-1].sigma_next == 0.0
        assert [s.index for s in tail] == list(range(start + 4, start + 4 + expected_tail))
        assert all(a.sigma_next == b.sigma for a, b in zip(tail, tail[1:]))


# ------------------------------------------------------------------------------------------------ execution
def _ode_plan(sig, kind="ode") -> Plan:
    return Plan(tuple(PlannedStep(i, sig[i], sig[i + 1], kind, None, False) for i in range(len(sig) - 1)))


def test_all_ode_plan_reproduces_euler_sampling_exactly():
    f = _Counter(_velocity)
    r = sample(f, X1, _ode_plan(SIG10), lambda j: pytest.fail("an ODE plan draws no noise"))
    assert torch.equal(r.final, euler_ode(_velocity, X1, SIG10))
    assert r.nfe == f.calls == 10 and r.latents.shape == (2, 0, 3) and r.log_probs.shape == (2, 0)
    # a window plan whose window is CPS with eta = 0 is Euler too
    w = WindowPlan("cps", 1e-30, width=3, start=2)(SIG10)
    assert torch.equal(sample(_velocity, X1, w, _noise_fn()).final, euler_ode(_velocity, X1, SIG10))


def test_all_dpm2m_plan_reproduces_dpm_solver_exactly():
    r = sample(_velocity, X1, _ode_plan(SIG10, "dpm2m"), _noise_fn())
    assert torch.equal(r.final, dpm_solver_2m(_velocity, X1, SIG10))


def test_flash_tail_restarts_the_multistep_history_after_the_window():
    plan = WindowPlan(width=4, start=2, ode_solver="dpm2m", flash_ratio=0.5)(SIG10)
    assert plan.kinds == ("ode",) * 2 + ("sde",) * 4 + ("dpm2m",) * 2
    f = _Counter(_velocity)
    full = sample(f, X1, plan, _noise_fn(1))
    assert f.calls == full.nfe == plan.nfe == 8
    head = sample(_velocity, X1, Plan(plan.steps[:6]), _noise_fn(1))  # up to the end of the window
    tail_sigmas = [plan.steps[6].sigma, plan.steps[7].sigma, plan.steps[7].sigma_next]
    assert tail_sigmas == [SIG10[6], SIG10[8], SIG10[10]]
    assert torch.equal(full.final, dpm_solver_2m(_velocity, head.final, tail_sigmas))
    assert torch.equal(full.latents, head.latents) and torch.equal(full.log_probs, head.log_probs)


def test_dpm2m_tail_in_a_plan_is_second_order():
    """The tail as the rollout runs it (0.7 -> 0.2) vs a many-step (Richardson-extrapolated) Euler reference."""
    x_start = torch.tensor(_mu(0.7)) + _S(0.7) * X1.double()

    def euler64(n):
        x, sig = x_start.clone(), torch.linspace(0.7, 0.2, n + 1, dtype=torch.float64)
        for s, sn in zip(sig[:-1], sig[1:]):
            x = x - (s - sn) * _velocity(x, s)
        return x

    reference = 2 * euler64(8192) - euler64(4096)  # O(1/N^2) error
    assert (reference - (_mu(0.2) + _S(0.2) * X1.double())).abs().max() < 1e-7
    errs = []
    for n in (16, 32, 64):
        sig = torch.linspace(0.7, 0.2, n + 1).tolist()
        plan = Plan(tuple(ode_tail(sig, 0, "dpm2m", 1.0)))
        out = sample(_velocity, x_start.float(), plan, _noise_fn()).final
        errs.append((out.double() - reference).abs().max().item())
    for a, b in zip(errs, errs[1:]):
        assert 3.5 < a / b < 5.0, errs  # -> 4: second order (Euler: 2)
    euler_err = (euler_ode(_velocity, x_start.float(), torch.linspace(0.7, 0.2, 65)).double() - reference).abs().max()
    assert errs[-1] < euler_err / 20


@pytest.mark.parametrize("kind, level", [("sde", 0.7), ("cps", 0.8), ("dance", 0.3)])
def test_window_rollout_stores_only_window_steps_and_rescoring_is_exact(kind, level):
    plan = WindowPlan(kind, level, width=3, start=1, ode_solver="dpm2m", flash_ratio=0.4)(SIG10)
    r = sample(_velocity, X1, plan, _noise_fn(2))
    assert r.step_indices.tolist() == [1, 2, 3] and r.kinds == (kind,) * 3
    assert r.latents.shape == (2, 3, 3) and torch.isfinite(r.log_probs).all()
    for j in range(3):
        v = _velocity(r.latents[:, j], r.sigmas[j])
        lp, mean, std = rescore(v, r, j)
        assert torch.equal(lp, r.log_probs[:, j]) and torch.equal(mean, r.means[:, j])
    both = Rollout.cat([r, r])
    assert both.nfe == r.nfe == plan.nfe and both.batch_size == 4


def test_dance_noise_is_constant_eta():
    plan = FullSDEPlan("dance", 0.3, 1.0)(SIG10)
    r = sample(_velocity, X1, plan, _noise_fn(3))
    dt = torch.tensor(SIG10[:-1]) - torch.tensor(SIG10[1:])
    assert torch.allclose(r.stds, (0.3 * dt.sqrt()).expand(2, -1))
