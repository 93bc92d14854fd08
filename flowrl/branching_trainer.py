"""The trainer's sample -> score -> advantages -> update -> metrics for the branching plans (``plan: tempflow | g2rpo |
tree``): TempFlow-GRPO (arXiv 2508.04324), G²RPO (arXiv 2510.01982), Dynamic-TreeRPO (arXiv 2509.23352).

:class:`flowrl.trainer.Trainer` dispatches here when its plan is a branching one (``plan.branching``); setup, the
loop, evaluation, checkpoints and export are the Trainer's own. Read top to bottom:

1. **Sampling** (:func:`sample_and_score`). ``prompts_per_step x group_size`` *roots* (group_size = seeds / anchors /
   trees per prompt; initial noise as in the linear trainer, shared per prompt with ``same_noise_per_group``) run the
   plan's :class:`~samplers.branching.BranchSpec` through :func:`samplers.branching.sample_branching`: one velocity per
   branch node serves its K children, node forwards are chunked by ``sample_batch_size`` nodes, the children are
   finished by ODE. Child noise is seeded by (seed, iteration, root id, step, path, child).
2. **Rewards and advantages.** Leaves are decoded and scored; leaf advantages are group-normalised (any reward
   aggregation, group or global std) in the plan's groups, then turned into per-transition (row) advantages by
   :func:`flowrl.advantages.backup_advantages`:

   - ``tempflow``: group = (root, step) - the K siblings of one seed at one step (``tempflow_grouping: prompt``:
     (prompt, step), all seeds' children at that step); A_row = its leaf's advantage (a process reward for step i).
   - ``g2rpo``: group = (root, step, granularity); A_row = Σ_g A^g over the child's granularity leaves.
   - ``tree``: group = the leaves of one tree; last-level rows take their leaf's advantage, a row into an internal node
     the mean of that node's rows (``tree_backup: softmax``: weighted by softmax of their sampling log-probs).

   Row advantages are clipped to ±``adv_clip_max`` (after the G²RPO sum).
3. **Update** (:func:`update`). Training replays the sampling chunks: per chunk one forward at its nodes (with CFG as
   configured) rescores all of their rows (:func:`samplers.branching.rescore_rows`), so the first, on-policy pass has
   ratio exactly 1. A chunk is a micro-batch; by default all chunks of an epoch are one optimizer update
   (``gradient_accumulation_steps`` k: every k chunks; ``branch_update: step``: a new update at each branch step, the
   G²RPO option). The loss of an update is the clipped surrogate averaged over its valid rows (+ beta·KL averaged the
   same way, + the SFT term), with:

   - step weights (``step_weighting``) computed over the iteration's branch steps from the schedule's stds, mean 1
     (TempFlow's noise-aware ``s_i / mean_j s_j``); the KL is not weighted;
   - ``ratio_norm`` (GRPO-Guard) against each node's stored mean;
   - ``dynamic_clip``: per-row symmetric range ``dynamic_clip_bounds(A)`` over the iteration's valid rows
     (Dynamic-TreeRPO);
   - ``sft_weight`` λ > 0 (tree): LayerTuning's ``λ·Σ_t w_t·mean((v_θ(x_t) - v*_t)²)`` on the nodes of each tree's
     best path, averaged over trees (see below).

NFE (exact, logged per iteration and process): ``nfe/sampling`` = every velocity evaluation of the branching pass
(anchor Euler steps, one per branch node, ODE continuations) x2 with CFG, split into ``nfe/sampling_{anchor,nodes,
continuations}``; ``nfe/training`` = one forward per node per inner epoch (x2 CFG in training, x2 with the KL's
reference pass).

Choices the papers leave open (ours; every one is a config option or stated here):

- TempFlow: branch steps default to every step but the last (Flow-GRPO does not train the last step either); the
  main trajectory stops after its last branch step (the paper's N·(T + K·Σ_{j=1}^{T-1} j) counts a full main
  trajectory and branching at all T steps: pass ``branch_steps`` 0..T-1 to get exactly that). Step weights are
  ``step_weights('tempflow')`` of the branch steps: s_i / mean_j s_j computed from the schedule (the reference's
  2.25·s_i is that normalisation for SD3.5 at 10 steps).
- G²RPO: M defaults to steps 0 .. max(T//2, 1) - 1; a continuation's evaluations are shared between granularities
  where their sigma lists share a prefix (always the first two: equal states, equal velocities); the image is x0_hat
  at the last evaluated step of each list; the summed advantage is clipped like any other.
- Dynamic-TreeRPO: the window width is the depth (one SDE level per window step) and slides with the MixGRPO window
  schedules; level noise eta_t = eta_0·(1 + growth·t/d) with t = 0 .. d-1 (root at the base noise); leaf advantages are
  normalised over the tree's leaves; the dynamic clip range defaults to [clip_range/2, 2·clip_range]; the SFT pseudo
  label is ``v*_t = (x_t - x0*)/sigma_t``, the flow-matching velocity that carries node x_t of the best path (the
  tree's highest-reward leaf, total weighted reward) straight to that leaf's final latent x0*, with
  ``w_t = max(A_t, 0)``, A_t the backed-up (clipped) advantage of the best path's transition out of x_t (no pull
  where the best leaf's subtree is not better than its siblings); the squared error is the mean over latent elements
  (like the log-probs), summed over the path, averaged over trees. It regresses the *conditional* velocity, the
  quantity flow-matching pretraining fits, through one extra conditional forward per pulled node (counted in
  ``nfe/training``; none without CFG, where the node's own forward serves). Regressing the CFG mix
  ``v_u + g (v_c - v_u)`` instead pushes the unconditional branch away from the target with weight g - 1: on the
  embedded default that collapsed the model within 7 iterations (training reward 0.49 -> 0.24, objects vanishing),
  while the same run without SFT rose. Even on the conditional velocity λ = 0.01 degraded it (`eval` 0.475 -> 0.394
  in 40 iterations, against 0.482 with λ = 0), so the preset leaves λ at 0: ``--sft_weight`` turns the term on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict

import torch
from torch import Tensor

from samplers.branching import BranchRollout, G2RPOPlan, TempFlowPlan, TreePlan, rescore_rows, sample_branching

from .advantages import backup_advantages, clip_advantages
from .evaluate import score_all
from .objectives import clipped_surrogate, dynamic_clip_bounds, guard_normalized_log_ratio, kl_to_reference, step_weights
from .seeding import gaussian

BRANCH_PLANS = ("tempflow", "g2rpo", "tree")


def make_branch_plan(cfg):
    """The :mod:`samplers.branching` plan of a config whose ``plan.plan`` is a branching one."""
    p = cfg.plan
    steps = None if p.branch_steps is None else tuple(int(i) for i in p.branch_steps)
    if p.plan == "tempflow":
        return TempFlowPlan(p.step_kind, p.noise_level, p.branch_factor, steps, p.ode_solver, p.flash_ratio)
    if p.plan == "g2rpo":
        return G2RPOPlan(p.step_kind, p.noise_level, p.branch_factor, steps, tuple(int(g) for g in p.granularities),
                         p.ode_solver)
    if p.plan == "tree":
        return TreePlan(p.step_kind, p.noise_level, p.branch_factor, p.tree_depth, p.tree_noise_growth, p.window_start,
                        p.window_schedule, p.window_tau, p.window_shift, p.window_wrap, seed=cfg.seed,
                        ode_solver=p.ode_solver, flash_ratio=p.flash_ratio)
    raise ValueError(f"plan {p.plan!r} is not a branching plan {BRANCH_PLANS}")


def update_groups(chunk_steps: list[int], accumulation: int | None, per_step: bool) -> list[list[int]]:
    """Chunks (micro-batches) per optimizer update, in order: all of them, or one run per branch step
    (``per_step``), each split every ``accumulation`` chunks."""
    segments: list[list[int]] = []
    for c, st in enumerate(chunk_steps):
        if segments and (not per_step or chunk_steps[segments[-1][-1]] == st):
            segments[-1].append(c)
        else:
            segments.append([c])
    out = []
    for seg in segments:
        k = accumulation or len(seg)
        out += [seg[i : i + k] for i in range(0, len(seg), k)]
    return out


def micro_batch_schedule(trainer) -> tuple[int, int, int]:
    """(micro-batches, accumulation, optimizer updates) per iteration: the chunk structure does not depend on the
    iteration (a sliding tree window only moves it)."""
    cfg, g = trainer.cfg, trainer.cfg.grpo
    spec = trainer.plan(trainer.sigmas, 0)
    roots = g.prompts_per_step * g.group_size
    steps: list[int] = []
    for n, lv in zip(spec.nodes_per_root(), spec.levels):
        steps += [lv.index] * math.ceil(roots * n / g.sample_batch_size)
    groups = update_groups(steps, cfg.optim.gradient_accumulation_steps, g.branch_update == "step")
    return len(steps), cfg.optim.gradient_accumulation_steps or len(steps), g.num_inner_epochs * len(groups)


@dataclasses.dataclass
class BranchBatch:
    """One iteration's branching samples with rewards per leaf and advantages per transition (row)."""

    prompts: list[str]  # per root (prompt-major)
    root_rows: Tensor  # [roots] row of each root's prompt in cond_all
    cond_all: object  # Cond of the distinct prompts
    rollout: BranchRollout
    rewards: dict[str, Tensor]  # per leaf, cpu
    leaf_advantages: Tensor  # [L]
    zero_std: Tensor  # [L]
    valid: Tensor  # [L]
    row_advantages: Tensor  # [R] clipped
    row_valid: Tensor  # [R]
    row_clip: Tensor | None  # [R] dynamic clip ranges
    row_weights: Tensor | None  # [R] step weights
    step_weight: dict[int, float]
    node_sft_weight: Tensor | None  # [Nn]
    node_sft_target: Tensor | None  # [Nn, *D]
    n_trees: int


