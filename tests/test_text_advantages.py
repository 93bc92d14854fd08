"""Modality-agnostic advantage variants used by the text trainer: DAPO dynamic sampling, NGRPO."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.advantages import dynamic_sampling_mask, group_advantages, ngrpo_advantages

NAN = float("nan")


def test_dynamic_sampling_keeps_mixed_groups_only():
    # group 0: 1,0,1 (mixed) keep; group 1: all 1 drop; group 2: all 0 drop; group 3: 1 and NaN -> flat, drop;
    # group 4: all NaN drop; group 5: 0, NaN, 1 keep (the NaN sample rides along)
    r = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0, 0, 1, NAN, NAN, NAN, 0, NAN, 1])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 5])
    keep = dynamic_sampling_mask(r, g)
    expected = [True] * 3 + [False] * 10 + [True] * 3
    assert keep.tolist() == expected


def test_ngrpo_hand_values():
    # group of 3 all-wrong rewards 0, virtual r_max = 1: mu = 1/4, var = (3·(1/16) + 9/16)/4 = 12/64, sigma = sqrt(3)/4
    r = torch.tensor([0.0, 0.0, 0.0])
    out = ngrpo_advantages(r, torch.zeros(3, dtype=torch.long), eps=0.0)
    a = -(1 / 4) / (math.sqrt(3) / 4)
    torch.testing.assert_close(out.advantages, torch.full((3,), a))
    assert not out.zero_std.any()
    # plain GRPO gives zeros for the same group
    assert group_advantages(r, torch.zeros(3, dtype=torch.long)).advantages.abs().sum() == 0


def test_ngrpo_mixed_and_all_correct_groups():
    # group 0: [1, 0] + virtual 1 -> mu 2/3, var = (1/9 + 4/9 + 1/9)/3 = 2/9, sigma = sqrt(2)/3
    # group 1: [1, 1] + virtual 1 -> sigma 0: advantages 0, zero_std
    # group 2: [NaN, 0] -> the NaN is invalid; [0] + virtual 1: mu 1/2, sigma 1/2 -> A = -1
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, NAN, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    out = ngrpo_advantages(r, g, eps=0.0)
    s = math.sqrt(2) / 3
    torch.testing.assert_close(out.advantages, torch.tensor([(1 / 3) / s, (-2 / 3) / s, 0.0, 0.0, 0.0, -1.0]))
    assert out.zero_std.tolist() == [False, False, True, True, False, False]
    assert out.valid.tolist() == [True, True, True, True, False, True]


def test_ngrpo_rejects_bad_groups():
    with pytest.raises(TypeError):
        ngrpo_advantages(torch.zeros(2), torch.zeros(2))


# ------------------------------------------------------------------------------------------------ trackers, budgets
from flowrl.advantages import (  # noqa: E402
    BetaTracker,
    gvm_budgets,
    knapsack_budgets,
    knapsack_value,
    max_variance_subset,
    spo_advantages,
    spo_decay,
    vade_select,
)


def test_beta_tracker_decay_and_update():
    t = BetaTracker(2, alpha0=1.0, beta0=1.0)
    t.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0, 1.0]))
    assert t.alpha.tolist() == [2.0, 2.0] and t.beta.tolist() == [2.0, 1.0]
    # decay rho = 0.5 toward the prior first (once per prompt), then add: alpha0 = 1 + 0.5·(2 - 1) + 1 = 2.5
    t.update(torch.tensor([0, 0]), torch.tensor([1.0, float("nan")]), rho=0.5)
    assert t.alpha[0] == 2.5 and t.beta[0] == 1.5
    assert float(t.mean(torch.tensor([1]))) == pytest.approx(2 / 3)


def test_spo_advantages_and_decay_hand_values():
    t = BetaTracker(2, alpha0=1.0, beta0=3.0)  # v = 0.25 for both
    adv = spo_advantages(t, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), normalize=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25]))
    assert t.mean(torch.tensor([0])).item() == pytest.approx(2 / 5)
    # normalised: (A - mean)/std of [0.75, -0.25] = [1, -1]
    t2 = BetaTracker(2, alpha0=1.0, beta0=3.0)
    torch.testing.assert_close(spo_advantages(t2, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), eps=0.0),
                               torch.tensor([1.0, -1.0]))
    assert float(spo_decay(0.0, 0.1, 0.5, 1.0)) == 1.0
    assert float(spo_decay(0.1, 0.1, 0.0, 1.0)) == pytest.approx(0.5)
    assert float(spo_decay(10.0, 0.1)) == 0.875  # clamped at rho_min


def test_vade_prefers_uncertain_prompts():
    t = BetaTracker(3)
    t.update(torch.tensor([0] * 50 + [1] * 50 + [2] * 50),
             torch.cat([torch.ones(50), torch.zeros(50), (torch.arange(50) % 2).float()]))
    # prompt 0 always solved, 1 never, 2 half the time: p(1-p) is largest for 2
    picks = [int(vade_select(t, 1, torch.Generator().manual_seed(s))[0]) for s in range(20)]
    assert picks.count(2) == 20
    assert sorted(vade_select(t, 3).tolist()) == [0, 1, 2]


def test_knapsack_value_and_budgets_hand_values():
    # value(n, 0.5) = (1 - 2·0.5^n)·0.5·0.25
    assert float(knapsack_value(3, 0.5)) == pytest.approx(0.125 * 0.75)
    assert float(knapsack_value(4, 0.0)) == 0.0 and float(knapsack_value(4, 1.0)) == 0.0
    # p = [0.5, 0.9], total 6, n in [2, 4]: (2,4) 0.06559, (3,3) 0.09618, (4,2) 0.11100 -> (4, 2)
    assert knapsack_budgets(torch.tensor([0.5, 0.9]), 6, n_min=2, n_max=4).tolist() == [4, 2]
    b = knapsack_budgets(torch.tensor([0.5, 0.99, 0.01, 0.3]), 16, n_min=1, n_max=8)
    assert int(b.sum()) == 16 and b[0] >= b[1] and b[0] >= b[2]
    with pytest.raises(ValueError):
        knapsack_budgets(torch.tensor([0.5, 0.5]), 3, n_min=2)


def test_gvm_budgets_hand_values():
    # w_i = 1/sqrt(p + 1e-3/p): 1.4114, 3.0151, 1.0534; free 7 -> shares 1.803, 3.851, 1.346 -> 1+1, 3+1, 1 (+1 each)
    b = gvm_budgets(torch.tensor([0.5, 0.1, 0.9]), torch.ones(3), 10, alpha=1e-3, beta=2.0, n_min=1)
    assert b.tolist() == [3, 5, 2]
    assert gvm_budgets(torch.tensor([0.5, 0.5]), torch.tensor([3.0, 1.0]), 4, n_min=0).tolist() == [3, 1]


def test_max_variance_subset_takes_extremes():
    v = torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0])
    assert max_variance_subset(v, 2).tolist() == [True, True, False, False, False]  # {0, 5}
    assert max_variance_subset(v, 4).tolist() == [True, True, True, True, False]  # drop the middle value 2
    with pytest.raises(ValueError):
        max_variance_subset(v, 1)
