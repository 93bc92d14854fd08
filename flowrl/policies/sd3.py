"""Policy over a diffusers ``StableDiffusion3Pipeline`` (SD3, SD3.5, and the embedded tiny model).

Follows the stock pipeline exactly where it matters for reproducibility: prompt encoding through
``pipe.encode_prompt``, timesteps ``sigma * 1000``, true CFG as ``v_u + g (v_c - v_u)`` on a doubled batch, the
scheduler's own sigmas, and decoding ``vae.decode(x / scaling + shift)`` then ``x / 2 + 0.5`` clamped to [0, 1].
LoRA is a peft adapter on the transformer (diffusers' ``add_adapter``); the reference policy is the same transformer
with the adapter disabled. The exported LoRA loads into a stock pipeline with ``pipe.load_lora_weights(dir)``.

Memory options (constructor): xformers attention (checked before anything loads or moves), text encoders offloaded
to the CPU with a per-prompt embedding cache, and :meth:`SD3Policy.precompute_prompt_embeds`, which encodes a fixed
prompt list once and frees the text encoders; the encoding side lives in :mod:`flowrl.policies.text_encoding`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import Tensor

from .base import Cond, forward_unique_rows, require_xformers
from .text_encoding import PromptEncoder

SD3_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""Flow-GRPO's SD3.5 LoRA targets: the joint attention projections of both streams."""