# ------------------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_and_score(trainer, step: int) -> tuple[BranchBatch, float]:
    tr, cfg, g = trainer, trainer.cfg, trainer.cfg.grpo
    t0 = time.time()
    prompts, group_ids, sample_ids = tr.step_prompts(step)
    spec = tr.plan(tr.sigmas, step - 1)
    uniq = sorted(set(prompts), key=prompts.index)
    cond_all = tr.policy.encode(uniq)
    row_of = {p: i for i, p in enumerate(uniq)}
    root_rows = torch.tensor([row_of[p] for p in prompts])
    noise_ids = group_ids if cfg.sampling.same_noise_per_group else sample_ids
    x = torch.stack([gaussian(tr.latent_shape, cfg.seed, step, int(i), -1) for i in noise_ids]).to(tr.device)

    def noise_fn(keys: list) -> Tensor:
        return torch.stack([gaussian(tr.latent_shape, cfg.seed, step, *key) for key in keys]).to(tr.device)

    def vel(x_: Tensor, s_: Tensor, rows: Tensor) -> Tensor:
        cond = cond_all.select(rows.to(tr.device))
        with tr.accelerator.autocast():
            return tr.policy.velocity(x_, s_, cond, tr.guidance)

    ro = sample_branching(vel, x, root_rows, sample_ids, spec, noise_fn, batch_size=g.sample_batch_size,
                          ode_solver=cfg.plan.ode_solver)
    leaf_roots = ro.leaf_roots
    leaf_prompts = [prompts[int(r)] for r in leaf_roots]
    scores = _decode_and_score(tr, ro.leaves, leaf_prompts)

    # leaf groups (global labels), advantages over leaves
    n_lv = len(ro.levels)
    n_tag = int(ro.leaf_tag.max()) + 1 if ro.num_leaves else 1
    root_g, prompt_g = sample_ids[leaf_roots], group_ids[leaf_roots]
    if cfg.plan.plan == "tempflow":
        base = root_g if cfg.plan.tempflow_grouping == "seed" else prompt_g
        keys = base * n_lv + ro.leaf_levels
    elif cfg.plan.plan == "g2rpo":
        keys = (root_g * n_lv + ro.leaf_levels) * n_tag + ro.leaf_tag
    else:
        keys = root_g
    adv = tr.gathered_advantages(scores, keys)
    L = ro.num_leaves
    mine = slice(tr.rank * L, (tr.rank + 1) * L)
    leaf_adv, leaf_valid, zero_std = adv.advantages[mine].cpu(), adv.valid[mine].cpu(), adv.zero_std[mine].cpu()

    rule = cfg.plan.tree_backup if cfg.plan.plan == "tree" else "mean"
    row_adv, row_valid = backup_advantages(leaf_adv, leaf_valid, ro.leaf_row, ro.row_node, ro.node_parent_row,
                                           row_log_probs=ro.log_probs.cpu(), node_rule=rule)
    row_adv = clip_advantages(row_adv, g.adv_clip_max)

    row_clip = None
    if g.dynamic_clip:
        lo = g.dynamic_clip_low if g.dynamic_clip_low is not None else g.clip_range / 2
        hi = g.dynamic_clip_high if g.dynamic_clip_high is not None else 2 * g.clip_range
        row_clip = torch.full((ro.num_rows,), float(lo))
        if bool(row_valid.any()):
            row_clip[row_valid] = dynamic_clip_bounds(row_adv[row_valid], lo, hi, g.dynamic_clip_sensitivity).float()

    # step weights over the iteration's branch steps (mean 1), from the schedule's stds
    steps = sorted(set(ro.node_steps.tolist()))
    step_weight: dict[int, float] = {}
    row_w = None
    w = None
    if steps:
        first = {k: int((ro.node_steps == k).nonzero()[0]) for k in steps}
        w = step_weights(
            g.step_weighting, [ro.node_kind(first[k]) for k in steps],
            torch.stack([ro.node_sigmas[first[k]] for k in steps]),
            torch.stack([ro.node_sigmas_next[first[k]] for k in steps]),
            [float(ro.node_noise_levels[first[k]]) for k in steps],
            torch.stack([ro.node_stds.cpu()[ro.node_steps == k].float().mean() for k in steps]),
        )
    if w is not None:
        step_weight = {k: float(w[i]) for i, k in enumerate(steps)}
        row_w = torch.tensor([step_weight[int(k)] for k in ro.step_indices.tolist()])

    sft_w = sft_t = None
    n_trees = len(prompts)
    if cfg.plan.plan == "tree" and g.sft_weight > 0:
        weights = {k: float(w) for k, w in cfg.rewards.items()}
        sft_w, sft_t = _best_path_targets(ro, scores, tr.rewards, weights, leaf_valid, row_adv, row_valid)

    batch = BranchBatch(
        prompts=prompts, root_rows=root_rows, cond_all=cond_all, rollout=ro,
        rewards={k: v.cpu() for k, v in scores.items()}, leaf_advantages=leaf_adv, zero_std=zero_std, valid=leaf_valid,
        row_advantages=row_adv, row_valid=row_valid, row_clip=row_clip, row_weights=row_w, step_weight=step_weight,
        node_sft_weight=sft_w, node_sft_target=sft_t, n_trees=n_trees,
    )
    return batch, time.time() - t0


