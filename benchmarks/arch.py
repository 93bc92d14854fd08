"""Random-weight diffusers pipelines with the architecture of a real checkpoint, for timing and memory figures where
the weights cannot be downloaded.

    python -m benchmarks.arch --arch sd35m --output_dir outputs/sd35m-random --device cuda --torch_dtype bfloat16
    python -m benchmarks.probe --what time --reps 3 --json outputs/sd35m-step.json \\
        --config configs/sd35m_flow_grpo.yaml --pretrained_model_name_or_path outputs/sd35m-random \\
        --prompts scenes:train --eval_sets eval --reward jpeg_compressibility --prompts_per_step 1

A training step's cost is set by the architecture and the shapes, not by the weights, so a pipeline built from the
published configs with random weights times the same as the real checkpoint. What is exact and what is not:

* ``transformer``: ``SD3Transformer2DModel`` with Stable Diffusion 3.5 Medium's published config (MMDiT-X: 24 blocks,
  24 heads of 64, dual attention in blocks 0-12, RMS q/k norm, patch 2, 16 latent channels, position embeddings up
  to 384 patches a side): 2.24B parameters plus the 384 x 384 x 1536 position table, 2.47B values as in the released
  weights, exact.
* ``vae``: SD3's ``AutoencoderKL`` config (16 latent channels, blocks 128/256/512/512, scaling 1.5305, shift 0.0609,
  no quant convs): exact, so decode time at 512 px is real.
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with shift 3, as shipped.
* text encoders: **stand-ins** with the real output widths and sequence lengths (two one-layer CLIP text models of
  width 768 and 1280 with projections, a one-layer T5 of width 4096 whose output is zero, tokenizers built in code).
  The transformer sees exactly the real context shape (77 CLIP + ``max_sequence_length`` T5 tokens of width 4096,
  pooled width 2048); text encoding itself, once per prompt per step in flowrl, is much cheaper than with CLIP-G and
  T5-XXL (4.7B parameters), so the figures are of everything but the text encoders.

The pipeline loads with ``StableDiffusion3Pipeline.from_pretrained(output_dir)`` and runs through ``flowrl train`` and
``benchmarks.probe`` like any checkpoint directory. ``--shrink`` divides depth and width for tests (the same code
path, a model that fits a CPU test).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A pipeline's architecture: transformer and VAE configs (diffusers kwargs), text widths, scheduler shift."""

    transformer: dict
    vae: dict
    clip_widths: tuple[int, int]  # CLIP-L, CLIP-G hidden = projection widths
    t5_width: int
    shift: float
    clip_tokens: int = 77

    def shrunk(self, factor: int) -> "Architecture":
        """Depth, heads and every width divided by ``factor`` (the VAE's channels too): a test-size replica."""
        if factor == 1:
            return self
        t = dict(self.transformer)
        t["num_layers"] = max(2, t["num_layers"] // factor)
        t["num_attention_heads"] = max(2, t["num_attention_heads"] // factor)
        t["attention_head_dim"] = max(4, t["attention_head_dim"] // factor)
        t["caption_projection_dim"] = t["num_attention_heads"] * t["attention_head_dim"]
        clip = tuple(max(8, w // factor) for w in self.clip_widths)
        t5 = max(sum(clip), self.t5_width // factor)
        t["joint_attention_dim"] = t5
        t["pooled_projection_dim"] = sum(clip)
        if t.get("dual_attention_layers"):
            t["dual_attention_layers"] = tuple(i for i in t["dual_attention_layers"] if i < t["num_layers"] // 2) or (0,)
        v = dict(self.vae)
        v["block_out_channels"] = tuple(max(8, c // factor) for c in v["block_out_channels"])
        v["norm_num_groups"] = max(1, min(v["norm_num_groups"] // factor, min(v["block_out_channels"]) // 2))
        v["layers_per_block"] = 1
        return dataclasses.replace(self, transformer=t, vae=v, clip_widths=clip, t5_width=t5)


ARCHITECTURES: dict[str, Architecture] = {
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json
    "sd35m": Architecture(
        transformer={
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)),
            "qk_norm": "rms_norm",
        },
        vae=SD3_VAE,
        clip_widths=(768, 1280),
        t5_width=4096,
        shift=3.0,
    ),
}


def build_pipeline(arch: Architecture, *, device: str = "cpu", dtype: str = "float32", seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of ``arch`` with random weights (see the module docstring), on ``device``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from flowrl.embedded import build_null_t5, build_tokenizer

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    tok = build_tokenizer(arch.clip_tokens)

    def clip(width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=width, num_hidden_layers=1,
            num_attention_heads=max(1, width // 64), max_position_embeddings=arch.clip_tokens, projection_dim=width,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"))

    with torch.device(device):  # build in place: a 2.5B-parameter init on a GPU takes seconds, on a CPU minutes
        transformer = SD3Transformer2DModel(**arch.transformer).to(torch_dtype)
        vae = AutoencoderKL(**arch.vae).to(torch_dtype)
        te1, te2 = clip(arch.clip_widths[0]).to(torch_dtype), clip(arch.clip_widths[1]).to(torch_dtype)
        te3 = build_null_t5(arch.t5_width, len(tok)).to(torch_dtype)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=arch.shift),
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=te3, tokenizer_3=tok,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.arch", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    ap.add_argument("--output_dir", required=True, help="where the pipeline directory is written (atomically)")
    ap.add_argument("--device", default="cpu", help="where the weights are initialised (cuda: much faster)")
    ap.add_argument("--torch_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the saved weights")
    ap.add_argument("--shrink", type=int, default=1, help="divide depth and widths by this (test-size replicas)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.shrink < 1:
        ap.error(f"--shrink must be >= 1, got {args.shrink}")
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    from flowrl.embedded import save_pipeline_atomic

    arch = ARCHITECTURES[args.arch].shrunk(args.shrink)
    pipe = build_pipeline(arch, device=args.device, dtype=args.torch_dtype, seed=args.seed)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    save_pipeline_atomic(pipe, args.output_dir)
    print(f"{args.arch} (shrink {args.shrink}): transformer {n / 1e6:.1f}M parameters, "
          f"VAE {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.1f}M, {args.torch_dtype}, random weights "
          f"-> {Path(args.output_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