SD3_LORA_TARGETS_WITH_FF = SD3_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class SD3Policy:
    """Stable Diffusion 3 adapter. See the module docstring; shapes on each method."""

    def __init__(
        self,
        pipe,
        *,
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] | list[str] = SD3_LORA_TARGETS,
        max_sequence_length: int = 256,
        negative_prompt: str = "",
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        gradient_checkpointing: bool = False,
        need_reference: bool = False,
        enable_xformers_memory_efficient_attention: bool = False,
        text_encoder_offload: bool = False,
        prompt_embeds_cache_size: int = 1024,
        lora_config: dict | None = None,
        lora_export_rank: int | None = None,
        base_weights_from: dict | None = None,
    ) -> None:
        """Wrap ``pipe``; see the module docstring.

        Adapter: ``lora_rank=None`` = full fine-tuning, else LoRA of that rank / alpha on ``lora_targets``;
        ``lora_config`` (``LoraConfig`` kwargs, e.g. a saved file's adapter metadata with per-layer ``rank_pattern``)
        replaces rank / alpha / targets. ``lora_export_rank``: rank of the LoRA that :meth:`save_lora` extracts from a
        full fine-tune (None = exact); its base weights are reloaded with ``from_pretrained(**base_weights_from,
        subfolder="transformer")`` at export when given (what :meth:`from_pretrained` passes), else copied to the CPU
        here.

        Memory options (all off by default):
            enable_xformers_memory_efficient_attention: the transformer's (and reference copy's) attention through
                xformers; checked first, so a machine that cannot run it fails before anything moves.
            text_encoder_offload: text encoders stay on the CPU, on ``device`` only while encoding; prompt
                embeddings are cached per prompt (:mod:`flowrl.policies.text_encoding`).
            prompt_embeds_cache_size: LRU entries of that cache (0 = re-encode every call).
        """
        if enable_xformers_memory_efficient_attention:
            require_xformers(device)
        self.pipe = pipe
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.transformer = pipe.transformer
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            m = getattr(pipe, name, None)
            if m is not None:
                m.requires_grad_(False).eval()
                where = "cpu" if (text_encoder_offload and name != "vae") else self.device
                m.to(where, dtype=torch.float32 if name == "vae" else weight_dtype)  # VAE in fp32
        self.text = PromptEncoder(pipe, self._encode_batch, self.device, offload=text_encoder_offload,
                                  cache_size=prompt_embeds_cache_size)
        self.transformer.eval()  # no dropout: sampling and training must see the same function
        self.full_finetune = lora_rank is None and lora_config is None
        self.lora_export_rank = lora_export_rank
        self._ref_model = None
        self._base_state: dict[str, Tensor] | None = None
        self._base_from = base_weights_from
        if self.full_finetune:
            if base_weights_from is None:  # the base weights on the CPU, so save_lora can export the delta as a LoRA
                self._base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.transformer.state_dict().items()}
            self.transformer.requires_grad_(True).to(self.device, dtype=torch.float32)
            if need_reference:
                self._ref_model = copy.deepcopy(self.transformer).requires_grad_(False).to(dtype=weight_dtype)
        else:
            from peft import LoraConfig

            self.transformer.requires_grad_(False).to(self.device, dtype=weight_dtype)
            kwargs = dict(lora_config) if lora_config is not None else dict(
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(lora_targets),
            )
            self.transformer.add_adapter(LoraConfig(**kwargs))
            for p in self.transformer.parameters():  # LoRA weights train in fp32 whatever the base dtype
                if p.requires_grad:
                    p.data = p.data.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if enable_xformers_memory_efficient_attention:  # as diffusers' training scripts do, on every copy
            for m in (self.transformer, self._ref_model):
                if m is not None:
                    m.enable_xformers_memory_efficient_attention()
        self._neg: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        cache_dir: str | None = None,
        **kwargs,
    ) -> "SD3Policy":
        """Load the family's diffusers pipeline (``pipeline_class_name``) by hub id or path, then wrap it.

        Raises:
            ValueError: before loading anything, when ``enable_xformers_memory_efficient_attention`` is asked for
                and xformers cannot run on ``device``.
        """
        if kwargs.get("enable_xformers_memory_efficient_attention"):
            require_xformers(kwargs.get("device", "cpu"))
        pipe = cls._pipeline_class().from_pretrained(path, revision=revision, variant=variant, cache_dir=cache_dir)
        pipe.set_progress_bar_config(disable=True)
        source = {"pretrained_model_name_or_path": path, "revision": revision, "variant": variant, "cache_dir": cache_dir}
        return cls(pipe, base_weights_from=source, **kwargs)

    # ------------------------------------------------------------------------------------------------ the interface
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        """Prompt (and negative prompt) embeddings, one row per prompt: embeds [N, L, D], pooled [N, P]."""
        with _quiet_diffusers():  # a short T5 slot makes the pipeline warn about truncation on every call
            return self._encode(prompts)

    def _encode_batch(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The stock ``pipe.encode_prompt`` (no CFG): embeds [N, L, D], pooled [N, P] (encoders on the device)."""
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return pe, pooled

    def _encode(self, prompts: list[str]) -> Cond:
        pe, pooled = self.text.encode(prompts)
        if self._neg is None:
            self._neg = self.text.encode([self.negative_prompt])
        ne, npooled = self._neg
        n = len(prompts)
        return Cond(pe, pooled, ne.expand(n, -1, -1), npooled.expand(n, -1))

    def uses_negative_prompt(self) -> bool:
        """Whether conditioning includes the negative prompt (SD3: always, for CFG)."""
        return True

    @torch.no_grad()
    def precompute_prompt_embeds(self, prompts: list[str]) -> int:
        """Encode ``prompts`` (and the negative prompt) once, then delete the text encoders from the pipeline.

        Afterwards :meth:`encode` serves only these prompts (rows bitwise equal to encoding each prompt alone) and
        raises :class:`~flowrl.policies.text_encoding.PromptNotPrecomputedError` for any other.

        Returns:
            the number of distinct prompts stored.
        """
        extra = [self.negative_prompt] if self.uses_negative_prompt() else []
        with _quiet_diffusers():
            n = self.text.precompute([*prompts, *extra])
        self.text.free_encoders()
        return n

    def _forward(self, model, x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        """One transformer pass: [B, C, H, W] fp32 velocity. Rows repeated in (x, t, embeds, pooled) run once
        (:func:`~flowrl.policies.base.forward_unique_rows`)."""
        return forward_unique_rows(self._forward_rows, x, t, embeds, pooled, model=model)

    def _forward_rows(self, x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor, *, model) -> Tensor:
        return model(
            hidden_states=x.to(self.weight_dtype),
            encoder_hidden_states=embeds.to(self.weight_dtype),
            pooled_projections=pooled.to(self.weight_dtype),
            timestep=t,
            return_dict=False,
        )[0].float()

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float = 1.0) -> Tensor:
        """v(x, sigma | cond) with true CFG when ``guidance_scale > 1``.

        Args:
            x: [B, C, H, W] latents at ``sigma``.
            sigma: scalar or [B] in [0, 1]; the transformer sees ``timestep = sigma * 1000`` as in diffusers.
            cond: rows aligned with ``x``.
            guidance_scale: CFG scale g; the uncond pass uses the negative prompt. 1 = no CFG (one pass).

        Returns:
            [B, C, H, W] fp32 velocity (``eps - x0`` convention).
        """
        model = self._ref_model if (self._ref_model is not None and self._use_ref) else self.transformer
        B = x.shape[0]
        t = (sigma.float() * 1000).expand(B) if sigma.dim() == 0 else sigma.float() * 1000
        if guidance_scale == 1.0 or cond.neg_embeds is None:
            return self._forward(model, x, t, cond.embeds, cond.pooled)
        v = self._forward(
            model,
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([cond.neg_embeds, cond.embeds]),
            torch.cat([cond.neg_pooled, cond.pooled]),
        )
        v_u, v_c = v.chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    def cfg_parts(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float = 1.0,
                  with_uncond: bool = True) -> tuple[Tensor, Tensor | None, float]:
        """The two CFG branches as separate passes: ``(v_cond, v_uncond, g)`` with the guided velocity
        ``v_uncond + g * (v_cond - v_uncond)`` (:func:`flowrl.policies.base.combine_cfg`).

        Args: as :meth:`velocity`; ``with_uncond=False`` skips the unconditional pass (returns ``None`` for it, the
        caller holds it). Without CFG (``guidance_scale == 1`` or no negative embeddings) ``(v, None, 1.0)``.

        Returns:
            [B, C, H, W] fp32 velocities (each from a pass of batch B, so a later conditional pass on the same rows
            reproduces ``v_cond`` bit for bit) and the scale.
        """
        model = self._ref_model if (self._ref_model is not None and self._use_ref) else self.transformer
        B = x.shape[0]
        t = (sigma.float() * 1000).expand(B) if sigma.dim() == 0 else sigma.float() * 1000
        v_c = self._forward(model, x, t, cond.embeds, cond.pooled)
        if guidance_scale == 1.0 or cond.neg_embeds is None:
            return v_c, None, 1.0
        v_u = self._forward(model, x, t, cond.neg_embeds, cond.neg_pooled) if with_uncond else None
        return v_c, v_u, float(guidance_scale)

    _use_ref = False
    default_guidance = 4.5
    """CFG scale used when neither the config nor the model directory gives one (SD3.5 recipes)."""

    def passes_per_velocity(self, guidance_scale: float) -> int:
        """Transformer passes per velocity evaluation: 2 with true CFG, else 1 (NFE accounting)."""
        return 2 if guidance_scale > 1 else 1

    @contextlib.contextmanager
    def reference(self):
        """Within this context the policy is the reference model (LoRA disabled, or the frozen copy)."""
        if self.full_finetune:
            if self._ref_model is None:
                raise RuntimeError("full fine-tuning without a reference copy: build the policy with need_reference=True")
            self._use_ref = True
            try:
                yield self
            finally:
                self._use_ref = False
        else:
            self.transformer.disable_adapters()
            try:
                yield self
            finally:
                self.transformer.enable_adapters()

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1] (VAE in fp32)."""
        vae = self.pipe.vae
        z = x.float() / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, resolution // f, resolution // f)

    def sigmas(self, num_steps: int, resolution: int | None = None) -> Tensor:
        """The scheduler's sigma schedule for ``num_steps`` steps (``num_steps + 1`` values, ending at 0)."""
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.float().clone()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained weights by name (LoRA layers, or the whole transformer when fully fine-tuned)."""
        return {n: p.detach() for n, p in self.transformer.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------------------------------------ export
    pipeline_class_name = "StableDiffusion3Pipeline"
    """The diffusers pipeline whose ``save_lora_weights`` / ``lora_state_dict`` define the LoRA file format."""

    @classmethod
    def _pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    def save_lora(self, output_dir: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` with ``<Pipeline>.save_lora_weights`` (keys ``transformer.*``,
        adapter metadata included so ``load_lora_weights`` restores alpha and per-layer ranks).

        Full fine-tunes write the transformer in diffusers format (``transformer/``) and, beside it, the LoRA of the
        weight deltas (:func:`flowrl.lora_export.extract_lora`; exact unless ``lora_export_rank`` is set)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.full_finetune:
            from ..lora_export import extract_lora

            self.transformer.save_pretrained(out / "transformer")
            layers, config = extract_lora(self._base_weights(), self.transformer, self.lora_export_rank)
            metadata = config
        else:
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(self.transformer)
            metadata = self.transformer.peft_config["default"].to_dict()
        self._pipeline_class().save_lora_weights(
            out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
        return out / "pytorch_lora_weights.safetensors"

    def _base_weights(self) -> dict[str, Tensor]:
        """The transformer's weights before fine-tuning (CPU), for the LoRA export of a full fine-tune."""
        if self._base_state is not None:
            return self._base_state
        with _quiet_diffusers():
            base = type(self.transformer).from_pretrained(**self._base_from, subfolder="transformer")
        return base.state_dict()

    def load_lora(self, lora_dir: str | Path) -> None:
        """Load weights written by :meth:`save_lora` into this policy's adapter."""
        from peft.utils import set_peft_model_state_dict

        sd = self._pipeline_class().lora_state_dict(str(lora_dir))
        sd = sd[0] if isinstance(sd, tuple) else sd
        sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
        res = set_peft_model_state_dict(self.transformer, sd)
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA in {str(lora_dir)!r} does not match this model: unexpected keys {unexpected[:4]}")


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logging at error level inside the context (restored after)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def read_model_defaults(path: str | Path) -> dict:
    """Recommended sampling settings a model directory ships in ``flowrl_defaults.json`` (empty if none)."""
    f = Path(path) / "flowrl_defaults.json"
    return json.loads(f.read_text()) if f.is_file() else {}