def _decode_and_score(tr, leaves: Tensor, prompts: list[str], chunk: int = 256) -> dict[str, Tensor]:
    """Rewards of the decoded leaves, ``chunk`` images at a time (a branching batch has many leaves: TempFlow's
    defaults give N·K·(T-1) = 216 per prompt), so the images never all sit in memory."""
    bs = tr.cfg.grpo.sample_batch_size
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for c0 in range(0, leaves.shape[0], chunk):
        lat = leaves[c0 : c0 + chunk]
        images = torch.cat([tr.policy.decode(lat[i : i + bs].to(tr.device)) for i in range(0, lat.shape[0], bs)])
        for k, v in score_all(tr.rewards, images, prompts[c0 : c0 + chunk]).items():
            parts[k].append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _best_path_targets(ro: BranchRollout, scores, rewards, weights, leaf_valid, row_adv, row_valid):
    """LayerTuning pseudo-labels: per tree, the nodes on the path to its highest-reward leaf get
    ``v* = (x_t - x0*)/sigma_t`` and weight ``max(A_t, 0)`` (A_t = the path's row advantage out of the node)."""
    total = sum(weights[k] * torch.nan_to_num(scores[k].cpu().double()) for k in rewards)
    total = torch.where(leaf_valid, total, torch.full_like(total, -math.inf))
    w = torch.zeros(ro.num_nodes)
    target = torch.zeros_like(ro.node_latents)
    leaf_roots = ro.leaf_roots
    for root in torch.unique(leaf_roots).tolist():
        idx = (leaf_roots == root).nonzero().flatten()
        if not bool(leaf_valid[idx].any()):
            continue
        best = int(idx[int(torch.argmax(total[idx]))])
        x0 = ro.leaves[best].to(target.device)
        row = int(ro.leaf_row[best])
        while row >= 0:
            n = int(ro.row_node[row])
            a = float(row_adv[row]) if bool(row_valid[row]) else 0.0
            if a > 0:
                w[n] = a
                target[n] = (ro.node_latents[n].float() - x0) / ro.node_sigmas[n].to(target.device)
            row = int(ro.node_parent_row[n])
    return w, target


