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


def combine_cfg(v_cond: Tensor, v_uncond: Tensor | None, scale: float) -> Tensor:
    """Guided velocity ``v_uncond + scale * (v_cond - v_uncond)`` from :meth:`Policy.cfg_parts` (``v_cond`` when there
    is no unconditional branch). Shapes [B, *D], fp32; the same arithmetic as the policies' ``velocity``."""
    if v_uncond is None:
        return v_cond
    return v_uncond + scale * (v_cond - v_uncond)


def unique_rows(*tensors: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """Rows that repeat across row-aligned tensors: ``(first, inverse)`` with ``t[first][inverse]`` equal to ``t``
    (exactly, every element) for every given tensor, or ``None`` when all B rows differ.

    Args:
        tensors: [B, ...] each, same B (``None`` entries are skipped). A row repeats only when it repeats in every
            tensor (latent, timestep, prompt embeddings, ...).

    Returns:
        first: [U] long, ascending: the first index of each distinct row (U < B).
        inverse: [B] long in [0, U): which distinct row each row is.

    Candidates are grouped by a key of up to 256 evenly spaced elements of each row (copied, never summed, so equal
    rows always get equal keys, whatever the reduction order of the hardware), then every candidate is compared with
    its representative element for element; a row that matches its key but not its representative (or holds a NaN)
    stays a row of its own, so the result is always exact. Groups that share their initial noise
    (``same_noise_per_group``) repeat every latent of the first SDE step and of any ODE stretch before it: evaluating
    those rows once is the same function, at 1/G of the cost.
    """
    ts = [t.detach() for t in tensors if t is not None]
    if any(t.dim() == 0 for t in ts):  # a scalar is not a row
        return None
    B = ts[0].shape[0]
    if B < 2 or any(t.shape[0] != B for t in ts):  # one row, or rows broadcast: nothing to share
        return None
    keys = []
    for t in ts:
        flat = t.reshape(B, -1)
        n = flat.shape[1]
        pos = torch.linspace(0, n - 1, min(n, 256), device=flat.device).round().long().unique()
        keys.append(flat[:, pos].float())
    _, key_id = torch.unique(torch.cat(keys, 1), dim=0, return_inverse=True)
    n_keys = int(key_id.max()) + 1
    rep = torch.arange(B, device=key_id.device)  # each row's representative: the first equal row
    pending = rep.clone()
    while pending.numel():  # each pass settles at least the first pending row of every key
        k = key_id[pending]
        firsts = torch.full((n_keys,), B, dtype=torch.long, device=k.device).scatter_reduce(0, k, pending, "amin")
        cand = firsts[k]  # the first still-pending row with the same key
        dup = pending[cand != pending]
        if dup.numel() == 0:
            break
        same = torch.ones(dup.numel(), dtype=torch.bool, device=dup.device)
        for t in ts:
            same &= (t[dup] == t[firsts[key_id[dup]]]).reshape(dup.numel(), -1).all(1)
        rep[dup[same]] = firsts[key_id[dup[same]]]
        pending = dup[~same]  # equal keys, different rows: try them against each other in the next pass
    first = torch.unique(rep)  # sorted: first appearances in order
    if first.numel() == B:
        return None
    return first, torch.searchsorted(first, rep)


def forward_unique_rows(fn, *rows: Tensor | None, **shared) -> Tensor:
    """``fn(*rows, **shared)`` evaluated once per distinct row of ``rows`` (see :func:`unique_rows`) and gathered back
    to [B, ...]; ``fn`` unchanged when every row differs. ``fn`` must act on rows independently (a transformer forward
    does); ``shared`` arguments pass through as they are. Gradients flow back through the gather, so a repeated row's
    gradient is the sum over its copies, as if each had been evaluated."""
    u = unique_rows(*rows)
    if u is None:
        return fn(*rows, **shared)
    first, inverse = u
    return fn(*(None if r is None else r[first] for r in rows), **shared)[inverse]


class Policy(Protocol):
    """What the trainer needs from a model. Shapes: latents [B, *latent_shape] (SD3 [B, C, H, W]; Flux the packed
    [B, S, 4C]); images [B, 3, H', W'] in [0, 1]."""

    def encode(self, prompts: list[str]) -> Cond: ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float) -> Tensor: ...

    def cfg_parts(self, x: Tensor, sigma: Tensor, cond: Cond, guidance_scale: float,
                  with_uncond: bool = True) -> tuple[Tensor, Tensor | None, float]: ...

    def decode(self, x: Tensor) -> Tensor: ...

    def latent_shape(self, resolution: int) -> tuple[int, ...]: ...

    def sigmas(self, num_steps: int, resolution: int) -> Tensor: ...

    def reference(self) -> contextlib.AbstractContextManager: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...


SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")

XFORMERS_FLAG = "--enable_xformers_memory_efficient_attention"


