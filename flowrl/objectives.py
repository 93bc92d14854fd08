"""Policy objectives: clipped surrogate, KL regularisers, GRPO-Guard ratio normalisation, dynamic clipping.

References: Flow-GRPO (arXiv 2505.05470), DAPO clip-higher (arXiv 2503.14476), GRPO-Guard (arXiv 2510.22319),
TempFlow-GRPO (arXiv 2508.04324), Dynamic-TreeRPO (arXiv 2509.23352). Formulas as written in ``ALGORITHMS.md``.
DiffusionNFT (arXiv 2509.16117), a likelihood-free objective on the forward process: :func:`nft_loss`.

Conventions
-----------
- Log-probs are per *trained step*: ``[B, S]`` (B samples, S trained steps) or flat ``[N]``. They are the
  mean-reduced Gaussian log-probs of the step functions (mean over latent elements), which is what the tiny
  clip ranges (1e-4 .. 2e-6) assume.
- Everything is computed in at least float32 (float64 inputs stay float64), whatever the model dtype.
- ``old_log_prob``, ``advantages`` and ``old_mean`` are treated as constants (detached).
- Losses return ``(loss, stats)``: ``loss`` a 0-dim tensor with grad, ``stats`` a dict of detached tensors
  (0-dim, except ``ratio_mean_per_step`` which is ``[S]``). Tensors rather than python floats so that a
  training step does not force a device sync; call ``float()`` / ``.tolist()`` when logging.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from samplers.steps import dmean_dv

__all__ = [
    "Reduction",
    "clipped_surrogate",
    "kl_to_reference",
    "kl_velocity",
    "guard_normalized_log_ratio",
    "StepWeighting",
    "step_weights",
    "dynamic_clip_bounds",
    "grpo_loss",
    "kl_k3",
    "kl_weight_schedule",
    "nft_loss",
]

Reduction = Literal["mean", "sum"]
StepWeighting = Literal["uniform", "guard", "tempflow"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 when the input is float64 (fp16/bf16 are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _like_advantages(t: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Broadcast a per-sample ``[B]`` (or 0-dim, or full-shape) tensor to the log-prob ``shape``."""
    if t.shape == shape:
        return t
    if t.dim() == 0:
        return t.expand(shape)
    if len(shape) == 2 and t.dim() == 1 and t.shape[0] == shape[0]:
        return t[:, None].expand(shape)
    raise ValueError(f"{name} shape {tuple(t.shape)} does not fit log_prob shape {tuple(shape)} "
                     f"(expected {tuple(shape)}" + (f" or [{shape[0]}])" if len(shape) == 2 else ")"))


