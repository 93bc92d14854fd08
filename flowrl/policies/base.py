"""The Policy interface every model adapter implements, and loading by pipeline class."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor


@dataclasses.dataclass
class Cond:
    """Per-sample conditioning (rows aligned with the batch of latents).

    Attributes:
        embeds: [B, L, D] token embeddings of the prompts.
        pooled: [B, P] pooled embeddings.
        neg_embeds, neg_pooled: the same for the negative prompt (classifier-free guidance), or None.
    """

    embeds: Tensor
    pooled: Tensor
    neg_embeds: Tensor | None = None
    neg_pooled: Tensor | None = None

    def select(self, idx: Tensor | slice) -> "Cond":
        return Cond(*(None if t is None else t[idx] for t in dataclasses.astuple(self)))


class Policy(Protocol):
    """What the trainer needs from a model. Shapes: latents [B, C, H, W]; images [B, 3, H', W'] in [0, 1]."""

    def encode(self, prompts: list[str]) -> Cond: ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float) -> Tensor: ...

    def decode(self, x: Tensor) -> Tensor: ...

    def latent_shape(self, resolution: int) -> tuple[int, ...]: ...

    def sigmas(self, num_steps: int, resolution: int) -> Tensor: ...

    def reference(self) -> contextlib.AbstractContextManager: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...


SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline",)


def pipeline_class_name(path: str | Path) -> str:
    """The ``_class_name`` in a local diffusers directory's ``model_index.json``.

    Raises:
        FileNotFoundError: naming the path when it is missing or not a diffusers pipeline directory.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist")
    index = p / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a diffusers pipeline directory: model_index.json is missing "
            "(pass a hub id or a directory written by save_pretrained)"
        )
    return json.loads(index.read_text())["_class_name"]


def load_policy(path: str, **kwargs) -> "Policy":
    """Build the Policy matching the pipeline class of ``path`` (local dir or hub id)."""
    if Path(path).exists() or path.startswith((".", "/", "~")):
        cls = pipeline_class_name(Path(path).expanduser())
    else:  # hub id: read model_index.json through the hub cache
        from huggingface_hub import hf_hub_download

        cls = json.loads(Path(hf_hub_download(path, "model_index.json", revision=kwargs.get("revision"))).read_text())[
            "_class_name"
        ]
    if cls == "StableDiffusion3Pipeline":
        from .sd3 import SD3Policy

        return SD3Policy.from_pretrained(path, **kwargs)
    raise ValueError(f"pipeline class {cls!r} of {path!r} is not supported; supported: {SUPPORTED_PIPELINES}")
