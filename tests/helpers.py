"""Shared builders for tests: a tiny random SD3 pipeline saved in diffusers format."""

from __future__ import annotations

from pathlib import Path

from flowrl.embedded import MAX_SEQUENCE_LENGTH, TinySD3Config, build_pipeline, save_pipeline_atomic

TINY = TinySD3Config(
    resolution=16, patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16,
    text_layers=1, text_projection_dim=8,
)


def save_tiny_sd3(path: Path, guidance_scale: float = 2.0) -> Path:
    pipe = build_pipeline(TINY, seed=0)
    save_pipeline_atomic(
        pipe, path, {"resolution": TINY.resolution, "max_sequence_length": MAX_SEQUENCE_LENGTH,
                     "guidance_scale": guidance_scale, "num_inference_steps": 4},
    )
    return path
