"""Deterministic per-sample randomness: a sample's noise depends on (seed, ...ids), never on batch layout or rank.

:func:`gaussian` draws one sample's noise; :func:`gaussians` draws many rows at once and is bit-identical to stacking
:func:`gaussian` of each row (the seeds are derived for all rows in one vectorised pass of numpy's ``SeedSequence``
hash, one generator is re-seeded per row and each row is written in place), at about half the cost per row.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

# numpy.random.SeedSequence's hash constants (numpy/random/bit_generator.pyx), pool size 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4
_M32 = 0xFFFFFFFF


def derive_seed(*ids: int) -> int:
    """A 63-bit seed mixed from integer ids with numpy's SeedSequence (well-spread, order-sensitive)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ids] + [len(ids)]).generate_state(2, np.uint64)[0] >> 1)


def derive_seeds(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """``[derive_seed(*row) for row in rows]`` as a uint64 array, in one vectorised pass (rows of equal length).

    A transcription of ``SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1`` for entropy = the row's ids
    masked to 32 bits plus its length (one 32-bit word each): the pool mixing and the output hash run on all rows
    at once in uint32 arithmetic; the hash constants' sequence does not depend on the data, so it is shared.
    """
    ids = np.asarray(rows, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"rows must be a sequence of equal-length id sequences, got shape {ids.shape}")
    n, k = ids.shape
    entropy = np.empty((n, k + 1), dtype=np.uint32)
    entropy[:, :k] = (ids & _M32).astype(np.uint32)
    entropy[:, k] = k
    hc = [_INIT_A]  # the evolving hash constant (a Python int kept to 32 bits)

    def hashmix(v: np.ndarray) -> np.ndarray:
        v = v ^ np.uint32(hc[0])
        hc[0] = (hc[0] * _MULT_A) & _M32
        v = v * np.uint32(hc[0])
        return v ^ (v >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = np.uint32(_MIX_L) * x - np.uint32(_MIX_R) * y
        return r ^ (r >> np.uint32(16))

    zeros = np.zeros(n, dtype=np.uint32)
    pool = [hashmix(entropy[:, i] if i < k + 1 else zeros) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, k + 1):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
    words = []
    hb = _INIT_B
    for i in range(2):  # the first uint64 of generate_state = words 0 (low) and 1 (high)
        v = pool[i % _POOL] ^ np.uint32(hb)
        hb = (hb * _MULT_B) & _M32
        v = v * np.uint32(hb)
        words.append(v ^ (v >> np.uint32(16)))
    state = words[0].astype(np.uint64) | (words[1].astype(np.uint64) << np.uint64(32))
    return state >> np.uint64(1)


_local = threading.local()


def _generator() -> torch.Generator:
    """This thread's CPU generator, re-seeded before every draw (``manual_seed`` resets the whole state)."""
    g = getattr(_local, "g", None)
    if g is None:
        g = _local.g = torch.Generator()
    return g


def gaussian(shape: tuple[int, ...], *ids: int) -> torch.Tensor:
    """Standard normal fp32 tensor of ``shape`` drawn from a generator seeded by ``ids`` (CPU, then moved)."""
    return torch.randn(shape, generator=_generator().manual_seed(derive_seed(*ids)))


def gaussians(shape: tuple[int, ...], rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``torch.stack([gaussian(shape, *row) for row in rows])``, bit for bit, at about half the cost: [N, *shape]."""
    shape = tuple(shape)
    out = torch.empty((len(rows), *shape))
    if not len(rows):
        return out
    g = _generator()
    for i, s in enumerate(derive_seeds(rows).tolist()):
        torch.randn(shape, generator=g.manual_seed(s), out=out[i])
    return out