def _like_steps(t: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Broadcast per-step weights ``[S]`` (or full-shape) to the log-prob ``shape``."""
    if t.shape == shape:
        return t
    if len(shape) == 2 and t.dim() == 1 and t.shape[0] == shape[1]:
        return t[None, :].expand(shape)
    raise ValueError(f"{name} shape {tuple(t.shape)} does not fit log_prob shape {tuple(shape)} "
                     f"(expected {tuple(shape)}" + (f" or [{shape[1]}])" if len(shape) == 2 else ")"))


def _reduce_trailing(x: Tensor, n_batch_dims: int, reduction: Reduction) -> Tensor:
    """Mean or sum over all dims after the first ``n_batch_dims``."""
    dims = tuple(range(n_batch_dims, x.dim()))
    if not dims:
        return x
    if reduction == "mean":
        return x.mean(dim=dims)
    if reduction == "sum":
        return x.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def clipped_surrogate(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float | Tensor = 1e-4,
    clip_range_high: float | Tensor | None = None,
    mask: Tensor | None = None,
    step_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate (Flow-GRPO Eq. 6; DAPO clip-higher when ``clip_range_high`` is set).

    Per element: ``r = exp(logp - logp_old)``,
    ``l = max(-A·r, -A·clip(r, 1 - eps_low, 1 + eps_high))``, ``eps_low = clip_range``,
    ``eps_high = clip_range_high`` (defaults to ``clip_range``: symmetric).
    ``loss = sum(w · m · l) / sum(m)`` - the mean over valid elements, with step weights as multipliers
    (they are not renormalised: pass weights with mean 1 to keep the loss scale, e.g. TempFlow's
    ``s_i / mean_j s_j``). With no valid element the loss is 0 (still attached to the graph).

    Args:
        log_prob: ``[B, S]`` or ``[N]`` current-policy log-probs (any float dtype; upcast to >= float32).
        old_log_prob: same shape, sampling-time log-probs (detached).
        advantages: ``[B]`` (broadcast over steps) or same shape as ``log_prob`` (per-step advantages).
        clip_range: ``eps_low`` >= 0; a float, or a tensor shaped like ``advantages`` for per-sample bounds
            (see :func:`dynamic_clip_bounds`).
        clip_range_high: ``eps_high``; ``None`` = ``clip_range``.
        mask: bool, same shape as ``log_prob`` or ``[B]``; False elements are ignored everywhere (loss and
            stats), even if their log-probs are inf/NaN (no NaN gradient leaks from them).
        step_weights: ``[S]`` or same shape as ``log_prob``; multiplies the per-element loss (not the stats).

    Returns:
        ``(loss, stats)``. ``loss``: 0-dim. ``stats`` (detached, over valid elements, unweighted):
        ``ratio_mean``, ``ratio_std`` (population), ``ratio_min``, ``ratio_max`` (1.0 when nothing is valid),
        ``clipfrac`` (share of valid elements whose clipped branch binds: A > 0 and r > 1 + eps_high, or A < 0
        and r < 1 - eps_low), ``clipfrac_pos`` / ``clipfrac_neg`` (the same share among valid elements with
        A > 0 / A < 0; 0 when there are none), ``approx_kl`` (mean of ``0.5·(logp - logp_old)²``), and for
        2-D inputs ``ratio_mean_per_step`` ``[S]`` (0 for a step with no valid element).
    """
    shape = log_prob.shape
    if log_prob.dim() not in (1, 2):
        raise ValueError(f"log_prob must be [B, S] or [N], got shape {tuple(shape)}")
    if old_log_prob.shape != shape:
        raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} != log_prob shape {tuple(shape)}")
    dtype = _compute_dtype(log_prob)

    logp = log_prob.to(dtype)
    old = old_log_prob.detach().to(dtype)
    adv = _like_advantages(advantages.detach().to(dtype), shape, "advantages")
    m = (torch.ones(shape, dtype=torch.bool, device=logp.device) if mask is None
         else _like_advantages(mask.to(torch.bool), shape, "mask"))
    w = None if step_weights is None else _like_steps(step_weights.detach().to(dtype), shape, "step_weights")

    def _bound(eps: float | Tensor, name: str) -> float | Tensor:
        if isinstance(eps, Tensor):
            return _like_advantages(eps.detach().to(dtype), shape, name)
        if eps < 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
        return float(eps)

    eps_low = _bound(clip_range, "clip_range")
    eps_high = eps_low if clip_range_high is None else _bound(clip_range_high, "clip_range_high")
    lo, hi = 1 - eps_low, 1 + eps_high
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):  # per-sample bounds: clamp needs two tensors
        lo, hi = (torch.as_tensor(b, dtype=dtype, device=logp.device).expand(shape) for b in (lo, hi))

    # Masked elements get log-ratio 0 *before* exp, so inf/NaN there cannot reach the loss or the gradient.
    log_ratio = torch.where(m, logp - old, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, lo, hi)
    per_elem = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    if w is not None:
        per_elem = per_elem * w
    per_elem = torch.where(m, per_elem, torch.zeros_like(per_elem))
    n_valid = m.sum().clamp_min(1).to(dtype)
    loss = per_elem.sum() / n_valid

    with torch.no_grad():
        mf = m.to(dtype)
        r = ratio.detach()
        any_valid = m.any()
        ratio_mean = (r * mf).sum() / n_valid
        ratio_std = (((r - ratio_mean).square() * mf).sum() / n_valid).sqrt()
        one = torch.ones((), dtype=dtype, device=r.device)
        ratio_min = torch.where(any_valid, torch.where(m, r, torch.full_like(r, math.inf)).amin(), one)
        ratio_max = torch.where(any_valid, torch.where(m, r, torch.full_like(r, -math.inf)).amax(), one)
        pos, neg = m & (adv > 0), m & (adv < 0)
        clip_pos = pos & (r > hi)
        clip_neg = neg & (r < lo)
        stats: dict[str, Tensor] = {
            "ratio_mean": ratio_mean,
            "ratio_std": ratio_std,
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "clipfrac": (clip_pos | clip_neg).sum().to(dtype) / n_valid,
            "clipfrac_pos": clip_pos.sum().to(dtype) / pos.sum().clamp_min(1).to(dtype),
            "clipfrac_neg": clip_neg.sum().to(dtype) / neg.sum().clamp_min(1).to(dtype),
            "approx_kl": (0.5 * log_ratio.detach().square() * mf).sum() / n_valid,
        }
        if log_prob.dim() == 2:
            stats["ratio_mean_per_step"] = (r * mf).sum(0) / mf.sum(0).clamp_min(1)
    return loss, stats


