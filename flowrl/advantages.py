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

import math
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
    "BetaTracker",
    "spo_advantages",
    "spo_decay",
    "vade_select",
    "knapsack_value",
    "knapsack_budgets",
    "gvm_budgets",
    "max_variance_subset",
    "backup_advantages",
    "ADVANTAGE_VARIANTS",
    "variant_advantages",
    "RewardStats",
    "dcpo_sas_advantages",
    "Papers",
    "riskpo_papers",
    "bundle_quantiles",
    "riskpo_advantages",
    "QuantileTracker",
    "group_max_variance_mask",
    "d3s_keep_ratio",
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
    """NGRPO advantage calibration: a virtual sample with the maximum reward ``r_max`` joins
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


def backup_advantages(
    leaf_advantages: Tensor,
    leaf_valid: Tensor,
    leaf_row: Tensor,
    row_node: Tensor,
    node_parent_row: Tensor,
    *,
    row_log_probs: Tensor | None = None,
    node_rule: Literal["mean", "softmax"] = "mean",
) -> tuple[Tensor, Tensor]:
    """Advantages of the transitions (rows) of a branching rollout from the advantages of its leaves.

    Rows are transitions node -> child (``row_node[r]`` is the parent node); a child is either finished into one or
    more leaves (``leaf_row[l] = r``) or is itself a branch node ``n`` (``node_parent_row[n] = r``). Then:

    1. ``A_r = Σ_{l: leaf_row[l] = r, valid} A_l`` - one leaf per row (TempFlow-GRPO, the last tree level): its own
       advantage; several (G²RPO's granularities, each normalised in its own group): their sum, ``A_k = Σ_g A_k^g``.
    2. bottom-up, a row whose child is a node ``n`` takes the aggregate of ``n``'s valid rows (Dynamic-TreeRPO's
       backup): ``"mean"`` (their mean), or ``"softmax"`` (``Σ_c softmax_c(log p_old(c)) A_c`` over the node's
       children, the TreeGRPO rule; ``row_log_probs`` required).

    A row is valid when some valid leaf lies below it; invalid rows get 0.

    Args:
        leaf_advantages: [L] float, already normalised (e.g. :func:`group_advantages` over the leaves' groups).
        leaf_valid: [L] bool.
        leaf_row: [L] long, the row each leaf was finished from.
        row_node: [R] long, parent node of each row.
        node_parent_row: [Nn] long, the row that produced each node, -1 for nodes reached by ODE from a root.
        row_log_probs: [R] sampling log-probs (``"softmax"`` only).
        node_rule: ``"mean"`` or ``"softmax"``.

    Returns:
        ``(advantages [R] float32, valid [R] bool)``.
    """
    if node_rule not in ("mean", "softmax"):
        raise ValueError(f"node_rule must be 'mean' or 'softmax', got {node_rule!r}")
    if node_rule == "softmax" and row_log_probs is None:
        raise ValueError("node_rule='softmax' needs row_log_probs")
    R, Nn = row_node.shape[0], node_parent_row.shape[0]
    a_leaf = leaf_advantages.detach().double()
    a_leaf = torch.where(leaf_valid, a_leaf, torch.zeros_like(a_leaf))
    adv = torch.zeros(R, dtype=torch.float64).index_add(0, leaf_row.cpu(), a_leaf.cpu())
    valid = torch.zeros(R, dtype=torch.long).index_add(0, leaf_row.cpu(), leaf_valid.long().cpu()) > 0
    parent = node_parent_row.cpu().tolist()
    # depth of every node (roots 0), then children before parents
    rn = row_node.cpu().tolist()
    depth = [0] * Nn
    for n in range(Nn):
        d, r = 0, parent[n]
        while r >= 0:
            d, r = d + 1, parent[rn[r]]
        depth[n] = d
    rows_of: list[list[int]] = [[] for _ in range(Nn)]
    for r, n in enumerate(rn):
        rows_of[n].append(r)
    lp = None if row_log_probs is None else row_log_probs.detach().double().cpu()
    for n in sorted(range(Nn), key=lambda i: -depth[i]):
        pr = parent[n]
        if pr < 0:
            continue
        rs = torch.tensor(rows_of[n], dtype=torch.long)
        ok = valid[rs]
        if not bool(ok.any()):
            adv[pr], valid[pr] = 0.0, False
            continue
        if node_rule == "mean":
            adv[pr] = adv[rs][ok].mean()
        else:
            w = torch.softmax(lp[rs][ok], dim=0)
            adv[pr] = (w * adv[rs][ok]).sum()
        valid[pr] = True
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return adv.to(torch.float32).to(leaf_advantages.device), valid.to(leaf_advantages.device)


# ------------------------------------------------------------------------------------------------ per-prompt trackers
class BetaTracker:
    """A Beta(alpha_i, beta_i) belief over each prompt's success probability p_i (rewards in [0, 1]).

    Shared state of SPO's value tracker and VADE's prompt sampler. ``update`` first decays the previous evidence
    toward the prior, ``alpha <- alpha0 + rho·(alpha - alpha0)`` (same for beta; ``rho = 1`` keeps everything,
    ``rho = 0`` forgets everything), then adds the new observations: ``alpha += Σ r``, ``beta += Σ (1 - r)``.

    Args:
        n_prompts: number of prompts tracked (indices 0..n-1).
        alpha0, beta0: prior pseudo-counts (> 0).
    """

    def __init__(self, n_prompts: int, alpha0: float = 1.0, beta0: float = 1.0) -> None:
        if alpha0 <= 0 or beta0 <= 0:
            raise ValueError(f"alpha0 and beta0 must be > 0, got {alpha0}, {beta0}")
        self.alpha0, self.beta0 = float(alpha0), float(beta0)
        self.alpha = torch.full((n_prompts,), self.alpha0, dtype=torch.float64)
        self.beta = torch.full((n_prompts,), self.beta0, dtype=torch.float64)

    def mean(self, idx: Tensor | None = None) -> Tensor:
        """``alpha / (alpha + beta)`` (the value estimate), for ``idx`` or all prompts."""
        a, b = (self.alpha, self.beta) if idx is None else (self.alpha[idx], self.beta[idx])
        return a / (a + b)

    def update(self, idx: Tensor, rewards: Tensor, rho: float | Tensor = 1.0) -> None:
        """Decay prompts ``idx`` (once each, ``rho`` scalar or per entry of ``idx``), then add ``rewards`` (``[n]``
        in [0, 1], several per prompt allowed; NaN skipped)."""
        idx = idx.long().cpu()
        r = rewards.detach().to(torch.float64).cpu()
        rho_t = torch.as_tensor(rho, dtype=torch.float64).expand(idx.shape).clone()
        uniq, first = _first_occurrence(idx)
        rho_u = rho_t[first]
        self.alpha[uniq] = self.alpha0 + rho_u * (self.alpha[uniq] - self.alpha0)
        self.beta[uniq] = self.beta0 + rho_u * (self.beta[uniq] - self.beta0)
        ok = ~torch.isnan(r)
        self.alpha.index_add_(0, idx[ok], r[ok])
        self.beta.index_add_(0, idx[ok], 1 - r[ok])

    def state_dict(self) -> dict[str, Tensor]:
        return {"alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self.alpha, self.beta = sd["alpha"].clone(), sd["beta"].clone()


def _first_occurrence(idx: Tensor) -> tuple[Tensor, Tensor]:
    """Unique values of ``idx`` and the position of each one's first occurrence."""
    uniq, inv = torch.unique(idx, return_inverse=True)
    pos = torch.arange(idx.numel())
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long).scatter_reduce(0, inv, pos, "amin")
    return uniq, first


