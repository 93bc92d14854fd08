"""The GRPO training recipe, on accelerate: setup -> (sample -> score -> advantages -> update -> log) x steps ->
export. Read top to bottom; the math lives in :mod:`samplers`, :mod:`flowrl.advantages`, :mod:`flowrl.objectives`.

One *step* is one iteration: ``prompts_per_step x group_size`` trajectories sampled with the current policy, scored,
turned into advantages, then ``num_inner_epochs`` passes of clipped-surrogate updates over the stored transitions
(by default one optimizer update per step; ``gradient_accumulation_steps`` splits it). Micro-batches in training are
exactly the sampling batches, so the first, on-policy pass has ratio exactly 1. With ``objective: nft``
(DiffusionNFT) the update is instead advantage-signed flow matching on the sampled clean images
(:meth:`Trainer.nft_micro_batch_loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rewards import get_reward
from samplers.plans import FullSDEPlan, WindowPlan
from samplers.rollout import Rollout, rescore, sample

from .advantages import clip_advantages, group_advantages, multi_reward_advantages, variant_advantages
from .checkpoint import find_checkpoint, save_checkpoint, truncate_metrics
from .config import ConfigError, TrainConfig, to_dict
from .embedded import EMBEDDED_MODEL_DIR
from .evaluate import atomic_write_text, generate, make_grid, save_image_atomic, score_all, summarize
from .objectives import (adaptive_lr_scale, clipped_surrogate, guard_normalized_log_ratio, kl_to_reference,
                         kl_velocity, nft_loss, step_weights)
from .policies.base import combine_cfg
from .policies.sd3 import read_model_defaults
from .prompts import load_prompts
from .seeding import derive_seed, gaussian, gaussians



def resolve_model_path(name: str) -> str:
    return str(EMBEDDED_MODEL_DIR) if name == "embedded" else name


def make_plan(cfg: TrainConfig):
    p = cfg.plan
    if p.plan in ("tempflow", "g2rpo", "tree"):  # branching plans: samplers.branching, flowrl.branching_trainer
        from .branching_trainer import make_branch_plan

        return make_branch_plan(cfg)
    tail = {"ode_solver": p.ode_solver, "flash_ratio": p.flash_ratio}
    if p.plan == "full":
        return FullSDEPlan(p.step_kind, p.noise_level, p.train_fraction, p.ode_after_train, **tail)
    return WindowPlan(
        p.step_kind, p.noise_level, p.window_size, p.window_start, p.window_schedule, p.window_tau, p.window_shift,
        wrap=p.window_wrap, seed=cfg.seed, **tail,
    )


@dataclasses.dataclass
class Batch:
    """One step's samples (rows prompt-major: row r belongs to prompt r // group_size)."""

    prompts: list[str]
    group_ids: Tensor
    rollouts: list[Rollout]  # one per micro-batch
    images: Tensor
    rewards: dict[str, Tensor]
    advantages: Tensor
    zero_std: Tensor
    valid: Tensor
    sample_ids: Tensor | None = None  # global sample ids (seeding of the nft objective's forward-process points)


