"""Group-relative advantages (Flow-GRPO, arXiv 2505.05470; MixGRPO, arXiv 2507.21802).

All functions are pure: tensors in, tensors out, no state, no python loop over samples.

Conventions
-----------
- A *group* is the set of samples whose rewards are compared with each other: the samples of one prompt, of
  one seed, of one tree node, of one (prompt, step) pair... The caller encodes it as integer ``group_ids``;
  the values are arbitrary labels (they need not be contiguous or sorted).
- A ``NaN`` reward means "not applicable" (e.g. an OCR reward on a prompt without text). Such a sample is
  left out of every statistic, gets advantage exactly 0 and ``valid=False``. Only ``NaN`` has this meaning;
  ``±inf`` is a bug upstream and propagates.
- Standard deviations are *population* ones (divide by n, ``correction=0``), as ``np.std`` in Flow-GRPO's
  reference; a group with a single valid sample therefore has std 0.
- Statistics are computed in float64 (rewards are ``[B]``, so this is free) and advantages returned as float32.
- For ``std_mode="global"`` Flow-GRPO takes the std over the batch gathered from all processes: gather the
  rewards (and group ids) before calling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor

__all__ = [
    "AdvantageOutput",
    "StdMode",
    "MultiRewardMode",
    "group_advantages",
    "multi_reward_advantages",
    "clip_advantages",
    "dynamic_sampling_mask",
    "ngrpo_advantages",
]

StdMode = Literal["group", "global"]
MultiRewardMode = Literal["sum_then_normalize", "normalize_then_sum"]


@dataclass(frozen=True)
class AdvantageOutput:
    """Advantages of one batch and the masks that explain them.

    Attributes:
        advantages: ``[B]`` float32. Exactly 0 where ``zero_std`` or not ``valid``.
        zero_std: ``[B]`` bool. The sample is valid and its group's reward std is 0 (all valid rewards of the
            group are equal, or it has a single valid sample): it contributes nothing to the policy gradient.
        valid: ``[B]`` bool. The sample has a (non-NaN) reward.
    """

    advantages: Tensor
    zero_std: Tensor
    valid: Tensor

    def stats(self) -> dict[str, Tensor]:
        """Detached 0-dim diagnostics: ``zero_std_frac`` (share of valid samples in zero-std groups),
        ``valid_frac`` (share of samples with a reward), ``adv_abs_mean`` (mean |A| over valid samples)."""
        n_valid = self.valid.sum().clamp_min(1).float()
        return {
            "zero_std_frac": (self.zero_std.sum().float() / n_valid).detach(),
            "valid_frac": (self.valid.sum().float() / max(self.valid.numel(), 1)).detach(),
            "adv_abs_mean": (self.advantages.abs().sum() / n_valid).detach(),
        }


def _check_rewards_and_groups(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} must equal rewards shape {tuple(rewards.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_mode: StdMode = "group",
    eps: float = 1e-4,
) -> AdvantageOutput:
    """Group-normalised advantages ``A_i = (r_i - mean_{g(i)}) / (std + eps)`` (Flow-GRPO, Eq. 4).

    ``mean_{g(i)}`` is always the mean of sample i's group. ``std`` is the population std of the group
    (``std_mode="group"``) or of all valid rewards of the batch (``std_mode="global"``, the raw rewards, not
    the group-centred ones, as in Flow-GRPO's ``global_std`` option). Samples in a group whose valid rewards
    are all equal get advantage exactly 0 (in both modes), whatever the floating-point residue of
    ``r - mean`` would have been.

    Args:
        rewards: ``[B]`` float, any float dtype. ``NaN`` = not applicable (excluded, advantage 0, invalid).
        group_ids: ``[B]`` integer labels; equal label = same group.
        std_mode: ``"group"`` or ``"global"``.
        eps: added to the std before dividing (Flow-GRPO: 1e-4).

    Returns:
        :class:`AdvantageOutput` with ``advantages`` ``[B]`` float32, ``zero_std`` and ``valid`` ``[B]`` bool.
    """
    _check_rewards_and_groups(rewards, group_ids)
    if std_mode not in ("group", "global"):
        raise ValueError(f"std_mode must be 'group' or 'global', got {std_mode!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    r = rewards.detach().to(torch.float64)  # fp64: exact enough that equal rewards give equal means
    valid = ~torch.isnan(r)
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # inv: [B] in [0, G)
    n_groups = uniq.numel()

    zeros_g = r.new_zeros(n_groups)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = zeros_g.index_add(0, inv, valid.to(r.dtype))  # [G] valid samples per group
    mean_g = zeros_g.index_add(0, inv, r0) / count.clamp_min(1)
    centred = torch.where(valid, r - mean_g[inv], torch.zeros_like(r))  # [B]

    if std_mode == "group":
        var_g = zeros_g.index_add(0, inv, centred.square()) / count.clamp_min(1)
        std = var_g.sqrt()[inv]  # [B]
    else:
        n = valid.sum().clamp_min(1).to(r.dtype)
        mean_all = r0.sum() / n
        var_all = torch.where(valid, (r - mean_all).square(), torch.zeros_like(r)).sum() / n
        std = var_all.sqrt().expand_as(r)

    # Zero-std groups detected exactly by max == min over their valid rewards.
    big = torch.finfo(r.dtype).max
    gmax = zeros_g.scatter_reduce(0, inv, torch.where(valid, r, torch.full_like(r, -big)), "amax", include_self=False)
    gmin = zeros_g.scatter_reduce(0, inv, torch.where(valid, r, torch.full_like(r, big)), "amin", include_self=False)
    zero_std = valid & (gmax == gmin)[inv]

    adv = centred / (std + eps)
    adv = torch.where(zero_std | ~valid, torch.zeros_like(adv), adv)
    return AdvantageOutput(advantages=adv.to(torch.float32), zero_std=zero_std, valid=valid)


def multi_reward_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    *,
    mode: MultiRewardMode = "sum_then_normalize",
    std_mode: StdMode = "group",
    eps: float = 1e-4,
) -> AdvantageOutput:
    """Advantages from several rewards.

    - ``"sum_then_normalize"`` (Flow-GRPO multi-reward): ``r = sum_k w_k r_k``, then :func:`group_advantages`.
      A ``NaN`` component is skipped for that sample (counts as 0 in the sum); the sample is invalid only if
      all its components are ``NaN``. Applicability is usually per prompt, i.e. the same within a group; if it
      varies inside a group, the skipped components shift that sample's sum.
    - ``"normalize_then_sum"`` (MixGRPO): ``A = sum_k w_k A_k`` with ``A_k`` = :func:`group_advantages` of
      reward k alone (each with its own std, so rewards of different scales weigh by ``w_k`` only). A ``NaN``
      component contributes ``A_k = 0``. ``valid`` = any component valid; ``zero_std`` = valid and every
      valid component is zero-std (the sum is then exactly 0).

    Args:
        rewards: name -> ``[B]`` float rewards (``NaN`` = not applicable).
        weights: name -> weight; must have exactly the keys of ``rewards``.
        group_ids: ``[B]`` integer group labels.
        mode: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        std_mode, eps: as in :func:`group_advantages`.

    Returns:
        :class:`AdvantageOutput` (``advantages`` ``[B]`` float32).
    """
    if not rewards:
        raise ValueError("rewards is empty")
    if set(rewards) != set(weights):
        raise ValueError(f"weights keys {sorted(weights)} must equal rewards keys {sorted(rewards)}")
    names = sorted(rewards)
    for name in names:
        _check_rewards_and_groups(rewards[name], group_ids)

    if mode == "sum_then_normalize":
        stacked = torch.stack([rewards[n].detach().to(torch.float64) for n in names])  # [K, B]
        w = torch.tensor([float(weights[n]) for n in names], dtype=torch.float64, device=stacked.device)
        present = ~torch.isnan(stacked)
        total = (torch.where(present, stacked, torch.zeros_like(stacked)) * w[:, None]).sum(0)
        total = torch.where(present.any(0), total, torch.full_like(total, float("nan")))
        return group_advantages(total, group_ids, std_mode=std_mode, eps=eps)
    if mode == "normalize_then_sum":
        outs = [group_advantages(rewards[n], group_ids, std_mode=std_mode, eps=eps) for n in names]
        adv = sum(float(weights[n]) * o.advantages for n, o in zip(names, outs))
        valid = torch.stack([o.valid for o in outs]).any(0)
        flat = torch.stack([o.zero_std | ~o.valid for o in outs]).all(0)
        return AdvantageOutput(advantages=adv.to(torch.float32), zero_std=valid & flat, valid=valid)
    raise ValueError(f"mode must be 'sum_then_normalize' or 'normalize_then_sum', got {mode!r}")


def clip_advantages(advantages: Tensor, max_abs: float = 5.0) -> Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (Flow-GRPO ``adv_clip_max`` = 5). Any shape and dtype."""
    if max_abs <= 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return advantages.clamp(-max_abs, max_abs)


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, uniq.numel()


def dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling (arXiv 2503.14476): keep the samples of groups whose valid rewards are not all equal.

    For 0/1 correctness rewards this is ``0 < #correct < G``: all-correct and all-wrong groups have zero advantage
    and only dilute the batch; the trainer drops them and samples more prompts to fill it. Groups with no valid
    reward are dropped too.

    Args:
        rewards: ``[B]`` float (``NaN`` = not applicable).
        group_ids: ``[B]`` integer labels.

    Returns:
        ``[B]`` bool: True for every sample (valid or not) of a kept group.
    """
    _check_rewards_and_groups(rewards, group_ids)
    r = rewards.detach().to(torch.float64)
    valid = ~torch.isnan(r)
    inv, n_groups = _group_index(group_ids)
    big = torch.finfo(r.dtype).max
    zeros_g = r.new_zeros(n_groups)
    gmax = zeros_g.scatter_reduce(0, inv, torch.where(valid, r, torch.full_like(r, -big)), "amax", include_self=False)
    gmin = zeros_g.scatter_reduce(0, inv, torch.where(valid, r, torch.full_like(r, big)), "amin", include_self=False)
    return (gmax > gmin)[inv]


def ngrpo_advantages(rewards: Tensor, group_ids: Tensor, *, r_max: float = 1.0, eps: float = 1e-4) -> AdvantageOutput:
    """NGRPO advantage calibration (arXiv 2509.18851): a virtual sample with the maximum reward ``r_max`` joins
    every group's statistics (not the batch).

    With the group's n valid rewards r_1..r_n: ``mu = (Σ r_j + r_max)/(n + 1)``,
    ``sigma² = (Σ (r_j - mu)² + (r_max - mu)²)/(n + 1)`` (population), ``A_i = (r_i - mu)/(sigma + eps)``.
    An all-wrong group (every r < r_max) now gets negative advantages instead of zeros, so failures still teach;
    an all-``r_max`` group keeps sigma = 0 and advantage 0 (``zero_std``). Pair with asymmetric clipping
    (NGRPO: ``eps_low`` 0.16, ``eps_high`` 0.24 via ``clip_range`` / ``clip_range_high``).

    Args:
        rewards: ``[B]`` float (``NaN`` = not applicable: excluded, advantage 0, invalid).
        group_ids: ``[B]`` integer labels.
        r_max: the virtual sample's reward (the reward's maximum; 1 for correctness).
        eps: added to sigma.

    Returns:
        :class:`AdvantageOutput` (``advantages`` ``[B]`` float32).
    """
    _check_rewards_and_groups(rewards, group_ids)
    r = rewards.detach().to(torch.float64)
    valid = ~torch.isnan(r)
    inv, n_groups = _group_index(group_ids)
    zeros_g = r.new_zeros(n_groups)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    n = zeros_g.index_add(0, inv, valid.to(r.dtype)) + 1  # + the virtual sample
    mu = (zeros_g.index_add(0, inv, r0) + r_max) / n
    centred = torch.where(valid, r - mu[inv], torch.zeros_like(r))
    var = (zeros_g.index_add(0, inv, centred.square()) + (r_max - mu) ** 2) / n
    sigma = var.sqrt()
    flat = torch.where(valid, (r != r_max).to(r.dtype), torch.zeros_like(r))
    all_max = zeros_g.index_add(0, inv, flat) == 0  # every valid reward equals r_max (or none valid)
    zero_std = valid & all_max[inv]
    adv = centred / (sigma[inv] + eps)
    adv = torch.where(zero_std | ~valid, torch.zeros_like(adv), adv)
    return AdvantageOutput(advantages=adv.to(torch.float32), zero_std=zero_std, valid=valid)
