"""Group advantages: expected values derived by hand in each test."""

import math

import pytest
import torch

from flowrl.advantages import (
    AdvantageOutput,
    clip_advantages,
    group_advantages,
    multi_reward_advantages,
)

EPS = 1e-4
NAN = float("nan")


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_group_std_with_zero_std_group_and_nan():
    # Group label 7: rewards 1, 3, NaN, 2 -> valid mean 2, population var (1 + 1 + 0)/3 = 2/3.
    # Group label 3: rewards 5, 5, 5 -> std 0 -> advantages exactly 0.
    # Samples interleaved, labels not contiguous.
    rewards = torch.tensor([1.0, 5.0, 3.0, NAN, 5.0, 2.0, 5.0])
    groups = torch.tensor([7, 3, 7, 7, 3, 7, 3])
    out = group_advantages(rewards, groups)
    assert isinstance(out, AdvantageOutput)
    assert out.advantages.dtype == torch.float32 and out.advantages.shape == (7,)
    d = math.sqrt(2 / 3) + EPS
    close(out.advantages, [-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0, 0.0])
    assert out.zero_std.tolist() == [False, True, False, False, True, False, True]
    assert out.valid.tolist() == [True, True, True, False, True, True, True]
    # Exactly zero, not merely close, for zero-std groups and NaN samples.
    assert (out.advantages[[1, 3, 4, 6]] == 0).all()
    stats = out.stats()
    assert float(stats["zero_std_frac"]) == pytest.approx(3 / 6)
    assert float(stats["valid_frac"]) == pytest.approx(6 / 7)


def test_zero_std_is_exact_for_inexact_floats():
    # 0.1 * 3 / 3 != 0.1 in floating point; the group must still be flagged zero-std with advantage 0.
    out = group_advantages(torch.tensor([0.1, 0.1, 0.1, 0.7]), torch.tensor([0, 0, 0, 1]))
    assert out.zero_std.tolist() == [True, True, True, True]  # the singleton group has std 0 too
    assert (out.advantages == 0).all()


def test_global_std():
    # Group means 2 (rewards 1, 3) and 4 (rewards 2, 6). Global population std of {1, 3, 2, 6}:
    # mean 3, var (4 + 0 + 1 + 9)/4 = 3.5. The NaN sample is ignored everywhere.
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0, NAN])
    groups = torch.tensor([0, 0, 1, 1, 1])
    out = group_advantages(rewards, groups, std_mode="global")
    d = math.sqrt(3.5) + EPS
    close(out.advantages, [-1 / d, 1 / d, -2 / d, 2 / d, 0.0])
    assert out.valid.tolist() == [True, True, True, True, False]
    assert not out.zero_std.any()


def test_global_std_zero_std_group_still_zero():
    out = group_advantages(torch.tensor([1.0, 3.0, 4.0, 4.0]), torch.tensor([0, 0, 1, 1]), std_mode="global")
    assert out.zero_std.tolist() == [False, False, True, True]
    assert out.advantages[2:].tolist() == [0.0, 0.0]


def test_all_nan_group():
    out = group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    assert out.valid.tolist() == [False, False, True, True]
    assert out.zero_std.tolist() == [False, False, False, False]
    d = 0.5 + EPS  # group 1: mean 1.5, population std 0.5
    close(out.advantages, [0.0, 0.0, -0.5 / d, 0.5 / d])


def test_eps_option():
    out = group_advantages(torch.tensor([0.0, 2.0]), torch.tensor([0, 0]), eps=1.0)
    close(out.advantages, [-0.5, 0.5])  # (r - 1) / (1 + 1)


# Two rewards, two groups of two:  a = [1, 3 | 0, 0],  b = [0, 2 | 4, 8],  w_a = 1, w_b = 0.5.
A_REW = torch.tensor([1.0, 3.0, 0.0, 0.0])
B_REW = torch.tensor([0.0, 2.0, 4.0, 8.0])
GROUPS = torch.tensor([0, 0, 1, 1])
WEIGHTS = {"a": 1.0, "b": 0.5}


def test_multi_reward_sum_then_normalize():
    # total = a + 0.5 b = [1, 4 | 2, 4]; group 0: mean 2.5, std 1.5; group 1: mean 3, std 1.
    out = multi_reward_advantages({"a": A_REW, "b": B_REW}, WEIGHTS, GROUPS, mode="sum_then_normalize")
    close(out.advantages, [-1.5 / (1.5 + EPS), 1.5 / (1.5 + EPS), -1 / (1 + EPS), 1 / (1 + EPS)])
    assert not out.zero_std.any() and out.valid.all()


def test_multi_reward_normalize_then_sum():
    # A_a: group 0 mean 2 std 1 -> [-1, 1]/(1+eps); group 1 constant -> [0, 0].
    # A_b: group 0 mean 1 std 1 -> [-1, 1]/(1+eps); group 1 mean 6 std 2 -> [-2, 2]/(2+eps).
    # A = A_a + 0.5 A_b.
    out = multi_reward_advantages({"a": A_REW, "b": B_REW}, WEIGHTS, GROUPS, mode="normalize_then_sum")
    g0 = 1 / (1 + EPS) + 0.5 / (1 + EPS)
    g1 = 0.5 * 2 / (2 + EPS)
    close(out.advantages, [-g0, g0, -g1, g1])
    assert not out.zero_std.any()  # group 1 is flat in a but not in b


def test_multi_reward_zero_std_and_nan():
    # Group 1 flat in both rewards -> zero_std in both modes. Sample 0 has no "b": NaN.
    a = torch.tensor([1.0, 3.0, 2.0, 2.0])
    b = torch.tensor([NAN, 1.0, 5.0, 5.0])
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        out = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS, mode=mode)
        assert out.zero_std.tolist() == [False, False, True, True], mode
        assert out.valid.all(), mode
        assert out.advantages[2:].tolist() == [0.0, 0.0], mode
    # sum_then_normalize: NaN skipped -> totals [1, 3 + 2] = [1, 5]: mean 3, std 2.
    out = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS, mode="sum_then_normalize")
    close(out.advantages[:2], [-2 / (2 + EPS), 2 / (2 + EPS)])
    # normalize_then_sum: A_a group 0 = [-1, 1]/(1+eps); A_b group 0 has one valid sample -> zero std -> 0.
    out = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS, mode="normalize_then_sum")
    close(out.advantages[:2], [-1 / (1 + EPS), 1 / (1 + EPS)])


def test_multi_reward_key_mismatch_raises():
    with pytest.raises(ValueError):
        multi_reward_advantages({"a": A_REW}, {"a": 1.0, "b": 1.0}, GROUPS)
    with pytest.raises(ValueError):
        multi_reward_advantages({"a": A_REW}, {"a": 1.0}, GROUPS, mode="nope")  # type: ignore[arg-type]


def test_shape_checks():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        group_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), std_mode="batch")  # type: ignore[arg-type]


def test_clip_advantages():
    adv = torch.tensor([-7.0, -5.0, 0.3, 5.0, 9.0])
    assert clip_advantages(adv).tolist() == pytest.approx([-5.0, -5.0, 0.3, 5.0, 5.0])
    assert clip_advantages(adv, max_abs=1.0).tolist() == pytest.approx([-1.0, -1.0, 0.3, 1.0, 1.0])
    with pytest.raises(ValueError):
        clip_advantages(adv, max_abs=0.0)