# ------------------------------------------------------------------------------------------------------------ update
def update(trainer, batch: BranchBatch) -> dict[str, float]:
    """``num_inner_epochs`` passes over the sampling chunks; see the module docstring."""
    tr, cfg, g = trainer, trainer.cfg, trainer.cfg.grpo
    tr.policy.transformer.train(False)
    ro = batch.rollout
    chunks = ro.node_batches
    order = torch.argsort(ro.row_node, stable=True)
    counts = torch.bincount(ro.row_node, minlength=ro.num_nodes).tolist()
    starts = [0] + list(torch.cumsum(torch.tensor(counts), 0).tolist())
    rows_of_chunk = [torch.cat([order[starts[n] : starts[n + 1]] for n in c.tolist()]) for c in chunks]
    chunk_steps = [int(ro.node_steps[int(c[0])]) for c in chunks]
    groups = update_groups(chunk_steps, cfg.optim.gradient_accumulation_steps, g.branch_update == "step")
    acc: dict[str, float] = defaultdict(float)
    rmin, rmax = math.inf, -math.inf
    gn_count: dict[int, int] = defaultdict(int)
    n_updates = 0
    grad_norm = 0.0
    for _epoch in range(g.num_inner_epochs):
        for grp in groups:
            tr.optimizer.zero_grad(set_to_none=True)
            denom = max(1, sum(int(batch.row_valid[rows_of_chunk[c]].sum()) for c in grp))
            for c in grp:
                st = _chunk_loss(tr, batch, chunks[c], rows_of_chunk[c], denom)
                if st is None:
                    continue
                rmin, rmax = min(rmin, st.pop("ratio_min")), max(rmax, st.pop("ratio_max"))
                for k, v in st.items():
                    acc[k] += v
                if f"_gn/step{chunk_steps[c]}" in st:
                    gn_count[chunk_steps[c]] += 1
            grad_norm += tr.optimizer_step()
            n_updates += 1
    n = sum(v for k, v in acc.items() if k.startswith("_n/step"))
    d1 = sum(v for k, v in acc.items() if k.startswith("_d1/step"))
    d2 = sum(v for k, v in acc.items() if k.startswith("_d2/step"))
    pos = sum(v for k, v in acc.items() if k.startswith("_pos/step"))
    neg = sum(v for k, v in acc.items() if k.startswith("_neg/step"))
    cpos = sum(v for k, v in acc.items() if k.startswith("_clip_pos/step"))
    cneg = sum(v for k, v in acc.items() if k.startswith("_clip_neg/step"))
    mu = d1 / n if n else 0.0
    out: dict[str, float] = {
        "loss": acc["loss"] / max(1, n_updates),
        "policy_loss": acc["policy_loss"] / max(1, n_updates),
        "ratio_mean": 1.0 + mu,
        "ratio_std": math.sqrt(max(d2 / n - mu * mu, 0.0)) if n else 0.0,
        "ratio_min": rmin if n else 1.0,
        "ratio_max": rmax if n else 1.0,
        "clipfrac": (cpos + cneg) / n if n else 0.0,
        "clipfrac_pos": cpos / pos if pos else 0.0,
        "clipfrac_neg": cneg / neg if neg else 0.0,
        "approx_kl": acc["approx_kl"] / n if n else 0.0,
        "grad_norm": grad_norm / max(1, n_updates),
        "optimizer_updates": n_updates,
        "transitions_per_update": ro.num_rows * g.num_inner_epochs / max(1, n_updates),
    }
    if g.beta > 0:
        out["kl"] = acc["kl"] / n if n else 0.0
    if batch.node_sft_weight is not None:
        out["sft_loss"] = acc["sft_loss"] / g.num_inner_epochs
        out["sft_forwards"] = acc["sft_forwards"]  # conditional forwards of the SFT term (counted in nfe/training)
    for k in sorted(set(chunk_steps)):
        nk = acc.get(f"_n/step{k}", 0.0)
        out[f"ratio_mean/step{k}"] = 1.0 + (acc.get(f"_d1/step{k}", 0.0) / nk if nk else 0.0)
        if k in batch.step_weight:
            out[f"step_weight/step{k}"] = batch.step_weight[k]
        if gn_count[k]:
            acc[f"_gn/step{k}"] /= gn_count[k]
    out.update({k: v for k, v in acc.items() if k.startswith("_")})
    return out


