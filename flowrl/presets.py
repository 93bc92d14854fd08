"""Algorithm presets: a method name is a set of config overrides (parts), never a separate code path.

``flowrl train --algorithm NAME`` applies the preset first; the YAML and flags can still change any part. Presets
only choose the sampling side (plan, step kind, noise, tail solver, shared noise) plus, where the method defines it,
its reward aggregation or clip range, so every preset composes with any objective option (KL, clip-higher, ...).
Objective presets (``grpo_guard``) set only objective/optimizer parts and run on whatever plan is configured.

Composition: ``--algorithm A+B`` applies A, then B (section by section; where both set a field, B wins), e.g.
``--algorithm mixgrpo+grpo_guard`` = MixGRPO's window plan with GRPO-Guard's regulated clipping, or
``flow_grpo+grpo_guard``, the GRPO-Guard paper's setting.

Parts used below:

* plan ``full``: SDE on every step, train the first ``train_fraction`` (Flow-GRPO 0.9 = the first 9 of 10 steps).
* plan ``window``: SDE and training only in W = [l, l + w), ODE outside; ``window_schedule`` moves l over iterations.
* ``ode_solver`` / ``flash_ratio``: the ODE tail after the window solved by DPM-Solver++ 2M on
  max(int(m * r), 1) steps (MixGRPO-Flash); steps before the window are never accelerated.
* ``step_kind``: ``sde`` (Flow-GRPO), ``cps``, ``dance`` (DanceGRPO's constant-eta SDE).

MixGRPO's window clock. The paper (T = 25 steps, w = 4) moves the window by 1 every tau = 25 iterations over a few
hundred iterations. Our CPU runs are ~100 iterations at T = 10, where the window has T - w + 1 = 7 positions; the
presets use ``window_tau = 10`` so that one run sweeps every start position once (0..6 in 70 iterations, then wraps
to 0). Set ``--window_tau 25`` for the paper's clock on long runs.
"""

from __future__ import annotations

_MIXGRPO_PLAN = {
    "plan": "window",
    "step_kind": "sde",
    "noise_level": 0.7,
    "window_size": 4,
    "window_start": 0,
    "window_schedule": "progressive",
    "window_tau": 10,
    "window_shift": 1,
    "window_wrap": True,
}
_MIXGRPO_COMMON = {
    "sampling": {"same_noise_per_group": True},  # shared initial noise per group (MixGRPO)
    "grpo": {"reward_aggregation": "normalize_then_sum"},  # MixGRPO: normalise each reward, then sum
}