def kl_to_reference(
    mean: Tensor,
    ref_mean: Tensor,
    std: Tensor | float,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Per-sample KL between the policy's and the reference's Gaussian step (Flow-GRPO Eq. 7 as implemented).

    ``KL_b = mean_{elements}( (mean - ref_mean)² / (2·std²) )`` - the KL between ``N(mean, std²)`` and
    ``N(ref_mean, std²)``, averaged over latent elements (``reduction="sum"`` sums them instead).
    No dt factor is applied here: what ``std`` is decides the form. Flow-GRPO passes the SDE's ``sigma_t``
    (not the step std ``s = sigma_t·sqrt(dt)``), i.e. it drops the dt of the exact Gaussian KL on purpose;
    pass ``s`` instead for the exact per-element KL of the step.

    Args:
        mean: ``[B, ...]`` policy step mean (with grad).
        ref_mean: ``[B, ...]`` reference step mean (LoRA disabled); treated as a constant.
        std: ``[B]`` per-sample std (reshaped to broadcast over the element dims), a float, or any tensor
            broadcastable to ``mean``.
        reduction: ``"mean"`` (default) or ``"sum"`` over the non-batch dims.

    Returns:
        ``[B]`` in >= float32.
    """
    if ref_mean.shape != mean.shape:
        raise ValueError(f"ref_mean shape {tuple(ref_mean.shape)} != mean shape {tuple(mean.shape)}")
    dtype = _compute_dtype(mean)
    std_t = torch.as_tensor(std, device=mean.device).to(dtype)
    if std_t.dim() == 1 and mean.dim() > 1 and std_t.shape[0] == mean.shape[0]:
        std_t = std_t.reshape(-1, *([1] * (mean.dim() - 1)))
    diff = mean.to(dtype) - ref_mean.detach().to(dtype)
    return _reduce_trailing(diff.square() / (2 * std_t.square()), 1, reduction)


def kl_velocity(v: Tensor, v_ref: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Per-sample squared velocity distance ``mean_{elements}((v - v_ref)²)`` -> ``[B]`` (>= float32).

    The "KL on velocity" option: proportional to the step KL for samplers whose mean is affine in ``v``
    with a per-sample coefficient, without choosing that coefficient. ``v_ref`` is treated as a constant.
    """
    if v_ref.shape != v.shape:
        raise ValueError(f"v_ref shape {tuple(v_ref.shape)} != v shape {tuple(v.shape)}")
    dtype = _compute_dtype(v)
    return _reduce_trailing((v.to(dtype) - v_ref.detach().to(dtype)).square(), 1, reduction)


def adaptive_lr_scale(scale: float, kl: float, target_kl: float, *, factor: float = 1.5,
                      max_scale: float = 10.0) -> float:
    """Next learning-rate multiplier of the KL-adaptive step-size rule (a trust region on the measured update).

    PPO's adaptive-KL rule (Schulman et al. 2017, Sec. 4) adapts the KL penalty: beta / 2 when ``d < d_targ / 1.5``,
    beta x 2 when ``d > 1.5 d_targ``. Applied to the step size instead, as rsl_rl's PPO ``schedule: adaptive``
    (Rudin et al. 2022) does: the multiplier is divided by ``factor`` when the measured KL of the update ``kl`` exceeds
    ``2 * target_kl``, multiplied by ``factor`` when it is below ``target_kl / 2``, and kept otherwise; the result is
    clamped to ``[1 / max_scale, max_scale]``.

    Args:
        scale: current multiplier (> 0) of the scheduled learning rate.
        kl: measured KL between the policy before and after the last update (>= 0; NaN keeps ``scale``).
        target_kl: the KL per update aimed at (> 0), in ``kl``'s units.
        factor: change per adjustment (> 1).
        max_scale: bound of the multiplier (>= 1).

    Returns:
        The new multiplier, a float in ``[1 / max_scale, max_scale]``.
    """
    if not (target_kl > 0 and factor > 1 and max_scale >= 1 and scale > 0):
        raise ValueError(f"need target_kl > 0, factor > 1, max_scale >= 1, scale > 0; got target_kl={target_kl}, "
                         f"factor={factor}, max_scale={max_scale}, scale={scale}")
    if kl > 2 * target_kl:
        scale = scale / factor
    elif kl < target_kl / 2:
        scale = scale * factor
    return min(max(scale, 1.0 / max_scale), max_scale)


def guard_normalized_log_ratio(
    log_prob: Tensor,
    old_log_prob: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor | float,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """GRPO-Guard ratio normalisation: ``log r̂ = s·( log r + mean((mean - old_mean)²) / (2 s²) )``.

    For the Gaussian step log-prob ``log p(x'|m) = mean(-(x' - m)²/(2s²)) - log s - ½ log 2π`` and a stored
    sample ``x' = old_mean + s·eps``, ``log r = mean(eps·(mean - old_mean))/s - mean((mean - old_mean)²)/(2s²)``:
    the second term is the left shift of the raw log-ratio. Removing it and multiplying by ``s`` gives the
    identity ``log r̂ = mean(eps ⊙ (mean - old_mean))`` (GRPO-Guard), whose spread no longer depends on the
    timestep's noise level. ``reduction`` must match the one used for the log-probs (``"sum"`` replaces every
    mean by a sum). The identity needs the same Gaussian std in both log-probs (Flow-GRPO SDE, DanceGRPO);
    it does not hold for CPS's variance-free log-prob.

    Use it as the log-ratio of :func:`clipped_surrogate`:
    ``clipped_surrogate(log_r_hat, torch.zeros_like(log_r_hat), A, ...)``.

    Args:
        log_prob: ``P`` (e.g. ``[B]`` or ``[B, S]``) current log-probs of the stored ``x'``.
        old_log_prob: ``P``, sampling-time log-probs (detached).
        mean: ``P + E`` (e.g. ``[B, C, H, W]``) current step mean (with grad).
        old_mean: ``P + E``, step mean stored at sampling time (detached).
        std: the step's Gaussian std ``s``, one per sample: a float, shape ``P``, or ``P + (1,)*len(E)``.

    Returns:
        ``P`` normalised log-ratio, >= float32. 0 on the on-policy pass (``mean == old_mean``).
    """
    batch = log_prob.shape
    k = log_prob.dim()
    if old_log_prob.shape != batch:
        raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} != log_prob shape {tuple(batch)}")
    if mean.shape != old_mean.shape or mean.shape[:k] != batch:
        raise ValueError(f"mean {tuple(mean.shape)} / old_mean {tuple(old_mean.shape)} must both be "
                         f"log_prob's shape {tuple(batch)} followed by element dims")
    n_elem_dims = mean.dim() - k
    dtype = _compute_dtype(log_prob)
    std_t = torch.as_tensor(std, device=mean.device).to(dtype)
    if std_t.dim() == 0:
        std_p = std_t.expand(batch)
    elif std_t.shape == batch:
        std_p = std_t
    elif std_t.shape == batch + (1,) * n_elem_dims:
        std_p = std_t.reshape(batch)
    else:
        raise ValueError(f"std shape {tuple(std_t.shape)} must be per sample: {tuple(batch)} or "
                         f"{tuple(batch + (1,) * n_elem_dims)} (a per-element std breaks the identity)")
    std_e = std_p.reshape(batch + (1,) * n_elem_dims)
    shift = _reduce_trailing((mean.to(dtype) - old_mean.detach().to(dtype)).square() / (2 * std_e.square()),
                             k, reduction)
    return std_p * (log_prob.to(dtype) - old_log_prob.detach().to(dtype) + shift)


def step_weights(
    mode: StepWeighting,
    kinds: tuple[str, ...] | list[str],
    sigmas: Tensor,
    sigmas_next: Tensor,
    noise_levels: tuple[float | None, ...] | list[float | None],
    stds: Tensor,
) -> Tensor | None:
    """Per-trained-step loss weights ``[S]``, normalised to mean 1 over the S trained steps (``None`` = uniform).

    * ``"guard"`` (GRPO-Guard gradient reweighting): ``w_i ∝ 1 / |∂mean_i/∂v|`` from
      :func:`samplers.steps.dmean_dv` for step i's kind (Flow-GRPO SDE ``dt·(1 + sigma_t²(1 - sigma)/(2 sigma))``,
      DanceGRPO the same with ``sigma_t = eta``, CPS ``|-(1 - sigma_next)·sigma + sqrt(sigma_next² - sigma_c²)·(1 - sigma)|``).
      The gradient of a step's loss w.r.t. ``v`` carries a factor ``|∂mean/∂v|`` (≈ dt): dividing it out gives every
      step the same say, instead of letting the large-dt (high-noise) steps dominate.
    * ``"tempflow"`` (TempFlow-GRPO noise-aware weighting): ``w_i ∝ s_i``, the step's Gaussian std.

    Normalisation: ``w_i = u_i / mean_j(u_j)`` over the trained steps of the plan. (The reference GRPO-Guard code
    normalises its ``1/dt`` with a schedule-wide constant, ``mean(sqrt(dt))²``: also O(1) weights, but their mean then
    depends on the schedule and on which steps are trained.) Mean 1 keeps the loss scale - hence the
    effective learning rate and the grad-norm clip - equal to uniform weighting, so the option only moves weight
    between steps; it is the same convention for every step kind (``mean(sqrt(dt))²`` has no meaning for CPS) and
    the one TempFlow uses (``s_i / mean_j s_j``). Under a moving window (MixGRPO) the mean is over the current window.

    Args:
        mode: ``"uniform"``, ``"guard"`` or ``"tempflow"`` (one of them: the two reweightings are exclusive).
        kinds, noise_levels: per trained step, its step function name and noise level (a :class:`Rollout`'s).
        sigmas, sigmas_next: ``[S]`` the trained steps' noise levels.
        stds: ``[S]`` the trained steps' Gaussian std ``s_i`` (used by ``"tempflow"``).

    Returns:
        ``[S]`` float32 weights with mean 1, or ``None`` for ``"uniform"``.
    """
    if mode == "uniform":
        return None
    S = len(kinds)
    if mode == "guard":
        d = torch.stack([dmean_dv(kinds[i], float(sigmas[i]), float(sigmas_next[i]), noise_levels[i])
                         for i in range(S)]) if S else torch.zeros(0)
        raw = 1.0 / d.double()
    elif mode == "tempflow":
        raw = torch.as_tensor(stds).detach().double().reshape(-1)
        if raw.shape[0] != S:
            raise ValueError(f"stds must have one value per trained step ({S}), got shape {tuple(stds.shape)}")
    else:
        raise ValueError(f"step weighting must be 'uniform', 'guard' or 'tempflow', got {mode!r}")
    if S == 0:
        return raw.float()
    if not (torch.isfinite(raw).all() and (raw > 0).all()):
        raise ValueError(f"{mode} step weights need a positive finite factor at every trained step, got "
                         f"{raw.tolist()} (steps {list(kinds)})")
    return (raw / raw.mean()).float()


def dynamic_clip_bounds(
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    sensitivity: float = 1.0,
    *,
    norm_eps: float = 1e-8,
) -> Tensor:
    """Dynamic-TreeRPO adaptive clip range, one per sample (the form is *inferred*: no public code).

    ``z = (A - mean(A)) / (std(A) + norm_eps)`` over all elements (population std),
    ``eps_i = eps_low + (eps_high - eps_low)·sigmoid(sensitivity·z_i)``: samples with a high advantage get a
    wider trust region, low-advantage ones a tighter one; ``eps_i`` always lies in ``[eps_low, eps_high]``
    (here ``eps_low`` / ``eps_high`` are the smallest / largest *width*, not the lower / upper side).
    Use it as a symmetric per-sample range: ``clipped_surrogate(..., clip_range=eps_i)``.

    Args:
        advantages: ``[B]`` or ``[B, S]``.
        eps_low, eps_high: range of the clip width, ``0 <= eps_low <= eps_high``.
        sensitivity: slope of the sigmoid; 0 gives the midpoint for everyone.

    Returns:
        Same shape as ``advantages``, >= float32, detached.
    """
    if not 0 <= eps_low <= eps_high:
        raise ValueError(f"need 0 <= eps_low <= eps_high, got {eps_low}, {eps_high}")
    a = advantages.detach().to(_compute_dtype(advantages))
    z = (a - a.mean()) / (a.std(correction=0) + norm_eps)
    return eps_low + (eps_high - eps_low) * torch.sigmoid(sensitivity * z)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
    clip_range: float | Tensor = 1e-4,
    clip_range_high: float | Tensor | None = None,
    mask: Tensor | None = None,
    step_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = clipped_surrogate(...) + beta·mean(kl)`` (Flow-GRPO objective).

    Args:
        log_prob, old_log_prob, advantages, clip_range, clip_range_high, mask, step_weights: as in
            :func:`clipped_surrogate`.
        kl: per-sample or per-element KL, e.g. stacked :func:`kl_to_reference` outputs, ``[B, S]`` or ``[B]``
            (or ``[N]``). Averaged over valid elements of ``mask`` (for ``[B]`` with a 2-D mask: over samples
            with at least one valid step). Not step-weighted (TempFlow leaves the KL unweighted).
        beta: KL weight; must be 0 when ``kl`` is None.

    Returns:
        ``(loss, stats)``: the :func:`clipped_surrogate` stats plus ``policy_loss`` and, when ``kl`` is given,
        ``kl`` (the averaged KL, before ``beta``).
    """
    policy_loss, stats = clipped_surrogate(
        log_prob, old_log_prob, advantages, clip_range=clip_range, clip_range_high=clip_range_high,
        mask=mask, step_weights=step_weights,
    )
    stats["policy_loss"] = policy_loss.detach()
    if kl is None:
        if beta != 0:
            raise ValueError("beta != 0 needs a kl tensor")
        return policy_loss, stats
    kl = kl.to(policy_loss.dtype)
    if mask is None:
        kl_mean = kl.mean()
    else:
        mk = mask.to(torch.bool)
        if kl.dim() == 1 and mk.dim() == 2:
            mk = mk.any(1)
        if mk.shape != kl.shape:
            raise ValueError(f"kl shape {tuple(kl.shape)} does not fit mask shape {tuple(mask.shape)}")
        kl_mean = torch.where(mk, kl, torch.zeros_like(kl)).sum() / mk.sum().clamp_min(1)
    stats["kl"] = kl_mean.detach()
    return policy_loss + beta * kl_mean, stats


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    advantages: Tensor,
    *,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's negative-aware flow-matching loss (arXiv 2509.16117, Eq. 8, in x0 space with the
    self-normalised weight of the public implementations), per forward-noised sample ``x_t = (1 - t) x0 + t eps``.

    The optimality probability of a sample is ``r = 1/2 + clip(A, -A_max, A_max) / (2 A_max)`` in [0, 1]. The
    trained velocity ``v`` defines an implicit positive and negative policy around the sampling policy's ``v_old``:
    ``v+ = (1 - beta) v_old + beta v``, ``v- = (1 + beta) v_old - beta v``. Each predicts a clean image
    ``x^± = x_t - t v±``, and

        ``l± = mean_elements((x^± - x0)²) / sg(mean_elements(|x^± - x0|))``,
        ``L = mean_valid[(r l+ + (1 - r) l-)] · A_max / beta``.

    Positive samples pull ``v+`` toward their own clean image, negative ones pull ``v-`` toward theirs, which pushes
    ``v`` away. At ``v = v_old`` (the first, on-policy pass) the gradient with respect to ``v`` per sample is
    ``-2 t clip(A) (x^ - x0) / (n |x^ - x0|_mean)`` (n = elements per sample): an advantage-signed regression toward
    the sample, whose zero-mean advantages cancel the plain self-fit within each group. ``beta`` sets how far the
    implicit policies move per unit change of ``v`` (a trust-region scale: the loss is quadratic in ``v - v_old``).

    Args:
        v: ``[B, *D]`` trained velocity at ``(x_t, t)`` (``eps - x0`` convention; any float dtype).
        v_old: same shape, the sampling policy's velocity at the same point (a constant; pass ``v.detach()`` on the
            first pass after sampling).
        x_t: ``[B, *D]`` the forward-noised input; x0: ``[B, *D]`` the sampled clean latents.
        t: ``[B]`` or 0-dim noise levels in [0, 1].
        advantages: ``[B]`` (any scale; clipped to ``+-adv_clip_max``).
        beta: > 0. adv_clip_max: ``A_max`` > 0.
        mask: ``[B]`` bool; False rows are left out (zero-std groups).

    Returns:
        ``(loss, stats)``: loss 0-dim; stats ``nft_pos_loss`` / ``nft_neg_loss`` (mean ``l+`` / ``l-`` over valid
        rows), ``nft_r_mean`` (mean r), ``nft_x0_err`` (mean |x^+ - x0| over valid rows).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    for name, x in (("v_old", v_old), ("x_t", x_t), ("x0", x0)):
        if x.shape != v.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} != v shape {tuple(v.shape)}")
    B = v.shape[0]
    dtype = _compute_dtype(v)
    tb = torch.as_tensor(t, device=v.device).to(dtype)
    if tb.dim() == 0:
        tb = tb.expand(B)
    if tb.shape != (B,):
        raise ValueError(f"t must be 0-dim or [{B}], got shape {tuple(tb.shape)}")
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be [{B}], got shape {tuple(advantages.shape)}")
    tb = tb.view(B, *[1] * (v.dim() - 1))
    v, old = v.to(dtype), v_old.detach().to(dtype)
    xt, x0 = x_t.detach().to(dtype), x0.detach().to(dtype)
    r = advantages.detach().to(dtype).clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max) + 0.5
    m = torch.ones(B, dtype=torch.bool, device=v.device) if mask is None else mask.to(torch.bool)

    def side(v_side: Tensor) -> tuple[Tensor, Tensor]:
        err = xt - tb * v_side - x0
        scale = _reduce_trailing(err.detach().abs(), 1, "mean").clamp_min(1e-5)
        return _reduce_trailing(err.square(), 1, "mean") / scale, scale

    l_pos, err_pos = side((1 - beta) * old + beta * v)
    l_neg, _ = side((1 + beta) * old - beta * v)
    per = (r * l_pos + (1 - r) * l_neg) * (adv_clip_max / beta)
    n_valid = m.sum().clamp_min(1).to(dtype)
    loss = torch.where(m, per, torch.zeros_like(per)).sum() / n_valid
    with torch.no_grad():
        mf = m.to(dtype)
        stats = {
            "nft_pos_loss": (l_pos.detach() * mf).sum() / n_valid,
            "nft_neg_loss": (l_neg.detach() * mf).sum() / n_valid,
            "nft_r_mean": (r * mf).sum() / n_valid,
            "nft_x0_err": (err_pos * mf).sum() / n_valid,
        }
    return loss, stats


def kl_k3(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per element: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0).

    Unbiased for samples drawn from ``pi``, always non-negative (GRPO, DeepSeekMath Eq. 4; TRL's per-token KL).
    Works on any log-probs: per token (text) or per step (image). ``ref_log_prob`` is a constant (detached).
    With ``log_prob`` the log-prob of a *teacher*'s sample under the student and ``ref_log_prob`` the teacher's
    own, the same formula estimates the reverse KL to a teacher (KDRL).

    Args:
        log_prob: any shape, with grad.
        ref_log_prob: same shape.

    Returns:
        Same shape, >= float32.
    """
    if ref_log_prob.shape != log_prob.shape:
        raise ValueError(f"ref_log_prob shape {tuple(ref_log_prob.shape)} != log_prob shape {tuple(log_prob.shape)}")
    dtype = _compute_dtype(log_prob)
    d = ref_log_prob.detach().to(dtype) - log_prob.to(dtype)
    return torch.exp(d) - d - 1


def kl_weight_schedule(
    step: int,
    total_steps: int,
    beta_start: float,
    beta_end: float,
    kind: Literal["constant", "linear", "cosine", "exp"] = "linear",
) -> float:
    """KL weight at ``step`` (OThink-MR1 GRPO-D's dynamic KL; the exact curve is not published
    in a form we could check, so the shape is a choice).

    With ``u = clamp(step / total_steps, 0, 1)``: ``constant`` -> ``beta_start``; ``linear`` ->
    ``beta_start + (beta_end - beta_start)·u``; ``cosine`` -> ``beta_end + (beta_start - beta_end)·(1 + cos(pi u))/2``;
    ``exp`` -> geometric interpolation ``beta_start·(beta_end/beta_start)^u`` (both > 0). GRPO-D starts with a small
    weight (exploration) and raises it (exploitation): ``beta_start < beta_end``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if beta_start < 0 or beta_end < 0:
        raise ValueError(f"KL weights must be >= 0, got {beta_start}, {beta_end}")
    u = min(max(step / total_steps, 0.0), 1.0)
    if kind == "constant":
        return float(beta_start)
    if kind == "linear":
        return float(beta_start + (beta_end - beta_start) * u)
    if kind == "cosine":
        return float(beta_end + (beta_start - beta_end) * (1 + math.cos(math.pi * u)) / 2)
    if kind == "exp":
        if beta_start <= 0 or beta_end <= 0:
            raise ValueError("kind='exp' needs beta_start > 0 and beta_end > 0")
        return float(beta_start * (beta_end / beta_start) ** u)
    raise ValueError(f"kind must be 'constant', 'linear', 'cosine' or 'exp', got {kind!r}")
