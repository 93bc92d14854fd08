"""The text GRPO recipe (``modality: text``), on accelerate: setup -> (sample -> score -> advantages -> update -> log)
x steps -> export. Read top to bottom; the math lives in :mod:`flowrl.advantages`, :mod:`flowrl.objectives` (shared
with the image trainer) and :mod:`flowrl.text_objectives` (token-loss aggregation, DCPO bounds, overlong shaping).

One *step*: ``prompts_per_step`` problems of the task, ``group_size`` completions each, sampled with the current
policy (:class:`flowrl.policies.text.TextPolicy`), scored by text rewards (TRL's signature, :mod:`rewards.text`),
turned into group advantages, then ``num_inner_epochs`` passes of token-level clipped-surrogate updates. With
``dynamic_sampling`` (DAPO) groups whose rewards are all equal are dropped and more problems are sampled, up to
``dynamic_sampling_max_rounds`` rounds. Micro-batches are ``sample_batch_size`` completions; the old log-probs are
recomputed on the exact micro-batch the update sees, so the first pass has ratio exactly 1.

Settings come from the same config tree as images: ``grpo`` (group size, clip ranges, beta...), ``optim``,
``eval.eval_steps`` / ``eval.eval_sets`` (``eval`` = training problems, ``heldout`` = the held-out split; greedy
decoding), checkpointing and ``rewards`` at the top level, and the ``text`` section. An unset
``rewards`` (the image default ``{scenes: 1}``) means ``{exact_answer: 1}`` here. Not used for text: EMA, the
``sampling`` / ``plan`` sections.

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

from .advantages import clip_advantages, dynamic_sampling_mask, multi_reward_advantages, ngrpo_advantages
from .checkpoint import find_checkpoint, save_checkpoint, truncate_metrics
from .config import ConfigError, TrainConfig, to_dict
from .objectives import kl_weight_schedule
from .policies.text import LLAMA_LORA_TARGETS, TextPolicy, TextRollout, build_char_tokenizer, build_tiny_lm
from .text_objectives import dcpo_clip_bounds, overlong_penalty, text_policy_loss

IMAGE_DEFAULT_REWARDS = {"scenes": 1.0}


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


# ====================================================================================================== batch
@dataclasses.dataclass
class TextBatch:
    """One step's samples (rows group-major: the G completions of a problem are adjacent)."""

    problems: list[ArithmeticProblem]
    group_ids: Tensor  # [B]
    rollouts: list[TextRollout]  # micro-batches, old log-probs recomputed on exactly these
    ref_log_probs: list[Tensor | None]  # per micro-batch, [b, L] when beta > 0
    rewards: dict[str, Tensor]  # raw reward per name, [B] (NaN = not applicable)
    advantages: Tensor  # [B]
    zero_std: Tensor  # [B]
    valid: Tensor  # [B]
    sampled_groups: int
    rounds: int