PRESETS: dict[str, dict] = {
    "flow_grpo": {
        "_doc": "Flow-GRPO (arXiv 2505.05470): Flow-GRPO SDE on every step, train on the first 90% of the steps.",
        "plan": {"plan": "full", "step_kind": "sde", "noise_level": 0.7, "train_fraction": 0.9},
    },
    "flow_grpo_fast": {
        "_doc": "Flow-GRPO-Fast: SDE and training only in a fixed window at the start, ODE elsewhere.",
        "plan": {"plan": "window", "step_kind": "sde", "window_schedule": "fixed", "window_start": 0},
    },
    "flow_grpo_cps": {
        "_doc": "Flow-GRPO with Coefficients-Preserving Sampling (arXiv 2509.05952); clip 1e-5 per the reference.",
        "plan": {"plan": "full", "step_kind": "cps", "noise_level": 0.8, "train_fraction": 0.9},
        "grpo": {"clip_range": 1e-5},
    },
    "mixgrpo": {
        "_doc": "MixGRPO (arXiv 2507.21802): SDE window w=4 moving by 1 every tau=10 iterations, ODE elsewhere, "
        "shared group noise.",
        "plan": dict(_MIXGRPO_PLAN),
        **_MIXGRPO_COMMON,
    },
    "mixgrpo_flash": {
        "_doc": "MixGRPO-Flash: MixGRPO with the ODE tail after the window by DPM-Solver++ 2M on 40% of its steps.",
        "plan": {**_MIXGRPO_PLAN, "ode_solver": "dpm2m", "flash_ratio": 0.4},
        **_MIXGRPO_COMMON,
    },
    "mixgrpo_flash_star": {
        "_doc": "MixGRPO-Flash*: window frozen at [0, 4), ODE tail by DPM-Solver++ 2M on 20% of its steps.",
        "plan": {**_MIXGRPO_PLAN, "window_schedule": "fixed", "window_start": 0, "ode_solver": "dpm2m",
                 "flash_ratio": 0.2},
        **_MIXGRPO_COMMON,
    },
    "dance_grpo": {
        "_doc": "DanceGRPO (arXiv 2505.07818): constant-eta SDE (eta 0.3) on every step, train on the first 60%.",
        # The reference trains a random timestep_fraction = 0.6 of the steps; FullSDEPlan trains the first 60%.
        "plan": {"plan": "full", "step_kind": "dance", "noise_level": 0.3, "train_fraction": 0.6},
    },
    "grpo_guard": {
        "_doc": "GRPO-Guard (arXiv 2510.22319): normalised ratio + 1/|dmean/dv| step weights, clip 2e-6, beta 0, one "
        "update per micro-batch; objective only: compose with a plan, e.g. flow_grpo+grpo_guard, mixgrpo+grpo_guard.",
        # clip 2e-6 is the paper's GenEval/OCR setting (4e-6 for PickScore). Clipping can only bind once the policy
        # has moved away from the one that sampled, i.e. from the second optimizer update on a batch: with our
        # default of one update per batch (gradient_accumulation_steps = all micro-batches) every ratio is exactly 1
        # and the clip is inert, so the preset makes one update per micro-batch (prompts_per_step * group_size /
        # sample_batch_size updates per batch; raise sample_batch_size for fewer). The paper's lr 1e-4 is left to
        # --learning_rate. Needs a Gaussian step (sde, dance): ratio_norm is refused with step_kind cps.
        "grpo": {"ratio_norm": True, "step_weighting": "guard", "clip_range": 2e-6, "beta": 0.0},
        "optim": {"gradient_accumulation_steps": 1},
    },
    "diffusion_nft": {
        "_doc": "DiffusionNFT (arXiv 2509.16117): advantage-signed flow matching on the clean samples at 4 fresh "
        "forward-process points each (t ~ U(0, 1), beta 1), no log-probs; CFG-free (guidance 1) as in the paper; "
        "objective only otherwise: the plan's SDE steps just add diversity.",
        # The public implementation samples with an EMA-lagged copy of the trained weights ("old" policy, soft update);
        # flowrl samples with the current weights, and with one update per iteration (the default) v_old = v exactly
        # on the single pass; with several updates per iteration v_old is computed before the first (Trainer.update).
        "grpo": {"objective": "nft", "nft_beta": 1.0, "nft_timesteps": 4, "nft_t_min": 0.0, "nft_t_max": 1.0},
        "sampling": {"guidance_scale": 1.0},
    },
    # ------------------------------------------------------------------------------------------ branching plans
    # group_size = roots per prompt (seeds / anchors / trees); the advantage groups are siblings (samplers.branching).
    "tempflow_grpo": {
        "_doc": "TempFlow-GRPO (arXiv 2508.04324): ODE main trajectory, K=6 SDE children at every step but the last, "
        "each finished by ODE (process reward per step), advantages per (prompt, step, seed), noise-aware step "
        "weights; N=4 seeds per prompt.",
        "plan": {"plan": "tempflow", "step_kind": "sde", "noise_level": 0.7, "branch_factor": 6, "branch_steps": None,
                 "tempflow_grouping": "seed", "ode_solver": "euler", "flash_ratio": 1.0},
        "grpo": {"group_size": 4, "step_weighting": "tempflow"},
    },
    "g2rpo": {
        "_doc": "G²RPO (arXiv 2510.01982): ODE anchor per prompt, G=12 SDE children at each of the first half of the "
        "steps, each finished on granularities {1,2,3}; A = sum of per-granularity group advantages; beta 0.",
        "plan": {"plan": "g2rpo", "step_kind": "sde", "noise_level": 0.7, "branch_factor": 12, "branch_steps": None,
                 "granularities": [1, 2, 3], "ode_solver": "euler", "flash_ratio": 1.0},
        "grpo": {"group_size": 1, "beta": 0.0},
    },
    "dynamic_treerpo": {
        "_doc": "Dynamic-TreeRPO (arXiv 2509.23352): binary tree of depth 4 (16 leaves, 30 SDE transitions) in a "
        "MixGRPO-style sliding window, noise growing with depth, leaf advantages backed up to nodes, dynamic clipping; "
        "no KL; LayerTuning's SFT toward the best path with --sft_weight (off: it degraded the embedded default).",
        # window clock as mixgrpo (tau 10 on our ~100-iteration CPU runs); the clip range and sft_weight are our
        # choices (the paper publishes neither form nor values), see flowrl/branching_trainer.py. sft_weight 0: on the
        # embedded default (full fine-tuning, 40 iterations, seed 0) lambda = 0.01 took eval 0.475 -> 0.394 while
        # lambda = 0 ended at 0.482; the best leaf it pulls toward was itself sampled with depth-growing noise.
        "plan": {"plan": "tree", "step_kind": "sde", "noise_level": 0.7, "branch_factor": 2, "tree_depth": 4,
                 "tree_noise_growth": 1.0, "tree_backup": "mean", "window_start": 0, "window_schedule": "progressive",
                 "window_tau": 10, "window_shift": 1, "window_wrap": True, "ode_solver": "euler", "flash_ratio": 1.0},
        "grpo": {"group_size": 1, "beta": 0.0, "dynamic_clip": True, "sft_weight": 0.0},
    },
}


