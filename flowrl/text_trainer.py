"""The text GRPO recipe (``modality: text``), on accelerate: setup -> (sample -> score -> advantages -> update -> log)
x steps -> export. Read top to bottom; the math lives in :mod:`flowrl.advantages`, :mod:`flowrl.objectives` (shared
with the image trainer) and :mod:`flowrl.text_objectives` (token-loss aggregation and the text-only variants).

One *step*: ``prompts_per_step`` problems of the task, ``group_size`` completions each, sampled with the current
policy (:class:`flowrl.policies.text.TextPolicy`), scored by text rewards (TRL's signature, :mod:`rewards.text`),
turned into group advantages, then ``num_inner_epochs`` passes of token-level clipped-surrogate updates. With
``dynamic_sampling`` (DAPO) groups whose rewards are all equal are dropped and more problems are sampled, up to
``dynamic_sampling_max_rounds`` rounds. Micro-batches are ``sample_batch_size`` completions; the old log-probs are
recomputed on the exact micro-batch the update sees, so the first pass has ratio exactly 1.

The GRPO variants of ALGORITHMS.md ("LLM variants") are parts chosen by name in the ``text`` section (presets in
:mod:`flowrl.presets`, ``LLM_PRESETS``), each a hook at one place of the step:

- which prompts: ``prompt_selection`` (``vade``); how many completions each: ``rollout_allocation`` (``knapsack``,
  ``gvm``) - both read a per-prompt Beta tracker of success rates updated every step;
- the reward: ``overlong_buffer`` (DAPO), ``reward_shaping`` (``grpo_lambda``);
- which groups: ``dynamic_sampling`` (DAPO);
- the advantage: ``advantage_baseline`` (``group``, ``ngrpo``, ``dcpo``, ``spo``, ``riskpo``) or
  ``grpo.advantage_variant`` (shared with the image trainer);
- which samples / tokens: ``sample_selection`` and ``token_selection`` (``d3s``);
- per-token weights: ``token_weighting`` (``gtpo``); clipping: ``token_clip`` (``dcpo``), clip-higher;
- regularisers: KL to the reference with a schedule (GRPO-D), KL to a teacher (KDRL, ``teacher_name_or_path``).

State the variants carry across steps (trackers, quantiles) is saved in each checkpoint's ``flowrl_state.json``.

Settings come from the same config tree as images: ``grpo`` (group size, clip ranges, beta...), ``optim``,
``eval.eval_steps`` / ``eval.eval_sets`` (``eval`` = training problems, ``heldout`` = the held-out split; greedy
decoding), checkpointing and ``rewards`` at the top level, and the ``text`` section. An unset
``rewards`` (the image default ``{scenes: 1}``) means ``{exact_answer: 1}`` here. Not used for text: EMA, the
``sampling`` / ``plan`` sections.

Robustness as in the image trainer: a non-finite loss is skipped with a counted warning and ``optim.max_nan_skips``
of them in a row stop the run; multi-process runs keep the bare model (peft attributes, export) and average the
gradients once per update, and the learning-rate schedule steps once per update whatever the process count.

Outputs in ``output_dir``: ``metrics.jsonl``, ``checkpoint-{step}/`` (``accelerator.save_state`` + the trained weights
as ``trainable.safetensors`` + ``flowrl_state.json``), ``final/`` (the LoRA adapter in peft format, or the full model,
with the tokenizer: loadable as ``lm_name_or_path``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rewards import RewardError
from rewards.text import ArithmeticProblem, arithmetic_problems, get_text_reward, score_text, shuffled

from .advantages import (
    AdvantageOutput,
    BetaTracker,
    QuantileTracker,
    RewardStats,
    bundle_quantiles,
    clip_advantages,
    d3s_keep_ratio,
    dcpo_sas_advantages,
    dynamic_sampling_mask,
    group_max_variance_mask,
    gvm_budgets,
    knapsack_budgets,
    multi_reward_advantages,
    ngrpo_advantages,
    riskpo_advantages,
    riskpo_papers,
    spo_advantages,
    spo_decay,
    vade_select,
)
from .checkpoint import find_checkpoint, save_checkpoint, truncate_metrics
from .config import ConfigError, TrainConfig, to_dict
from .objectives import kl_k3, kl_weight_schedule
from .policies.text import LLAMA_LORA_TARGETS, TextPolicy, TextRollout, build_char_tokenizer, build_tiny_lm
from .seeding import derive_seed
from .text_objectives import (
    d3s_token_mask,
    dcpo_clip_bounds,
    grpo_lambda_rewards,
    gtpo_conflict_mask,
    gtpo_entropy_filter,
    gtpo_token_weights,
    masked_row_mean,
    overlong_penalty,
    text_policy_loss,
)
from .trainer import (
    backward,
    configure_for_wrapper,
    optimizer_step,
    skip_nonfinite_loss,
    trainable_state_dict,
    unwrap_prepared,
)

IMAGE_DEFAULT_REWARDS = {"scenes": 1.0}
SHAPING_REWARDS = ("overlong", "length_penalty")
"""Reward terms added by the trainer itself (weight 1): DAPO's overlong punishment, GRPO-λ's length penalty."""


def text_rewards(cfg: TrainConfig) -> dict[str, float]:
    """The configured rewards, with the image default (``scenes``) read as "unset" -> ``exact_answer``."""
    return {"exact_answer": 1.0} if cfg.rewards == IMAGE_DEFAULT_REWARDS else dict(cfg.rewards)


def task_problems(cfg: TrainConfig, split: str) -> list[ArithmeticProblem]:
    t = cfg.text
    return arithmetic_problems(split, max_operand=t.max_operand, ops=t.ops, heldout_fraction=t.heldout_fraction)


def prompt_text(cfg: TrainConfig, problem: ArithmeticProblem) -> str:
    return cfg.text.prompt_template.format(question=problem.question, expression=problem.question.rstrip("="))


# ====================================================================================================== tiny model
def sft_warmup(model, tokenizer, problems: list[ArithmeticProblem], *, steps: int, noise: float, seed: int,
               batch_size: int = 64, lr: float = 3e-3, template: str = "{question}") -> None:
    """Supervised warm-up of the tiny LM: cross-entropy on ``answer<eos>`` after each prompt (prompt tokens not
    trained). With probability ``noise`` an example's answer is replaced by ``answer + 1``: a *systematic* off-by-one
    habit. With ``noise > 0.5`` the warmed-up model's most likely answer is wrong (greedy accuracy near 0) while the
    right one keeps a large share of the samples, which is what GRPO needs to flip it; the habit is the same on
    held-out problems, so fixing it generalises."""
    if steps <= 0:
        return
    rng = np.random.default_rng([seed, 12345])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    model.train(False)  # no dropout (tiny config has none anyway)
    eos = tokenizer.eos_token
    for _ in range(steps):
        idx = rng.integers(0, len(problems), batch_size)
        flip = rng.random(batch_size) < noise
        prompts, targets = [], []
        for i, f in zip(idx, flip):
            p = problems[int(i)]
            prompts.append(template.format(question=p.question, expression=p.question.rstrip("=")))
            targets.append(f"{int(p.answer) + int(f)}{eos}")
        enc_p = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        enc_t = tokenizer(targets, add_special_tokens=False)["input_ids"]
        seqs = [a + b for a, b in zip(enc_p, enc_t)]
        T = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, (a, b) in enumerate(zip(enc_p, enc_t)):  # right padding: positions start at 0 for every row
            n = len(a) + len(b)
            ids[r, :n] = torch.tensor(a + b)
            labels[r, len(a):n] = torch.tensor(b)
            attn[r, :n] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()



def load_text_policy(cfg: TrainConfig, device, need_reference: bool) -> TextPolicy:
    """``tiny`` -> build the character-level Llama and warm it up on the task's training split; else load."""
    t, m = cfg.text, cfg.model
    lora = dict(lora_rank=m.rank or None, lora_alpha=m.lora_alpha,
                lora_targets=m.lora_target_modules or list(LLAMA_LORA_TARGETS),
                need_reference=need_reference, device=device, chat_template=t.chat_template)
    if t.lm_name_or_path == "tiny":
        tok = build_char_tokenizer()
        model = build_tiny_lm(tok, seed=cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            sft_warmup(model, tok, task_problems(cfg, "train"), steps=t.sft_warmup_steps, noise=t.sft_noise,
                       seed=cfg.seed, template=t.prompt_template)
        return TextPolicy(model, tok, **lora)
    return TextPolicy.from_pretrained(t.lm_name_or_path, gguf_file=t.gguf_file, **lora)


def load_teacher(cfg: TrainConfig, device, student: TextPolicy) -> TextPolicy:
    """KDRL's teacher, frozen: ``tiny`` = the tiny LM (seed + 1) warmed up on the training split *without* answer noise
    (so it knows the answers the student's warm-up blurred); else a causal LM loaded from ``teacher_name_or_path``.
    Its tokenizer must be the student's (the KL compares the same tokens). The teacher scores the student's completions
    at the sampling temperature, like the student's own log-probs (at T = 1: the plain reverse KL)."""
    t = cfg.text
    if t.teacher_name_or_path == "tiny":
        tok = build_char_tokenizer()
        model = build_tiny_lm(tok, seed=cfg.seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            sft_warmup(model, tok, task_problems(cfg, "train"), steps=t.sft_warmup_steps, noise=0.0,
                       seed=cfg.seed + 1, template=t.prompt_template)
        teacher = TextPolicy(model, tok, device=device, chat_template=t.chat_template)
    else:
        teacher = TextPolicy.from_pretrained(t.teacher_name_or_path, device=device, chat_template=t.chat_template)
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ConfigError(f"teacher_name_or_path {t.teacher_name_or_path!r}: its tokenizer differs from the student's "
                          f"({len(teacher.tokenizer)} vs {len(student.tokenizer)} tokens); KDRL compares per-token "
                          "log-probs of the same tokens, so the teacher must share the student's vocabulary")
    teacher.model.requires_grad_(False).eval()
    return teacher


# ====================================================================================================== batch
@dataclasses.dataclass
class TextBatch:
    """One step's samples (rows group-major: the completions of a problem are adjacent)."""

    problems: list[ArithmeticProblem]
    group_ids: Tensor  # [B]
    prompt_idx: Tensor  # [B] index of each row's problem in the training split
    rollouts: list[TextRollout]  # micro-batches, old log-probs recomputed on exactly these
    ref_log_probs: list[Tensor | None]  # per micro-batch, [b, L] when beta > 0
    rewards: dict[str, Tensor]  # raw reward per name, [B] (NaN = not applicable)
    advantages: Tensor  # [B]
    zero_std: Tensor  # [B]
    valid: Tensor  # [B]
    sampled_groups: int
    rounds: int
    teacher_log_probs: list[Tensor | None] = dataclasses.field(default_factory=list)  # KDRL, per micro-batch
    kd_mask: Tensor | None = None  # [B] rows the KD term applies to (KDRL's reward-guided masking)
    token_weights: list[Tensor | None] = dataclasses.field(default_factory=list)  # GTPO, per micro-batch [b, L]
    token_keep: list[Tensor | None] = dataclasses.field(default_factory=list)  # D³S tokens, per micro-batch [b, L]
    variant_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # logged as train/<key>


class TextTrainer:
    """GRPO for causal LMs. ``TextTrainer(cfg).train()``; see the module docstring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ================================================================================================ setup
    def setup(self) -> None:
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

        cfg, t, g, o = self.cfg, self.cfg.text, self.cfg.grpo, self.cfg.optim
        log_with = None if cfg.report_to == "none" else cfg.report_to
        self.accelerator = Accelerator(
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
            # one lr-scheduler step per optimizer update whatever the process count (as in the image trainer)
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.use_kl = g.beta > 0 or (t.beta_end or 0) > 0
        self.policy = load_text_policy(cfg, self.device, need_reference=self.use_kl)
        self.teacher = load_teacher(cfg, self.device, self.policy) if t.teacher_name_or_path else None
        self.params = self.policy.trainable_parameters()
        self.reward_weights = text_rewards(cfg)
        self.rewards = {name: get_text_reward(name) for name in self.reward_weights}
        self.train_problems = task_problems(cfg, "train")
        sets = {  # ``eval.eval_sets`` picks among these two
            "eval": lambda: shuffled(self.train_problems, cfg.seed)[: t.eval_max_examples],
            "heldout": lambda: task_problems(cfg, "heldout")[: t.eval_max_examples],
        }
        self.eval_sets = {name: make() for name, make in sets.items() if name in cfg.eval.eval_sets}
        self.optimizer = torch.optim.AdamW(self.params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                           weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)
        n_micro = math.ceil(g.prompts_per_step * g.group_size / g.sample_batch_size)
        self.accum = min(o.gradient_accumulation_steps or n_micro, n_micro)
        updates_per_step = g.num_inner_epochs * math.ceil(n_micro / self.accum)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(o.lr_scheduler, self.optimizer,
                                          num_warmup_steps=o.lr_warmup_steps * updates_per_step,
                                          num_training_steps=cfg.max_train_steps * updates_per_step)
        names = list(self.policy.trainable_state_dict())
        configure_for_wrapper(self.accelerator, cfg, self.policy.model, text=True)  # DeepSpeed settings; FSDP: error
        model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.policy.model, self.optimizer, self.lr_scheduler
        )
        # Multi-process: the policy keeps the bare module (peft attributes and disable_adapter, un-prefixed parameter
        # names, save_pretrained); under DDP optimizer_step averages the trainable gradients itself, once per update,
        # under DeepSpeed ZeRO-2 the engine reduces them (flowrl.trainer.unwrap_prepared).
        self._prepared = unwrap_prepared(self.accelerator, model, names)
        self._average_grads = self._prepared.average_grads
        self.policy.model = self._prepared.module
        self.setup_variants()
        self._register_checkpoint_hooks()
        self.step = 0
        self.optimizer_steps = 0
        self.nan_skips = 0
        self.nan_streak = 0  # non-finite losses in a row (reset by a finite one); max_nan_skips stops the run
        if cfg.resume_from_checkpoint:
            self.resume(cfg.resume_from_checkpoint)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            if log_with:
                from .trainer import _flat_config

                self.accelerator.init_trackers("flowrl-text", config=_flat_config(cfg))

    def setup_variants(self) -> None:
        """Per-prompt state of the variants that carry it across steps (all keyed by training-split index)."""
        t, g = self.cfg.text, self.cfg.grpo
        n = len(self.train_problems)
        need_tracker = t.prompt_selection == "vade" or t.rollout_allocation != "uniform"
        self.prompt_tracker = BetaTracker(n) if need_tracker else None  # success rates (VADE, Knapsack, GVM)
        self.gvm_grad = torch.ones(n, dtype=torch.float64) if t.rollout_allocation == "gvm" else None
        self.spo_tracker = BetaTracker(n) if t.advantage_baseline == "spo" else None
        self.spo_cum_kl = 0.0  # policy drift so far (sum of each step's post-update KL), SPO's D
        self.spo_last_kl = torch.zeros(n, dtype=torch.float64)  # spo_cum_kl when each prompt was last seen
        self.reward_stats = RewardStats(n) if t.advantage_baseline == "dcpo" else None
        self.risk_tracker = (QuantileTracker((t.riskpo_alpha, t.riskpo_beta), lr=t.riskpo_quantile_lr)
                             if t.advantage_baseline == "riskpo" else None)
        if t.prompt_selection == "vade" and g.prompts_per_step * self.world > n:
            raise ConfigError(f"prompt_selection='vade' picks prompts_per_step x processes = "
                              f"{g.prompts_per_step * self.world} distinct prompts per step, but the training split "
                              f"has {n}")

    def variant_state(self) -> dict:
        """JSON-serialisable state of the variants (exact: float64 lists round-trip through JSON)."""
        st: dict = {"spo_cum_kl": self.spo_cum_kl, "spo_last_kl": self.spo_last_kl.tolist()}
        for name in ("prompt_tracker", "spo_tracker"):
            tr = getattr(self, name)
            if tr is not None:
                st[name] = {k: v.tolist() for k, v in tr.state_dict().items()}
        if self.gvm_grad is not None:
            st["gvm_grad"] = self.gvm_grad.tolist()
        if self.reward_stats is not None:
            st["reward_stats"] = self.reward_stats.state_dict()
        if self.risk_tracker is not None:
            st["risk_tracker"] = self.risk_tracker.state_dict()
        return st

    def load_variant_state(self, st: dict) -> None:
        self.spo_cum_kl = float(st.get("spo_cum_kl", 0.0))
        if "spo_last_kl" in st:
            self.spo_last_kl = torch.tensor(st["spo_last_kl"], dtype=torch.float64)
        for name in ("prompt_tracker", "spo_tracker"):
            tr = getattr(self, name)
            if tr is not None and name in st:
                tr.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in st[name].items()})
        if self.gvm_grad is not None and "gvm_grad" in st:
            self.gvm_grad = torch.tensor(st["gvm_grad"], dtype=torch.float64)
        if self.reward_stats is not None and "reward_stats" in st:
            self.reward_stats.load_state_dict(st["reward_stats"])
        if self.risk_tracker is not None and "risk_tracker" in st:
            self.risk_tracker.load_state_dict(st["risk_tracker"])

    # ================================================================================================ the loop
    def train(self) -> dict:
        """Run to ``max_train_steps`` (or the time budget); returns the last metrics."""
        from .trainer import _install_signal_handlers, _restore_signal_handlers

        self.setup()
        cfg = self.cfg
        start = time.time()
        metrics: dict = {}
        if self.step == 0 and cfg.eval.eval_steps > 0:
            self.log(self.evaluate(), step=0)
        stop = {"flag": False}
        old_handlers = _install_signal_handlers(stop)
        try:
            while self.step < cfg.max_train_steps and not stop["flag"]:
                self.step += 1
                batch, t_sample = self.sample_and_score(self.step)
                t0 = time.time()
                train_stats = self.update(batch)
                self.after_update(batch)
                metrics = self.step_metrics(batch, train_stats, t_sample, time.time() - t0)
                if cfg.eval.eval_steps and self.step % cfg.eval.eval_steps == 0:
                    metrics.update(self.evaluate())
                self.log(metrics, step=self.step)
                if self.accelerator.is_main_process:
                    print(f"step {self.step}: reward {metrics['reward/mean']:.3f} "
                          f"loss {metrics.get('train/loss', float('nan')):.4f}", file=sys.stderr, flush=True)
                if cfg.max_time_minutes is not None and (time.time() - start) / 60 > cfg.max_time_minutes:
                    stop["flag"] = True
                if (cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0) or stop["flag"]:
                    self.save_checkpoint()
            if cfg.eval.eval_steps and self.step % cfg.eval.eval_steps != 0:
                final_eval = self.evaluate()
                self.log(final_eval, step=self.step)
                metrics.update(final_eval)
            if not (cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0) and not stop["flag"]:
                self.save_checkpoint()
            self.export()
        finally:
            _restore_signal_handlers(old_handlers)
            self.accelerator.end_training()
        return metrics

    # ------------------------------------------------------------------------------------------------ sampling
    def step_problems(self, step: int, round_: int) -> tuple[list[ArithmeticProblem], Tensor, Tensor]:
        """This process's problems for (step, round), one row per completion (group-major), group ids and problem
        indices. The choice depends only on (seed, step, round) and the gathered trackers, identical on every process:
        ``prompts_per_step * world`` problems (uniformly, or by VADE's Thompson sampling), rank r takes its slice;
        each gets ``group_size`` completions, or its Knapsack / GVM budget (same total)."""
        g, t = self.cfg.grpo, self.cfg.text
        rng = np.random.default_rng([self.cfg.seed, step, round_])
        n_global = g.prompts_per_step * self.world
        if t.prompt_selection == "vade":
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            pick = vade_select(self.prompt_tracker, n_global, gen).tolist()
        else:
            pick = rng.choice(len(self.train_problems), n_global, replace=n_global > len(self.train_problems)).tolist()
        mine = list(range(self.rank * g.prompts_per_step, (self.rank + 1) * g.prompts_per_step))
        idx = torch.tensor([int(pick[i]) for i in mine])
        sizes = self.completions_per_prompt(idx).tolist()
        problems = [self.train_problems[int(p)] for p, n in zip(idx.tolist(), sizes) for _ in range(n)]
        base = round_ * n_global  # group ids unique across rounds
        group_ids = torch.tensor([base + i for i, n in zip(mine, sizes) for _ in range(n)])
        prompt_idx = torch.tensor([int(p) for p, n in zip(idx.tolist(), sizes) for _ in range(n)])
        return problems, group_ids, prompt_idx

    def completions_per_prompt(self, idx: Tensor) -> Tensor:
        """``[P]`` completions for the prompts ``idx``: ``group_size`` each, or Knapsack-RL / GVM budgets from the
        tracked success rates, summing to ``prompts_per_step * group_size``."""
        g, t = self.cfg.grpo, self.cfg.text
        total = len(idx) * g.group_size
        if t.rollout_allocation == "uniform":
            return torch.full((len(idx),), g.group_size, dtype=torch.long)
        p = self.prompt_tracker.mean(idx)
        if t.rollout_allocation == "knapsack":
            return knapsack_budgets(p, total, n_min=t.allocation_n_min, n_max=t.allocation_n_max)
        return gvm_budgets(p, self.gvm_grad[idx], total, alpha=t.gvm_alpha, beta=t.gvm_beta, n_min=t.allocation_n_min)

    @torch.no_grad()
    def generate(self, problems: list[ArithmeticProblem], step: int, round_: int) -> TextRollout:
        """Completions for this process's ``problems`` in micro-batches of ``sample_batch_size`` (sampling
        temperature / top-p).

        Each micro-batch samples with its own generator, seeded by (seed, step, round, global index of its first
        completion): the randomness follows a completion's global position, never the process layout. Process r holds
        global rows ``[r * n, (r + 1) * n)``, so with ``prompts_per_step * group_size`` a multiple of
        ``sample_batch_size`` the micro-batches of N processes are exactly those of one process with N times the
        prompts: same rows, same seeds, same completions.
        """
        t, bs = self.cfg.text, self.cfg.grpo.sample_batch_size
        prompts = self.policy.format_prompts([prompt_text(self.cfg, p) for p in problems])
        first = self.rank * len(prompts)  # global index of this process's first row (equal rows per process)
        parts = []
        for i in range(0, len(prompts), bs):
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed, step, round_, first + i))
            parts.append(self.policy.generate(prompts[i:i + bs], max_new_tokens=t.max_new_tokens,
                                              temperature=t.temperature, top_p=t.top_p, generator=gen, score=False))
        return TextRollout.cat(parts)

    def score(self, problems: list[ArithmeticProblem], rollout: TextRollout) -> dict[str, Tensor]:
        """Raw rewards ``name -> [B]`` (NaN = not applicable), plus ``overlong`` shaping when enabled."""
        t = self.cfg.text
        kwargs = {"answer": [p.answer for p in problems], "question": [p.question for p in problems],
                  "completion_ids": [ids[m].tolist() for ids, m in zip(rollout.completion_ids, rollout.mask)]}
        out = {name: score_text(fn, rollout.prompts, rollout.completions, name=name, **kwargs)
               for name, fn in self.rewards.items()}
        if t.overlong_buffer > 0:
            out["overlong"] = overlong_penalty(rollout.lengths.cpu(), t.max_new_tokens, t.overlong_buffer,
                                               t.overlong_penalty)
        return out

    def reward_total(self, rewards: dict[str, Tensor]) -> Tensor:
        """``[B]`` weighted sum of the configured rewards (NaN components count 0), shaping terms excluded."""
        return sum(w * torch.nan_to_num(rewards[k].cpu()) for k, w in self.reward_weights.items())

    def sample_and_score(self, step: int) -> tuple[TextBatch, float]:
        cfg, g, t = self.cfg, self.cfg.grpo, self.cfg.text
        t0 = time.time()
        weights = dict(self.reward_weights)
        if t.overlong_buffer > 0:
            weights["overlong"] = 1.0
        kept: list[tuple[list[ArithmeticProblem], Tensor, Tensor, TextRollout, dict[str, Tensor]]] = []
        n_kept_groups, sampled_groups, rounds = 0, 0, 0
        for round_ in range(t.dynamic_sampling_max_rounds if t.dynamic_sampling else 1):
            rounds += 1
            problems, group_ids, prompt_idx = self.step_problems(step, round_)
            rollout = self.generate(problems, step, round_)
            rewards = self.score(problems, rollout)
            sampled_groups += g.prompts_per_step
            if t.dynamic_sampling:
                total = sum(w * torch.nan_to_num(rewards[k]) for k, w in weights.items())
                keep = dynamic_sampling_mask(total, group_ids)
                if not bool(keep.any()):
                    continue
                idx = keep.nonzero().squeeze(1)
                problems = [problems[i] for i in idx.tolist()]
                group_ids, prompt_idx = group_ids[idx], prompt_idx[idx]
                rollout = rollout.select(idx.to(rollout.mask.device))
                rewards = {k: v[idx] for k, v in rewards.items()}
            kept.append((problems, group_ids, prompt_idx, rollout, rewards))
            n_kept_groups += len(set(group_ids.tolist()))
            if n_kept_groups >= g.prompts_per_step:
                break
        if not kept:  # every group flat in every round: train on the last round anyway (all advantages 0)
            kept.append((problems, group_ids, prompt_idx, rollout, rewards))
        problems = [p for k in kept for p in k[0]]
        group_ids = torch.cat([k[1] for k in kept])
        prompt_idx = torch.cat([k[2] for k in kept])
        rollout = TextRollout.cat([k[3] for k in kept])
        rewards = {name: torch.cat([k[4][name] for k in kept]) for name in kept[0][4]}
        if t.dynamic_sampling:  # at most prompts_per_step groups
            first = sorted(set(group_ids.tolist()), key=group_ids.tolist().index)[: g.prompts_per_step]
            idx = torch.isin(group_ids, torch.tensor(first)).nonzero().squeeze(1)
            problems = [problems[i] for i in idx.tolist()]
            group_ids, prompt_idx = group_ids[idx], prompt_idx[idx]
            rollout = rollout.select(idx.to(rollout.mask.device))
            rewards = {k: v[idx] for k, v in rewards.items()}
        if t.reward_shaping == "grpo_lambda":  # GRPO-λ: length penalty for the top-λ of this process's groups
            correct = self.reward_total(rewards) >= t.correct_reward
            shaped, _ = grpo_lambda_rewards(correct, rollout.lengths.cpu(), group_ids,
                                            top_fraction=t.grpo_lambda_fraction)
            rewards["length_penalty"] = shaped - correct.float()
            weights["length_penalty"] = 1.0

        # advantages over the gathered batch (groups never straddle processes: they are per rank)
        all_rewards = {k: self.accelerator.gather(v.to(self.device)) for k, v in rewards.items()}
        all_groups = self.accelerator.gather(group_ids.to(self.device) + self.rank * 10**9)
        all_prompts = self.accelerator.gather(prompt_idx.to(self.device)).cpu()
        adv = self.advantages(all_rewards, weights, all_groups, all_prompts, group_ids)
        self.update_prompt_trackers(all_rewards, all_prompts, adv)
        n = len(problems)
        mine = slice(self.rank * n, (self.rank + 1) * n)  # equal n per rank assumed (no dynamic sampling in DDP)
        advantages = clip_advantages(adv.advantages[mine], g.adv_clip_max).cpu()
        zero_std, valid = adv.zero_std[mine].cpu(), adv.valid[mine].cpu()
        variant_stats: dict[str, float] = {}

        if t.sample_selection == "d3s":  # D³S: per group, the subset with the largest Var(A)
            ratio = d3s_keep_ratio(step - 1, cfg.max_train_steps, t.d3s_sample_keep, t.d3s_schedule)
            keep = group_max_variance_mask(advantages, group_ids, ratio)
            variant_stats["d3s_sample_keep"] = float(keep.float().mean())
            idx = keep.nonzero().squeeze(1)
            problems = [problems[i] for i in idx.tolist()]
            group_ids, prompt_idx, advantages = group_ids[idx], prompt_idx[idx], advantages[idx]
            zero_std, valid = zero_std[idx], valid[idx]
            rollout = rollout.select(idx.to(rollout.mask.device))
            rewards = {k: v[idx] for k, v in rewards.items()}
            n = len(problems)

        # micro-batches; old (reference, teacher) log-probs and entropies on exactly these
        need_entropy = t.token_weighting == "gtpo" or t.token_selection == "d3s"
        micro, refs, teach, ents, rows = [], [], [], [], []
        bs = g.sample_batch_size
        with torch.no_grad():
            for i in range(0, n, bs):
                r = rollout.select(torch.arange(i, min(i + bs, n), device=rollout.mask.device))
                lp, ent = self.policy.log_probs(r, temperature=t.temperature, with_entropy=need_entropy)
                r.log_probs = lp.masked_fill(~r.mask, 0.0)
                micro.append(r)
                ents.append(ent)
                rows.append(slice(i, min(i + bs, n)))
                if self.use_kl:
                    with self.policy.reference():
                        refs.append(self.policy.log_probs(r, temperature=t.temperature)[0])
                else:
                    refs.append(None)
                teach.append(self.teacher.log_probs(r, temperature=t.temperature)[0] if self.teacher else None)

        token_weights: list[Tensor | None] = [None] * len(micro)
        token_keep: list[Tensor | None] = [None] * len(micro)
        if need_entropy:
            L = rollout.mask.shape[1]
            ent_full = torch.cat([torch.nn.functional.pad(e, (0, L - e.shape[1])) for e in ents]).cpu()
            mask_full = rollout.mask.cpu() & valid[:, None]
        if t.token_weighting == "gtpo":  # GTPO: conflict tokens from the advantages' signs, then the entropy filter
            conflict = gtpo_conflict_mask(rollout.completion_ids.cpu(), mask_full, advantages, group_ids)
            w_full = gtpo_token_weights(conflict, advantages, mask_full, t.gtpo_conflict_weight)
            advantages, kept_rows = gtpo_entropy_filter(advantages, masked_row_mean(ent_full, mask_full),
                                                        threshold=t.gtpo_entropy_threshold, coef=t.gtpo_entropy_coef)
            token_weights = [w_full[s, : r.mask.shape[1]].to(self.device) for s, r in zip(rows, micro)]
            variant_stats["gtpo_conflict_frac"] = float(conflict.sum() / mask_full.sum().clamp_min(1))
            variant_stats["gtpo_filtered_frac"] = float((~kept_rows & valid).sum() / valid.sum().clamp_min(1))
        if t.token_selection == "d3s":  # D³S: the tokens with the largest |A|·H
            ratio = d3s_keep_ratio(step - 1, cfg.max_train_steps, t.d3s_token_keep, t.d3s_schedule)
            keep_full = d3s_token_mask(advantages, ent_full, mask_full, ratio)
            token_keep = [keep_full[s, : r.mask.shape[1]].to(self.device) for s, r in zip(rows, micro)]
            variant_stats["d3s_token_keep"] = float(keep_full.sum() / mask_full.sum().clamp_min(1))
        kd_mask = None
        if self.teacher is not None:
            kd_mask = (torch.ones(n, dtype=torch.bool) if t.kd_mask == "all"
                       else self.reward_total(rewards) < t.correct_reward)
            variant_stats["kd_frac"] = float(kd_mask.float().mean())
        batch = TextBatch(
            problems=problems, group_ids=group_ids, prompt_idx=prompt_idx, rollouts=micro, ref_log_probs=refs,
            rewards={k: v.cpu() for k, v in rewards.items()}, advantages=advantages, zero_std=zero_std, valid=valid,
            sampled_groups=sampled_groups, rounds=rounds, teacher_log_probs=teach, kd_mask=kd_mask,
            token_weights=token_weights, token_keep=token_keep, variant_stats=variant_stats,
        )
        return batch, time.time() - t0

    def advantages(self, all_rewards: dict[str, Tensor], weights: dict[str, float], all_groups: Tensor,
                   all_prompts: Tensor, group_ids: Tensor) -> AdvantageOutput:
        """The configured advantage of the gathered batch: ``advantage_baseline`` (or ``grpo.advantage_variant``)."""
        g, t = self.cfg.grpo, self.cfg.text
        base = t.advantage_baseline
        if base == "group" and g.advantage_variant != "group":
            base = g.advantage_variant
        if base == "group":
            return multi_reward_advantages(all_rewards, weights, all_groups, mode=g.reward_aggregation,
                                           std_mode=g.std_mode)
        total = torch.stack([w * all_rewards[k] for k, w in weights.items()]).nansum(0)
        if base == "ngrpo":
            return ngrpo_advantages(total, all_groups, r_max=g.ngrpo_r_max)
        if base == "dcpo":
            return dcpo_sas_advantages(total, all_groups, all_prompts, self.reward_stats)
        if base == "spo":  # forgetting by the policy's KL drift since each prompt was last seen
            drift = self.spo_cum_kl - self.spo_last_kl[all_prompts]
            rho = spo_decay(drift, t.spo_d_half, t.spo_rho_min, t.spo_rho_max)
            a = spo_advantages(self.spo_tracker, all_prompts, total, rho=rho)
            self.spo_last_kl[all_prompts] = self.spo_cum_kl
            valid = ~torch.isnan(total)
            return AdvantageOutput(advantages=a, zero_std=torch.zeros_like(valid), valid=valid)
        if base == "riskpo":  # bundles of riskpo_bundle_size consecutive groups of each process
            local = torch.unique_consecutive(group_ids, return_inverse=True)[1]
            bundles = self.accelerator.gather((local // t.riskpo_bundle_size).to(self.device) + self.rank * 10**9)
            papers = riskpo_papers(total, all_groups, bundles)
            q_lo, q_hi = bundle_quantiles(papers, t.riskpo_alpha), bundle_quantiles(papers, t.riskpo_beta)
            tracked = self.risk_tracker.q
            if tracked is not None and t.riskpo_quantile_mode != "batch":
                w = 1.0 if t.riskpo_quantile_mode == "track" else 0.5
                q_lo, q_hi = w * tracked[0] + (1 - w) * q_lo, w * tracked[1] + (1 - w) * q_hi
            out, papers = riskpo_advantages(total, all_groups, bundles, alpha=t.riskpo_alpha, beta=t.riskpo_beta,
                                            omega=t.riskpo_omega, q_low=q_lo, q_high=q_hi)
            self.risk_tracker.update(papers.scores)
            return out
        raise ValueError(f"unknown advantage_baseline {base!r}")

    def update_prompt_trackers(self, all_rewards: dict[str, Tensor], all_prompts: Tensor,
                               adv: AdvantageOutput) -> None:
        """VADE / Knapsack / GVM: the prompts' success rates (total reward clamped to [0, 1]) and GVM's gradient-norm
        proxy. Done on the gathered batch, so every process holds the same trackers."""
        t = self.cfg.text
        if self.prompt_tracker is None:
            return
        total = sum(w * torch.nan_to_num(all_rewards[k].cpu()) for k, w in self.reward_weights.items())
        self.prompt_tracker.update(all_prompts, total.clamp(0, 1), rho=t.tracker_decay)
        if self.gvm_grad is not None:  # G_i: norm of the prompt's advantages this step (our cheap proxy)
            sq = torch.zeros_like(self.gvm_grad).index_add(0, all_prompts, adv.advantages.cpu().double().square())
            seen = torch.unique(all_prompts)
            self.gvm_grad[seen] = sq[seen].sqrt()

    # ------------------------------------------------------------------------------------------------ update
    def beta_now(self) -> float:
        g, t = self.cfg.grpo, self.cfg.text
        end = g.beta if t.beta_end is None else t.beta_end
        if t.kl_schedule == "constant" or end == g.beta:
            return g.beta
        return kl_weight_schedule(self.step - 1, self.cfg.max_train_steps, g.beta, end, t.kl_schedule)

    def kd_beta_now(self) -> float:
        """KDRL's KL-to-teacher weight: ``kd_beta`` annealed linearly to ``kd_beta_end`` (0 without a teacher)."""
        t = self.cfg.text
        if self.teacher is None:
            return 0.0
        if t.kd_beta_end is None:
            return t.kd_beta
        return kl_weight_schedule(self.step - 1, self.cfg.max_train_steps, t.kd_beta, t.kd_beta_end, "linear")

    def loss_mask(self, r: TextRollout, valid: Tensor, keep: Tensor | None = None) -> Tensor:
        m = r.mask & valid[:, None]
        if self.cfg.text.mask_truncated:
            m = m & ~r.truncated[:, None]
        if keep is not None:
            m = m & keep
        return m

    def update(self, batch: TextBatch) -> dict[str, float]:
        """``num_inner_epochs`` passes of token-level clipped-surrogate updates over the micro-batches."""
        g, t = self.cfg.grpo, self.cfg.text
        self.policy.model.eval()  # dropout stays off while training with gradients
        beta, kd_beta = self.beta_now(), self.kd_beta_now()
        sums: dict[str, float] = {}
        count, n_updates, gn_sum = 0, 0, 0.0
        offsets = np.cumsum([0] + [r.batch_size for r in batch.rollouts])
        windows = [list(range(i, min(i + self.accum, len(batch.rollouts))))
                   for i in range(0, len(batch.rollouts), self.accum)]
        keeps = batch.token_keep or [None] * len(batch.rollouts)
        tws = batch.token_weights or [None] * len(batch.rollouts)
        teach = batch.teacher_log_probs or [None] * len(batch.rollouts)
        for _epoch in range(g.num_inner_epochs):
            for win in windows:
                self.optimizer.zero_grad(set_to_none=True)
                masks = [self.loss_mask(batch.rollouts[b], batch.valid[offsets[b]:offsets[b + 1]].to(self.device),
                                        keeps[b]) for b in win]
                n_tokens = self.accelerator.gather(sum(m.sum() for m in masks).reshape(1).float()).sum()
                for b, m in zip(win, masks):
                    r = batch.rollouts[b]
                    adv = batch.advantages[offsets[b]:offsets[b + 1]].to(self.device)
                    logp, _ = self.policy.log_probs(r, temperature=t.temperature)
                    lo, hi = g.clip_range, g.clip_range_high
                    if t.token_clip == "dcpo":
                        lo, hi = dcpo_clip_bounds(r.log_probs, g.clip_range, g.clip_range_high or g.clip_range)
                    kd_mask = (None if batch.kd_mask is None
                               else batch.kd_mask[offsets[b]:offsets[b + 1]].to(self.device))
                    loss, st = text_policy_loss(
                        logp, r.log_probs, adv, m, loss_type=t.loss_type, clip_range=lo, clip_range_high=hi,
                        ref_log_prob=batch.ref_log_probs[b], beta=beta, max_completion_length=t.max_new_tokens,
                        num_items_in_batch=n_tokens, num_processes=self.world, token_weights=tws[b],
                        teacher_log_prob=teach[b], kd_beta=kd_beta, kd_estimator=t.kd_estimator, kd_mask=kd_mask,
                    )
                    # dapo's normaliser already spans the accumulation window; the others are per micro-batch means
                    scale = 1.0 if t.loss_type == "dapo" else 1.0 / len(win)
                    if not self.finite_or_skip(loss, b):
                        continue
                    backward(self.accelerator, self._prepared, loss * scale)
                    st["loss"] = loss.detach()
                    for k, v in st.items():
                        if v.dim() == 0:
                            sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                gn_sum += self.optimizer_step()
                n_updates += 1
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["grad_norm"] = gn_sum / max(n_updates, 1)
        out["optimizer_updates"] = n_updates
        out["beta"] = beta
        if self.teacher is not None:
            out["kd_beta"] = kd_beta
        return out

    def finite_or_skip(self, loss: Tensor, micro_batch: int) -> bool:
        """True for a finite loss; else counted, warned, and fatal after ``max_nan_skips`` in a row (the image
        trainer's rule, :func:`flowrl.trainer.skip_nonfinite_loss`)."""
        return not skip_nonfinite_loss(self, loss, f"micro-batch {micro_batch}")

    def optimizer_step(self) -> float:
        return optimizer_step(self)

    @torch.no_grad()
    def after_update(self, batch: TextBatch) -> None:
        """SPO: add this step's policy drift, the mean k3 KL(pi_old || pi_new) over the batch's tokens, to the
        cumulative drift that sets each prompt's forgetting factor."""
        if self.spo_tracker is None:
            return
        s, n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for r in batch.rollouts:
            logp, _ = self.policy.log_probs(r, temperature=self.cfg.text.temperature)
            kl = kl_k3(r.log_probs, logp)  # = exp(logp_new - logp_old) - (logp_new - logp_old) - 1 per token
            s = s + torch.where(r.mask, kl, torch.zeros_like(kl)).sum()
            n = n + r.mask.sum()
        tot = self.accelerator.gather(torch.stack([s, n.float()])[None]).sum(0)
        self.spo_cum_kl += float(tot[0] / tot[1].clamp_min(1))

    # ------------------------------------------------------------------------------------------------ metrics
    def step_metrics(self, batch: TextBatch, train: dict, t_sample: float, t_train: float) -> dict:
        m: dict = {}
        total = torch.zeros(len(batch.problems))
        for name, s in batch.rewards.items():
            ok = s[~torch.isnan(s)]
            m[f"reward/{name}/mean"] = float(ok.mean()) if len(ok) else float("nan")
            m[f"reward/{name}/std"] = float(ok.std(unbiased=False)) if len(ok) else float("nan")
            w = 1.0 if name in SHAPING_REWARDS else self.reward_weights[name]
            total += w * torch.nan_to_num(s)
        m["reward/mean"] = float(total.mean())
        for k, v in train.items():
            m[f"train/{k}"] = v
        for k, v in batch.variant_stats.items():
            m[f"train/{k}"] = v
        lengths = torch.cat([r.lengths.cpu() for r in batch.rollouts]).float()
        truncated = torch.cat([r.truncated.cpu() for r in batch.rollouts]).float()
        m["completion/mean_length"] = float(lengths.mean())
        m["completion/truncated_frac"] = float(truncated.mean())
        m["train/zero_std_share"] = float(batch.zero_std.float().mean())
        m["train/adv_abs_mean"] = float(batch.advantages.abs().mean())
        m["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        m["train/nan_loss_skips"] = self.nan_skips
        m["train/sampled_groups"] = batch.sampled_groups
        m["train/sampling_rounds"] = batch.rounds
        m["train/kept_groups"] = len(set(batch.group_ids.tolist()))
        m["time/sampling_s"] = t_sample
        m["time/training_s"] = t_train
        return m

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.cfg.report_to != "none":
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy completions of every eval set, scored: ``{set}/accuracy`` (mean ``exact_answer``),
        ``{set}/reward/{name}``, ``{set}/mean_length``, ``{set}/truncated_frac``."""
        return evaluate_policy(self.policy, self.cfg, self.eval_sets, self.rewards)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _register_checkpoint_hooks(self) -> None:
        from safetensors.torch import load_file, save_file

        def save_hook(models, weights, output_dir):
            sd = trainable_state_dict(self.accelerator, self._prepared, self.policy.trainable_state_dict)
            if sd is not None:  # the main process
                sd = {k: v.contiguous().cpu() for k, v in sd.items()}
                save_file(sd, os.path.join(output_dir, "trainable.safetensors"))
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            if not models:  # DeepSpeed: accelerate restored the engine's model (and optimizer) itself
                return
            sd = load_file(os.path.join(input_dir, "trainable.safetensors"))
            named = {k: p for k, p in self.policy.model.named_parameters() if p.requires_grad}
            bad = sorted(set(sd) ^ set(named)) + [k for k in sd if k in named and sd[k].shape != named[k].shape]
            if bad:
                raise ValueError(f"checkpoint {input_dir!r} does not match this model/LoRA config ({bad[:3]})")
            with torch.no_grad():
                for k, v in sd.items():
                    named[k].copy_(v)
            while models:
                models.pop()

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_checkpoint(self) -> Path:
        """``checkpoint-{step}`` via ``accelerator.save_state``, written atomically (shared with the image trainer)."""
        state = {"step": self.step, "optimizer_steps": self.optimizer_steps, "nan_skips": self.nan_skips,
                 "modality": "text", "variants": self.variant_state(), "config": to_dict(self.cfg)}
        return save_checkpoint(self.accelerator, self.out, self.step, state, self.cfg.checkpoints_total_limit)

    def resume(self, which: str) -> None:
        path = find_checkpoint(self.out, which)
        if path is None:
            self.accelerator.print(f"no checkpoint in {self.out}; starting from scratch")
            return
        state = json.loads((path / "flowrl_state.json").read_text())
        self.accelerator.load_state(str(path))
        self.step = int(state["step"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.nan_skips = int(state.get("nan_skips", 0))
        self.load_variant_state(state.get("variants", {}))
        if self.accelerator.is_main_process:
            truncate_metrics(self.out, self.step)
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def export(self) -> None:
        """``output_dir/final``: the LoRA adapter (peft) or the full model, with the tokenizer."""
        if self.accelerator.is_main_process:
            final = self.out / "final"
            shutil.rmtree(final, ignore_errors=True)
            self.policy.save_pretrained(final)


@torch.no_grad()
def evaluate_policy(policy: TextPolicy, cfg: TrainConfig, sets: dict[str, list[ArithmeticProblem]],
                    rewards: dict) -> dict:
    """Greedy decoding of each set; see :meth:`TextTrainer.evaluate`."""
    t, bs = cfg.text, max(cfg.grpo.sample_batch_size, 1)
    out: dict = {}
    for label, problems in sets.items():
        if not problems:
            continue
        prompts = policy.format_prompts([prompt_text(cfg, p) for p in problems])
        parts = [policy.generate(prompts[i:i + bs], max_new_tokens=t.max_new_tokens, temperature=0.0, score=False)
                 for i in range(0, len(prompts), bs)]
        r = TextRollout.cat(parts)
        answers = [p.answer for p in problems]
        acc = score_text(get_text_reward("exact_answer"), r.prompts, r.completions, name="exact_answer",
                         answer=answers)
        out[f"{label}/accuracy"] = float(acc.mean())
        for name, fn in rewards.items():
            if name != "exact_answer":
                s = score_text(fn, r.prompts, r.completions, name=name, answer=answers)
                out[f"{label}/reward/{name}"] = float(torch.nanmean(s))
        out[f"{label}/mean_length"] = float(r.lengths.float().mean())
        out[f"{label}/truncated_frac"] = float(r.truncated.float().mean())
    return out


# ====================================================================================================== CLI glue
def preflight_text(cfg: TrainConfig) -> None:
    """Cheap checks before any heavy work: rewards, model path, output dir, checkpoint. Raises ConfigError."""
    from .policies.text import resolve_lm_path

    for name in text_rewards(cfg):
        try:
            get_text_reward(name)
        except (ValueError, ImportError, AttributeError) as e:
            raise ConfigError(f"text reward {name!r}: {e}") from None
    t = cfg.text
    for key, name in (("lm_name_or_path", t.lm_name_or_path), ("teacher_name_or_path", t.teacher_name_or_path)):
        if name in (None, "tiny"):
            continue
        try:
            path = resolve_lm_path(name)
        except FileNotFoundError as e:
            raise ConfigError(f"{key}: {e}") from None
        p = Path(path)
        if path.startswith((".", "/", "~")) and not p.exists():
            raise ConfigError(f"{key} {path!r} does not exist")
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{key} {path!r} is not a directory")
        if key == "lm_name_or_path" and t.gguf_file and not (p / t.gguf_file).is_file():
            raise ConfigError(f"gguf_file {t.gguf_file!r} not found in {path!r}")
    need = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    if cfg.grpo.sample_batch_size > need:
        raise ConfigError(f"sample_batch_size={cfg.grpo.sample_batch_size} exceeds prompts_per_step*group_size={need}")
    out = Path(cfg.output_dir)
    probe = out if out.exists() else next((q for q in out.parents if q.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"output_dir {str(out)!r} cannot be created or written")
    ck = cfg.resume_from_checkpoint
    if ck not in (None, "latest") and not (Path(ck) / "flowrl_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint {ck!r} is not a complete flowrl checkpoint "
                          "(use 'latest' or a checkpoint-N directory)")


def run_text_training(cfg: TrainConfig) -> int:
    """``flowrl train`` for ``modality: text``; returns the exit code."""
    trainer = TextTrainer(cfg)
    try:
        metrics = trainer.train()
    except (RewardError, ConfigError) as e:
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.startswith(("eval/", "heldout/"))]
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"model and logs in {cfg.output_dir}")
    return 0