def xformers_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why xformers' memory-efficient attention cannot run here, or None when it can.

    Cheap (no model is loaded): xformers must import, CUDA must be available, and ``device`` (when given) must be a
    CUDA device.
    """
    try:
        import xformers.ops  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name in ("xformers", "xformers.ops"):
            return ("xformers is not installed (it is GPU-only: pip install -e '.[xformers]' on a CUDA machine, "
                    "matching your torch build)")
        return f"xformers is installed but cannot be imported ({e})"
    except Exception as e:  # a wheel built for another torch/CUDA fails at import in many ways
        return f"xformers is installed but cannot be imported ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return ("no CUDA device is available (torch.cuda.is_available() is False); xformers' attention runs on "
                "NVIDIA GPUs only")
    if device is not None and torch.device(device).type != "cuda":
        return (f"the model runs on device {str(device)!r}, not a CUDA device; xformers' attention runs on NVIDIA "
                "GPUs only")
    return None


def require_xformers(device: torch.device | str | None = None) -> None:
    """Raise before any heavy work when ``--enable_xformers_memory_efficient_attention`` cannot be honoured.

    Raises:
        ValueError: naming the flag, the reason, and that torch SDPA (the default) needs no flag.
    """
    reason = xformers_unavailable_reason(device)
    if reason is not None:
        raise ValueError(xformers_error_message(reason))


def xformers_error_message(reason: str) -> str:
    return (f"{XFORMERS_FLAG} is set but xformers cannot run here: {reason}. Without the flag attention uses "
            "torch's scaled_dot_product_attention (SDPA), the default, which is already memory-efficient on GPUs; "
            "drop the flag to use it")


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


def resolve_pipeline_class(path: str, revision: str | None = None) -> str:
    """The pipeline ``_class_name`` of ``path`` (local dir, or hub id read through the hub cache)."""
    if Path(path).exists() or path.startswith((".", "/", "~")):
        return pipeline_class_name(Path(path).expanduser())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text())["_class_name"]


def policy_class(pipeline_class: str) -> type:
    """The Policy class for a diffusers pipeline class name.

    Raises:
        ValueError: for a pipeline class no adapter supports.
    """
    if pipeline_class == "StableDiffusion3Pipeline":
        from .sd3 import SD3Policy

        return SD3Policy
    if pipeline_class == "FluxPipeline":
        from .flux import FluxPolicy

        return FluxPolicy
    raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported: {SUPPORTED_PIPELINES}")


def default_lora_targets(path: str, lora_on_ff: bool, revision: str | None = None) -> tuple[str, ...]:
    """The model family's LoRA target preset (attention projections, plus the feed-forwards with ``lora_on_ff``)."""
    cls = policy_class(resolve_pipeline_class(path, revision))
    if hasattr(cls, "default_lora_targets"):
        return tuple(cls.default_lora_targets(lora_on_ff))
    from .sd3 import SD3_LORA_TARGETS, SD3_LORA_TARGETS_WITH_FF

    return SD3_LORA_TARGETS_WITH_FF if lora_on_ff else SD3_LORA_TARGETS


LARGE_FULL_FINETUNE_PARAMS = 1_000_000_000
"""Full fine-tuning of a transformer above this many parameters needs ``allow_large_full_finetune``."""


def transformer_num_params(path: str | Path) -> int | None:
    """Stored tensor elements (parameters and saved buffers) of ``path/transformer`` counted from its safetensors
    headers (no weights read); None if unknown.

    Reads only each ``*.safetensors`` file's JSON header (8-byte length + header), so it costs milliseconds even for
    Flux's 24 GB of shards.
    """
    folder = Path(path) / "transformer"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for d in entry.get("shape", []):
                    count *= int(d)
                total += count
    return total


def check_full_finetune_size(path: str | Path, rank: int, allow_large: bool, n_params: int | None = None) -> None:
    """Refuse ``rank 0`` (full fine-tuning) of a > 1B-parameter transformer unless explicitly allowed.

    ``n_params`` None = count from the local model directory's safetensors headers (before loading)."""
    if rank != 0 or allow_large:
        return
    n = n_params if n_params is not None else transformer_num_params(path)
    if n is not None and n > LARGE_FULL_FINETUNE_PARAMS:
        from ..config import ConfigError

        raise ConfigError(
            f"rank 0 means full fine-tuning, and the transformer at {path} has {n / 1e9:.2f}B parameters: pass "
            f"--rank 32 for LoRA (what configs/sd35m_*.yaml and configs/flux_dev_hps.yaml use), or "
            f"--allow_large_full_finetune true to fine-tune every weight (optimizer state alone is 8 bytes per parameter)"
        )


def load_policy(path: str, **kwargs) -> "Policy":
    """Build the Policy matching the pipeline class of ``path`` (local dir or hub id)."""
    name = resolve_pipeline_class(path, kwargs.get("revision"))
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"pipeline class {name!r} of {path!r} is not supported; supported: {SUPPORTED_PIPELINES}")
    return policy_class(name).from_pretrained(path, **kwargs)