# ------------------------------------------------------------------------------------------------ LLM variants
# The GRPO variants of the text adapter (ALGORITHMS.md, "LLM variants"; flowrl.text_trainer). Kept apart from the image
# presets above (tests/test_presets.py trains every image preset on the tiny SD3). Text-only ones set modality: text;
# ngrpo is modality-agnostic (grpo.advantage_variant, used by both trainers). Each composes with the others ("+").
LLM_PRESETS: dict[str, dict] = {
    "dapo": {
        "_doc": "DAPO (arXiv 2503.14476), text: clip-higher 0.2/0.28, dynamic sampling (keep groups with "
        "0 < #correct < G), token-level loss; add --overlong_buffer N for the soft overlong punishment.",
        "modality": "text",
        "grpo": {"clip_range": 0.2, "clip_range_high": 0.28},
        "text": {"dynamic_sampling": True, "loss_type": "dapo"},
    },
    "ngrpo": {
        "_doc": "NGRPO: a virtual max-reward sample joins every group's statistics (all-wrong groups still teach); "
        "image and text. For text pair with --clip_range 0.16 --clip_range_high 0.24.",
        "grpo": {"advantage_variant": "ngrpo"},
    },
    "dcpo": {
        "_doc": "DCPO (arXiv 2509.02333), text: token-prior clip bounds (eps 0.16/0.2) and smooth advantage "
        "standardisation over each prompt's visits.",
        "modality": "text",
        "grpo": {"clip_range": 0.16, "clip_range_high": 0.2},
        "text": {"token_clip": "dcpo", "advantage_baseline": "dcpo"},
    },
    "gtpo": {
        "_doc": "GTPO (arXiv 2508.03772), text: conflict tokens (negative updates skipped, positive x2), entropy "
        "filter (mean entropy > 0.7 nats: no update), no KL.",
        "modality": "text",
        "grpo": {"beta": 0.0},
        "text": {"token_weighting": "gtpo"},
    },
    "d3s": {
        "_doc": "D³S (arXiv 2509.22115), text: keep the max-Var(A) half of each group and the top half of tokens by "
        "|A|·entropy, both relaxing linearly to everything over the run.",
        "modality": "text",
        "text": {"sample_selection": "d3s", "token_selection": "d3s", "d3s_schedule": "linear"},
    },
    "vade": {
        "_doc": "VADE, text: Beta posterior per prompt, Thompson-sample the prompts with the largest p(1-p), prior "
        "decay 0.9 per visit (our value).",
        "modality": "text",
        "text": {"prompt_selection": "vade", "tracker_decay": 0.9},
    },
    "knapsack_rl": {
        "_doc": "Knapsack RL, text: completions per prompt by a DP maximising sum [1-p^n-(1-p)^n] p(1-p)^2 under the "
        "step's total budget (tracked success rates p).",
        "modality": "text",
        "text": {"rollout_allocation": "knapsack"},
    },
    "gvm": {
        "_doc": "GVM-RAFT's allocation, text: n_i ~ G_i / sqrt(p_i + a / p_i^(b-1)) on the GRPO objective (the RAFT "
        "loss itself is not implemented).",
        "modality": "text",
        "text": {"rollout_allocation": "gvm"},
    },
    "spo": {
        "_doc": "SPO single stream, text: one completion per prompt, A = r - Beta-tracked value, batch-normalised, "
        "KL-adaptive forgetting.",
        "modality": "text",
        "grpo": {"group_size": 1, "prompts_per_step": 64},  # the default batch (8 x 8 completions) as 64 streams
        "text": {"advantage_baseline": "spo"},
    },
    "riskpo": {
        "_doc": "RiskPO (arXiv 2510.00911), text: bundles of 5 prompts, MVaR advantages (RVaR[0.2, 0.8] + "
        "1.5 CVaR_0.2) with tracked quantiles.",
        "modality": "text",
        "text": {"advantage_baseline": "riskpo"},
    },
    "kdrl": {
        "_doc": "KDRL (arXiv 2506.02208), text: GRPO + k2 reverse KL to a teacher (weight 5e-3 -> 1e-3), only on "
        "incorrect completions; teacher 'tiny' unless --teacher_name_or_path.",
        "modality": "text",
        "text": {"teacher_name_or_path": "tiny", "kd_beta": 5e-3, "kd_beta_end": 1e-3, "kd_estimator": "k2",
                 "kd_mask": "incorrect"},
    },
    "grpo_lambda": {
        "_doc": "GRPO-λ (arXiv 2505.18086), text: length-penalised reward for the top-20% groups by correctness, "
        "0/1 reward elsewhere.",
        "modality": "text",
        "text": {"reward_shaping": "grpo_lambda", "grpo_lambda_fraction": 0.2},
    },
    "grpo_d": {
        "_doc": "OThink-MR1 GRPO-D, text: KL weight rising linearly from 0 to 0.04 over the run.",
        "modality": "text",
        "grpo": {"beta": 0.0},
        "text": {"kl_schedule": "linear", "beta_end": 0.04},
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def llm_preset_names() -> list[str]:
    return sorted(LLM_PRESETS)


def get_preset(name: str) -> dict:
    """The overrides of preset ``name`` (without its ``_doc``), a fresh copy safe to modify.

    ``"A+B"`` composes presets left to right: sections are merged, a field set by both takes B's value.
    """
    merged: dict = {}
    registry = {**PRESETS, **LLM_PRESETS}
    for part in name.split("+"):
        part = part.strip()
        if part not in registry:
            raise ValueError(f"unknown algorithm {part!r}; available: {', '.join(preset_names())}; LLM variants: "
                             f"{', '.join(llm_preset_names())} (compose them with '+', e.g. mixgrpo+grpo_guard)")
        for k, v in registry[part].items():
            if k.startswith("_"):
                continue
            if isinstance(v, dict):
                merged[k] = {**merged.get(k, {}), **v}
            else:
                merged[k] = v
    return merged


def describe_presets() -> str:
    lines = [f"  {n:<22} {PRESETS[n]['_doc']}" for n in preset_names()]
    lines += ["LLM variants (modality: text unless noted):"]
    lines += [f"  {n:<22} {LLM_PRESETS[n]['_doc']}" for n in llm_preset_names()]
    return "\n".join(lines + ["  (compose with '+': A+B applies A then B, e.g. mixgrpo+grpo_guard, dapo+kdrl)"])
