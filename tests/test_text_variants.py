"""The LLM GRPO variants of issue 9, each part's distinctive computation against hand-computed values: DCPO smooth
standardisation, RiskPO papers / MVaR advantages / tracked quantiles, D³S sample and token selection, GTPO conflict
tokens and entropy filter, GRPO-λ reward switching, KDRL's KL to a teacher, the variant dispatch and presets."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.advantages import (
    QuantileTracker,
    RewardStats,
    bundle_quantiles,
    d3s_keep_ratio,
    dcpo_sas_advantages,
    group_max_variance_mask,
    riskpo_advantages,
    riskpo_papers,
    variant_advantages,
)
from flowrl.text_objectives import (
    d3s_token_mask,
    grpo_lambda_rewards,
    gtpo_conflict_mask,
    gtpo_entropy_filter,
    gtpo_token_weights,
    kd_token_kl,
    masked_row_mean,
    text_policy_loss,
)

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ DCPO SAS
def test_dcpo_sas_hand_values_over_three_visits():
    stats = RewardStats(2)
    g = torch.tensor([0, 0])
    p = torch.tensor([0, 0])
    # visit 1: [1, 0] -> A_new = A_total = +-1 (i = 1: SA_total = A_total)
    out = dcpo_sas_advantages(torch.tensor([1.0, 0.0]), g, p, stats, eps=0.0)
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, -1.0]))
    # visit 2: [1, 1] -> A_new = 0 (flat group); history {1,0,1,1}: mu 3/4, sigma sqrt(3)/4, A_total = 1/sqrt(3);
    # i = 2: SA_new = SA_total = A_total / 2
    out = dcpo_sas_advantages(torch.tensor([1.0, 1.0]), g, p, stats, eps=0.0)
    torch.testing.assert_close(out.advantages, torch.full((2,), 0.5 / math.sqrt(3)))
    assert not out.zero_std.any()  # plain GRPO would give zeros here
    # visit 3: [0, 0] -> history {1,0,1,1,0,0}: mu 1/2, sigma 1/2, A_total = -1, A_new = 0;
    # SA_new = 2/3·0 + 1/3·(-1) = -1/3, SA_total = 1/3·0 + 2/3·(-1) = -2/3 -> the smaller magnitude, -1/3
    out = dcpo_sas_advantages(torch.tensor([0.0, 0.0]), g, p, stats, eps=0.0)
    torch.testing.assert_close(out.advantages, torch.full((2,), -1 / 3))
    assert stats.visits.tolist() == [3, 0] and stats.n[0] == 6


def test_dcpo_sas_mixed_group_prefers_smaller_magnitude_and_handles_nan():
    stats = RewardStats(1)
    dcpo_sas_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.zeros(4, dtype=torch.long),
                        torch.zeros(4, dtype=torch.long), stats, eps=0.0)  # visit 1: flat history
    # visit 2: [1, 0, NaN]: A_new = +-1; history {1,1,1,1,1,0}: mu 5/6, sigma sqrt(5)/6
    out = dcpo_sas_advantages(torch.tensor([1.0, 0.0, NAN]), torch.zeros(3, dtype=torch.long),
                              torch.zeros(3, dtype=torch.long), stats, eps=0.0)
    s = math.sqrt(5) / 6
    a_tot = torch.tensor([(1 / 6) / s, (-5 / 6) / s])
    a_new = torch.tensor([1.0, -1.0])
    sa = 0.5 * a_new + 0.5 * a_tot  # i = 2: both mixes are the same
    torch.testing.assert_close(out.advantages, torch.cat([sa, torch.zeros(1)]))
    assert out.valid.tolist() == [True, True, False]
    state = stats.state_dict()
    other = RewardStats(1)
    other.load_state_dict(state)
    assert other.state_dict() == state


# ------------------------------------------------------------------------------------------------ RiskPO
def test_riskpo_papers_take_the_jth_sample_of_each_group():
    r = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0, 5, 5, 5])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    b = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    p = riskpo_papers(r, g, b)
    assert p.scores.tolist() == [2.0, 1.0, 1.0, 0.0, 5.0, 5.0, 5.0]  # bundle 1: one group -> one sample per paper
    assert p.of_sample.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]
    assert p.bundle.tolist() == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="straddles"):
        riskpo_papers(r[:4], g[:4], torch.tensor([0, 0, 1, 1]))
    # unequal groups: papers = the smallest group; the extra sample is in none
    p2 = riskpo_papers(torch.tensor([1.0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1]), torch.zeros(5, dtype=torch.long))
    assert p2.scores.tolist() == [2.0, 1.0] and p2.of_sample.tolist() == [0, 1, -1, 0, 1]


def test_riskpo_mvar_advantages_hand_values():
    # papers [2, 1, 1, 0]; torch.quantile (linear): q_0.25 = 0.75, q_0.75 = 1.25; population std = sqrt(0.5)
    r = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    b = torch.zeros(8, dtype=torch.long)
    out, papers = riskpo_advantages(r, g, b, alpha=0.25, beta=0.75, omega=1.0, eps=0.0)
    torch.testing.assert_close(bundle_quantiles(papers, 0.25), torch.tensor([0.75], dtype=torch.float64))
    # S = 2: g_R = 1.25 - 0.75 - 0.5 = 0, g_C = 0                         -> 0
    # S = 1: g_R = (0.25 - 0 - 0.5)/0.5 = -0.5, g_C = 0 -> (0 - 0.5)/2     -> -0.25/sqrt(0.5)
    # S = 0: g_R = -0.5/0.5 = -1, g_C = -0.75/0.25 = -3 -> (-3 - 1)/2 = -2 -> -2/sqrt(0.5)
    s = math.sqrt(0.5)
    per_paper = torch.tensor([0.0, -0.25 / s, -0.25 / s, -2 / s])
    torch.testing.assert_close(out.advantages, torch.cat([per_paper, per_paper]))
    # omega = 0: RVaR only; given (tracked) quantiles replace the batch ones
    out0, _ = riskpo_advantages(r, g, b, alpha=0.25, beta=0.75, omega=0.0, q_low=0.0, q_high=2.0, eps=0.0)
    # g_R = (S - 0 - 0 + 0 - 2)/0.5 = 2S - 4 -> [0, -2, -2, -4] / sqrt(0.5)
    torch.testing.assert_close(out0.advantages[:4], torch.tensor([0.0, -2.0, -2.0, -4.0]) / s)
    # a flat bundle is divided by 1, not by eps
    flat, _ = riskpo_advantages(torch.zeros(4), torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long),
                                alpha=0.2, beta=0.8, omega=0.0, q_low=0.0, q_high=0.3, eps=1e-6)
    torch.testing.assert_close(flat.advantages, torch.full((4,), -0.3 / 0.6), rtol=1e-5, atol=1e-6)
    assert flat.zero_std.all()


def test_quantile_tracker_warmup_then_stochastic_approximation():
    qt = QuantileTracker((0.25, 0.75), lr=0.1)
    qt.update(torch.tensor([0.0, 1, 1, 2]))
    torch.testing.assert_close(qt.q, torch.tensor([0.75, 1.25], dtype=torch.float64))
    qt.update(torch.tensor([0.0, 0, 0, 2, NAN]))  # F(0.75) = 3/4, F(1.25) = 3/4
    torch.testing.assert_close(qt.q, torch.tensor([0.75 + 0.1 * (0.25 - 0.75), 1.25 + 0.1 * (0.75 - 0.75)],
                                                  dtype=torch.float64))
    other = QuantileTracker((0.25, 0.75))
    other.load_state_dict(qt.state_dict())
    torch.testing.assert_close(other.q, qt.q)


# ------------------------------------------------------------------------------------------------ D³S
def test_d3s_sample_selection_per_group_and_schedule():
    a = torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0, 1.0, 1.0, 3.0])
    g = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    # group 0: k = ceil(0.5·5) = 3 of {0,5,1,4,2}: {0,1,5} and {0,4,5} both have variance 14/3 -> the first split
    # (1 largest + 2 smallest); group 1: k = max(2, 1) = 2 = n -> kept; group 2: a single sample -> kept
    keep = group_max_variance_mask(a, g, 0.5)
    assert keep.tolist() == [True, True, True, False, False, True, True, True]
    assert d3s_keep_ratio(0, 10, 0.5) == 0.5 and d3s_keep_ratio(5, 10, 0.5) == 0.75
    assert d3s_keep_ratio(20, 10, 0.5) == 1.0 and d3s_keep_ratio(5, 10, 0.5, "constant") == 0.5
    with pytest.raises(ValueError):
        group_max_variance_mask(a, g, 0.0)


def test_d3s_token_selection_by_abs_advantage_times_entropy():
    adv = torch.tensor([1.0, -2.0])
    ent = torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.3, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # scores: [0.5, 0.1, 0.3], [0.4, 0.6, (masked)]; N = 5, k = ceil(0.5·5) = 3 -> 0.6, 0.5, 0.4
    keep = d3s_token_mask(adv, ent, mask, 0.5)
    assert keep.tolist() == [[True, False, False], [True, True, False]]
    assert d3s_token_mask(adv, ent, mask, 1.0).tolist() == mask.tolist()


# ------------------------------------------------------------------------------------------------ GTPO
def test_gtpo_conflict_tokens_and_weights():
    ids = torch.tensor([[5, 6, 2, 0], [5, 7, 2, 0], [5, 6, 2, 0], [9, 6, 2, 0], [5, 6, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]] * 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.0, -2.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    c = gtpo_conflict_mask(ids, mask, adv, groups)
    # group 0: rows 0 (+) and 1 (-) share "5" at t=0 and "2" at t=2; row 2 (A = 0) has no conflicts;
    # group 1: rows 3 (-) and 4 (+) share "6" at t=1 and "2" at t=2; the padding column never conflicts
    assert c.tolist() == [[True, False, True, False], [True, False, True, False], [False] * 4,
                          [False, True, True, False], [False, True, True, False]]
    w = gtpo_token_weights(c, adv, mask, conflict_weight=2.0)
    assert w.tolist() == [[2, 1, 2, 0], [0, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 2, 2, 0]]


def test_gtpo_entropy_filter_hand_values():
    adv = torch.tensor([1.0, -1.0, 2.0])
    h = torch.tensor([0.5, 0.8, 0.7])
    a, kept = gtpo_entropy_filter(adv, h, threshold=0.7, coef=0.1)
    torch.testing.assert_close(a, torch.tensor([1.0 - 0.05, 0.0, 2.0 - 0.07]))
    assert kept.tolist() == [True, False, True]
    ent = torch.tensor([[1.0, 3.0, 100.0]])
    assert float(masked_row_mean(ent, torch.tensor([[True, True, False]]))) == 2.0


def test_gtpo_token_weights_in_the_loss():
    """On-policy, bnpo: the per-token loss is -A·w, so a zero weight removes the token's gradient."""
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    w = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    loss, _ = text_policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, loss_type="bnpo",
                               token_weights=w)
    assert float(loss.detach()) == pytest.approx((-2 - 1 + 0 + 1) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.25], [0.0, 0.25]]))


