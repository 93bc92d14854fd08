"""Objectives: expected values derived by hand in each test."""

import math

import pytest
import torch

from flowrl.objectives import (
    clipped_surrogate,
    dynamic_clip_bounds,
    grpo_loss,
    guard_normalized_log_ratio,
    kl_to_reference,
    kl_velocity,
)

STAT_KEYS = {"ratio_mean", "ratio_std", "ratio_min", "ratio_max", "clipfrac", "clipfrac_pos", "clipfrac_neg",
             "approx_kl"}


def f(x: torch.Tensor) -> float:
    return float(x.detach())


def test_on_policy_ratio_is_one():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = clipped_surrogate(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert set(stats) == STAT_KEYS | {"ratio_mean_per_step"}
    assert f(loss) == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)  # -mean(A), each A repeated over 4 steps
    assert f(stats["ratio_mean"]) == 1.0 and f(stats["ratio_min"]) == 1.0 and f(stats["ratio_max"]) == 1.0
    assert f(stats["ratio_std"]) == 0.0
    assert f(stats["clipfrac"]) == 0.0 and f(stats["approx_kl"]) == 0.0
    assert stats["ratio_mean_per_step"].tolist() == [1.0] * 4
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d loss / d logp = -A * ratio / (B*S) = -A / 12
    expected = (-adv[:, None] / 12).expand(3, 4).to(torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def _ratios(values, dtype=torch.float64):
    """log_prob, old_log_prob with exp(log_prob - old) = values."""
    old = torch.linspace(-1.0, 1.0, len(values), dtype=dtype)
    logp = (old + torch.log(torch.tensor(values, dtype=dtype))).requires_grad_()
    return logp, old


def test_clipping_binds_for_positive_and_negative_advantages():
    # eps = 0.2: bounds [0.8, 1.2].
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2   clipped (pos side)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5   unclipped
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5   unclipped
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8   clipped (neg side)
    logp, old = _ratios([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = clipped_surrogate(logp, old, adv, clip_range=0.2)
    assert f(loss) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert f(stats["clipfrac"]) == pytest.approx(0.5)
    assert f(stats["clipfrac_pos"]) == pytest.approx(0.5)
    assert f(stats["clipfrac_neg"]) == pytest.approx(0.5)
    assert f(stats["ratio_mean"]) == pytest.approx(1.0)
    assert f(stats["ratio_std"]) == pytest.approx(0.5)  # population std of {1.5, 0.5, 1.5, 0.5}
    assert f(stats["ratio_min"]) == pytest.approx(0.5) and f(stats["ratio_max"]) == pytest.approx(1.5)
    l1, l2 = math.log(1.5), math.log(0.5)
    assert f(stats["approx_kl"]) == pytest.approx(0.5 * (2 * l1**2 + 2 * l2**2) / 4)
    assert "ratio_mean_per_step" not in stats  # 1-D input
    loss.backward()
    # Clipped elements have zero gradient; unclipped: d/dlogp (-A r) / 4 = -A r / 4.
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5 / 4, 1.5 / 4, 0.0], dtype=torch.float64))


def test_asymmetric_clip_higher():
    # eps_low 0.2, eps_high 0.28: bounds [0.8, 1.28].
    #   A=+1, r=1.25: inside -> -1.25 (would be clipped to -1.2 with symmetric 0.2)
    #   A=+1, r=1.5 : max(-1.5, -1.28) = -1.28  clipped
    #   A=-1, r=0.75: max(0.75, 0.8)  =  0.8    clipped
    logp, old = _ratios([1.25, 1.5, 0.75])
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = clipped_surrogate(logp, old, adv, clip_range=0.2, clip_range_high=0.28)
    assert f(loss) == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    assert f(stats["clipfrac"]) == pytest.approx(2 / 3)
    assert f(stats["clipfrac_pos"]) == pytest.approx(1 / 2)
    assert f(stats["clipfrac_neg"]) == pytest.approx(1.0)
    sym, _ = clipped_surrogate(logp, old, adv, clip_range=0.2)
    assert f(sym) == pytest.approx((-1.2 - 1.2 + 0.8) / 3)


def test_per_sample_clip_range_tensor():
    # Per-sample eps [0.1, 0.3]; both A=+1 with r=1.25: first clipped to 1.1, second inside.
    logp, old = _ratios([1.25, 1.25])
    loss, stats = clipped_surrogate(logp, old, torch.tensor([1.0, 1.0]), clip_range=torch.tensor([0.1, 0.3]))
    assert f(loss) == pytest.approx((-1.1 - 1.25) / 2)
    assert f(stats["clipfrac"]) == pytest.approx(0.5)