class Trainer:
    """Flow-GRPO-family trainer. ``Trainer(cfg).train()``; see the module docstring."""

    branching = False  # set in setup: the plan branches (samplers.branching)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ================================================================================================ setup
    def setup(self) -> None:
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

        cfg = self.cfg
        log_with = None if cfg.report_to == "none" else cfg.report_to
        self.accelerator = Accelerator(
            mixed_precision=cfg.model.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            # a hung or dead rank fails the collectives of the others after this long instead of blocking forever
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
            # one lr-scheduler step per optimizer update whatever the process count (accelerate's default steps it
            # num_processes times, assuming a sharded dataloader; the schedule here counts updates)
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

        model_path = resolve_model_path(cfg.model.pretrained_model_name_or_path)
        defaults = read_model_defaults(model_path) if Path(model_path).is_dir() else {}
        self.resolution = cfg.model.resolution or defaults.get("resolution") or 512
        self.guidance = cfg.sampling.guidance_scale or defaults.get("guidance_scale")  # resolved after loading
        self.eval_guidance = cfg.eval.eval_guidance_scale or self.guidance
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.model.mixed_precision]
        from .policies import load_policy
        from .policies.base import LARGE_FULL_FINETUNE_PARAMS, check_full_finetune_size, default_lora_targets

        check_full_finetune_size(model_path, cfg.model.rank, cfg.model.allow_large_full_finetune)

        # the model family's preset (SD3: joint attention [+ ff]; Flux: see flowrl.policies.flux)
        targets = cfg.model.lora_target_modules or list(
            default_lora_targets(model_path, cfg.model.lora_on_ff, revision=cfg.model.revision)
        )

        self.policy = load_policy(
            model_path,
            revision=cfg.model.revision,
            variant=cfg.model.variant,
            cache_dir=cfg.model.cache_dir,
            lora_rank=cfg.model.rank or None,
            lora_alpha=cfg.model.lora_alpha if cfg.model.lora_alpha is not None else 2.0 * cfg.model.rank,
            lora_targets=targets,
            max_sequence_length=cfg.model.max_sequence_length or defaults.get("max_sequence_length", 256),
            weight_dtype=weight_dtype,
            device=self.device,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            need_reference=cfg.grpo.beta > 0 or cfg.grpo.kl_probe_rows > 0,
            # issue 4 (memory): xformers attention; text encoders on the CPU (also while precomputing) + cache
            enable_xformers_memory_efficient_attention=cfg.model.enable_xformers_memory_efficient_attention,
            text_encoder_offload=cfg.model.text_encoder_offload or cfg.model.precompute_prompt_embeds,
            prompt_embeds_cache_size=cfg.model.prompt_embeds_cache_size,
            lora_export_rank=cfg.model.lora_export_rank,
        )
        if self.guidance is None:
            self.guidance = getattr(self.policy, "default_guidance", 4.5)
        if cfg.eval.eval_guidance_scale is None:
            self.eval_guidance = self.guidance
        self.params = self.policy.trainable_parameters()
        n_trained = sum(p.numel() for p in self.params)
        if cfg.model.rank == 0 and n_trained > LARGE_FULL_FINETUNE_PARAMS and not cfg.model.allow_large_full_finetune:
            check_full_finetune_size(model_path, 0, False, n_params=n_trained)  # a hub id: known only once loaded
        self.rewards = {name: get_reward(name) for name in cfg.rewards}
        from concurrent.futures import ThreadPoolExecutor

        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="flowrl-reward") if cfg.reward_worker else None
        self.train_prompts = load_prompts(cfg.prompts)
        self.eval_sets = {name: load_prompts(name) for name in cfg.eval.eval_sets}
        if cfg.model.precompute_prompt_embeds:  # issue 4: encode every prompt once, then free the text encoders
            self.policy.precompute_prompt_embeds(self.train_prompts + [p for ps in self.eval_sets.values() for p in ps])
        self.plan = make_plan(cfg)
        self.sigmas = self.policy.sigmas(cfg.sampling.num_inference_steps, self.resolution)
        self.latent_shape = self.policy.latent_shape(self.resolution)

        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay,
            eps=o.adam_epsilon,
        )
        self.branching = getattr(self.plan, "branching", False)
        if self.branching:  # micro-batches = the sampling's node chunks (flowrl.branching_trainer)
            from .branching_trainer import micro_batch_schedule

            self.n_micro, self.accum, updates_per_step = micro_batch_schedule(self)
        else:
            self.n_micro = cfg.grpo.prompts_per_step * cfg.grpo.group_size // cfg.grpo.sample_batch_size
            self.accum = min(o.gradient_accumulation_steps or self.n_micro, self.n_micro)
            updates_per_step = cfg.grpo.num_inner_epochs * math.ceil(self.n_micro / self.accum)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            o.lr_scheduler, self.optimizer, num_warmup_steps=o.lr_warmup_steps * updates_per_step,
            num_training_steps=cfg.max_train_steps * updates_per_step,
        )
        names = list(self.policy.trainable_state_dict())  # un-prefixed, before any wrapper renames them
        # FSDP / DeepSpeed checks + settings
        configure_for_wrapper(self.accelerator, cfg, self.policy.transformer, branching=self.branching)
        model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.policy.transformer, self.optimizer, self.lr_scheduler
        )
        # Multi-process (see unwrap_prepared): under DDP the policy keeps the bare module (peft attributes,
        # un-prefixed parameter names) and optimizer_step averages the trainable gradients over processes itself, once
        # per update (DDP's own hooks stay idle since its forward is never called; same gradient as DDP's mean).
        # FSDP: the policy calls the FSDP root, which reduce-scatters; DeepSpeed ZeRO-2: the bare module, the engine
        # reduces. Neither is reduced again here.
        self._prepared = unwrap_prepared(self.accelerator, model, names)
        self._average_grads = self._prepared.average_grads
        self.policy.transformer = self._prepared.module
        self.ema = [p.detach().clone() for p in self.params] if o.use_ema else None
        self._register_checkpoint_hooks()
        self.step = 0
        self.optimizer_steps = 0
        self.lr_scale = 1.0  # target_kl's multiplier of the scheduled learning rate
        self.nan_skips = 0
        self.nan_streak = 0  # non-finite losses in a row (reset by a finite one); max_nan_skips stops the run
        if cfg.resume_from_checkpoint:
            self.resume(cfg.resume_from_checkpoint)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
            if log_with:
                self.accelerator.init_trackers("flowrl", config=_flat_config(cfg))

    # ================================================================================================ the loop
    def train(self) -> dict:
        """Run to ``max_train_steps`` (or the time budget); returns the last metrics."""
        from tqdm.auto import tqdm

        self.setup()
        cfg = self.cfg
        start = time.time()
        metrics: dict = {}
        if self.step == 0 and cfg.eval.eval_steps > 0:
            self.log(self.evaluate(0), step=0)
        stop = {"flag": False}
        old_handlers = _install_signal_handlers(stop)
        bar = tqdm(total=cfg.max_train_steps, initial=self.step, disable=not self.accelerator.is_main_process,
                   desc="flowrl train", dynamic_ncols=True)
        try:
            while self.step < cfg.max_train_steps and not stop["flag"]:
                self.step += 1
                batch, t_sample = self.sample_and_score(self.step)
                t0 = time.time()
                train_stats = self.update(batch)
                t_train = time.time() - t0
                metrics = self.step_metrics(batch, train_stats, t_sample, t_train)
                if cfg.eval.eval_steps and self.step % cfg.eval.eval_steps == 0:
                    metrics.update(self.evaluate(self.step))
                self.log(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}")
                over_time = cfg.max_time_minutes is not None and (time.time() - start) / 60 > cfg.max_time_minutes
                if over_time:
                    stop["flag"] = True
                if (cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0) or stop["flag"]:
                    self.save_checkpoint()
            if cfg.eval.eval_steps and self.step % cfg.eval.eval_steps != 0:
                final_eval = self.evaluate(self.step)
                self.log(final_eval, step=self.step, append_to_last=True)
                metrics.update(final_eval)
            if not stop["flag"] or self.step >= cfg.max_train_steps:
                self.save_checkpoint()
            self.export()
        finally:
            bar.close()
            _restore_signal_handlers(old_handlers)
            if self._scorer is not None:
                self._scorer.shutdown(wait=True)
            self.accelerator.end_training()
        return metrics

    # ------------------------------------------------------------------------------------------------ sampling
    def step_prompts(self, step: int) -> tuple[list[str], Tensor, Tensor]:
        """This process's prompts for ``step`` (rows prompt-major), group ids and global sample ids.

        Prompt choice depends only on (seed, step): P * world prompts drawn without replacement, rank r takes its
        slice. Global sample id = (step, global row) so per-sample noise is independent of layout and rank.
        """
        g = self.cfg.grpo
        rng = np.random.default_rng([self.cfg.seed, step])
        n_global = g.prompts_per_step * self.world
        pick = rng.choice(len(self.train_prompts), n_global, replace=n_global > len(self.train_prompts))
        mine = range(self.rank * g.prompts_per_step, (self.rank + 1) * g.prompts_per_step)
        prompts = [self.train_prompts[int(pick[i])] for i in mine for _ in range(g.group_size)]
        group_ids = torch.tensor([i for i in mine for _ in range(g.group_size)])
        sample_ids = torch.tensor([i * g.group_size + k for i in mine for k in range(g.group_size)])
        return prompts, group_ids, sample_ids

    @torch.no_grad()
    def sample_and_score(self, step: int) -> tuple[Batch, float]:
        if self.branching:  # TempFlow-GRPO / G²RPO / Dynamic-TreeRPO: per-transition rows + advantages
            from . import branching_trainer

            return branching_trainer.sample_and_score(self, step)
        cfg, g = self.cfg, self.cfg.grpo
        t0 = time.time()
        prompts, group_ids, sample_ids = self.step_prompts(step)
        plan = self.plan(self.sigmas, step - 1)
        self._conds, self._uncond, rollouts, images, pending = [], [], [], [], []
        frozen = cfg.sampling.frozen_uncond
        trained_pos = {k for k, st in enumerate(plan.steps) if st.train}  # positions of the trained steps
        uniq = sorted(set(prompts), key=prompts.index)
        cond_all = self.policy.encode(uniq)  # encode each distinct prompt once per step
        row_of = {p: i for i, p in enumerate(uniq)}
        for b in range(self.n_micro):
            sl = slice(b * g.sample_batch_size, (b + 1) * g.sample_batch_size)
            cond = cond_all.select(torch.tensor([row_of[p] for p in prompts[sl]]))
            ids = sample_ids[sl]
            noise_ids = group_ids[sl] if cfg.sampling.same_noise_per_group else ids
            x = torch.stack([gaussian(self.latent_shape, cfg.seed, step, int(i), -1) for i in noise_ids]).to(self.device)

            def noise_fn(j: int, ids=ids) -> Tensor:
                if cfg.sampling.antithetic_noise:  # group member k odd takes -(noise of k - 1); G even, so id parity = k's
                    return torch.stack([gaussian(self.latent_shape, cfg.seed, step, int(i) - int(i) % 2, j)
                                        * (1 - 2 * (int(i) % 2)) for i in ids]).to(self.device)
                return torch.stack([gaussian(self.latent_shape, cfg.seed, step, int(i), j) for i in ids]).to(self.device)

            # frozen_uncond: v_u of the trained steps; sample() makes one velocity call per planned step, in order
            calls, kept = [0], []

            def vel(x_, s_, cond=cond) -> Tensor:
                with self.accelerator.autocast():
                    if not frozen:
                        return self.policy.velocity(x_, s_, cond, self.guidance)
                    v_c, v_u, scale = self.policy.cfg_parts(x_, s_, cond, self.guidance)
                if calls[0] in trained_pos:
                    kept.append(v_u)
                calls[0] += 1
                return combine_cfg(v_c, v_u, scale)

            r = sample(vel, x, plan, noise_fn)
            if frozen:
                self._uncond.append(torch.stack(kept, 1) if kept and kept[0] is not None else None)
            rollouts.append(r)
            images.append(self.policy.decode(r.final))
            self._conds.append(cond)
            if self._scorer is not None:  # score this micro-batch in the background while the next one samples
                pending.append(self._scorer.submit(score_all, self.rewards, images[-1].to(self.device), prompts[sl]))
        images_t = torch.cat(images)
        if self._scorer is not None:
            parts = [f.result() for f in pending]
            scores = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            scores = score_all(self.rewards, images_t.to(self.device), prompts)
        adv = self.gathered_advantages(scores, group_ids)
        n = len(prompts)
        mine = slice(self.rank * n, (self.rank + 1) * n)
        batch = Batch(
            prompts=prompts,
            group_ids=group_ids,
            rollouts=rollouts,
            images=images_t,
            rewards={k: v.cpu() for k, v in scores.items()},
            advantages=clip_advantages(adv.advantages[mine], g.adv_clip_max),
            zero_std=adv.zero_std[mine],
            valid=adv.valid[mine],
            sample_ids=sample_ids,
        )
        return batch, time.time() - t0

    def gathered_advantages(self, scores: dict[str, Tensor], group_ids: Tensor):
        """Group advantages of the configured rewards over the batch gathered from all processes (rows of every
        process, in rank order): one reward weighted, or several aggregated by ``reward_aggregation``."""
        g = self.cfg.grpo
        main = {k: v.to(self.device) for k, v in scores.items() if k in self.rewards}
        all_rewards = {k: self.accelerator.gather(v.to(self.device)) for k, v in main.items()}
        all_groups = self.accelerator.gather(group_ids.to(self.device))
        weights = {k: float(w) for k, w in self.cfg.rewards.items()}
        if g.advantage_variant != "group":  # modality-agnostic variants (NGRPO), shared with the text trainer
            return variant_advantages(g.advantage_variant, all_rewards, weights, all_groups, std_mode=g.std_mode,
                                      mode=g.reward_aggregation, r_max=g.ngrpo_r_max)
        if len(all_rewards) == 1:
            (name,) = all_rewards
            return group_advantages(all_rewards[name] * weights[name], all_groups, std_mode=g.std_mode)
        return multi_reward_advantages(all_rewards, weights, all_groups, mode=g.reward_aggregation,
                                       std_mode=g.std_mode)

    # ------------------------------------------------------------------------------------------------ update
    def update(self, batch: Batch) -> dict[str, float]:
        """``num_inner_epochs`` passes of clipped-surrogate updates over the stored transitions."""
        if self.branching:
            from . import branching_trainer

            return branching_trainer.update(self, batch)
        g = self.cfg.grpo
        self.policy.transformer.train(False)  # dropout stays off: sampling and training see the same function
        sums: dict[str, float] = {}
        count = 0
        n_updates = 0
        bs = g.sample_batch_size
        nft = g.objective == "nft"
        if nft:  # the sampling policy's velocities: needed as constants once the weights move within the step
            points = [self.nft_points(batch.rollouts[b].final, batch.sample_ids[b * bs : (b + 1) * bs])
                      for b in range(len(batch.rollouts))]
            v_old = [self.nft_old_velocities(p, self._conds[b]) if self.nft_needs_old else None
                     for b, p in enumerate(points)]
        for _epoch in range(g.num_inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for b, r in enumerate(batch.rollouts):
                adv = batch.advantages[b * bs : (b + 1) * bs].to(self.device)
                valid = batch.valid[b * bs : (b + 1) * bs].to(self.device)
                if nft:
                    stats = self.nft_micro_batch_loss(points[b], self._conds[b], adv, valid, 1.0 / self.accum,
                                                      v_old[b])
                else:
                    stats = self.micro_batch_loss(r, self._conds[b], adv, valid, scale=1.0 / self.accum,
                                                  uncond=self._uncond[b] if self._uncond else None)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if (b + 1) % self.accum == 0 or b + 1 == len(batch.rollouts):
                    n_updates += 1
                    gn = self.optimizer_step()
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + gn
        out = {k: v / count for k, v in sums.items() if k != "grad_norm"}
        out["grad_norm"] = sums.get("grad_norm", 0.0) / max(1, n_updates)
        out["optimizer_updates"] = n_updates
        if g.kl_probe_rows:  # the update's size, measured; target_kl steers the next step's learning rate by it
            out.update(self.policy_kl(batch))
            if g.target_kl is not None:
                self.lr_scale = adaptive_lr_scale(self.lr_scale, out["policy_kl"], g.target_kl,
                                                  max_scale=g.max_lr_scale)
                self.apply_lr_scale()
                out["lr_scale"] = self.lr_scale
        return out

    def micro_batch_loss(self, r: Rollout, cond, adv: Tensor, valid: Tensor, scale: float,
                         uncond: Tensor | None = None) -> dict[str, float]:
        """Backward the clipped surrogate (+ beta KL) of one micro-batch, averaged over its trained steps.

        ``uncond`` ([B, S, *D], ``frozen_uncond``): the unconditional velocities kept at sampling time; the guided
        velocity is then rebuilt from them and a fresh conditional pass (gradient through that pass only).

        With ``ratio_norm`` the clipped ratio is GRPO-Guard's normalised one (against the step mean stored at sampling
        time); ``step_weighting`` multiplies each step's surrogate (not the KL) by its weight (mean 1 over the steps).
        Besides the logged stats it returns per-step sums under ``_``-prefixed keys that :meth:`step_metrics` turns
        into per-step diagnostics (see :func:`_per_step_diagnostics`).
        """
        g = self.cfg.grpo
        guidance = self.guidance if self.cfg.sampling.train_cfg else 1.0
        S = r.latents.shape[1]
        stats: dict[str, float] = {}
        weights = step_weights(g.step_weighting, r.kinds, r.sigmas, r.sigmas_next, r.noise_levels, r.stds.mean(0))
        # (DeepSpeed ZeRO-2 moves the gradients into its partitions during backward: no per-step norms there)
        grads = _grad_snapshot(self.params) if g.step_grad_norms and self._prepared.kind != "deepspeed" else None
        for j in range(S):
            x = r.latents[:, j].to(self.device)
            sigma = r.sigmas[j].to(self.device)
            v = self.trained_velocity(x, sigma, cond, guidance, None if uncond is None else uncond[:, j])
            rj = dataclasses.replace(r, latents=r.latents.to(self.device), next_latents=r.next_latents.to(self.device))
            log_prob, mean, std = rescore(v, rj, j)
            old_log_prob = r.log_probs[:, j].to(self.device)
            raw_log_ratio = (log_prob - old_log_prob).detach()
            if g.ratio_norm:  # GRPO-Guard: clip exp(log r_hat) against old = 0
                log_prob = guard_normalized_log_ratio(log_prob, old_log_prob, mean, r.means[:, j].to(self.device), std)
                old_log_prob = torch.zeros_like(log_prob)
            w_j = None if weights is None else weights[j].to(self.device).expand(log_prob.shape)
            loss, st = clipped_surrogate(
                log_prob, old_log_prob, adv, clip_range=g.clip_range,
                clip_range_high=g.clip_range_high, mask=valid, step_weights=w_j,
            )
            if g.beta > 0:
                ref_mean = self.reference_step_mean(rj, j, x, sigma, cond, guidance)
                kl = kl_to_reference(mean, ref_mean, std.clamp_min(1e-12))
                kl_mean = (kl * valid).sum() / valid.sum().clamp_min(1)
                loss = loss + g.beta * kl_mean
                st["kl"] = kl_mean.detach()
            st["loss"] = loss.detach()
            if self.skip_nonfinite(loss, f"trained step {j}"):
                continue
            backward(self.accelerator, self._prepared, loss * scale / S)
            for k, val in st.items():
                if val.dim() == 0:
                    stats[k] = stats.get(k, 0.0) + float(val) / S
            stats[f"ratio_mean/step{int(r.step_indices[j])}"] = float(st["ratio_mean"])
            stats.update(_step_sums(int(r.step_indices[j]), (log_prob - old_log_prob).detach(), raw_log_ratio, adv,
                                    valid, st, None if w_j is None else float(weights[j]), g.ratio_norm))
            if grads is not None:
                gn, grads = _grad_delta_norm(self.params, grads)
                if self._prepared.kind == "fsdp":  # each process holds a shard of the (reduced) gradient
                    gn = _norm_over_processes(gn, self.device)
                scaler = getattr(self.accelerator, "scaler", None)
                stats[f"_gn/step{int(r.step_indices[j])}"] = gn / (scaler.get_scale() if scaler is not None else 1.0)
        return stats

    def trained_velocity(self, x: Tensor, sigma: Tensor, cond, guidance: float, uncond: Tensor | None) -> Tensor:
        """The velocity the surrogate trains at a stored state: the (guided) policy velocity, or with
        ``frozen_uncond`` the guided mix of a fresh conditional pass and the stored unconditional velocity ``uncond``
        ([B, *D])."""
        if uncond is None:
            with self.accelerator.autocast():
                return self.policy.velocity(x, sigma, cond, guidance)
        with self.accelerator.autocast():
            v_c, _, cfg_scale = self.policy.cfg_parts(x, sigma, cond, guidance, with_uncond=False)
        return combine_cfg(v_c, uncond.to(self.device), cfg_scale)

    @torch.no_grad()
    def reference_step_mean(self, r: Rollout, j: int, x: Tensor, sigma: Tensor, cond, guidance: float) -> Tensor:
        """The reference policy's (base: LoRA disabled, or the frozen copy) Gaussian step mean [B, *D] at the stored
        state ``x`` = ``r.latents[:, j]`` (on the device): the ``beta`` KL's and the probe's drift's anchor."""
        with self.policy.reference(), self.accelerator.autocast():
            v_ref = self.policy.velocity(x, sigma, cond, guidance)
        return rescore(v_ref, r, j)[1]

    @torch.no_grad()
    def policy_kl(self, batch: Batch) -> dict[str, float]:
        """How far this step's update moved the policy: the exact KL between the sampling Gaussian
        ``N(mean_old, s²)`` and the updated policy's ``N(mean_new, s²)`` at the stored state, averaged over latent
        elements (:func:`~flowrl.objectives.kl_to_reference` with the step std ``s``), over ``kl_probe_rows`` stored
        trajectories (evenly spaced over the batch; all of them when there are fewer) and over processes (so every
        process adapts its learning rate alike).

        Also how far the policy has drifted from the reference (the base: LoRA disabled, or the frozen copy of a full
        fine-tune) on the same rows: the same KL between the updated policy's step and the reference's.

        Returns ``{"policy_kl": mean over the trained steps, "policy_kl/step{k}": per trained step k,
        "policy_ref_kl": the drift, mean over the trained steps}``, floats >= 0; ``policy_kl`` is 0 before any
        update (the stored means are reproduced exactly, as the ratio of 1 is), and after the first update from the
        base ``policy_ref_kl`` equals it."""
        g = self.cfg.grpo
        guidance = self.guidance if self.cfg.sampling.train_cfg else 1.0
        bs, n = g.sample_batch_size, len(batch.prompts)
        picks = torch.linspace(0, n - 1, min(g.kl_probe_rows, n)).round().long().unique()
        S = batch.rollouts[0].latents.shape[1]
        total = torch.zeros(S, dtype=torch.float64, device=self.device)
        ref_total = torch.zeros(S, dtype=torch.float64, device=self.device)
        count = 0
        for b, r in enumerate(batch.rollouts):
            local = picks[(picks >= b * bs) & (picks < (b + 1) * bs)] - b * bs
            if not len(local):
                continue
            sub = r.select(local)
            sub = dataclasses.replace(sub, latents=sub.latents.to(self.device),
                                      next_latents=sub.next_latents.to(self.device))
            cond = self._conds[b].select(local.to(self.device))
            uncond = self._uncond[b][local] if self._uncond and self._uncond[b] is not None else None
            for j in range(S):
                v = self.trained_velocity(sub.latents[:, j], sub.sigmas[j].to(self.device), cond, guidance,
                                          None if uncond is None else uncond[:, j])
                _, mean, std = rescore(v, sub, j)
                total[j] += kl_to_reference(mean, sub.means[:, j].to(self.device), std).double().sum()
                ref_mean = self.reference_step_mean(sub, j, sub.latents[:, j], sub.sigmas[j].to(self.device), cond,
                                                    guidance)
                ref_total[j] += kl_to_reference(mean, ref_mean, std).double().sum()
            count += len(local)
        kl = torch.stack([total, ref_total]) / max(count, 1)
        if self.world > 1:
            kl = self.accelerator.reduce(kl, "mean")
        out = {f"policy_kl/step{int(k)}": float(v) for k, v in zip(batch.rollouts[0].step_indices, kl[0])}
        out["policy_kl"] = float(kl[0].mean())
        out["policy_ref_kl"] = float(kl[1].mean())
        return out

    def apply_lr_scale(self) -> None:
        """Set each parameter group's learning rate to the scheduler's times ``lr_scale`` (``target_kl``)."""
        for pg, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            pg["lr"] = lr * self.lr_scale

    # ------------------------------------------------------------------------------------------------ nft objective
    @property
    def nft_needs_old(self) -> bool:
        """Whether the weights move before the last micro-batch's first pass (inner epochs, or several updates per
        step): then the sampling policy's velocities are computed up front; otherwise ``v.detach()`` is exact."""
        return self.cfg.grpo.num_inner_epochs > 1 or self.accum < self.n_micro

    def nft_points(self, x0: Tensor, ids: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The ``nft_timesteps`` forward-process points of a micro-batch: ``[(t [B], x_t [B, *D], x0 [B, *D])]``.

        ``t ~ U(nft_t_min, nft_t_max)`` and ``eps ~ N(0, I)`` per (seed, iteration, global sample id, point), five
        ids, a stream apart from the sampler's four-id noise; ``x_t = (1 - t) x0 + t eps`` (rectified flow).
        """
        g = self.cfg.grpo
        x0 = x0.to(self.device)
        out = []
        for j in range(g.nft_timesteps):
            rows = [(self.cfg.seed, self.step, int(i), j, 0) for i in ids]
            eps = gaussians(tuple(x0.shape[1:]), rows).to(self.device)
            u = torch.tensor([np.random.default_rng(derive_seed(self.cfg.seed, self.step, int(i), j, 1)).random()
                              for i in ids], dtype=torch.float32, device=self.device)
            t = g.nft_t_min + (g.nft_t_max - g.nft_t_min) * u
            tt = t.view(-1, *[1] * (x0.dim() - 1))
            out.append((t, (1 - tt) * x0 + tt * eps, x0))
        return out

    def _nft_velocity(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        guidance = self.guidance if self.cfg.sampling.train_cfg else 1.0
        with self.accelerator.autocast():
            return self.policy.velocity(x_t, t, cond, guidance)

    @torch.no_grad()
    def nft_old_velocities(self, points, cond) -> list[Tensor]:
        """The sampling policy's velocities at ``points`` (one no-grad pass per point)."""
        return [self._nft_velocity(x_t, t, cond).float() for t, x_t, _ in points]

    def nft_micro_batch_loss(self, points, cond, adv: Tensor, valid: Tensor, scale: float,
                             v_old: list[Tensor] | None) -> dict[str, float]:
        """Backward DiffusionNFT's loss (+ beta times the velocity distance to the reference) of one micro-batch,
        averaged over its forward-process points (:func:`flowrl.objectives.nft_loss`)."""
        g = self.cfg.grpo
        K = len(points)
        stats: dict[str, float] = {}
        for j, (t, x_t, x0) in enumerate(points):
            v = self._nft_velocity(x_t, t, cond)
            old = v.detach() if v_old is None else v_old[j]
            loss, st = nft_loss(v, old, x_t, x0, t, adv, beta=g.nft_beta, adv_clip_max=g.adv_clip_max, mask=valid)
            if g.beta > 0:
                with torch.no_grad(), self.policy.reference():
                    v_ref = self._nft_velocity(x_t, t, cond)
                kl = kl_velocity(v, v_ref)
                kl_mean = (kl * valid).sum() / valid.sum().clamp_min(1)
                loss = loss + g.beta * kl_mean
                st["kl"] = kl_mean.detach()
            st["loss"] = loss.detach()
            if self.skip_nonfinite(loss, f"nft point {j}"):
                continue
            backward(self.accelerator, self._prepared, loss * scale / K)
            for k, val in st.items():
                stats[k] = stats.get(k, 0.0) + float(val) / K
        return stats

    def skip_nonfinite(self, loss: Tensor, where: str) -> bool:
        """True when ``loss`` is NaN/inf on any process: see :func:`skip_nonfinite_loss`."""
        return skip_nonfinite_loss(self, loss, where)

    def optimizer_step(self) -> float:
        gn = optimizer_step(self)
        if self.lr_scale != 1.0:  # the scheduler has just set the unscaled rate for the next update
            self.apply_lr_scale()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - self.cfg.optim.ema_decay)
        return gn

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (evaluation, export), restore the trained ones after."""
        if self.ema is None:
            yield
            return
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    # ------------------------------------------------------------------------------------------------ metrics
    def step_metrics(self, batch: Batch, train: dict, t_sample: float, t_train: float) -> dict:
        if self.branching:
            from . import branching_trainer

            return branching_trainer.step_metrics(self, batch, train, t_sample, t_train)
        cfg = self.cfg
        m = self.reward_metrics(batch.rewards)
        for k, v in train.items():
            if not k.startswith("_"):  # "_" keys: per-step sums, turned into per-step diagnostics below
                m[f"train/{k}"] = v
        m.update(_per_step_diagnostics(train))
        m["train/zero_std_share"] = float(batch.zero_std.float().mean())
        m["train/adv_abs_mean"] = float(batch.advantages.abs().mean())
        m["train/lr"] = float(self.lr_scheduler.get_last_lr()[0]) * self.lr_scale
        m["train/nan_loss_skips"] = self.nan_skips
        m["time/sampling_s"] = t_sample
        m["time/training_s"] = t_train
        cfg_mult = self.policy.passes_per_velocity(self.guidance)
        train_mult = cfg_mult if cfg.sampling.train_cfg and not cfg.sampling.frozen_uncond else 1
        n = len(batch.prompts)
        m["nfe/sampling"] = batch.rollouts[0].nfe * n * cfg_mult  # Rollout.nfe: evaluations per trajectory
        g = cfg.grpo
        if g.objective == "nft":  # per point: a pass per inner epoch (+ the reference's), + the up-front v_old pass
            passes = g.num_inner_epochs * (2 if g.beta > 0 else 1) + (1 if self.nft_needs_old else 0)
            m["nfe/training"] = n * g.nft_timesteps * train_mult * passes
        else:
            S = batch.rollouts[0].latents.shape[1]
            m["nfe/training"] = n * S * train_mult * g.num_inner_epochs * (2 if g.beta > 0 else 1)
        return m

    def reward_metrics(self, rewards: dict[str, Tensor]) -> dict:
        """``reward/{name}/mean|std|nan_count`` over the samples of all processes, ``reward/mean`` (weighted total)."""
        m: dict = {}
        gathered: dict[str, Tensor] = {}
        for name, s in rewards.items():
            s = gathered[name] = self.accelerator.gather(s.to(self.device)).cpu()
            ok = s[~torch.isnan(s)]
            m[f"reward/{name}/mean"] = float(ok.mean()) if len(ok) else float("nan")
            if name in self.rewards:
                m[f"reward/{name}/std"] = float(ok.std(unbiased=False)) if len(ok) else float("nan")
                m[f"reward/{name}/nan_count"] = int(torch.isnan(s).sum())
        total = sum(self.cfg.rewards[k] * torch.nan_to_num(gathered[k]) for k in self.rewards)
        m["reward/mean"] = float(total.mean())
        return m

    def log(self, metrics: dict, step: int, append_to_last: bool = False) -> None:
        if not self.accelerator.is_main_process:
            return
        rec = {"step": step, **metrics}
        path = self.out / "metrics.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.cfg.report_to != "none":
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """ODE samples of every eval set with fixed seeds (EMA weights), scored; grid saved per set."""
        e = self.cfg.eval
        out: dict = {}
        with self.ema_weights():
            for set_idx, (name, prompts) in enumerate(self.eval_sets.items()):
                images, texts, _ = generate(
                    self.policy, prompts, num_steps=e.eval_num_inference_steps, guidance_scale=self.eval_guidance,
                    resolution=self.resolution, seed=e.eval_seed + set_idx, images_per_prompt=e.eval_images_per_prompt,
                    batch_size=self.cfg.grpo.sample_batch_size,
                )
                scores = score_all(self.rewards, images, texts)
                label = "eval" if name in ("eval", "scenes:eval") else ("heldout" if "heldout" in name else Path(name).stem)
                for rname, r in summarize(scores).items():
                    out[f"{label}/reward/{rname}"] = r["mean"]
                if self.accelerator.is_main_process:
                    first = next(iter(self.rewards))
                    caps = [f"{t} [{float(s):.2f}]" for t, s in zip(texts, scores[first])]
                    k = min(len(images), 48)
                    save_image_atomic(make_grid(images[:k], caps[:k]), self.out / "grids" / f"{label}-step{step:05d}.png")
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _register_checkpoint_hooks(self) -> None:
        """Save only the trained weights (LoRA or full transformer) with the accelerator state, not the base model."""
        from safetensors.torch import load_file, save_file

        def save_hook(models, weights, output_dir):
            sd = trainable_state_dict(self.accelerator, self._prepared, self.policy.trainable_state_dict)
            if sd is not None:  # the main process (under FSDP every process took part in gathering it)
                sd = {k: v.contiguous().cpu() for k, v in sd.items()}
                save_file(sd, os.path.join(output_dir, "trainable.safetensors"))
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            if not models:  # FSDP / DeepSpeed: accelerate restored the wrapped model (and optimizer) itself
                return
            sd = load_file(os.path.join(input_dir, "trainable.safetensors"))
            named = dict(self.policy.transformer.named_parameters())
            missing = [k for k in named if named[k].requires_grad and k not in sd]
            wrong_shape = [k for k in sd if k in named and tuple(sd[k].shape) != tuple(named[k].shape)]
            if wrong_shape:
                raise ValueError(
                    f"checkpoint {input_dir!r} does not match this model/LoRA config: {wrong_shape[0]} has shape "
                    f"{tuple(sd[wrong_shape[0]].shape)} in the checkpoint, {tuple(named[wrong_shape[0]].shape)} here"
                )
            if missing or any(k not in named for k in sd):
                raise ValueError(
                    f"checkpoint {input_dir!r} does not match this model/LoRA config "
                    f"(missing {missing[:3]}, unexpected {[k for k in sd if k not in named][:3]})"
                )
            with torch.no_grad():
                for k, v in sd.items():
                    named[k].copy_(v)
            while models:
                models.pop()

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_checkpoint(self) -> Path:
        """``checkpoint-{step}`` (accelerator state, EMA, counters, plan) written atomically."""
        from safetensors.torch import save_file

        def extra(tmp: Path) -> None:
            save_file({f"ema.{i}": e.contiguous().cpu() for i, e in enumerate(self.ema)}, str(tmp / self._ema_file()))

        sharded = self._prepared.kind == "fsdp"  # each process holds its own shard of the EMA
        state = {"step": self.step, "optimizer_steps": self.optimizer_steps, "nan_skips": self.nan_skips,
                 "lr_scale": self.lr_scale, "plan": dataclasses.asdict(self.plan), "config": to_dict(self.cfg)}
        return save_checkpoint(self.accelerator, self.out, self.step, state, self.cfg.checkpoints_total_limit,
                               extra if self.ema is not None and not sharded else None,
                               per_process=extra if self.ema is not None and sharded else None)

    def _ema_file(self) -> str:
        return f"ema-rank{self.rank}.safetensors" if self._prepared.kind == "fsdp" else "ema.safetensors"

    def resume(self, which: str) -> None:
        from safetensors.torch import load_file

        path = find_checkpoint(self.out, which)
        if path is None:
            self.accelerator.print(f"no checkpoint in {self.out}; starting from scratch")
            return
        state = json.loads((path / "flowrl_state.json").read_text())
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            ema = load_file(str(path / self._ema_file()))
            self.ema = [ema[f"ema.{i}"].to(self.device) for i in range(len(self.ema))]
        self.step = int(state["step"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.nan_skips = int(state.get("nan_skips", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))  # the optimizer state already holds the scaled rate
        if self.accelerator.is_main_process:
            truncate_metrics(self.out, self.step)
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def export(self) -> None:
        """Final LoRA (EMA weights when enabled) as ``pytorch_lora_weights.safetensors`` in ``output_dir``."""
        gathered = None
        if self._prepared.kind == "fsdp":  # every process takes part in gathering the full LoRA; the main one writes
            with self.ema_weights():
                gathered = trainable_state_dict(self.accelerator, self._prepared, self.policy.trainable_state_dict)
        if not self.accelerator.is_main_process:
            return
        import tempfile

        with self.ema_weights():
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=self.out))
            try:
                if gathered is not None:
                    save_peft_lora(self.policy, self._prepared.bare, gathered, tmp)
                else:
                    self.policy.save_lora(tmp)
                for f in tmp.iterdir():
                    dest = self.out / f.name
                    if dest.is_dir():
                        shutil.rmtree(dest)
                    os.replace(f, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- per-step diagnostics
def _step_sums(k: int, log_ratio: Tensor, raw_log_ratio: Tensor, adv: Tensor, valid: Tensor, st: dict,
               weight: float | None, ratio_norm: bool) -> dict[str, float]:
    """Sums over one micro-batch's valid samples at trained step ``k`` (the ratio that is clipped: ``log_ratio``).

    :meth:`Trainer.update` averages every stat over micro-batches (and inner epochs) with one common count, so ratios
    of these sums, formed in :func:`_per_step_diagnostics`, are exact over the whole iteration. ``r - 1`` is taken as
    ``expm1(log r)`` in float64: ratios differ from 1 by ~1e-6, and ``r`` itself would lose the spread to rounding.
    """
    m = valid.to(torch.bool)
    d = torch.where(m, torch.expm1(log_ratio.double()), torch.zeros_like(log_ratio, dtype=torch.float64))
    n_pos, n_neg = float((m & (adv > 0)).sum()), float((m & (adv < 0)).sum())
    out = {
        f"_n/step{k}": float(m.sum()),
        f"_d1/step{k}": float(d.sum()),
        f"_d2/step{k}": float(d.square().sum()),
        f"_pos/step{k}": n_pos,
        f"_neg/step{k}": n_neg,
        f"_clip_pos/step{k}": float(round(float(st["clipfrac_pos"]) * n_pos)),
        f"_clip_neg/step{k}": float(round(float(st["clipfrac_neg"]) * n_neg)),
    }
    if ratio_norm:
        raw = torch.where(m, torch.expm1(raw_log_ratio.double()), torch.zeros_like(raw_log_ratio, dtype=torch.float64))
        out[f"_raw_d1/step{k}"] = float(raw.sum())
    if weight is not None:
        out[f"step_weight/step{k}"] = weight
    return out


def _per_step_diagnostics(train: dict) -> dict[str, float]:
    """``train/ratio_std/stepK`` (population std of the clipped ratio over the iteration's valid samples),
    ``train/clipfrac_pos|neg/stepK`` (share of A > 0 / A < 0 samples whose clipped branch binds; 0 if there are none),
    ``train/raw_ratio_mean/stepK`` (with ratio_norm: the raw, left-shifted ratio's mean), ``train/grad_norm/stepK``
    and ``train/grad_share/stepK`` (see :func:`_grad_delta_norm`)."""
    out: dict[str, float] = {}
    steps = sorted(int(k.rsplit("step", 1)[1]) for k in train if k.startswith("_n/step"))
    gn_total = sum(train.get(f"_gn/step{k}", 0.0) for k in steps)
    for k in steps:
        n = train[f"_n/step{k}"]
        mu = train[f"_d1/step{k}"] / n if n > 0 else 0.0
        out[f"train/ratio_std/step{k}"] = math.sqrt(max(train[f"_d2/step{k}"] / n - mu * mu, 0.0)) if n > 0 else 0.0
        for side in ("pos", "neg"):
            cnt = train[f"_{side}/step{k}"]
            out[f"train/clipfrac_{side}/step{k}"] = train[f"_clip_{side}/step{k}"] / cnt if cnt > 0 else 0.0
        if f"_raw_d1/step{k}" in train:
            out[f"train/raw_ratio_mean/step{k}"] = 1.0 + (train[f"_raw_d1/step{k}"] / n if n > 0 else 0.0)
        if f"_gn/step{k}" in train:
            out[f"train/grad_norm/step{k}"] = train[f"_gn/step{k}"]
            out[f"train/grad_share/step{k}"] = train[f"_gn/step{k}"] / gn_total if gn_total > 0 else 0.0
    return out


def _grad_snapshot(params: list[Tensor]) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _grad_delta_norm(params: list[Tensor], before: list[Tensor | None]) -> tuple[float, list[Tensor | None]]:
    """Norm of what the last backward added to the accumulated gradients, and the new snapshot.

    Per trained step this is the exact norm of that step's contribution to the micro-batch gradient (as backwarded:
    with the 1/(S * accumulation) scale and the step weight; loss scaling is divided out by the caller). Logged
    ``grad_norm/stepK`` is its mean over the iteration's micro-batches; ``grad_share/stepK`` = that / the sum over
    steps, so shares sum to 1. An approximation for ``gradient_accumulation_steps`` > 1: the per-step gradient summed
    over the micro-batches of an update (which would need one gradient copy per step) is replaced by the
    per-micro-batch norms; the steps' gradients may also partly cancel, so the shares are of the summed norms, not of
    ``train/grad_norm``. Cost: one copy of the trainable gradients and one pass over them per trained step.
    """
    sq: list[Tensor] = []
    after: list[Tensor | None] = []
    for p, b in zip(params, before):
        if p.grad is None:
            after.append(None)
            continue
        cur = p.grad.detach()
        sq.append((cur if b is None else cur - b).float().square().sum())
        after.append(cur.clone())
    return (math.sqrt(float(torch.stack(sq).sum())) if sq else 0.0), after


def _flat_config(cfg: TrainConfig) -> dict:
    flat = {}
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict) and k != "rewards":
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2 if isinstance(v2, (int, float, str, bool)) else str(v2)
        else:
            flat[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _install_signal_handlers(stop: dict):
    """SIGINT/SIGTERM: finish the current step, checkpoint, export, exit cleanly."""

    def handler(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not in the main thread
            pass
    return old


def _restore_signal_handlers(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------- distributed wrappers
@dataclasses.dataclass
class Prepared:
    """How ``accelerator.prepare`` wrapped the trained model, and what follows from it (shared with the text trainer).

    ``kind``: ``single`` (one process), ``ddp``, ``fsdp`` or ``deepspeed``. ``module``: what the policy calls (its
    forward runs through it). ``bare``: ``accelerator.unwrap_model(wrapper)`` (peft config, un-prefixed names, export).
    ``wrapper``: what ``prepare`` returned (full state dicts are gathered through it). ``trainable_names``: the trained
    parameters' names, taken before wrapping.
    """

    kind: str
    module: torch.nn.Module
    bare: torch.nn.Module
    wrapper: torch.nn.Module
    trainable_names: list[str]

    @property
    def average_grads(self) -> bool:
        """The trainer all-reduces the trained gradients itself, once per update: only under DDP, whose own hooks
        never run (the policy calls the bare module). FSDP and DeepSpeed reduce in backward; reducing again would
        double-reduce."""
        return self.kind == "ddp"

    @property
    def collective_backward(self) -> bool:
        """Backward communicates (FSDP reduce-scatters, ZeRO-2's gradient hooks reduce), so every process must run
        the same backward passes: a non-finite loss anywhere is skipped everywhere (:func:`finite_everywhere`)."""
        return self.kind in ("fsdp", "deepspeed")


def configure_for_wrapper(accelerator, cfg: TrainConfig, module: torch.nn.Module, *, text: bool = False,
                          branching: bool = False) -> None:
    """Checks and settings that must precede ``accelerator.prepare`` under FSDP or DeepSpeed (nothing otherwise).

    FSDP (image trainer, LoRA): version 1 needs ``fsdp_use_orig_params: true`` (trained LoRA and frozen base weights
    share FSDP units) and one dtype per unit, so the transformer is held in fp32 (FSDP's mixed-precision policy, set by
    accelerate from ``--mixed_precision``, casts it for compute). DeepSpeed: ZeRO stage <= 2 (parameters stay whole, so
    the policy's forward on the bare module is right), ``train_micro_batch_size_per_gpu`` = ``sample_batch_size``
    unless set, the engine's ``gradient_clipping`` = ``--max_grad_norm`` (the engine clips), and its
    ``gradient_accumulation_steps`` 1 (flowrl accumulates micro-batches itself, :func:`deepspeed_step`).
    """
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt == DistributedType.FSDP:
        if text:
            raise ConfigError(
                "FSDP is not supported by the text trainer: sampling decodes until every completion of a process has "
                "ended, so processes run different numbers of forward passes, which FSDP's all-gathers cannot match; "
                "use DDP (configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)")
        if not cfg.model.rank:
            raise ConfigError(
                "FSDP trains LoRA only (--rank > 0): the full fine-tuning export (transformer/ + extracted LoRA) reads "
                "the unsharded transformer; use DDP or DeepSpeed ZeRO-2 for --rank 0")
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
            raise ConfigError(
                "FSDP needs fsdp_use_orig_params: true in the accelerate config: the LoRA weights train while the "
                "frozen base weights share their FSDP units")
        if any(q.dtype != torch.float32 for q in module.parameters()):
            module.to(torch.float32)
    elif dt == DistributedType.DEEPSPEED:
        if branching:
            raise ConfigError(
                f"plan {cfg.plan.plan!r} is not wired for DeepSpeed yet (the branching update calls "
                "accelerator.backward itself, so the engine would step after every backward); use DDP or FSDP")
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ConfigError(
                f"DeepSpeed ZeRO stage {stage} is not supported: stage 3 shards the parameters, which the policy's "
                "forward on the bare module cannot see; use zero_stage 2 (configs/accelerate/deepspeed_zero2.yaml)")
        gas = ds.get("gradient_accumulation_steps", "auto")
        if gas not in ("auto", 1):
            raise ConfigError(
                f"DeepSpeed gradient_accumulation_steps must be 1 (got {gas!r}): flowrl accumulates micro-batches "
                "itself (--gradient_accumulation_steps) and ends each update with one engine step")
        ds["gradient_accumulation_steps"] = 1
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # no dataloader for accelerate to read it from
            ds["train_micro_batch_size_per_gpu"] = cfg.grpo.sample_batch_size
        ds["gradient_clipping"] = cfg.optim.max_grad_norm


def unwrap_prepared(accelerator, model: torch.nn.Module, trainable_names: list[str]) -> Prepared:
    """Which module the policy calls and who reduces the gradients, by accelerate's ``distributed_type``:

    - FSDP: the FSDP root (its forward gathers the shards; backward reduce-scatters the gradients);
    - DeepSpeed (ZeRO <= 2): the bare module (parameters are whole; the engine's hooks reduce during
      ``accelerator.backward``);
    - DDP: the bare module; the trainer averages the gradients itself (:attr:`Prepared.average_grads`);
    - one process: the model as prepared.
    """
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt == DistributedType.FSDP:
        return Prepared("fsdp", model, accelerator.unwrap_model(model), model, trainable_names)
    if dt == DistributedType.DEEPSPEED:
        bare = accelerator.unwrap_model(model)
        return Prepared("deepspeed", bare, bare, model, trainable_names)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        bare = accelerator.unwrap_model(model)
        return Prepared("ddp", bare, bare, model, trainable_names)
    return Prepared("single", model, model, model, trainable_names)


def optimizer_step(trainer) -> float:
    """The end of one update in every recipe (image, branching and text trainers): gradients averaged over processes
    where the wrapper leaves that to us, DeepSpeed's engine step under DeepSpeed (it reduces, clips and steps), the
    gradient norm clipped to ``cfg.optim.max_grad_norm``, optimizer and LR-scheduler steps, gradients zeroed,
    ``trainer.optimizer_steps`` counted. Returns the pre-clip gradient norm (NaN where the wrapper reports none)."""
    if trainer._average_grads:
        average_gradients(trainer.params, trainer.world)
    if trainer._prepared.kind == "deepspeed":
        deepspeed_step(trainer.accelerator, trainer.params)
    gn = trainer.accelerator.clip_grad_norm_(clip_parameters(trainer._prepared, trainer.params),
                                             trainer.cfg.optim.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.optimizer_steps += 1
    return float("nan") if gn is None else float(gn)


def skip_nonfinite_loss(trainer, loss: Tensor, where: str) -> bool:
    """The non-finite-loss rule of every recipe (image, branching and text trainers).

    True when ``loss`` is NaN/inf on any process (all processes agree, so FSDP/DeepSpeed never hang in a collective
    one rank skipped): counted in ``trainer.nan_skips``, warned, and after ``max_nan_skips`` in a row a
    FloatingPointError. A finite loss resets ``trainer.nan_streak`` and returns False (go on with the backward pass).
    """
    if finite_everywhere(loss, trainer._prepared):
        trainer.nan_streak = 0
        return False
    trainer.nan_skips += 1
    trainer.nan_streak += 1
    warnings.warn(f"step {trainer.step}: non-finite loss ({float(loss.detach())}) at {where} skipped "
                  f"({trainer.nan_skips} skipped in all, {trainer.nan_streak} in a row)", RuntimeWarning)
    limit = trainer.cfg.optim.max_nan_skips
    if trainer.nan_streak >= limit:
        raise FloatingPointError(
            f"step {trainer.step}: {trainer.nan_streak} non-finite losses in a row (max_nan_skips={limit}); "
            "training diverged - lower learning_rate or check the rewards/model (the last checkpoint is intact)")
    return True


def backward(accelerator, prepared: Prepared, loss: Tensor) -> None:
    """``accelerator.backward(loss)``; under DeepSpeed as a step inside a gradient-accumulation window (no engine
    step: one update here spans several backwards, and :func:`deepspeed_step` ends it)."""
    if prepared.kind != "deepspeed":
        accelerator.backward(loss)
        return
    accelerator.gradient_state._set_sync_gradients(False)  # accelerate's own switch (what `accumulate` sets)
    try:
        accelerator.backward(loss)
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def deepspeed_step(accelerator, params: list[Tensor]) -> None:
    """End a DeepSpeed update: a zero-valued backward at the accumulation boundary, so the engine reduces, clips
    (``gradient_clipping`` = ``--max_grad_norm``), steps the optimizer and zeroes the gradients exactly once. That is
    accelerate's pattern (the last backward of a window is the boundary) made independent of which of the update's
    losses were skipped as non-finite."""
    zero = torch.stack([(p * 0).sum().float() for p in params]).sum()
    accelerator.backward(zero)


def clip_parameters(prepared: Prepared, params: list[Tensor]):
    """What to hand ``accelerator.clip_grad_norm_``: under FSDP the root's parameters, so accelerate calls the root's
    ``clip_grad_norm_`` (norm over every shard; frozen parameters have no gradient). A list of LoRA shards would be
    clipped by each process's own local norm."""
    return prepared.wrapper.parameters() if prepared.kind == "fsdp" else params


def finite_everywhere(loss: Tensor, prepared: Prepared) -> bool:
    """Whether ``loss`` is finite; where backward communicates (FSDP, DeepSpeed) whether it is finite on every
    process (one tiny all-reduce), so all skip the same backwards. Under DDP each process decides alone: the
    gradients meet once per update."""
    ok = torch.isfinite(loss.detach()).all()
    if not prepared.collective_backward:
        return bool(ok)
    import torch.distributed as dist

    flag = ok.to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _norm_over_processes(local_norm: float, device) -> float:
    """The norm of a vector sharded over processes from each process's norm of its shard."""
    import torch.distributed as dist

    sq = torch.tensor([local_norm * local_norm], dtype=torch.float64, device=device)
    dist.all_reduce(sq)
    return math.sqrt(float(sq.item()))


def trainable_state_dict(accelerator, prepared: Prepared, local) -> dict[str, Tensor] | None:
    """The trained weights by un-prefixed name, whole, on the main process (None on the others).

    Under FSDP every process must call this: ``accelerator.get_state_dict`` gathers the full state dict (to the main
    process's CPU), which is filtered to the trained names. Elsewhere the weights are whole on every process and
    ``local()`` (the policy's ``trainable_state_dict``) reads them.
    """
    if prepared.kind == "fsdp":
        full = accelerator.get_state_dict(prepared.wrapper)
        if not accelerator.is_main_process:
            return None
        missing = [k for k in prepared.trainable_names if k not in full]
        if missing:
            raise RuntimeError(f"the gathered FSDP state dict lacks trained weights {missing[:3]}")
        return {k: full[k] for k in prepared.trainable_names}
    return local() if accelerator.is_main_process else None


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _clean_name(name: str) -> str:
    """A parameter name without the infixes of nested FSDP units / activation-checkpoint wrappers."""
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


def save_peft_lora(policy, bare: torch.nn.Module, state_dict: dict[str, Tensor], output_dir: Path) -> None:
    """``policy.save_lora`` from a gathered state dict (FSDP: the module's own parameters are shards): the same
    ``pytorch_lora_weights.safetensors`` via peft's ``get_peft_model_state_dict(bare, state_dict=...)`` and the
    pipeline's ``save_lora_weights`` (diffusers' FSDP LoRA scripts do the same). peft finds the adapter's entries by
    the module structure, whose names carry the nested FSDP units' ``_fsdp_wrapped_module.``: the gathered (clean)
    names are mapped onto those for peft and back."""
    from peft.utils import get_peft_model_state_dict

    structural = {_clean_name(n): n for n, _ in bare.named_parameters()}
    wrapped = {structural.get(k, k): v for k, v in state_dict.items()}
    layers = {_clean_name(k): v for k, v in get_peft_model_state_dict(bare, state_dict=wrapped).items()}
    policy._pipeline_class().save_lora_weights(
        output_dir, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=bare.peft_config["default"].to_dict(),
    )


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean of ``params``' gradients over ``world`` processes, in place (one flat all-reduce; a missing gradient
    counts as 0). Used by the image and text trainers under DDP, once per optimizer update."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i : i + n].view_as(g).to(g.dtype)
        i += n