def spo_decay(kl: Tensor | float, d_half: float, rho_min: float = 0.875, rho_max: float = 0.96) -> Tensor:
    """SPO's KL-adaptive forgetting factor: ``rho = clamp(2^(-D / D_half), rho_min, rho_max)``,
    D = KL between the current policy and the one that last saw the prompt: the more the policy moved, the more
    of the old evidence is forgotten."""
    if d_half <= 0:
        raise ValueError(f"d_half must be > 0, got {d_half}")
    d = torch.as_tensor(kl, dtype=torch.float64)
    return torch.exp2(-d / d_half).clamp(rho_min, rho_max)


def spo_advantages(tracker: BetaTracker, prompt_idx: Tensor, rewards: Tensor, *, rho: float | Tensor = 1.0,
                   normalize: bool = True, eps: float = 1e-4) -> Tensor:
    """SPO single-stream advantages (one sample per prompt, no group): ``A_i = r_i - v(prompt_i)`` with
    ``v = alpha/(alpha+beta)`` of the tracker *before* this batch, then normalised over the batch
    (``(A - mean)/(std + eps)``, population std) when ``normalize``; finally the tracker is updated with decay
    ``rho`` (:func:`spo_decay`). NaN rewards give advantage 0 and are not tracked.

    Returns:
        ``[B]`` float32.
    """
    r = rewards.detach().to(torch.float64).cpu()
    idx = prompt_idx.long().cpu()
    adv = r - tracker.mean(idx)
    ok = ~torch.isnan(adv)
    if normalize and ok.any():
        a = adv[ok]
        adv[ok] = (a - a.mean()) / (a.std(correction=0) + eps)
    adv = torch.where(ok, adv, torch.zeros_like(adv))
    tracker.update(idx, r, rho)
    return adv.to(torch.float32).to(rewards.device)