def _chunk_loss(tr, batch: BranchBatch, nodes: Tensor, rows: Tensor, denom: int) -> dict[str, float] | None:
    """Backward one chunk's share of its update's loss; returns summed stats (None if the loss was not finite)."""
    from .trainer import _grad_delta_norm, _grad_snapshot, _step_sums, backward

    cfg, g = tr.cfg, tr.cfg.grpo
    ro = batch.rollout
    dev = tr.device
    guidance = tr.guidance if cfg.sampling.train_cfg else 1.0
    x = ro.node_latents[nodes].to(dev)
    sigma = ro.node_sigmas[int(nodes[0])].to(dev)
    cond = batch.cond_all.select(batch.root_rows[ro.node_roots[nodes]].to(dev))
    grads = _grad_snapshot(tr.params) if g.step_grad_norms else None
    with tr.accelerator.autocast():
        v = tr.policy.velocity(x, sigma, cond, guidance)
    log_prob, mean, std = rescore_rows(v, ro, nodes, rows)
    old = ro.log_probs[rows].to(dev)
    raw = (log_prob - old).detach()
    if g.ratio_norm:  # GRPO-Guard: clip exp(log r_hat) against old = 0
        log_prob = guard_normalized_log_ratio(log_prob, old, mean, ro.node_means[ro.row_node[rows]].to(dev), std)
        old = torch.zeros_like(log_prob)
    adv = batch.row_advantages[rows].to(dev)
    valid = batch.row_valid[rows].to(dev)
    clip = g.clip_range if batch.row_clip is None else batch.row_clip[rows].to(dev)
    w = None if batch.row_weights is None else batch.row_weights[rows].to(dev)
    policy, st = clipped_surrogate(log_prob, old, adv, clip_range=clip,
                                   clip_range_high=None if batch.row_clip is not None else g.clip_range_high,
                                   mask=valid, step_weights=w)
    n_valid = int(valid.sum())
    policy = policy * (n_valid / denom)
    loss = policy
    out: dict[str, float] = {}
    if g.beta > 0:
        with torch.no_grad(), tr.policy.reference(), tr.accelerator.autocast():
            v_ref = tr.policy.velocity(x, sigma, cond, guidance)
        _, ref_mean, _ = rescore_rows(v_ref, ro, nodes, rows)
        kl = kl_to_reference(mean, ref_mean, std.clamp_min(1e-12))
        kl_sum = (kl * valid).sum()
        loss = loss + g.beta * kl_sum / denom
        out["kl"] = float(kl_sum)
    if batch.node_sft_weight is not None:
        wn = batch.node_sft_weight[nodes].to(dev)
        sel = wn > 0
        sft = torch.zeros((), device=dev)
        forwards = 0
        if bool(sel.any()):
            tgt = batch.node_sft_target[nodes.to(batch.node_sft_target.device)].to(dev)[sel]
            if guidance != 1.0:  # regress the conditional velocity, never the CFG mix (see the module docstring)
                with tr.accelerator.autocast():
                    v_sft = tr.policy.velocity(x[sel], sigma, cond.select(sel.nonzero().flatten()), 1.0)
                forwards = int(sel.sum())
            else:
                v_sft = v[sel]
            mse = (v_sft.float() - tgt).square().flatten(1).mean(1)
            sft = g.sft_weight * (wn[sel] * mse).sum() / max(1, batch.n_trees)
        loss = loss + sft
        out["sft_loss"] = float(sft.detach())
        out["sft_forwards"] = forwards
    k = int(ro.node_steps[int(nodes[0])])
    if tr.skip_nonfinite(loss, f"branch step {k}"):  # agreed across processes; max_nan_skips in a row stops
        return None
    backward(tr.accelerator, tr._prepared, loss)
    out.update({"loss": float(loss.detach()), "policy_loss": float(policy.detach()),
                "approx_kl": float(st["approx_kl"]) * n_valid,
                "ratio_min": float(st["ratio_min"]) if n_valid else math.inf,
                "ratio_max": float(st["ratio_max"]) if n_valid else -math.inf})
    sums = _step_sums(k, (log_prob - old).detach(), raw, adv, valid, st, None, g.ratio_norm)
    out.update(sums)
    if grads is not None:
        gn, _ = _grad_delta_norm(tr.params, grads)
        scaler = getattr(tr.accelerator, "scaler", None)
        out[f"_gn/step{k}"] = gn / (scaler.get_scale() if scaler is not None else 1.0)
    return out


