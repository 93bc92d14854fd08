"""``random``: a null-control reward, uniform noise that carries no information about the image.

Training on it answers "what do the updates do without a reward signal?", the sanity check of Shao et al. 2025
("Spurious Rewards: Rethinking Training Signals in RLVR", arXiv 2506.10947), who trained on random rewards. Pair it
with the real reward at weight 0 so that it is still logged and evaluated, e.g.
``flowrl train --reward random --reward scenes:0``: advantages then have the usual size and no signal, and the
`eval` curve shows what the update noise alone does to the model (on the embedded default: a loss of 0.05-0.14 in
90 steps, seeds 0 and 1, see the README).

Each score is a deterministic function of the image's uint8 pixels, its prompt and ``seed`` (BLAKE2b), so a resumed
run and a re-scored image get the same value; different images get independent values.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from .base import Reward, quantize_uint8
from .registry import register_reward

__all__ = ["RandomReward", "random_scores"]


def random_scores(images: torch.Tensor, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Uniform ``[0, 1)`` scores (multiples of 2^-24) keyed by ``(seed, prompt, round(255 * image))``: the top 24
    bits of an 8-byte BLAKE2b digest.

    Args:
        images: float ``[B, 3, H, W]`` in ``[0, 1]``.
        prompts: ``B`` prompts (part of the key, so one image under two prompts scores independently).
        seed: any integer; another seed gives independent scores.

    Returns:
        float32 ``[B]`` on ``images.device``.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    pixels = quantize_uint8(images).numpy()
    out = np.empty(len(pixels), np.float64)
    for i, (arr, prompt) in enumerate(zip(pixels, prompts)):
        h = hashlib.blake2b(digest_size=8, key=str(int(seed)).encode())
        h.update(prompt.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        out[i] = (int.from_bytes(h.digest(), "little") >> 40) / 2.0**24  # 24 bits: exact in float32, below 1
    return torch.from_numpy(out.astype(np.float32)).to(images.device)


@register_reward("random")
class RandomReward(Reward):
    """Null control: ``score`` uniform in ``[0, 1)``, a hash of (seed, prompt, uint8 pixels) with no information
    about quality or the prompt (:func:`random_scores`).

    Args:
        seed: selects an independent set of scores (default 0).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)

    def score(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        return random_scores(images, prompts, self.seed)