def vade_select(tracker: BetaTracker, k: int, generator: torch.Generator | None = None) -> Tensor:
    """VADE prompt selection (variance-aware dynamic sampling): Thompson-sample
    ``p~_i ~ Beta(alpha_i, beta_i)`` for every prompt and take the k prompts with the largest ``p~(1 - p~)`` (the
    expected reward variance, i.e. the expected GRPO signal). Decay the tracker between steps
    (``BetaTracker.update`` with ``rho < 1``) so stale beliefs fade.

    Returns:
        ``[k]`` long prompt indices, best first.
    """
    n = tracker.alpha.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    # Beta(a, b) = Ga / (Ga + Gb) with Gamma draws; torch._standard_gamma takes no generator, so draw via numpy
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    rng = __import__("numpy").random.default_rng(seed)
    p = torch.from_numpy(rng.beta(tracker.alpha.numpy(), tracker.beta.numpy()))
    return torch.topk(p * (1 - p), k).indices


def knapsack_value(n: Tensor | int, p: Tensor | float) -> Tensor:
    """Knapsack-RL value of giving a prompt with success rate p a budget of n rollouts:
    ``[1 - p^n - (1 - p)^n] · p(1 - p)²`` - the chance that the group has a non-zero gradient (not all equal)
    times the information gain of the prompt."""
    n_t = torch.as_tensor(n, dtype=torch.float64)
    p_t = torch.as_tensor(p, dtype=torch.float64)
    return (1 - p_t**n_t - (1 - p_t) ** n_t) * p_t * (1 - p_t) ** 2


