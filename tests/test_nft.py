"""DiffusionNFT's forward-process loss (flowrl.objectives.nft_loss): values derived by hand in each test."""

import pytest
import torch

from flowrl.objectives import nft_loss


def _one(beta: float):
    """B = 1, two elements: x0 = [1, 0], x_t = [0.5, 0.5], t = 0.5, v_old = 0, v = [0.2, -0.2], A = 2.5 (r = 0.75)."""
    x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    xt = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    v = torch.tensor([[0.2, -0.2]], dtype=torch.float64, requires_grad=True)
    return nft_loss(v, torch.zeros_like(v), xt, x0, torch.tensor(0.5), torch.tensor([2.5]), beta=beta,
                    adv_clip_max=5.0)


def test_value_by_hand_beta_one():
    # v+ = v -> x^+ = x_t - 0.5 v = [0.4, 0.6], err [-0.6, 0.6]: mean sq 0.36 / mean abs 0.6 = 0.6
    # v- = -v -> x^- = [0.6, 0.4], err [-0.4, 0.4]: 0.16 / 0.4 = 0.4
    # L = (0.75 * 0.6 + 0.25 * 0.4) * 5 / 1 = 2.75
    loss, stats = _one(1.0)
    assert float(loss.detach()) == pytest.approx(2.75)
    assert float(stats["nft_pos_loss"]) == pytest.approx(0.6)
    assert float(stats["nft_neg_loss"]) == pytest.approx(0.4)
    assert float(stats["nft_r_mean"]) == pytest.approx(0.75)
    assert float(stats["nft_x0_err"]) == pytest.approx(0.6)


def test_value_by_hand_beta_half():
    # v+ = 0.5 v = [0.1, -0.1] -> err [-0.55, 0.55]: 0.3025 / 0.55 = 0.55
    # v- = -0.5 v -> err [-0.45, 0.45]: 0.45;  L = (0.75 * 0.55 + 0.25 * 0.45) * 5 / 0.5 = 5.25
    loss, _ = _one(0.5)
    assert float(loss.detach()) == pytest.approx(5.25)


def test_on_policy_gradient_is_signed_regression():
    # at v = v_old: dL/dv_b = -2 t_b clip(A_b) (x^_b - x0_b) / (n mean|x^_b - x0_b|) / B
    g = torch.Generator().manual_seed(0)
    B, D = 4, (3, 2, 2)
    x0, eps, v0 = (torch.randn(B, *D, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.3, 0.7], dtype=torch.float64)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    adv = torch.tensor([7.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    for beta in (1.0, 0.3):
        v = v0.clone().requires_grad_()
        loss, _ = nft_loss(v, v0, xt, x0, t, adv, beta=beta, adv_clip_max=5.0)
        loss.backward()
        err = xt - t.view(-1, 1, 1, 1) * v0 - x0
        n = err[0].numel()
        scale = err.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        expected = -2 * t.view(-1, 1, 1, 1) * adv.clamp(-5, 5).view(-1, 1, 1, 1) * err / (n * scale) / B
        torch.testing.assert_close(v.grad, expected)


def test_step_moves_prediction_toward_positive_and_away_from_negative():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    t = torch.tensor(0.6)
    xt = (1 - t) * x0 + t * eps
    v0 = torch.zeros(2, 8)
    v = v0.clone().requires_grad_()
    loss, _ = nft_loss(v, v0, xt, x0, t, torch.tensor([1.0, -1.0]))
    loss.backward()
    v_new = v0 - 0.05 * v.grad
    before = (xt - t * v0 - x0).norm(dim=1)
    after = (xt - t * v_new - x0).norm(dim=1)
    assert after[0] < before[0]  # A > 0: the prediction moves toward the sample
    assert after[1] > before[1]  # A < 0: away from it


def test_zero_advantage_and_masked_rows_give_no_gradient():
    g = torch.Generator().manual_seed(2)
    x0, xt, v0 = (torch.randn(3, 5, generator=g) for _ in range(3))
    v = v0.clone().requires_grad_()
    mask = torch.tensor([True, True, False])
    loss, stats = nft_loss(v, v0, xt, x0, torch.tensor(0.5), torch.tensor([0.0, 2.0, 4.0]), mask=mask)
    loss.backward()
    assert torch.all(v.grad[0] == 0)  # A = 0: r = 1/2, the two sides cancel at v = v_old
    assert torch.all(v.grad[2] == 0)  # masked out
    assert v.grad[1].abs().sum() > 0
    assert float(stats["nft_r_mean"]) == pytest.approx((0.5 + 0.7) / 2)  # valid rows only


def test_bad_input_is_named():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        nft_loss(v, v, v, v, torch.tensor(0.5), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="x0 shape"):
        nft_loss(v, v, v, torch.zeros(2, 4), torch.tensor(0.5), torch.zeros(2))
    with pytest.raises(ValueError, match=r"t must be 0-dim or \[2\]"):
        nft_loss(v, v, v, v, torch.zeros(3), torch.zeros(2))