def test_mask_ignores_elements_even_if_nonfinite():
    # [2, 3]; valid: (0,0), (0,1), (1,0). log-probs on-policy there; masked ones are inf / NaN.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.0, 0.0, math.inf], [0.0, math.nan, -math.inf]]).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, 2.0])
    loss, stats = clipped_surrogate(logp, old, adv, mask=mask)
    assert f(loss) == pytest.approx(-(1 + 1 + 2) / 3)
    assert f(stats["ratio_mean"]) == pytest.approx(1.0) and f(stats["ratio_max"]) == pytest.approx(1.0)
    assert stats["ratio_mean_per_step"].tolist() == [1.0, 1.0, 0.0]  # step 2: no valid element -> 0
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [-2 / 3, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_per_sample_mask_and_empty_mask():
    logp = torch.zeros(2, 2, requires_grad=True)
    adv = torch.tensor([3.0, 5.0])
    loss, _ = clipped_surrogate(logp, torch.zeros(2, 2), adv, mask=torch.tensor([False, True]))
    assert f(loss) == pytest.approx(-5.0)
    loss, stats = clipped_surrogate(logp, torch.zeros(2, 2), adv, mask=torch.zeros(2, 2, dtype=torch.bool))
    assert f(loss) == 0.0 and loss.requires_grad
    assert f(stats["ratio_min"]) == 1.0 and f(stats["clipfrac"]) == 0.0


def test_step_weights():
    # On-policy, A = [1, -2], S = 3, w = [1, 2, 0.5]:
    # sum_b sum_s w_s (-A_b) = -(1 * 3.5) + 2 * 3.5 = 3.5; mean over 6 elements -> 3.5 / 6.
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    w = torch.tensor([1.0, 2.0, 0.5])
    loss, stats = clipped_surrogate(logp, logp, adv, step_weights=w)
    assert f(loss) == pytest.approx(3.5 / 6)
    loss_full, _ = clipped_surrogate(logp, logp, adv, step_weights=w.expand(2, 3).clone())
    assert f(loss_full) == pytest.approx(3.5 / 6)
    # Weights and mask together: drop step 1 -> (-(1 + 0.5) + 2 * 1.5) / 4 = 1.5 / 4.
    mask = torch.tensor([[True, False, True], [True, False, True]])
    loss_m, _ = clipped_surrogate(logp, logp, adv, step_weights=w, mask=mask)
    assert f(loss_m) == pytest.approx(1.5 / 4)


def test_per_step_advantages_and_stats_per_step():
    # [B=2, S=2] advantages; ratios per step: step 0 -> {2, 1}, step 1 -> {1, 1}. eps large (no clipping).
    logp = torch.log(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    loss, stats = clipped_surrogate(logp, torch.zeros(2, 2), adv, clip_range=10.0)
    assert f(loss) == pytest.approx((-2.0 + 1.0 - 2.0 + 0.0) / 4)
    torch.testing.assert_close(stats["ratio_mean_per_step"], torch.tensor([1.5, 1.0]))


def test_shape_errors():
    with pytest.raises(ValueError):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), step_weights=torch.ones(2))


def test_kl_to_reference_by_hand():
    # Sample 0: diffs (1, 2), std 1 -> mean(1, 4) / (2 * 1) = 2.5 / 2 = 1.25.
    # Sample 1: diffs (-1, -1), std 2 -> mean(1, 1) / (2 * 4) = 0.125.
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).reshape(2, 1, 2, 1)
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 2, 1)
    std = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(kl_to_reference(mean, ref, std), torch.tensor([1.25, 0.125]))
    torch.testing.assert_close(kl_to_reference(mean, ref, std.reshape(2, 1, 1, 1)), torch.tensor([1.25, 0.125]))
    torch.testing.assert_close(kl_to_reference(mean, ref, 1.0), torch.tensor([1.25, 0.5]))
    torch.testing.assert_close(kl_to_reference(mean, ref, std, reduction="sum"), torch.tensor([2.5, 0.25]))
    # Gradient flows to mean only: d/dmean = (mean - ref) / (std^2 * n_elem).
    m = mean.clone().requires_grad_()
    r = ref.clone().requires_grad_()
    kl_to_reference(m, r, std).sum().backward()
    assert r.grad is None
    torch.testing.assert_close(m.grad.flatten(), torch.tensor([0.5, 1.0, -1 / 8, -1 / 8]))


def test_kl_velocity_by_hand():
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    v_ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    torch.testing.assert_close(kl_velocity(v, v_ref), torch.tensor([5.0, 2.0]))  # (1+9)/2, (0+4)/2
    torch.testing.assert_close(kl_velocity(v, v_ref, reduction="sum"), torch.tensor([10.0, 4.0]))


