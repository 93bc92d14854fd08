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

Also here, the text-only variants (ALGORITHMS.md, "LLM variants"): DCPO's token-prior clip bounds, DAPO's overlong
reward shaping, GTPO's conflict-token weights and entropy filter, D³S's token selection by ``|A|·H``, GRPO-λ's
length-penalty switching, and KDRL's per-token KL to a teacher (:func:`kd_token_kl`, which works on any ``[B, S]``
log-probs).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .objectives import clipped_surrogate, kl_k3

__all__ = [
    "LossType",
    "LOSS_TYPES",
    "KD_ESTIMATORS",
    "aggregate_token_loss",
    "d3s_token_mask",
    "dcpo_clip_bounds",
    "grpo_lambda_rewards",
    "gtpo_conflict_mask",
    "gtpo_entropy_filter",
    "gtpo_token_weights",
    "kd_token_kl",
    "masked_row_mean",
    "overlong_penalty",
    "text_policy_loss",
    "token_loss_weights",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KD_ESTIMATORS = ("k1", "k2", "k3")


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
    token_weights: Tensor | None = None,
    teacher_log_prob: Tensor | None = None,
    kd_beta: float = 0.0,
    kd_estimator: str = "k2",
    kd_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on ``[B, L]`` token log-probs: clipped surrogate (+ ``beta``·k3 KL per token, + ``kd_beta``·KL to a
    teacher per token), aggregated by ``loss_type``. Equals TRL's ``GRPOTrainer`` loss for the same inputs
    (token-level importance sampling) when the optional variant arguments are left unset.

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
        token_weights: ``[B, L]`` multipliers of the per-token surrogate (not of the KL terms, not renormalised),
            e.g. GTPO's conflict weights (:func:`gtpo_token_weights`).
        teacher_log_prob: ``[B, L]`` a teacher's log-probs of the same tokens (KDRL), needed when ``kd_beta > 0``.
        kd_beta: weight of the KL to the teacher, :func:`kd_token_kl` per token, aggregated like the surrogate.
        kd_estimator: ``k1``, ``k2`` (KDRL's choice) or ``k3``.
        kd_mask: ``[B]`` or ``[B, L]`` bool, where the KD term applies (KDRL's reward-guided masking); masked-out
            tokens count as 0 (the aggregation's normaliser is unchanged). None = everywhere in ``mask``.

    Returns:
        ``(loss, stats)``: the :func:`clipped_surrogate` stats (token-level, unweighted) plus ``policy_loss``
        (the aggregated surrogate), ``kl`` (mean k3 over valid tokens) when ``beta > 0`` and ``kd`` (mean KD
        term over the tokens it applies to) when ``kd_beta > 0``.
    """
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [B, L], got shape {tuple(log_prob.shape)}")
    if mask.shape != log_prob.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != log_prob shape {tuple(log_prob.shape)}")
    dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    m = mask.to(torch.bool)
    w = token_loss_weights(m, loss_type, max_completion_length=max_completion_length,
                           num_items_in_batch=num_items_in_batch, num_processes=num_processes, dtype=dtype)
    if token_weights is not None:
        if token_weights.shape != log_prob.shape:
            raise ValueError(f"token_weights shape {tuple(token_weights.shape)} != log_prob shape "
                             f"{tuple(log_prob.shape)}")
        w = w * token_weights.detach().to(dtype)
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
    if kd_beta != 0:
        if teacher_log_prob is None:
            raise ValueError("kd_beta != 0 needs teacher_log_prob")
        mk = m if kd_mask is None else m & (kd_mask[:, None] if kd_mask.dim() == 1 else kd_mask).to(torch.bool)
        kd = kd_token_kl(log_prob, teacher_log_prob, kd_estimator)
        kd = torch.where(mk, kd, torch.zeros_like(kd))
        loss = loss + kd_beta * aggregate_token_loss(kd, m, loss_type, max_completion_length=max_completion_length,
                                                     num_items_in_batch=num_items_in_batch,
                                                     num_processes=num_processes)
        stats["kd"] = (kd.detach().sum() / mk.sum().clamp_min(1)).to(dtype)
    return loss, stats


def kd_token_kl(log_prob: Tensor, teacher_log_prob: Tensor, estimator: str = "k2") -> Tensor:
    """Per-token estimate of the reverse KL ``KL(pi_theta || pi_T)`` to a teacher on the student's own samples
    (KDRL, arXiv 2506.02208), with ``d = logp - logp_T``:

    - ``k1``: ``d`` (unbiased value, high-variance gradient);
    - ``k2``: ``½·d²`` - KDRL's choice: its gradient ``d·∇logp`` is, in expectation over the student's samples, the
      exact gradient of the reverse KL;
    - ``k3``: ``exp(-d) + d - 1`` (Schulman's, as :func:`flowrl.objectives.kl_k3`).

    Args:
        log_prob: ``[B, L]`` (or any shape) student log-probs, with grad.
        teacher_log_prob: same shape, the teacher's log-probs of the same tokens (constant).
        estimator: ``k1``, ``k2`` or ``k3``.

    Returns:
        Same shape, >= float32.
    """
    if estimator not in KD_ESTIMATORS:
        raise ValueError(f"kd estimator must be one of {', '.join(KD_ESTIMATORS)}, got {estimator!r}")
    if teacher_log_prob.shape != log_prob.shape:
        raise ValueError(f"teacher_log_prob shape {tuple(teacher_log_prob.shape)} != log_prob shape "
                         f"{tuple(log_prob.shape)}")
    dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    d = log_prob.to(dtype) - teacher_log_prob.detach().to(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    return torch.exp(-d) + d - 1


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


def masked_row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` mean of ``x [B, L]`` over each row's True ``mask`` entries (0 for an empty row), float32."""
    m = mask.to(torch.float32)
    return (x.float() * m).sum(-1) / m.sum(-1).clamp_min(1.0)


# ------------------------------------------------------------------------------------------------ GTPO
def gtpo_conflict_mask(completion_ids: Tensor, mask: Tensor, advantages: Tensor, group_ids: Tensor) -> Tensor:
    """GTPO conflict tokens (arXiv 2508.03772): token ``t`` of completion i is a conflict token when the same token id
    stands at the same position t in a completion of the same group whose advantage has the opposite sign.

    The paper's definition, at every position. (The authors' code additionally restricts conflicts to the runs of
    consecutive conflict positions at the start and, aligned on the last token, at the end of the completion.)
    Completions with advantage 0 neither have nor cause conflicts.

    Args:
        completion_ids: ``[B, L]`` long.
        mask: ``[B, L]`` bool, the completion tokens.
        advantages: ``[B]`` float.
        group_ids: ``[B]`` integer labels.

    Returns:
        ``[B, L]`` bool.
    """
    if completion_ids.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != completion_ids shape {tuple(completion_ids.shape)}")
    B = completion_ids.shape[0]
    if advantages.shape != (B,) or group_ids.shape != (B,):
        raise ValueError(f"advantages and group_ids must be [{B}], got {tuple(advantages.shape)}, "
                         f"{tuple(group_ids.shape)}")
    ids, m = completion_ids, mask.to(torch.bool)
    same = (ids[:, None, :] == ids[None, :, :]) & m[:, None, :] & m[None, :, :]  # [B, B, L]
    sign = torch.sign(advantages.detach())
    opposite = (sign[:, None] * sign[None, :] < 0) & (group_ids[:, None] == group_ids[None, :])  # [B, B]
    return (same & opposite[:, :, None]).any(1)


def gtpo_token_weights(conflict: Tensor, advantages: Tensor, mask: Tensor, conflict_weight: float = 2.0) -> Tensor:
    """GTPO per-token weights ``lambda_{i,t}``: a conflict token's negative update is skipped (0) and its positive one
    amplified (``conflict_weight``, the authors' code: 2); every other token 1 (0 outside ``mask``).

    Args:
        conflict: ``[B, L]`` bool (:func:`gtpo_conflict_mask`).
        advantages: ``[B]`` float.
        mask: ``[B, L]`` bool.
        conflict_weight: >= 0.

    Returns:
        ``[B, L]`` float32, to pass as ``token_weights`` to :func:`text_policy_loss`.
    """
    if conflict_weight < 0:
        raise ValueError(f"conflict_weight must be >= 0, got {conflict_weight}")
    a = advantages.detach()[:, None].expand_as(conflict)
    w = torch.ones(conflict.shape, dtype=torch.float32, device=conflict.device)
    w = torch.where(conflict & (a > 0), torch.full_like(w, conflict_weight), w)
    w = torch.where(conflict & (a < 0), torch.zeros_like(w), w)
    return torch.where(mask.to(torch.bool), w, torch.zeros_like(w))


def gtpo_entropy_filter(advantages: Tensor, mean_entropy: Tensor, *, threshold: float = 0.7,
                        coef: float = 0.1) -> tuple[Tensor, Tensor]:
    """GTPO's entropy control: a completion whose mean token entropy exceeds ``threshold`` is filtered out (advantage
    0, no update); the kept ones get ``A - coef·H̄`` (entropy shaping).

    The paper's threshold is "provable"; we take the authors' code values (``ENT_THRESHOLD`` 0.7 nats, about ln 2,
    ``ENT_SCALE`` 0.1) as defaults. ``coef = 0`` is the filter alone.

    Args:
        advantages: ``[B]`` float.
        mean_entropy: ``[B]`` mean entropy (nats) of each completion's tokens under the sampling policy.
        threshold: > 0.
        coef: >= 0.

    Returns:
        ``(advantages [B] float32, kept [B] bool)``.
    """
    if threshold <= 0 or coef < 0:
        raise ValueError(f"need threshold > 0 and coef >= 0, got {threshold}, {coef}")
    h = mean_entropy.detach().float()
    kept = h <= threshold
    a = advantages.detach().float() - coef * h
    return torch.where(kept, a, torch.zeros_like(a)), kept


# ------------------------------------------------------------------------------------------------ D³S tokens
def d3s_token_mask(advantages: Tensor, entropy: Tensor, mask: Tensor, keep: float) -> Tensor:
    """D³S token-level down-sampling (arXiv 2509.22115): keep the ``k = ceil(keep·N)`` of the N valid tokens with the
    largest ``|A_{i,t}|·H_{i,t}`` (advantage magnitude times policy entropy), over the whole batch given (ties: first
    in row-major order).

    Args:
        advantages: ``[B]`` or ``[B, L]`` float.
        entropy: ``[B, L]`` float, the policy entropy at each token (we use the sampling policy's).
        mask: ``[B, L]`` bool, valid tokens.
        keep: fraction in (0, 1].

    Returns:
        ``[B, L]`` bool, a subset of ``mask``.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy shape {tuple(entropy.shape)} != mask shape {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    a = advantages.detach().float()
    a = a[:, None].expand_as(entropy) if a.dim() == 1 else a
    score = torch.where(m, a.abs() * entropy.detach().float(), torch.full_like(entropy, -1.0, dtype=torch.float32))
    n = int(m.sum())
    k = min(n, math.ceil(keep * n - 1e-9))
    flat = score.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[order] = True
    return out.view_as(m) & m


# ------------------------------------------------------------------------------------------------ GRPO-λ
def grpo_lambda_rewards(correct: Tensor, lengths: Tensor, group_ids: Tensor, *,
                        top_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """GRPO-λ's reward switching (arXiv 2505.18086): rank the batch's groups by correctness ratio; the top-λ fraction
    (``ceil(λ·n_groups)`` groups; ties: first in batch order) get a length-penalised reward, the others the plain
    0/1 reward (length-agnostic, protecting reasoning where the group is still failing).

    Length penalty (the paper builds on Kimi-1.5's; this form is our reading): within a group, with
    ``l = 0.5 - (len - min_len)/(max_len - min_len)`` (0 when all lengths are equal), a correct completion gets
    ``1 + l``, an incorrect one ``min(0, l)``.

    Args:
        correct: ``[B]`` bool.
        lengths: ``[B]`` completion lengths (tokens).
        group_ids: ``[B]`` integer labels.
        top_fraction: λ in [0, 1].

    Returns:
        ``(rewards [B] float32, penalised [B] bool)`` - the latter marks samples of the top-λ groups.
    """
    if not 0 <= top_fraction <= 1:
        raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}")
    c = correct.to(torch.bool).cpu()
    ln = lengths.detach().to(torch.float64).cpu()
    g = group_ids.cpu().tolist()
    order: list[int] = []
    rows: dict[int, list[int]] = {}
    for i, gi in enumerate(g):
        if gi not in rows:
            order.append(gi)
        rows.setdefault(gi, []).append(i)
    ratio = torch.tensor([float(c[rows[gi]].float().mean()) for gi in order], dtype=torch.float64)
    n_top = math.ceil(top_fraction * len(order) - 1e-9)
    top = torch.sort(-ratio, stable=True).indices[:n_top].tolist()
    rewards = c.to(torch.float64).clone()
    penalised = torch.zeros(len(g), dtype=torch.bool)
    for k in top:
        r = torch.tensor(rows[order[k]])
        lo, hi = ln[r].min(), ln[r].max()
        lam = 0.5 - (ln[r] - lo) / (hi - lo) if hi > lo else torch.zeros_like(ln[r])
        rewards[r] = torch.where(c[r], 1 + lam, lam.clamp_max(0))
        penalised[r] = True
    return rewards.to(torch.float32).to(correct.device), penalised.to(correct.device)