def knapsack_budgets(p: Tensor, total: int, *, n_min: int = 2, n_max: int | None = None) -> Tensor:
    """Knapsack-RL rollout allocation: maximise ``Σ_i knapsack_value(n_i, p_i)`` subject to
    ``Σ n_i = total``, ``n_min <= n_i <= n_max``, by dynamic programming over (prompt, budget used).

    Args:
        p: ``[P]`` estimated success rates (e.g. :class:`BetaTracker` means).
        total: total rollouts; needs ``P·n_min <= total <= P·n_max``.
        n_min, n_max: per-prompt bounds (``n_max`` None = ``total``).

    Returns:
        ``[P]`` long budgets summing to ``total``. Ties go to the earliest prompts.
    """
    P = p.numel()
    n_max = total if n_max is None else n_max
    if not (0 <= n_min <= n_max) or not (P * n_min <= total <= P * n_max):
        raise ValueError(f"infeasible: {P} prompts, budgets in [{n_min}, {n_max}], total {total}")
    import numpy as np

    ns = list(range(n_min, n_max + 1))
    vals = knapsack_value(torch.tensor(ns)[None, :], p.detach().to(torch.float64).cpu()[:, None]).numpy()  # [P, K]
    best = np.full((P + 1, total + 1), -np.inf)
    choice = np.zeros((P + 1, total + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for i in range(1, P + 1):  # vectorised over the budget b; n in increasing order, strict > keeps the smallest n
        for j, n in enumerate(ns):
            cand = np.full(total + 1, -np.inf)
            cand[n:] = best[i - 1, : total + 1 - n] + vals[i - 1, j]
            better = cand > best[i] + 1e-15
            best[i] = np.where(better, cand, best[i])
            choice[i] = np.where(better, n, choice[i])
    out, b = torch.zeros(P, dtype=torch.long), total
    for i in range(P, 0, -1):
        out[i - 1] = int(choice[i, b])
        b -= int(choice[i, b])
    return out


def gvm_budgets(p: Tensor, grad_norms: Tensor, total: int, *, alpha: float = 1e-3, beta: float = 2.0,
                n_min: int = 1) -> Tensor:
    """GVM-RAFT sample allocation: ``n_i ∝ G_i / sqrt(p_i + alpha / p_i^(beta - 1))`` with G_i
    the prompt's gradient-norm estimate and p_i its acceptance (success) rate - more samples where gradients are
    large and successes rare. Rounded by largest remainder to sum to ``total``, at least ``n_min`` each.

    Returns:
        ``[P]`` long budgets summing to ``total``.
    """
    P = p.numel()
    if total < P * n_min:
        raise ValueError(f"total {total} < {P} prompts x n_min {n_min}")
    pp = p.detach().to(torch.float64).cpu().clamp_min(1e-6)
    w = grad_norms.detach().to(torch.float64).cpu() / torch.sqrt(pp + alpha / pp ** (beta - 1))
    free = total - P * n_min
    share = w / w.sum() * free if w.sum() > 0 else torch.full((P,), free / P, dtype=torch.float64)
    base = share.floor().long()
    rest = free - int(base.sum())
    order = torch.argsort(share - base, descending=True, stable=True)
    base[order[:rest]] += 1
    return base + n_min


def max_variance_subset(values: Tensor, k: int) -> Tensor:
    """D³S sample-level selection: the k of n values whose (population) variance is largest. Such a subset is
    always the j largest plus the k - j smallest values for some j (extremes); all k + 1 splits are tried.

    Args:
        values: ``[n]`` (e.g. one group's advantages).
        k: subset size, ``2 <= k <= n``.

    Returns:
        ``[n]`` bool mask of the chosen samples (ties: the earliest split and stable sort order).
    """
    n = values.numel()
    if not 2 <= k <= n:
        raise ValueError(f"k must be in [2, {n}], got {k}")
    v = values.detach().to(torch.float64)
    order = torch.argsort(v, stable=True)
    best, best_mask = -1.0, None
    for j in range(k + 1):  # j largest, k - j smallest
        idx = torch.cat([order[: k - j], order[n - j :]]) if j else order[:k]
        var = float(v[idx].var(correction=0))
        if var > best + 1e-15:
            best = var
            best_mask = torch.zeros(n, dtype=torch.bool)
            best_mask[idx] = True
    return best_mask


# ------------------------------------------------------------------------------------------------ variant dispatch
ADVANTAGE_VARIANTS = ("group", "ngrpo")
"""Advantage variants selectable by name for both modalities (``grpo.advantage_variant``): Flow-GRPO's group
normalisation, NGRPO's virtual-r_max calibration."""


def variant_advantages(
    variant: str,
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    *,
    std_mode: StdMode = "group",
    mode: MultiRewardMode = "sum_then_normalize",
    r_max: float = 1.0,
    eps: float = 1e-4,
) -> AdvantageOutput:
    """Advantages of the named modality-agnostic variant, the one entry point both trainers dispatch through.

    - ``"group"``: :func:`multi_reward_advantages` (one reward: :func:`group_advantages` of ``w·r``).
    - ``"ngrpo"``: :func:`ngrpo_advantages` of the weighted sum ``Σ_k w_k r_k`` (a NaN component is skipped; a
      sample whose components are all NaN stays NaN, i.e. invalid), with the virtual reward ``r_max``. NGRPO
      needs one scalar reward, so ``mode`` does not apply.

    Args:
        variant: one of :data:`ADVANTAGE_VARIANTS`.
        rewards, weights: name -> ``[B]`` rewards / weight (same keys).
        group_ids: ``[B]`` integer labels.
        std_mode, mode, eps: as in :func:`multi_reward_advantages` (``std_mode``/``mode`` for ``"group"`` only).
        r_max: NGRPO's virtual reward.

    Returns:
        :class:`AdvantageOutput`.
    """
    if variant not in ADVANTAGE_VARIANTS:
        raise ValueError(f"unknown advantage variant {variant!r}; allowed: {', '.join(ADVANTAGE_VARIANTS)}")
    if variant == "group":
        return multi_reward_advantages(rewards, weights, group_ids, mode=mode, std_mode=std_mode, eps=eps)
    if set(rewards) != set(weights) or not rewards:
        raise ValueError(f"weights keys {sorted(weights)} must equal rewards keys {sorted(rewards)} (non-empty)")
    stacked = torch.stack([rewards[n].detach().to(torch.float64) * float(weights[n]) for n in sorted(rewards)])
    present = ~torch.isnan(stacked)
    total = torch.where(present, stacked, torch.zeros_like(stacked)).sum(0)
    total = torch.where(present.any(0), total, torch.full_like(total, float("nan")))
    return ngrpo_advantages(total, group_ids, r_max=r_max, eps=eps)


# ------------------------------------------------------------------------------------------------ DCPO SAS
class RewardStats:
    """Cumulative reward statistics of each prompt over all its visits (DCPO's smooth advantage standardisation).

    Per prompt: ``visits`` (training steps that sampled it), ``n`` (rewards seen), ``sum``, ``sumsq`` (float64) and
    the min / max reward (so "all rewards equal" is decided exactly). The mean and the population std of *all* the
    prompt's rewards so far follow exactly. (The reference code pools per-visit mean/std with equal weight per
    visit, which is the same thing when every visit has the same group size.)

    Args:
        n_prompts: prompts tracked (indices 0..n-1).
    """

    def __init__(self, n_prompts: int) -> None:
        self.visits = torch.zeros(n_prompts, dtype=torch.long)
        self.n = torch.zeros(n_prompts, dtype=torch.float64)
        self.sum = torch.zeros(n_prompts, dtype=torch.float64)
        self.sumsq = torch.zeros(n_prompts, dtype=torch.float64)
        self.min = torch.full((n_prompts,), math.inf, dtype=torch.float64)
        self.max = torch.full((n_prompts,), -math.inf, dtype=torch.float64)

    def update(self, prompt_idx: Tensor, rewards: Tensor) -> None:
        """One visit of each distinct prompt in ``prompt_idx`` ([B] long), adding its valid (non-NaN) rewards."""
        idx = prompt_idx.long().cpu()
        r = rewards.detach().to(torch.float64).cpu()
        ok = ~torch.isnan(r)
        uniq = torch.unique(idx)
        self.visits[uniq] += 1
        i, v = idx[ok], r[ok]
        self.n.index_add_(0, i, torch.ones_like(v))
        self.sum.index_add_(0, i, v)
        self.sumsq.index_add_(0, i, v * v)
        self.min.scatter_reduce_(0, i, v, "amin")
        self.max.scatter_reduce_(0, i, v, "amax")

    def mean_std(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, population std, flat)`` of prompts ``idx``; ``flat`` = all their rewards are equal (std 0)."""
        n = self.n[idx].clamp_min(1)
        mean = self.sum[idx] / n
        var = (self.sumsq[idx] / n - mean.square()).clamp_min(0)
        flat = ~(self.max[idx] > self.min[idx])
        return mean, torch.where(flat, torch.zeros_like(var), var.sqrt()), flat

    def state_dict(self) -> dict[str, list]:
        return {k: getattr(self, k).tolist() for k in ("visits", "n", "sum", "sumsq", "min", "max")}

    def load_state_dict(self, sd: Mapping[str, list]) -> None:
        for k in ("visits", "n", "sum", "sumsq", "min", "max"):
            setattr(self, k, torch.tensor(sd[k], dtype=getattr(self, k).dtype))


def _group_flat_stats(r: Tensor, valid: Tensor, inv: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ``(mean, population std, flat)`` of the valid values of ``r`` (float64); ``flat`` = all equal."""
    zeros_g = r.new_zeros(n_groups)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    cnt = zeros_g.index_add(0, inv, valid.to(r.dtype))
    mu = zeros_g.index_add(0, inv, r0) / cnt.clamp_min(1)
    centred = torch.where(valid, r - mu[inv], torch.zeros_like(r))
    std = (zeros_g.index_add(0, inv, centred.square()) / cnt.clamp_min(1)).sqrt()
    big = torch.finfo(r.dtype).max
    gmax = zeros_g.scatter_reduce(0, inv, torch.where(valid, r, torch.full_like(r, -big)), "amax", include_self=False)
    gmin = zeros_g.scatter_reduce(0, inv, torch.where(valid, r, torch.full_like(r, big)), "amin", include_self=False)
    return mu, std, ~(gmax > gmin)


def dcpo_sas_advantages(rewards: Tensor, group_ids: Tensor, prompt_idx: Tensor, stats: RewardStats, *,
                        eps: float = 1e-4) -> AdvantageOutput:
    """DCPO smooth advantage standardisation (SAS, arXiv 2509.02333; lime-RL/DCPO ``compute_dcpo_outcome_advantage``).

    For sample j of prompt q at its i-th visit (i counts this one):
    ``A_new = (r_j - mu_new)/(sigma_new + eps)`` with this step's group statistics, and
    ``A_total = (r_j - mu_total)/(sigma_total + eps)`` with the statistics of *all* q's rewards so far (this step
    included, ``stats`` is updated first). Either is 0 when its std is 0. Then
    ``SA_new = (i-1)/i · A_new + 1/i · A_total``, ``SA_total = 1/i · A_new + (i-1)/i · A_total``, and the advantage is
    the one of smaller magnitude (``SA_new`` only when strictly smaller, as in the reference). An all-correct or
    all-wrong group thus still gets a (damped) signal whenever the prompt's history has varied. Population stds
    (flowrl's convention; the reference mixes unbiased per-step and pooled stds).

    Args:
        rewards: ``[B]`` float (NaN = not applicable: advantage 0, invalid, not tracked).
        group_ids: ``[B]`` integer labels (one group = one prompt's samples of this step).
        prompt_idx: ``[B]`` long, the dataset index of each sample's prompt (the key of ``stats``).
        stats: :class:`RewardStats`, updated in place (one visit per distinct prompt).
        eps: added to the stds.

    Returns:
        :class:`AdvantageOutput`; ``zero_std`` = valid and both the group and the prompt's history are flat.
    """
    _check_rewards_and_groups(rewards, group_ids)
    if prompt_idx.shape != rewards.shape:
        raise ValueError(f"prompt_idx shape {tuple(prompt_idx.shape)} must equal rewards shape {tuple(rewards.shape)}")
    r = rewards.detach().to(torch.float64).cpu()
    valid = ~torch.isnan(r)
    inv, n_groups = _group_index(group_ids.cpu())
    mu_g, sd_g, flat_g = _group_flat_stats(r, valid, inv, n_groups)
    idx = prompt_idx.long().cpu()
    stats.update(idx, r)
    mu_t, sd_t, flat_t = stats.mean_std(idx)
    a_new = torch.where(flat_g[inv], torch.zeros_like(r), (r - mu_g[inv]) / (sd_g[inv] + eps))
    a_tot = torch.where(flat_t, torch.zeros_like(r), (r - mu_t) / (sd_t + eps))
    i = stats.visits[idx].to(torch.float64)
    sa_new = (i - 1) / i * a_new + a_tot / i
    sa_tot = a_new / i + (i - 1) / i * a_tot
    adv = torch.where(sa_new.abs() < sa_tot.abs(), sa_new, sa_tot)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    zero_std = valid & flat_g[inv] & flat_t
    dev = rewards.device
    return AdvantageOutput(advantages=adv.to(torch.float32).to(dev), zero_std=zero_std.to(dev), valid=valid.to(dev))


# ------------------------------------------------------------------------------------------------ RiskPO
@dataclass(frozen=True)
class Papers:
    """RiskPO's "papers": within a bundle of B prompts, paper j takes the j-th sample of every prompt.

    Attributes:
        scores: ``[P]`` float64, the sum of the paper's rewards (NaN when one of them is NaN).
        bundle: ``[P]`` long, bundle index 0..n_bundles-1 of each paper.
        of_sample: ``[N]`` long, each sample's paper, -1 for samples in none (a bundle's papers number its
            smallest group).
        n_bundles: number of bundles.
    """

    scores: Tensor
    bundle: Tensor
    of_sample: Tensor
    n_bundles: int


def riskpo_papers(rewards: Tensor, group_ids: Tensor, bundle_ids: Tensor) -> Papers:
    """Build RiskPO's papers (bundling, arXiv 2510.00911; RTkenny/RiskPO, "papers without replacement"): in each
    bundle, group k's samples are taken in batch order and the j-th of every group forms paper j; a bundle has as
    many papers as its smallest group.

    Args:
        rewards: ``[N]`` float (NaN allowed).
        group_ids: ``[N]`` integer group (prompt) labels.
        bundle_ids: ``[N]`` integer bundle labels; all samples of a group must share one bundle.

    Returns:
        :class:`Papers`.
    """
    _check_rewards_and_groups(rewards, group_ids)
    if bundle_ids.shape != group_ids.shape:
        raise ValueError(f"bundle_ids shape {tuple(bundle_ids.shape)} must equal group_ids shape "
                         f"{tuple(group_ids.shape)}")
    r = rewards.detach().to(torch.float64).cpu()
    g, bnd = group_ids.cpu().tolist(), bundle_ids.cpu().tolist()
    members: dict[int, dict[int, list[int]]] = {}
    bundle_of: dict[int, int] = {}
    for i, (gi, bi) in enumerate(zip(g, bnd)):
        if bundle_of.setdefault(gi, bi) != bi:
            raise ValueError(f"group {gi} straddles bundles {bundle_of[gi]} and {bi}")
        members.setdefault(bi, {}).setdefault(gi, []).append(i)
    of = torch.full((r.numel(),), -1, dtype=torch.long)
    scores, bundle = [], []
    for b_ord, (bi, groups) in enumerate(members.items()):
        n_papers = min(len(rows) for rows in groups.values())
        for j in range(n_papers):
            rows = [groups[gi][j] for gi in groups]
            of[rows] = len(scores)
            scores.append(float(r[rows].sum()))
            bundle.append(b_ord)
    return Papers(scores=torch.tensor(scores, dtype=torch.float64), bundle=torch.tensor(bundle, dtype=torch.long),
                  of_sample=of, n_bundles=len(members))


def bundle_quantiles(papers: Papers, level: float) -> Tensor:
    """``[n_bundles]`` float64: the ``level``-quantile of each bundle's valid paper scores (``torch.quantile``,
    linear interpolation); NaN for a bundle without a valid paper."""
    out = torch.full((papers.n_bundles,), float("nan"), dtype=torch.float64)
    for b in range(papers.n_bundles):
        s = papers.scores[(papers.bundle == b) & ~torch.isnan(papers.scores)]
        if s.numel():
            out[b] = torch.quantile(s, level)
    return out


def riskpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    bundle_ids: Tensor,
    *,
    alpha: float = 0.2,
    beta: float = 0.8,
    omega: float = 1.5,
    q_low: Tensor | float | None = None,
    q_high: Tensor | float | None = None,
    eps: float = 1e-6,
) -> tuple[AdvantageOutput, Papers]:
    """RiskPO's Mixed-Value-at-Risk advantages of bundled papers (arXiv 2510.00911; RTkenny/RiskPO
    ``compute_grpo_bundle_rvar_outcome_advantage_quantile_tracking``).

    With paper score ``S`` (:func:`riskpo_papers`), quantiles ``q_a`` (level alpha) and ``q_b`` (level beta):

    - RVaR part (range value-at-risk over [alpha, beta], with the reference's natural baseline):
      ``g_R = ((S - q_a)^+ - (S - q_b)^+ + q_a - q_b) / (beta - alpha)``;
    - CVaR part (lower tail below alpha): ``g_C = -(q_a - S)^+ / alpha``;
    - MVaR mix: ``A = (omega·g_C + g_R) / (omega + 1)`` (``omega = 0``: RVaR only), divided by the population std
      of the bundle's paper scores (+ eps). A bundle with a single paper, or whose paper scores are all equal, is
      divided by 1 instead (the reference divides an all-equal bundle by its eps, which blows the advantage up to
      ~1e6 whenever the tracked quantiles differ from the bundle's; ours stays on the scale of ``g``).

    Every sample of a paper gets the paper's advantage (uniform credit assignment). Samples in no paper, or in a
    paper with a NaN reward, get 0 and ``valid=False``.

    Args:
        rewards, group_ids, bundle_ids: ``[N]``, see :func:`riskpo_papers`.
        alpha, beta: quantile levels, ``0 < alpha < beta <= 1`` (our defaults 0.2 / 0.8).
        omega: weight of the CVaR part (the reference's ``w_mix`` 1.5).
        q_low, q_high: quantiles to use, a float or ``[n_bundles]`` per bundle (e.g. tracked ones,
            :class:`QuantileTracker`); ``None`` = each bundle's empirical quantile (:func:`bundle_quantiles`).
        eps: added to the std and to ``beta - alpha`` / ``alpha``.

    Returns:
        ``(AdvantageOutput, Papers)``; ``zero_std`` = valid and the bundle's paper scores are all equal.
    """
    if not 0 < alpha < beta <= 1:
        raise ValueError(f"need 0 < alpha < beta <= 1, got alpha={alpha}, beta={beta}")
    if omega < 0:
        raise ValueError(f"omega must be >= 0, got {omega}")
    papers = riskpo_papers(rewards, group_ids, bundle_ids)
    S, pb = papers.scores, papers.bundle

    def per_bundle(q, level) -> Tensor:
        if q is None:
            return bundle_quantiles(papers, level)
        return torch.as_tensor(q, dtype=torch.float64).cpu().expand(papers.n_bundles).clone()

    qa, qb = per_bundle(q_low, alpha)[pb], per_bundle(q_high, beta)[pb]
    ok = ~torch.isnan(S)
    std = torch.ones(papers.n_bundles, dtype=torch.float64)
    flat = torch.zeros(papers.n_bundles, dtype=torch.bool)
    for b in range(papers.n_bundles):
        s = S[(pb == b) & ok]
        flat[b] = s.numel() > 0 and bool((s == s[0]).all())
        if s.numel() > 1 and not flat[b]:
            std[b] = s.std(correction=0)
    g_r = ((S - qa).clamp_min(0) - (S - qb).clamp_min(0) + qa - qb) / (beta - alpha + eps)
    g_c = -(qa - S).clamp_min(0) / (alpha + eps)
    a_paper = (omega * g_c + g_r) / (omega + 1) / (std[pb] + eps)
    a_paper = torch.where(ok, a_paper, torch.zeros_like(a_paper))
    of = papers.of_sample
    has = of >= 0
    safe = of.clamp_min(0)
    valid = has & (ok[safe] if S.numel() else torch.zeros_like(has))
    adv = torch.where(valid, a_paper[safe] if S.numel() else torch.zeros_like(of, dtype=torch.float64),
                      torch.zeros_like(of, dtype=torch.float64))
    zero_std = valid & (flat[pb][safe] if S.numel() else torch.zeros_like(has))
    dev = rewards.device
    out = AdvantageOutput(advantages=adv.to(torch.float32).to(dev), zero_std=zero_std.to(dev), valid=valid.to(dev))
    return out, papers


class QuantileTracker:
    """RiskPO's tracked quantiles of the paper-score distribution, one per level (stochastic approximation).

    The first :meth:`update` sets each ``q`` to the batch's empirical quantile (the reference's warm-up); each later
    one takes one SGD step on the pinball loss: ``q <- q + lr·(level - mean(1[S < q]))``.

    Args:
        levels: quantile levels, e.g. ``(alpha, beta)``.
        lr: step size (the reference's ``lr_q``; the value is ours).
    """

    def __init__(self, levels: tuple[float, ...], lr: float = 0.1) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.levels = torch.tensor(levels, dtype=torch.float64)
        self.lr = float(lr)
        self.q: Tensor | None = None

    def update(self, scores: Tensor) -> None:
        """Update from ``[P]`` paper scores (NaN ignored; nothing valid: no change)."""
        s = scores.detach().to(torch.float64).cpu()
        s = s[~torch.isnan(s)]
        if not s.numel():
            return
        if self.q is None:
            self.q = torch.quantile(s, self.levels)
            return
        below = (s[None, :] < self.q[:, None]).to(torch.float64).mean(1)
        self.q = self.q + self.lr * (self.levels - below)

    def state_dict(self) -> dict:
        return {"q": None if self.q is None else self.q.tolist()}

    def load_state_dict(self, sd: Mapping) -> None:
        self.q = None if sd.get("q") is None else torch.tensor(sd["q"], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ D³S
def group_max_variance_mask(advantages: Tensor, group_ids: Tensor, keep: float) -> Tensor:
    """D³S sample-level down-sampling within each group (the paper's intra-group variant, arXiv 2509.22115): keep the
    ``k = max(2, ceil(keep·n))`` of the group's n samples whose advantages have the largest variance
    (:func:`max_variance_subset`). Groups of fewer than 2 samples (or ``k >= n``) are kept whole. The kept samples
    keep the advantages computed on the full group.

    Args:
        advantages: ``[B]`` float.
        group_ids: ``[B]`` integer labels.
        keep: fraction in (0, 1].

    Returns:
        ``[B]`` bool, True for kept samples.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    _check_rewards_and_groups(advantages.detach().float(), group_ids)
    a = advantages.detach().cpu()
    g = group_ids.cpu()
    out = torch.zeros(a.numel(), dtype=torch.bool)
    for gid in torch.unique(g):
        rows = (g == gid).nonzero().squeeze(1)
        n = rows.numel()
        k = max(2, math.ceil(keep * n - 1e-9))
        if n < 2 or k >= n:
            out[rows] = True
        else:
            out[rows[max_variance_subset(a[rows], k)]] = True
    return out.to(advantages.device)


def d3s_keep_ratio(step: int, total_steps: int, start: float,
                   schedule: Literal["constant", "linear"] = "linear") -> float:
    """D³S's dynamic down-sampling schedule: aggressive at first, relaxing toward no down-sampling. The paper does not
    give the curve in a form we could check; ``linear`` (our choice) goes from ``start`` at step 0 to 1 at
    ``total_steps``: ``start + (1 - start)·min(step/total_steps, 1)``; ``constant`` keeps ``start``."""
    if not 0 < start <= 1:
        raise ValueError(f"start must be in (0, 1], got {start}")
    if schedule == "constant":
        return float(start)
    if schedule != "linear":
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    u = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return float(start + (1 - start) * u)