# ------------------------------------------------------------------------------------------------ GRPO-λ
def test_grpo_lambda_switches_the_top_groups_to_the_length_penalty():
    correct = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    lengths = torch.tensor([2, 4, 3, 5, 5, 5, 1, 2, 3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    # ratios 2/3, 1/3, 0; lambda = 1/3 -> ceil(1) = 1 group: group 0. min 2, max 4: l = [0.5, -0.5, 0]
    # correct -> 1 + l, incorrect -> min(0, l); groups 1, 2 keep the 0/1 reward
    r, pen = grpo_lambda_rewards(correct, lengths, groups, top_fraction=1 / 3)
    torch.testing.assert_close(r, torch.tensor([1.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert pen.tolist() == [True] * 3 + [False] * 6
    # lambda = 1: every group; group 1's lengths are equal (l = 0), group 2: l = [0.5, 0, -0.5] -> min(0, l)
    r_all, _ = grpo_lambda_rewards(correct, lengths, groups, top_fraction=1.0)
    torch.testing.assert_close(r_all, torch.tensor([1.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -0.5]))
    r0, pen0 = grpo_lambda_rewards(correct, lengths, groups, top_fraction=0.0)
    torch.testing.assert_close(r0, correct.float())
    assert not pen0.any()


# ------------------------------------------------------------------------------------------------ KDRL
def test_kd_estimators_hand_values():
    lp = torch.log(torch.tensor([0.5]))
    lt = torch.log(torch.tensor([0.25]))
    d = math.log(2)  # logp - logp_T
    assert float(kd_token_kl(lp, lt, "k1")) == pytest.approx(d)
    assert float(kd_token_kl(lp, lt, "k2")) == pytest.approx(0.5 * d * d)
    assert float(kd_token_kl(lp, lt, "k3")) == pytest.approx(math.exp(-d) + d - 1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kd_token_kl(lp, lt, "k4")


def test_kd_term_in_the_loss_with_reward_guided_mask():
    """A = 0, on-policy: the loss is kd_beta · mean over valid tokens of k2, counted on the masked rows only; its
    gradient is kd_beta·(logp - logp_T)/N on those tokens (the k2 gradient of the reverse KL)."""
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_(True)
    teacher = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.25]]))
    mask = torch.tensor([[True, True], [True, False]])
    kd_mask = torch.tensor([True, False])  # e.g. row 0 incorrect, row 1 correct
    loss, st = text_policy_loss(logp, logp.detach(), torch.zeros(2), mask, loss_type="bnpo", teacher_log_prob=teacher,
                                kd_beta=0.1, kd_estimator="k2", kd_mask=kd_mask)
    d = math.log(2)
    assert float(loss.detach()) == pytest.approx(0.1 * (0.5 * d * d) / 3)  # one token with d = ln 2 of 3 valid tokens
    assert float(st["kd"]) == pytest.approx(0.5 * d * d / 2)  # mean over the 2 KD tokens
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.1 * d / 3, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="teacher_log_prob"):
        text_policy_loss(logp, logp.detach(), torch.zeros(2), mask, kd_beta=0.1)


# ------------------------------------------------------------------------------------------------ dispatch, presets
def test_variant_dispatch_and_unknown_names():
    r = {"a": torch.tensor([0.0, 0.0, 1.0, 0.0]), "b": torch.tensor([NAN, NAN, NAN, 0.0])}
    w = {"a": 1.0, "b": 1.0}
    g = torch.tensor([0, 0, 1, 1])
    # ngrpo of the weighted sum [0, 0, 1, 0] (NaN components skipped): group 0 all wrong -> -1/sqrt(2) each
    # (mu 1/3, sigma sqrt(2)/3); group 1 [1, 0] + virtual 1 -> (1/3)/(sqrt(2)/3), (-2/3)/(sqrt(2)/3)
    out = variant_advantages("ngrpo", r, w, g, eps=0.0)
    s = math.sqrt(2) / 3
    torch.testing.assert_close(out.advantages, torch.tensor([-(1 / 3) / s, -(1 / 3) / s, (1 / 3) / s, -(2 / 3) / s]))
    grp = variant_advantages("group", r, w, g, eps=0.0)
    torch.testing.assert_close(grp.advantages, torch.tensor([0.0, 0.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="allowed: group, ngrpo"):
        variant_advantages("dr_grpo", r, w, g)


def test_unknown_variant_names_list_the_allowed_ones():
    from flowrl.cli import build_config
    from flowrl.config import ConfigError

    for flag, allowed in [("--advantage_baseline", "'group', 'ngrpo', 'dcpo', 'spo', 'riskpo'"),
                          ("--token_weighting", "'none', 'gtpo'"), ("--rollout_allocation", "'uniform', 'knapsack'"),
                          ("--prompt_selection", "'uniform', 'vade'"), ("--kd_estimator", "'k1', 'k2', 'k3'"),
                          ("--advantage_variant", "'group', 'ngrpo'")]:
        with pytest.raises(ConfigError, match=allowed):
            build_config(["--modality", "text", flag, "nope"])
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'.*LLM variants: .*gtpo"):
        build_config(["--algorithm", "nope"])
    with pytest.raises(ConfigError, match="choose two different advantages"):
        build_config(["--modality", "text", "--advantage_baseline", "dcpo", "--advantage_variant", "ngrpo"])


def test_llm_presets_set_their_parts_and_show_in_help(capsys):
    from flowrl.cli import build_config, main
    from flowrl.presets import LLM_PRESETS

    expect = {
        "dapo": lambda c: c.text.dynamic_sampling and c.grpo.clip_range_high == 0.28,
        "ngrpo": lambda c: c.grpo.advantage_variant == "ngrpo" and c.modality == "image",
        "dcpo": lambda c: c.text.advantage_baseline == "dcpo" and c.text.token_clip == "dcpo",
        "gtpo": lambda c: c.text.token_weighting == "gtpo" and c.grpo.beta == 0,
        "d3s": lambda c: c.text.sample_selection == "d3s" and c.text.token_selection == "d3s",
        "vade": lambda c: c.text.prompt_selection == "vade",
        "knapsack_rl": lambda c: c.text.rollout_allocation == "knapsack",
        "gvm": lambda c: c.text.rollout_allocation == "gvm",
        "spo": lambda c: c.text.advantage_baseline == "spo" and c.grpo.group_size == 1,
        "riskpo": lambda c: c.text.advantage_baseline == "riskpo",
        "kdrl": lambda c: c.text.teacher_name_or_path == "tiny" and c.text.kd_estimator == "k2",
        "grpo_lambda": lambda c: c.text.reward_shaping == "grpo_lambda",
        "grpo_d": lambda c: c.text.kl_schedule == "linear" and c.text.beta_end == 0.04,
    }
    assert set(expect) == set(LLM_PRESETS)
    for name, check in expect.items():
        cfg = build_config(["--algorithm", name])
        assert check(cfg), name
        assert name == "ngrpo" or cfg.modality == "text"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "LLM variants" in out and all(f"  {n} " in out for n in LLM_PRESETS)