# ------------------------------------------------------------------------------------------------------------ metrics
def step_metrics(trainer, batch: BranchBatch, train: dict, t_sample: float, t_train: float) -> dict:
    from .trainer import _per_step_diagnostics

    tr, cfg = trainer, trainer.cfg
    ro = batch.rollout
    m = tr.reward_metrics(batch.rewards)  # over leaves
    for k, v in train.items():
        if not k.startswith("_"):
            m[f"train/{k}"] = v
    m.update(_per_step_diagnostics(train))
    m["train/zero_std_share"] = float(batch.zero_std.float().mean())
    va = batch.row_advantages[batch.row_valid]
    m["train/adv_abs_mean"] = float(va.abs().mean()) if len(va) else 0.0
    if batch.row_clip is not None:
        m["train/dynamic_clip_mean"] = float(batch.row_clip.mean())
    m["train/lr"] = float(tr.lr_scheduler.get_last_lr()[0])
    m["train/nan_loss_skips"] = tr.nan_skips
    m["time/sampling_s"] = t_sample
    m["time/training_s"] = t_train
    cfg_mult = tr.policy.passes_per_velocity(tr.guidance)
    train_mult = cfg_mult if cfg.sampling.train_cfg else 1
    m["nfe/sampling"] = ro.nfe * cfg_mult
    for part, val in ro.nfe_parts.items():
        m[f"nfe/sampling_{part}"] = val * cfg_mult
    m["nfe/training"] = (ro.num_nodes * train_mult * cfg.grpo.num_inner_epochs * (2 if cfg.grpo.beta > 0 else 1)
                         + int(train.get("sft_forwards", 0)))
    m["branch/nodes"] = ro.num_nodes
    m["branch/transitions"] = ro.num_rows
    m["branch/leaves"] = ro.num_leaves
    return m
