"""Policy over a diffusers ``FluxPipeline`` (FLUX.1-dev with its guidance embedding, FLUX.1-schnell without).

Follows the stock pipeline where it matters for reproducibility:

- prompts: ``pipe.encode_prompt`` (CLIP pooled + T5 tokens; ``text_ids`` are zeros [L, 3]);
- latents: the policy's ``x`` is the *packed* sequence ``[B, (H/2f)*(W/2f), 4C]`` (2x2 latent patches, f = the VAE
  scale factor), exactly what the stock pipeline steps on; ``latent_shape`` returns that shape and the image ids come
  from ``FluxPipeline._prepare_latent_image_ids``. A packed tensor passed as ``latents=`` to the stock pipeline is used
  as is;
- the transformer sees ``timestep = (sigma * 1000) / 1000`` as in the pipeline, and the guidance embedding
  ``guidance = guidance_scale`` when ``transformer.config.guidance_embeds`` (FLUX.1-dev; None for schnell). The
  trainer's ``sampling.guidance_scale`` is that embedding value here (one transformer pass per velocity), not a
  CFG scale: use 3.5 for FLUX.1-dev, and keep ``train_cfg`` on so training sees the same function as sampling;
- true CFG (the pipeline's ``true_cfg_scale`` with a negative prompt) is off by default; ``true_cfg_scale > 1``
  enables it: ``v_neg + s (v_pos - v_neg)``, two separate passes like the pipeline;
- sigmas: ``np.linspace(1, 1/n, n)`` shifted with ``mu = calculate_shift(image_seq_len, ...)`` from the scheduler
  config, via ``scheduler.set_timesteps(sigmas=..., mu=mu)``, ending at the scheduler's final 0;
- decoding: unpack, ``x / scaling_factor + shift_factor``, ``vae.decode``, ``x / 2 + 0.5`` clamped to [0, 1].

LoRA, the reference context and the trainable-weights bookkeeping are the SD3 adapter's (peft adapter on the
transformer via ``add_adapter``); the exported LoRA is written with ``FluxPipeline.save_lora_weights`` and loads into
a stock pipeline with ``pipe.load_lora_weights(dir)``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor

from .base import Cond, combine_cfg, forward_unique_rows
from .sd3 import SD3_LORA_TARGETS, SD3_LORA_TARGETS_WITH_FF, SD3Policy

FLUX_LORA_TARGETS = SD3_LORA_TARGETS
"""Attention projections, named as in SD3's joint blocks: both streams of the double blocks; ``to_q/k/v`` also match
the single blocks."""

FLUX_LORA_TARGETS_WITH_FF = SD3_LORA_TARGETS_WITH_FF + ("proj_mlp", "proj_out")
"""Plus the feed-forwards: the double blocks' ``ff``/``ff_context`` and the single blocks' ``proj_mlp``/``proj_out``.

