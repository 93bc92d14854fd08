"""JPEG (in)compressibility, the prompt-independent rewards of DDPO (Black et al., 2023).

Each image is quantised to uint8 as ``round(255 * x)`` clipped to ``[0, 255]``, encoded by PIL as a baseline
JPEG at quality 95 (PIL's default 4:2:0 chroma subsampling, no optimisation), and measured in kilobytes::

    size_kB = len(jpeg_bytes) / 1000
    jpeg_compressibility   = -size_kB     (higher = smaller file = simpler image)
    jpeg_incompressibility = +size_kB     (higher = larger file = more detail / texture)

No normalisation: a 32x32 image encodes to roughly 0.65 kB (flat; mostly headers) to 1.8 kB (noise), a scenes
render to 0.8-1.6 kB; a 512x512 photo to tens of kB.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .base import Reward, quantize_uint8
from .registry import register_reward

__all__ = [
    "JpegCompressibility",
    "JpegIncompressibility",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
]

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """JPEG file size of each image in kB (``bytes / 1000``).

    Args:
        images: float ``[B, 3, H, W]`` in ``[0, 1]``.
        quality: PIL JPEG quality (DDPO uses 95).

    Returns:
        float32 ``[B]`` on ``images.device``.
    """
    pixels = np.ascontiguousarray(quantize_uint8(images).permute(0, 2, 3, 1).numpy())
    sizes = np.empty(len(pixels), np.float32)
    for i, arr in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000
    return torch.from_numpy(sizes).to(images.device)


def jpeg_compressibility(images: torch.Tensor, prompts: Sequence[str] | None, **metadata: Any) -> torch.Tensor:
    """``-size_kB`` of the quality-95 JPEG encoding (float32 ``[B]``, always < 0; higher is more compressible)."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images: torch.Tensor, prompts: Sequence[str] | None, **metadata: Any) -> torch.Tensor:
    """``+size_kB`` of the quality-95 JPEG encoding (float32 ``[B]``, always > 0; higher is less compressible)."""
    return jpeg_size_kb(images)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """DDPO's JPEG compressibility: ``score = -len(JPEG(image, quality)) / 1000`` (negative kB; range ``(-inf, 0)``,
    about -0.65 to -1.8 at 32x32). Prompts are ignored.

    Args:
        quality: JPEG quality passed to PIL (default 95, as in DDPO).
    """

    def __init__(self, quality: int = JPEG_QUALITY) -> None:
        super().__init__()
        self.quality = int(quality)

    def score(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """DDPO's JPEG incompressibility: ``score = +len(JPEG(image, quality)) / 1000`` (kB; range ``(0, inf)``).
    Prompts are ignored.

    Args:
        quality: JPEG quality passed to PIL (default 95, as in DDPO).
    """

    def __init__(self, quality: int = JPEG_QUALITY) -> None:
        super().__init__()
        self.quality = int(quality)

    def score(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)
