"""Deterministic per-sample randomness: a sample's noise depends on (seed, ...ids), never on batch layout or rank."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*ids: int) -> int:
    """A 63-bit seed mixed from integer ids with numpy's SeedSequence (well-spread, order-sensitive)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ids] + [len(ids)]).generate_state(2, np.uint64)[0] >> 1)


def gaussian(shape: tuple[int, ...], *ids: int) -> torch.Tensor:
    """Standard normal fp32 tensor of ``shape`` drawn from a generator seeded by ``ids`` (CPU, then moved)."""
    g = torch.Generator().manual_seed(derive_seed(*ids))
    return torch.randn(shape, generator=g)