class TextTrainer:
    """GRPO for causal LMs. ``TextTrainer(cfg).train()``; see the module docstring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ================================================================================================ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg, t, g, o = self.cfg, self.cfg.text, self.cfg.grpo, self.cfg.optim
        log_with = None if cfg.report_to == "none" else cfg.report_to
        self.accelerator = Accelerator(
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.use_kl = g.beta > 0 or (t.beta_end or 0) > 0
        self.policy = load_text_policy(cfg, self.device, need_reference=self.use_kl)
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
        self.policy.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.policy.model, self.optimizer, self.lr_scheduler
        )
        self._register_checkpoint_hooks()
        self.step = 0
        self.optimizer_steps = 0
        self.nan_skips = 0
        if cfg.resume_from_checkpoint:
            self.resume(cfg.resume_from_checkpoint)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            if log_with:
                from .trainer import _flat_config

                self.accelerator.init_trackers("flowrl-text", config=_flat_config(cfg))

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
    def step_problems(self, step: int, round_: int) -> tuple[list[ArithmeticProblem], Tensor]:
        """This process's problems for (step, round), one row per completion (group-major), and group ids. The
        choice depends only on (seed, step, round): ``prompts_per_step * world`` problems, rank r takes its slice."""
        g = self.cfg.grpo
        rng = np.random.default_rng([self.cfg.seed, step, round_])
        n_global = g.prompts_per_step * self.world
        pick = rng.choice(len(self.train_problems), n_global, replace=n_global > len(self.train_problems))
        mine = range(self.rank * g.prompts_per_step, (self.rank + 1) * g.prompts_per_step)
        problems = [self.train_problems[int(pick[i])] for i in mine for _ in range(g.group_size)]
        base = round_ * n_global  # group ids unique across rounds
        group_ids = torch.tensor([base + i for i in mine for _ in range(g.group_size)])
        return problems, group_ids

    @torch.no_grad()
    def generate(self, problems: list[ArithmeticProblem], generator: torch.Generator) -> TextRollout:
        """Completions for ``problems`` in micro-batches of ``sample_batch_size`` (sampling temperature / top-p)."""
        t, bs = self.cfg.text, self.cfg.grpo.sample_batch_size
        prompts = self.policy.format_prompts([prompt_text(self.cfg, p) for p in problems])
        parts = [self.policy.generate(prompts[i:i + bs], max_new_tokens=t.max_new_tokens, temperature=t.temperature,
                                      top_p=t.top_p, generator=generator, score=False)
                 for i in range(0, len(prompts), bs)]
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

    def sample_and_score(self, step: int) -> tuple[TextBatch, float]:
        cfg, g, t = self.cfg, self.cfg.grpo, self.cfg.text
        t0 = time.time()
        gen = torch.Generator(device=self.device).manual_seed(int(np.random.SeedSequence([cfg.seed, step])
                                                                  .generate_state(1)[0]))
        weights = dict(self.reward_weights)
        if t.overlong_buffer > 0:
            weights["overlong"] = 1.0
        kept: list[tuple[list[ArithmeticProblem], Tensor, TextRollout, dict[str, Tensor]]] = []
        n_kept_groups, sampled_groups, rounds = 0, 0, 0
        for round_ in range(t.dynamic_sampling_max_rounds if t.dynamic_sampling else 1):
            rounds += 1
            problems, group_ids = self.step_problems(step, round_)
            rollout = self.generate(problems, gen)
            rewards = self.score(problems, rollout)
            sampled_groups += g.prompts_per_step
            if t.dynamic_sampling:
                total = sum(w * torch.nan_to_num(rewards[k]) for k, w in weights.items())
                keep = dynamic_sampling_mask(total, group_ids)
                if not bool(keep.any()):
                    continue
                idx = keep.nonzero().squeeze(1)
                problems = [problems[i] for i in idx.tolist()]
                group_ids, rollout = group_ids[idx], rollout.select(idx.to(rollout.mask.device))
                rewards = {k: v[idx] for k, v in rewards.items()}
            kept.append((problems, group_ids, rollout, rewards))
            n_kept_groups += len(set(group_ids.tolist()))
            if n_kept_groups >= g.prompts_per_step:
                break
        if not kept:  # every group flat in every round: train on the last round anyway (all advantages 0)
            kept.append((problems, group_ids, rollout, rewards))
        problems = [p for k in kept for p in k[0]]
        group_ids = torch.cat([k[1] for k in kept])
        rollout = TextRollout.cat([k[2] for k in kept])
        rewards = {name: torch.cat([k[3][name] for k in kept]) for name in kept[0][3]}
        if t.dynamic_sampling:  # at most prompts_per_step groups
            first = sorted(set(group_ids.tolist()), key=group_ids.tolist().index)[: g.prompts_per_step]
            idx = torch.isin(group_ids, torch.tensor(first)).nonzero().squeeze(1)
            problems = [problems[i] for i in idx.tolist()]
            group_ids, rollout = group_ids[idx], rollout.select(idx.to(rollout.mask.device))
            rewards = {k: v[idx] for k, v in rewards.items()}

        # advantages over the gathered batch (groups never straddle processes: they are per rank)
        all_rewards = {k: self.accelerator.gather(v.to(self.device)) for k, v in rewards.items()}
        all_groups = self.accelerator.gather(group_ids.to(self.device) + self.rank * 10**9)
        if t.advantage_baseline == "ngrpo":
            total = torch.stack([w * all_rewards[k] for k, w in weights.items()]).nansum(0)
            adv = ngrpo_advantages(total, all_groups, r_max=t.ngrpo_r_max)
        else:
            adv = multi_reward_advantages(all_rewards, weights, all_groups, mode=g.reward_aggregation,
                                          std_mode=g.std_mode)
        n = len(problems)
        mine = slice(self.rank * n, (self.rank + 1) * n)  # equal n per rank assumed (no dynamic sampling in DDP)

        # micro-batches; old (and reference) log-probs on exactly these
        micro, refs = [], []
        bs = g.sample_batch_size
        with torch.no_grad():
            for i in range(0, n, bs):
                r = rollout.select(torch.arange(i, min(i + bs, n), device=rollout.mask.device))
                lp, _ = self.policy.log_probs(r, temperature=t.temperature)
                r.log_probs = lp.masked_fill(~r.mask, 0.0)
                micro.append(r)
                if self.use_kl:
                    with self.policy.reference():
                        refs.append(self.policy.log_probs(r, temperature=t.temperature)[0])
                else:
                    refs.append(None)
        batch = TextBatch(
            problems=problems, group_ids=group_ids, rollouts=micro, ref_log_probs=refs,
            rewards={k: v.cpu() for k, v in rewards.items()},
            advantages=clip_advantages(adv.advantages[mine], g.adv_clip_max).cpu(),
            zero_std=adv.zero_std[mine].cpu(), valid=adv.valid[mine].cpu(),
            sampled_groups=sampled_groups, rounds=rounds,
        )
        return batch, time.time() - t0

    # ------------------------------------------------------------------------------------------------ update
    def beta_now(self) -> float:
        g, t = self.cfg.grpo, self.cfg.text
        end = g.beta if t.beta_end is None else t.beta_end
        if t.kl_schedule == "constant" or end == g.beta:
            return g.beta
        return kl_weight_schedule(self.step - 1, self.cfg.max_train_steps, g.beta, end, t.kl_schedule)

    def loss_mask(self, r: TextRollout, valid: Tensor) -> Tensor:
        m = r.mask & valid[:, None]
        if self.cfg.text.mask_truncated:
            m = m & ~r.truncated[:, None]
        return m

    def update(self, batch: TextBatch) -> dict[str, float]:
        """``num_inner_epochs`` passes of token-level clipped-surrogate updates over the micro-batches."""
        g, t = self.cfg.grpo, self.cfg.text
        self.policy.model.eval()  # dropout stays off while training with gradients
        beta = self.beta_now()
        sums: dict[str, float] = {}
        count, n_updates, gn_sum = 0, 0, 0.0
        offsets = np.cumsum([0] + [r.batch_size for r in batch.rollouts])
        windows = [list(range(i, min(i + self.accum, len(batch.rollouts))))
                   for i in range(0, len(batch.rollouts), self.accum)]
        for _epoch in range(g.num_inner_epochs):
            for win in windows:
                self.optimizer.zero_grad(set_to_none=True)
                masks = [self.loss_mask(batch.rollouts[b], batch.valid[offsets[b]:offsets[b + 1]].to(self.device))
                         for b in win]
                n_tokens = self.accelerator.gather(sum(m.sum() for m in masks).reshape(1).float()).sum()
                for b, m in zip(win, masks):
                    r = batch.rollouts[b]
                    adv = batch.advantages[offsets[b]:offsets[b + 1]].to(self.device)
                    logp, _ = self.policy.log_probs(r, temperature=t.temperature)
                    lo, hi = g.clip_range, g.clip_range_high
                    if t.token_clip == "dcpo":
                        lo, hi = dcpo_clip_bounds(r.log_probs, g.clip_range, g.clip_range_high or g.clip_range)
                    loss, st = text_policy_loss(
                        logp, r.log_probs, adv, m, loss_type=t.loss_type, clip_range=lo, clip_range_high=hi,
                        ref_log_prob=batch.ref_log_probs[b], beta=beta, max_completion_length=t.max_new_tokens,
                        num_items_in_batch=n_tokens, num_processes=self.world,
                    )
                    # dapo's normaliser already spans the accumulation window; the others are per micro-batch means
                    scale = 1.0 if t.loss_type == "dapo" else 1.0 / len(win)
                    if not torch.isfinite(loss):
                        self.nan_skips += 1
                        continue
                    self.accelerator.backward(loss * scale)
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
        return out

    def optimizer_step(self) -> float:
        gn = self.accelerator.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return float(gn)

    # ------------------------------------------------------------------------------------------------ metrics
    def step_metrics(self, batch: TextBatch, train: dict, t_sample: float, t_train: float) -> dict:
        m: dict = {}
        total = torch.zeros(len(batch.problems))
        for name, s in batch.rewards.items():
            ok = s[~torch.isnan(s)]
            m[f"reward/{name}/mean"] = float(ok.mean()) if len(ok) else float("nan")
            m[f"reward/{name}/std"] = float(ok.std(unbiased=False)) if len(ok) else float("nan")
            w = 1.0 if name == "overlong" else self.reward_weights[name]
            total += w * torch.nan_to_num(s)
        m["reward/mean"] = float(total.mean())
        for k, v in train.items():
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
            if self.accelerator.is_main_process:
                sd = {k: v.contiguous().cpu() for k, v in self.policy.trainable_state_dict().items()}
                save_file(sd, os.path.join(output_dir, "trainable.safetensors"))
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
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
                 "modality": "text", "config": to_dict(self.cfg)}
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
    if t.lm_name_or_path != "tiny":
        try:
            path = resolve_lm_path(t.lm_name_or_path)
        except FileNotFoundError as e:
            raise ConfigError(f"lm_name_or_path: {e}") from None
        p = Path(path)
        if path.startswith((".", "/", "~")) and not p.exists():
            raise ConfigError(f"lm_name_or_path {path!r} does not exist")
        if p.exists() and not p.is_dir():
            raise ConfigError(f"lm_name_or_path {path!r} is not a directory")
        if t.gguf_file and not (p / t.gguf_file).is_file():
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
    except (RewardError,) as e:
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.startswith(("eval/", "heldout/"))]
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"model and logs in {cfg.output_dir}")
    return 0