``proj_out`` in a target list means the single blocks' ``proj_out`` only (the policy expands it to
``single_transformer_blocks.{i}.proj_out``); the transformer's final output projection, also named ``proj_out``,
is not adapted."""


def default_lora_targets(lora_on_ff: bool) -> tuple[str, ...]:
    return FLUX_LORA_TARGETS_WITH_FF if lora_on_ff else FLUX_LORA_TARGETS


class FluxPolicy(SD3Policy):
    """FLUX.1 adapter. See the module docstring; shapes on each method."""

    default_lora_targets = staticmethod(default_lora_targets)

    def __init__(
        self,
        pipe,
        *,
        lora_targets: tuple[str, ...] | list[str] = FLUX_LORA_TARGETS,
        max_sequence_length: int = 512,
        true_cfg_scale: float = 1.0,
        **kwargs,
    ) -> None:
        n_single = len(getattr(pipe.transformer, "single_transformer_blocks", []))
        targets: list[str] = []
        for t in lora_targets:
            if t == "proj_out":  # single blocks only, never the final output projection
                targets += [f"single_transformer_blocks.{i}.proj_out" for i in range(n_single)]
            else:
                targets.append(t)
        self.true_cfg_scale = float(true_cfg_scale)
        super().__init__(pipe, lora_targets=targets, max_sequence_length=max_sequence_length, **kwargs)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self._text_ids: Tensor | None = None

    # ------------------------------------------------------------------------------------------------ the interface
    def _encode_batch(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The stock ``pipe.encode_prompt``: T5 embeds [N, L, D], CLIP pooled [N, P] (``text_ids`` are zeros [L, 3],
        rebuilt in :meth:`_ids`)."""
        pe, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        self._text_ids = text_ids
        return pe, pooled

    def _encode(self, prompts: list[str]) -> Cond:
        pe, pooled = self.text.encode(prompts)
        if not self.uses_negative_prompt():
            return Cond(pe, pooled)
        if self._neg is None:
            self._neg = self.text.encode([self.negative_prompt])
        ne, npooled = self._neg
        n = len(prompts)
        return Cond(pe, pooled, ne.expand(n, -1, -1), npooled.expand(n, -1))

    def uses_negative_prompt(self) -> bool:
        """Whether conditioning includes the negative prompt (Flux: only with true CFG, ``true_cfg_scale > 1``)."""
        return self.true_cfg_scale > 1.0

    default_guidance = 3.5
    """Guidance-embedding value when nothing else gives one (FLUX.1-dev)."""

    def passes_per_velocity(self, guidance_scale: float) -> int:
        """Transformer evaluations per :meth:`velocity` call (2 only with true CFG; the guidance embedding is free)."""
        return 2 if self.true_cfg_scale > 1.0 else 1

    def _ids(self, x: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"packed latents of {x.shape[1]} tokens are not a square grid")
        img_ids = self.pipe._prepare_latent_image_ids(x.shape[0], side, side, x.device, self.weight_dtype)
        txt = self._text_ids
        if txt is None or txt.shape[0] != seq_len:
            txt = torch.zeros(seq_len, 3)
        return txt.to(x.device, self.weight_dtype), img_ids

    def _flux_forward(self, model, x: Tensor, timestep: Tensor, guidance: Tensor | None, embeds: Tensor,
                      pooled: Tensor) -> Tensor:
        """One transformer pass: [B, S, 4C] fp32 velocity; repeated rows run once (``forward_unique_rows``)."""
        return forward_unique_rows(self._flux_forward_rows, x, timestep, guidance, embeds, pooled, model=model)

    def _flux_forward_rows(self, x: Tensor, timestep: Tensor, guidance: Tensor | None, embeds: Tensor,
                           pooled: Tensor, *, model) -> Tensor:
        txt_ids, img_ids = self._ids(x, embeds.shape[1])
        return model(
            hidden_states=x.to(self.weight_dtype),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled.to(self.weight_dtype),
            encoder_hidden_states=embeds.to(self.weight_dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].float()

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float = 3.5) -> Tensor:
        """v(x, sigma | cond).

        Args:
            x: [B, S, 4C] packed latents at ``sigma``.
            sigma: scalar or [B] in [0, 1]; the transformer sees ``(sigma * 1000) / 1000`` as in the pipeline.
            cond: rows aligned with ``x``.
            guidance_scale: the guidance-embedding value when the transformer has ``guidance_embeds`` (ignored
                otherwise, as in the pipeline). True CFG is the constructor's ``true_cfg_scale``.

        Returns:
            [B, S, 4C] fp32 velocity (``eps - x0`` convention).
        """
        return combine_cfg(*self.cfg_parts(x, sigma, cond, guidance_scale))

    def cfg_parts(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float = 3.5,
                  with_uncond: bool = True) -> tuple[Tensor, Tensor | None, float]:
        """True CFG in parts: ``(v_cond, v_neg, true_cfg_scale)``, guided velocity ``v_neg + s (v_cond - v_neg)``;
        ``(v, None, 1.0)`` without true CFG. ``with_uncond=False`` skips the negative pass (``None``)."""
        model = self._ref_model if (self._ref_model is not None and self._use_ref) else self.transformer
        B = x.shape[0]
        t = (sigma.float() * 1000).expand(B) if sigma.dim() == 0 else sigma.float() * 1000
        t = t.to(self.weight_dtype) / 1000
        guidance = (
            torch.full([B], float(guidance_scale), device=x.device, dtype=torch.float32)
            if self.guidance_embeds else None
        )
        v = self._flux_forward(model, x, t, guidance, cond.embeds, cond.pooled)
        if not (self.true_cfg_scale > 1.0 and cond.neg_embeds is not None):
            return v, None, 1.0
        v_neg = self._flux_forward(model, x, t, guidance, cond.neg_embeds, cond.neg_pooled) if with_uncond else None
        return v, v_neg, float(self.true_cfg_scale)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Packed latents [B, S, 4C] -> images [B, 3, H, W] float32 in [0, 1] (VAE in fp32)."""
        vae = self.pipe.vae
        f = self.pipe.vae_scale_factor
        res = math.isqrt(x.shape[1]) * 2 * f
        z = self.pipe._unpack_latents(x.float(), res, res, f)
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, resolution: int) -> tuple[int, int]:
        """``(S, 4C)``: S = (h/2)^2 packed 2x2 patches of the h x h latent (h = 2 * (resolution // (2f)))."""
        f = self.pipe.vae_scale_factor
        h = 2 * (int(resolution) // (f * 2))
        return ((h // 2) * (h // 2), self.transformer.config.in_channels)

    def sigmas(self, num_steps: int, resolution: int | None = None) -> Tensor:
        """The pipeline's schedule for ``num_steps`` steps at ``resolution`` (``num_steps + 1`` values, ending at 0):
        ``linspace(1, 1/n, n)`` with the resolution-dependent shift ``mu``."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if resolution is None:
            raise ValueError("Flux sigmas depend on the resolution (the shift mu is set by the image sequence length)")
        sched = copy.deepcopy(self.pipe.scheduler)
        c = sched.config
        mu = calculate_shift(
            self.latent_shape(resolution)[0],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        if c.get("use_flow_sigmas", False):
            sched.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
        return sched.sigmas.float().clone()

    # ------------------------------------------------------------------------------------------------ export
    pipeline_class_name = "FluxPipeline"  # save_lora / load_lora (inherited) use FluxPipeline's LoRA format
