"""Token-level objectives of the text adapter, built on :func:`flowrl.objectives.clipped_surrogate`.

The clipped surrogate itself is shared with the image trainer; what is text-only is how the per-token losses
``l_{b,t}`` of a ``[B, L]`` batch are aggregated into one number (TRL's ``loss_type``; ``m`` = completion mask):

- ``grpo``   (DeepSeekMath):  ``(1/B) Σ_b [ Σ_t m·l / Σ_t m ]`` - mean per sequence, then over sequences;
- ``bnpo``:                   ``Σ m·l / Σ m`` over the local batch (each token weighs the same);
- ``dr_grpo`` (Dr. GRPO):     ``Σ m·l / (B · L_max)``, ``L_max`` = ``max_completion_length`` (a constant: no length
  bias);
- ``dapo``   (DAPO token-level): ``Σ m·l / (N_global / n_processes)``, ``N_global`` = masked tokens of the whole
  generation batch over all processes (``num_items_in_batch``). Data-parallel gradient averaging then makes every
  token of the global batch weigh the same.

:func:`clipped_surrogate` returns ``Σ w·m·l / Σ m``; each aggregation is that with per-token weights ``w``
(:func:`token_loss_weights`), so the surrogate (and its stats) is not re-implemented here. The KL term (k3 estimator,
:func:`flowrl.objectives.kl_k3`) is added per token *before* aggregation, as in TRL.

Also here: DCPO's token-prior clip bounds and DAPO's overlong reward shaping (text-only variants).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .objectives import clipped_surrogate, kl_k3

__all__ = [
    "LossType",
    "LOSS_TYPES",
    "aggregate_token_loss",
    "dcpo_clip_bounds",
    "overlong_penalty",
    "text_policy_loss",
    "token_loss_weights",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _normaliser_check(loss_type: str, max_completion_length: int | None, num_items_in_batch: float | Tensor | None):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")


def aggregate_token_loss(
    per_token: Tensor,
    mask: Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    num_processes: int = 1,
) -> Tensor:
    """Aggregate ``[B, L]`` per-token losses into a scalar (formulas in the module docstring).

    Args:
        per_token: ``[B, L]`` float.
        mask: ``[B, L]`` bool or 0/1.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        max_completion_length: ``L_max`` for ``dr_grpo``.
        num_items_in_batch: masked tokens of the global batch for ``dapo`` (default: this batch's, ``Σ m``).
        num_processes: data-parallel processes (``dapo`` divides ``num_items_in_batch`` by it).

    Returns:
        0-dim tensor. Denominators are clamped at 1 (an all-masked batch gives 0, as in TRL).
    """
    _normaliser_check(loss_type, max_completion_length, num_items_in_batch)
    m = mask.to(per_token.dtype)
    s = per_token * m
    if loss_type == "grpo":
        return (s.sum(-1) / m.sum(-1).clamp_min(1.0)).mean()
    if loss_type == "bnpo":
        return s.sum() / m.sum().clamp_min(1.0)
    if loss_type == "dr_grpo":
        return s.sum() / (per_token.shape[0] * max_completion_length)
    n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=per_token.dtype,
                                                                   device=per_token.device)
    return s.sum() / (n.clamp_min(1.0) / num_processes)


def token_loss_weights(
    mask: Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    num_processes: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-token weights ``w [B, L]`` with ``Σ w·m·l / Σ m == aggregate_token_loss(l, m, loss_type, ...)``.

    ``grpo``: ``w_{b,t} = N / (B · n_b)``; ``bnpo``: 1; ``dr_grpo``: ``N / (B · L_max)``; ``dapo``:
    ``N · P / N_global`` (``N = Σ m`` of this batch, ``n_b`` = row b's tokens, ``P`` processes).
    """
    _normaliser_check(loss_type, max_completion_length, num_items_in_batch)
    m = mask.to(dtype)
    N = m.sum().clamp_min(1.0)
    B = m.shape[0]
    if loss_type == "grpo":
        w = N / (B * m.sum(-1, keepdim=True).clamp_min(1.0))
        return w.expand_as(m)
    if loss_type == "bnpo":
        return torch.ones_like(m)
    if loss_type == "dr_grpo":
        return (N / (B * max_completion_length)).expand_as(m)
    n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=dtype, device=m.device)
    return (N * num_processes / n.clamp_min(1.0)).expand_as(m)