def _gauss_logp_mean(x: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean-reduced Gaussian log-density per sample; s is [B] (written out here, independent of flowrl)."""
    s_e = s.reshape(-1, *([1] * (x.dim() - 1)))
    lp = -((x - mu) ** 2) / (2 * s_e**2) - torch.log(s_e) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, x.dim())))


def test_guard_identity():
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 4, 4)
    old_mean = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    mean = old_mean + delta
    std = torch.tensor([0.5, 1.0, 0.05], dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    x_next = old_mean + std.reshape(3, 1, 1, 1) * eps
    logp = _gauss_logp_mean(x_next, mean, std)
    old_logp = _gauss_logp_mean(x_next, old_mean, std)
    expected = (eps * delta).mean(dim=(1, 2, 3))
    for s in (std, std.reshape(3, 1, 1, 1)):
        got = guard_normalized_log_ratio(logp, old_logp, mean, old_mean, s)
        assert got.shape == (3,) and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The raw log-ratio is shifted by -mean(delta^2)/(2 s^2); the normalised one is not.
    shift = (delta**2).mean(dim=(1, 2, 3)) / (2 * std**2)
    torch.testing.assert_close(logp - old_logp, expected / std - shift, atol=1e-8, rtol=0)
    # On-policy: exactly 0.
    on = guard_normalized_log_ratio(old_logp, old_logp, old_mean, old_mean, std)
    assert (on == 0).all()


def test_guard_identity_sum_reduction_and_step_dim():
    # Batch dims P = [B=2, S=2], element dims E = [5]; sum-reduced log-probs with a scalar std.
    g = torch.Generator().manual_seed(2)
    old_mean = torch.randn(2, 2, 5, generator=g, dtype=torch.float64)
    delta = 0.1 * torch.randn(2, 2, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 2, 5, generator=g, dtype=torch.float64)
    s = 0.2
    x = old_mean + s * eps

    def logp_sum(mu):
        return (-((x - mu) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    got = guard_normalized_log_ratio(logp_sum(old_mean + delta), logp_sum(old_mean), old_mean + delta, old_mean,
                                     s, reduction="sum")
    torch.testing.assert_close(got, (eps * delta).sum(-1), atol=1e-6, rtol=0)


def test_guard_rejects_per_element_std():
    with pytest.raises(ValueError):
        guard_normalized_log_ratio(torch.zeros(2), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3),
                                   torch.ones(2, 3))


def test_dynamic_clip_bounds():
    # A = [-1, 0, 1]: mean 0, population std sqrt(2/3) -> z = [-1, 0, 1] / sqrt(2/3).
    adv = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    lo, hi, k = 1e-4, 3e-4, 2.0
    got = dynamic_clip_bounds(adv, lo, hi, k)
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    z = 1 / math.sqrt(2 / 3)
    expected = [lo + (hi - lo) * sig(-k * z), lo + (hi - lo) * 0.5, lo + (hi - lo) * sig(k * z)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (got >= lo).all() and (got <= hi).all()
    same = dynamic_clip_bounds(torch.zeros(4), lo, hi, k)  # std 0 -> midpoint
    torch.testing.assert_close(same, torch.full((4,), (lo + hi) / 2))
    with pytest.raises(ValueError):
        dynamic_clip_bounds(adv, hi, lo)


def test_grpo_loss_adds_beta_kl():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    loss, stats = grpo_loss(logp, torch.zeros(2, 3), adv, kl=kl, beta=0.04)
    # policy: -mean(A) = -2; kl mean = 2.1 / 6 = 0.35.
    assert f(loss) == pytest.approx(-2.0 + 0.04 * 0.35)
    assert f(stats["kl"]) == pytest.approx(0.35) and f(stats["policy_loss"]) == pytest.approx(-2.0)
    assert STAT_KEYS <= set(stats)
    # Mask: valid (0,0), (1,0), (1,1) -> kl (0.1 + 0.4 + 0.5)/3; policy -(1 + 3 + 3)/3.
    mask = torch.tensor([[True, False, False], [True, True, False]])
    loss, stats = grpo_loss(logp, torch.zeros(2, 3), adv, kl=kl, beta=1.0, mask=mask)
    assert f(stats["kl"]) == pytest.approx(1.0 / 3)
    assert f(loss) == pytest.approx(-7 / 3 + 1 / 3)
    # Per-sample kl [B] with no mask: plain mean.
    _, stats = grpo_loss(logp, torch.zeros(2, 3), adv, kl=torch.tensor([1.0, 2.0]), beta=0.5)
    assert f(stats["kl"]) == pytest.approx(1.5)
    # No kl: no "kl" key; beta != 0 without kl is an error.
    _, stats = grpo_loss(logp, torch.zeros(2, 3), adv)
    assert "kl" not in stats
    with pytest.raises(ValueError):
        grpo_loss(logp, torch.zeros(2, 3), adv, beta=0.1)


def test_bf16_inputs_are_upcast():
    logp = torch.zeros(2, 2, dtype=torch.bfloat16, requires_grad=True)
    loss, stats = clipped_surrogate(logp, logp.detach(), torch.tensor([1.0, 2.0]))
    assert loss.dtype == torch.float32 and stats["ratio_mean"].dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16
