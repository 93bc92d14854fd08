"""A LoRA from a full fine-tune: the weight deltas of every Linear / Conv2d layer, factorised by SVD.

A fully fine-tuned transformer differs from its base by ``D = W_tuned - W_base`` per layer. Factorising
``D = U S V^T`` and keeping ``r`` singular values gives LoRA factors ``B = U_r sqrt(S_r)`` ``[out, r]`` and
``A = sqrt(S_r) V_r^T`` ``[r, in]`` with scaling ``alpha / r = 1``: ``W_base + B A`` equals ``W_tuned`` exactly when
``r = rank(D)`` (``rank=None``, each layer's ``min(out, in)``), and is the best rank-``r`` approximation otherwise
(Eckart-Young). Bias deltas travel as ``lora_B.bias`` (peft's ``lora_bias``), which diffusers' ``load_lora_weights``
detects. Conv2d kernels ``[out, in, kh, kw]`` are flattened to ``[out, in*kh*kw]``; ``A`` becomes a ``[r, in, kh,
kw]`` kernel and ``B`` a 1x1 one, as peft's LoRA Conv2d layer is built.

Per-layer ranks go into the adapter config's ``rank_pattern`` / ``alpha_pattern``, so the file loads into a stock
pipeline with ``load_lora_weights`` and into :func:`flowrl.cli.policy_with_lora`.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["extract_lora"]


def _factor(delta: Tensor, rank: int | None) -> tuple[Tensor, Tensor, int]:
    """``delta [out, in]`` (float64 inside) -> ``B [out, r]``, ``A [r, in]`` (float32), ``r``.

    ``r = min(rank or min(out, in), min(out, in))``; singular values at float32 rounding level, below
    ``max(out, in) * eps_fp32 * s_max`` (numpy's ``matrix_rank`` rule), are dropped, so a low-rank delta gets its true
    rank; ``r >= 1``.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank or len(s), len(s))
    tol = float(s[0]) * max(delta.shape) * torch.finfo(torch.float32).eps
    keep = int((s > tol).sum())
    r = max(1, min(r, keep))
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), r


def extract_lora(
    base: Mapping[str, Tensor],
    tuned: nn.Module,
    rank: int | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """LoRA factors (peft key names, no adapter name) and the matching ``LoraConfig`` kwargs for ``tuned - base``.

    Args:
        base: the base model's state dict (same names as ``tuned.state_dict()``), any device / dtype.
        tuned: the fine-tuned module; every ``nn.Linear`` / ``nn.Conv2d`` whose weight or bias changed is exported.
        rank: LoRA rank per layer; None = exact (each delta's full rank).

    Returns:
        ``(state_dict, config)``: ``state_dict`` holds ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` (and
        ``<module>.lora_B.bias`` for every exported layer with a bias, zero where the bias did not change), float32
        on the CPU; ``config`` = ``LoraConfig`` kwargs (``r`` = the most common rank, ``lora_alpha = r``, per-layer
        ``rank_pattern`` / ``alpha_pattern``, ``lora_bias``, ``target_modules`` = the exported module names).

    Raises:
        ValueError: when a parameter that is not in a Linear / Conv2d layer changed (a LoRA cannot carry it), or
            when nothing changed.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 or None (exact), got {rank}")
    sd: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    any_bias = False
    covered: set[str] = set()
    for name, mod in tuned.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = mod.weight.detach().float().cpu()
        dw = w - base[f"{name}.weight"].float().cpu()
        db = None if mod.bias is None else mod.bias.detach().float().cpu() - base[f"{name}.bias"].float().cpu()
        covered.update({f"{name}.weight", f"{name}.bias"})
        if not dw.any() and (db is None or not db.any()):
            continue
        b_mat, a_mat, r = _factor(dw.reshape(dw.shape[0], -1), rank)
        if isinstance(mod, nn.Conv2d):
            a_mat = a_mat.reshape(r, *dw.shape[1:])
            b_mat = b_mat.reshape(dw.shape[0], r, 1, 1)
        sd[f"{name}.lora_A.weight"] = a_mat.contiguous()
        sd[f"{name}.lora_B.weight"] = b_mat.contiguous()
        if db is not None:
            sd[f"{name}.lora_B.bias"] = db.contiguous()
            any_bias = True
        ranks[name] = r
    changed = [n for n, p in tuned.named_parameters() if n not in covered and not torch.equal(p.detach().float().cpu(), base[n].float().cpu())]
    if changed:
        raise ValueError(f"parameters outside Linear/Conv2d layers changed, a LoRA cannot carry them: {changed[:5]}")
    if not ranks:
        raise ValueError("the fine-tuned model equals its base: there is no delta to export as a LoRA")
    values = list(ranks.values())
    r0 = max(set(values), key=values.count)
    pattern = {rf"^{re.escape(n)}$": r for n, r in ranks.items() if r != r0}
    config = {
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_bias": any_bias,
        "target_modules": sorted(ranks),
        "init_lora_weights": True,
    }
    return sd, config
