"""Token-level GRPO losses: hand-computed aggregations, equality with TRL's GRPOTrainer loss, text-only variants."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from flowrl.objectives import kl_k3, kl_weight_schedule
from flowrl.text_objectives import (
    aggregate_token_loss,
    dcpo_clip_bounds,
    overlong_penalty,
    text_policy_loss,
    token_loss_weights,
)

# two sequences: 3 valid tokens and 1 valid token, L = 4
L_TOK = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # mean per sequence, then over sequences = 3.0
        ("bnpo", {}, (1 + 2 + 3 + 4) / 4),  # all valid tokens = 2.5
        ("dr_grpo", {"max_completion_length": 5}, (1 + 2 + 3 + 4) / (2 * 5)),  # = 1.0
        ("dapo", {"num_items_in_batch": 8}, (1 + 2 + 3 + 4) / 8),  # global token count = 1.25
        ("dapo", {"num_items_in_batch": 8, "num_processes": 2}, (1 + 2 + 3 + 4) / 4),  # per-process share
        ("dapo", {}, (1 + 2 + 3 + 4) / 4),  # default: this batch's tokens
    ],
)
def test_aggregation_hand_values(loss_type, kwargs, expected):
    got = aggregate_token_loss(L_TOK, MASK, loss_type, **kwargs)
    assert float(got) == pytest.approx(expected)
    w = token_loss_weights(MASK, loss_type, **kwargs)
    assert float((w * MASK * L_TOK).sum() / MASK.sum()) == pytest.approx(expected)


def test_aggregation_errors_and_empty():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_token_loss(L_TOK, MASK, "sum")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_token_loss(L_TOK, MASK, "dr_grpo")
    empty = torch.zeros_like(MASK)
    for lt in ("grpo", "bnpo", "dapo"):
        assert float(aggregate_token_loss(L_TOK, empty, lt)) == 0.0


def test_policy_loss_on_policy_hand_value():
    """On-policy (ratio 1): per-token loss is -A; grpo = mean over sequences of -A_b."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1, 0.9], [0.3, 0.3, 0.3, 0.3]])).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    loss, st = text_policy_loss(logp, logp.detach(), adv, MASK, loss_type="grpo", clip_range=0.2)
    assert float(loss.detach()) == pytest.approx((-1.0 + 2.0) / 2)
    assert float(st["ratio_mean"]) == 1.0 and float(st["clipfrac"]) == 0.0
    loss.backward()
    # d loss / d logp_{b,t} = -A_b / (B * n_b) on valid tokens, 0 elsewhere
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_policy_loss_clip_higher_hand_value():
    """One token, A = 1, ratio 1.5: clipped at 1 + eps_high = 1.28 -> loss -1.28."""
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(1.5))
    loss, st = text_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool),
                                loss_type="bnpo", clip_range=0.2, clip_range_high=0.28)
    assert float(loss) == pytest.approx(-1.28)
    assert float(st["clipfrac"]) == 1.0


def test_kl_k3_hand_value():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    # d = ref - logp = log(0.5); exp(d) - d - 1 = 0.5 - log 0.5 - 1
    assert float(kl_k3(logp, ref)) == pytest.approx(0.5 - math.log(0.5) - 1)
    assert float(kl_k3(ref, ref)) == 0.0


def test_policy_loss_kl_added_per_token_before_aggregation():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]))
    adv = torch.zeros(2)
    k = 0.5 - math.log(0.5) - 1
    loss, st = text_policy_loss(logp, logp, adv, MASK, loss_type="grpo", ref_log_prob=ref, beta=0.1)
    assert float(loss) == pytest.approx(0.1 * (k / 3 + 0) / 2)
    assert float(st["kl"]) == pytest.approx(k / 4)
    with pytest.raises(ValueError, match="ref_log_prob"):
        text_policy_loss(logp, logp, adv, MASK, beta=0.1)


def test_dcpo_bounds_hand_values():
    # q = 1: lower = 1/2 + 1/2 sqrt(1 - 4*0.16) = 0.8; upper = 1/2 + 1/2 sqrt(1 + 4*0.2) = 1.1708...
    # q = 0.1: lower = 1/2 (sqrt(max(1 - 6.4, 0)) = 0); upper = 1/2 + 1/2 sqrt(9) = 2.0
    old = torch.log(torch.tensor([[1.0, 0.1]]))
    lo, hi = dcpo_clip_bounds(old, 0.16, 0.2)
    torch.testing.assert_close(lo, torch.tensor([[0.2, 0.5]]))
    torch.testing.assert_close(hi, torch.tensor([[0.5 * math.sqrt(1.8) - 0.5, 1.0]]))
    _, hi_capped = dcpo_clip_bounds(torch.log(torch.tensor([[1e-4]])), 0.16, 0.2, max_ratio=10.0)
    assert float(hi_capped) == pytest.approx(9.0)


def test_overlong_penalty_hand_values():
    # L_max 10, buffer 4: <= 6 -> 0; 8 -> (6 - 8)/4 = -0.5; 10 -> -1; 12 -> -1
    got = overlong_penalty(torch.tensor([3, 6, 8, 10, 12]), 10, 4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 0)


def test_kl_weight_schedule_values():
    assert kl_weight_schedule(0, 10, 0.0, 0.1, "linear") == 0.0
    assert kl_weight_schedule(5, 10, 0.0, 0.1, "linear") == pytest.approx(0.05)
    assert kl_weight_schedule(20, 10, 0.0, 0.1, "linear") == pytest.approx(0.1)
    assert kl_weight_schedule(5, 10, 0.0, 0.1, "cosine") == pytest.approx(0.05)
    assert kl_weight_schedule(5, 10, 0.01, 0.04, "exp") == pytest.approx(0.02)
    assert kl_weight_schedule(7, 10, 0.03, 0.1, "constant") == 0.03


# ------------------------------------------------------------------------------------------------ TRL equality
def _trl_loss(loss_type, logp, old, ref, adv, mask, *, beta, eps_low, eps_high, max_len, num_items):
    """Call TRL's own ``GRPOTrainer._compute_loss`` on a minimal stand-in trainer (eval mode: no grad-accumulation
    scaling), with the per-token log-probs injected where the model forward would produce them."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, L = logp.shape
    acc = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=False), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, L, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(num_items)),
    }
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_equals_trl_grpo_trainer_loss(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    B, L = 6, 7
    old = -torch.rand(B, L, generator=g) * 3
    logp = (old + 0.4 * torch.randn(B, L, generator=g)).requires_grad_(True)  # ratios well outside the clip range
    ref = old + 0.2 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    num_items = int(mask.sum()) + 5  # dapo: as if other micro-batches of the window held 5 more tokens

    logp_trl = logp.detach().clone().requires_grad_(True)
    expected = _trl_loss(loss_type, logp_trl, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=0.28,
                         max_len=10, num_items=num_items)
    ours, _ = text_policy_loss(logp, old, adv, mask, loss_type=loss_type, clip_range=0.2, clip_range_high=0.28,
                               ref_log_prob=ref, beta=beta, max_completion_length=10, num_items_in_batch=num_items)
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-6, atol=1e-7)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(logp.grad, logp_trl.grad, rtol=1e-5, atol=1e-7)