def text_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "dapo",
    clip_range: float | Tensor = 0.2,
    clip_range_high: float | Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    num_processes: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on ``[B, L]`` token log-probs: clipped surrogate (+ ``beta``·k3 KL per token), aggregated by
    ``loss_type``. Equals TRL's ``GRPOTrainer`` loss for the same inputs (token-level importance sampling).

    Args:
        log_prob: ``[B, L]`` current log-probs (with grad).
        old_log_prob: ``[B, L]`` sampling-time log-probs.
        advantages: ``[B]`` or ``[B, L]``.
        mask: ``[B, L]`` bool completion mask.
        loss_type, max_completion_length, num_items_in_batch, num_processes: see :func:`aggregate_token_loss`.
        clip_range, clip_range_high: ``eps_low``, ``eps_high`` (DAPO clip-higher: 0.2 / 0.28); floats or ``[B, L]``
            tensors (DCPO, :func:`dcpo_clip_bounds`).
        ref_log_prob: ``[B, L]`` reference log-probs, needed when ``beta > 0``.
        beta: KL weight.

    Returns:
        ``(loss, stats)``: the :func:`clipped_surrogate` stats (token-level, unweighted) plus ``policy_loss``
        (the aggregated surrogate) and ``kl`` (mean k3 over valid tokens) when ``beta > 0``.
    """
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [B, L], got shape {tuple(log_prob.shape)}")
    if mask.shape != log_prob.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != log_prob shape {tuple(log_prob.shape)}")
    dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    m = mask.to(torch.bool)
    w = token_loss_weights(m, loss_type, max_completion_length=max_completion_length,
                           num_items_in_batch=num_items_in_batch, num_processes=num_processes, dtype=dtype)
    policy_loss, stats = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range=clip_range,
                                           clip_range_high=clip_range_high, mask=m, step_weights=w)
    stats.pop("ratio_mean_per_step", None)  # per-position ratios mean little for text
    stats["policy_loss"] = policy_loss.detach()
    loss = policy_loss
    if beta != 0:
        if ref_log_prob is None:
            raise ValueError("beta != 0 needs ref_log_prob")
        kl = kl_k3(log_prob, ref_log_prob)
        kl = torch.where(m, kl, torch.zeros_like(kl))
        loss = loss + beta * aggregate_token_loss(kl, m, loss_type, max_completion_length=max_completion_length,
                                                  num_items_in_batch=num_items_in_batch, num_processes=num_processes)
        stats["kl"] = (kl.detach().sum() / m.sum().clamp_min(1)).to(dtype)
    return loss, stats


def dcpo_clip_bounds(old_log_prob: Tensor, eps_low: float = 0.16, eps_high: float = 0.2, *,
                     max_ratio: float = 10.0) -> tuple[Tensor, Tensor]:
    """DCPO token-prior clip bounds, as per-token ``(clip_range, clip_range_high)`` widths.

    With ``q = π_old(token)``, the ratio is kept in
    ``½ + ½·sqrt(max(1 - 4·eps_low/q, 0)) <= r <= ½ + ½·sqrt(1 + 4·eps_high/q)``: rare tokens (small q) get a
    wider range, confident ones about ``[1 - eps_low, 1 + eps_high]``. The upper bound is capped at ``max_ratio``
    (DCPO's hard cap, 10). Returns widths ``(1 - lower, upper - 1)`` to pass to :func:`text_policy_loss` /
    :func:`~flowrl.objectives.clipped_surrogate` as ``clip_range`` / ``clip_range_high``.

    Args:
        old_log_prob: ``[B, L]`` sampling-time log-probs (``q = exp``).
        eps_low, eps_high: base widths.
        max_ratio: cap on the upper ratio bound.
    """
    q = old_log_prob.detach().float().exp().clamp_min(1e-12)
    lower = 0.5 + 0.5 * torch.sqrt((1 - 4 * eps_low / q).clamp_min(0.0))
    upper = (0.5 + 0.5 * torch.sqrt(1 + 4 * eps_high / q)).clamp_max(max_ratio)
    return 1 - lower, upper - 1


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward (arXiv 2503.14476).

    With ``L_max = max_length`` and cache ``L_c = buffer``: ``0`` if ``|y| <= L_max - L_c``;
    ``penalty · ((L_max - L_c) - |y|) / L_c`` (from 0 down to ``-penalty``) if ``L_max - L_c < |y| <= L_max``;
    ``-penalty`` beyond ``L_max``.

    Args:
        lengths: ``[B]`` completion lengths in tokens.
        max_length: ``L_max`` (typically ``max_new_tokens``).
        buffer: ``L_c`` in ``(0, L_max]``.
        penalty: magnitude of the full punishment (DAPO: 1).

    Returns:
        ``[B]`` float32, in ``[-penalty, 0]``.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer must be in (0, max_length={max_length}], got {buffer}")
    y = lengths.float()
    start = max_length - buffer
    soft = (start - y) / buffer * penalty
    beyond = torch.where(y <= max_length, soft, torch.full_like(y, -penalty))
    return torch.where(y <= start, torch.zeros_like(y), beyond)
