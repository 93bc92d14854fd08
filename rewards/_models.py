"""Shared machinery of the model-based rewards: lazy loading, device/dtype, batching, preprocessing, checkpoints.

:class:`ModelReward` is the base of every reward that runs a network (:mod:`rewards.clip_models`,
:mod:`rewards.imagereward`). A subclass implements ``_load()`` (build the network, load the weights) and
``_raw_scores(pixels, prompts)`` (one chunk, already on the reward's device); the base class does the rest:

- **lazy loading**: nothing is read or imported (no ``torch.load``, no ``transformers``/``open_clip``
  import) before the first call or an explicit :meth:`~rewards.base.Reward.load`;
- **device**: ``device=None`` (default) picks one on the first call and keeps it: the images' device if they are
  on an accelerator, else the current CUDA device when CUDA is available (each process's own under
  accelerate/torchrun), else the CPU. So a first call with CPU images (e.g. an evaluation at step 0) still puts
  the model on the GPU, and the model never moves back and forth. An explicit ``device`` (or :meth:`to`) pins it.
  Images are copied to the reward's device; scores come back on the images' device;
- **dtype**: the dtype of the network's weights (``float32`` by default; ``"float16"``/``"bfloat16"`` halve
  memory at some precision cost);
- **batch_size**: the images of one call are scored in chunks of at most this many;
- **normalisation**, only when asked: the score returned is ``scale * raw + offset`` (defaults 1 and 0, i.e. the
  raw score). When either differs from its default, the raw score is also returned as ``info["raw"]`` (the
  trainer logs it as ``reward/<name>/raw/mean``) and the transformation is logged once (WARNING level) at
  construction, so a normalised run is never mistaken for a raw one. E.g. flow_grpo's PickScore/26 is ``scale=1/26``.

Images arrive as float ``[B, 3, H, W]`` in ``[0, 1]``; :func:`resize_center_crop_normalize` reproduces the
models' own PIL/torchvision preprocessing (resize of the shortest side with antialiased bicubic, centre crop,
per-channel normalisation) in torch, without a round trip through PIL/uint8.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .base import Reward

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ModelReward",
    "parse_dtype",
    "resize_center_crop_normalize",
    "resolve_checkpoint_file",
]

logger = logging.getLogger("rewards")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI CLIP's preprocessing (also used by open_clip ViT-H-14, PickScore, ImageReward)."""
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std of OpenAI CLIP's preprocessing."""

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``torch.float32`` for ``None``; a ``torch.dtype`` as is; a name (``"fp16"``, ``"bfloat16"``...) looked up."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def resize_center_crop_normalize(
    images: torch.Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop: int | tuple[int, int] | None = None,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """CLIP-style preprocessing in torch: resize shortest side, centre crop, clamp to ``[0, 1]``, normalise.

    Mirrors ``Resize(size, BICUBIC) -> CenterCrop(crop) -> ToTensor -> Normalize(mean, std)`` (torchvision /
    open_clip / ImageReward) and ``CLIPImageProcessor`` (resize ``shortest_edge``, ``crop_size``): the shortest
    side becomes ``size`` and the longer one ``int(size * long / short)``; the resize is antialiased (as PIL's);
    the result is clamped to ``[0, 1]`` (PIL clips bicubic overshoot to the uint8 range), then centre-cropped
    (offsets ``(H - h) // 2``, ``(W - w) // 2``) and normalised per channel. A tuple ``size`` resizes to exactly
    ``(h, w)``.

    Args:
        images: float ``[B, 3, H, W]`` in ``[0, 1]``.
        size: target of the shortest side (int) or exact ``(h, w)``.
        mean, std: per-channel normalisation.
        crop: centre-crop size (int or ``(h, w)``); default: ``size``.
        interpolation: ``"bicubic"`` (default) or ``"bilinear"``.

    Returns:
        float ``[B, 3, crop_h, crop_w]`` in ``images``' dtype (float32 for non-float inputs).
    """
    x = images if images.is_floating_point() else images.float()
    h, w = x.shape[-2:]
    if isinstance(size, int):
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        out_hw = (new_short, new_long) if h <= w else (new_long, new_short)
    else:
        out_hw = (int(size[0]), int(size[1]))
    if out_hw != (h, w):
        x = F.interpolate(x, size=out_hw, mode=interpolation, align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)
    if crop is None:
        crop = size if isinstance(size, int) else out_hw
    ch, cw = (int(crop), int(crop)) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    top, left = max((x.shape[-2] - ch) // 2, 0), max((x.shape[-1] - cw) // 2, 0)
    x = x[..., top : top + ch, left : left + cw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _looks_like_local_path(spec: str) -> bool:
    """A path the user meant as local: absolute, ``./``/``../``/``~``, or more than one ``/`` (hub ids have one)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def resolve_checkpoint_file(spec: str | Path, filename: str, *, reward: str) -> str:
    """The local path of a weights file named by a local file, a local folder or a Hugging Face hub repo id.

    - an existing file: used as is (whatever its name);
    - an existing folder: ``folder/filename``;
    - otherwise a hub repo id (``"xswu/HPSv2"``): ``huggingface_hub.hf_hub_download(repo_id, filename)`` (the
      cache is used first; offline mode makes that the only source).

    Raises:
        FileNotFoundError: naming the reward, what was looked for and how to pass a local file instead.
    """
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return str(candidate)
        raise FileNotFoundError(f"reward {reward!r}: folder {str(path)!r} has no {filename!r}")
    if _looks_like_local_path(spec_s):
        raise FileNotFoundError(f"reward {reward!r}: checkpoint {spec_s!r} does not exist")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(spec_s, filename)
    except Exception as exc:  # noqa: BLE001 - any hub/network/cache failure becomes one clear message
        raise FileNotFoundError(
            f"reward {reward!r}: could not get {filename!r} from hub repo {spec_s!r} "
            f"({type(exc).__name__}: {exc}); download it and pass its local path as checkpoint=..."
        ) from exc


def load_state_dict_file(path: str, *, reward: str) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` on CPU, unwrapped from a ``{"state_dict": ...}`` wrapper and from
    DataParallel's ``module.`` prefix; a flat ``{name: Tensor}`` dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"reward {reward!r}: could not read checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"reward {reward!r}: checkpoint {path!r} is not a state dict (name -> tensor)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, reward: str, source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a short, readable error naming the reward."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append("shape mismatch: " + show([f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}"
                                                     for k in wrong]))
        raise ValueError(f"reward {reward!r}: checkpoint {source} does not fit the architecture ({'; '.join(parts)})")
    module.load_state_dict(state_dict, strict=True)


class ModelReward(Reward):
    """Base of the network-backed rewards (see this module's docstring).

    Args:
        device: ``None`` (default): chosen on the first call (see the module docstring); else the device to
            compute on.
        dtype: weights' dtype (``torch.dtype`` or name; default ``float32``).
        batch_size: at most this many images per forward pass.
        scale, offset: the returned score is ``scale * raw + offset`` (defaults: the raw score).
    """

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.auto_device = device is None
        if device is not None:
            self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.scale, self.offset = float(scale), float(offset)
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise ValueError(f"scale and offset must be finite, got {scale}, {offset}")
        if self.normalized:
            logger.warning("reward %r: reporting %g * raw + %g (normalised; the raw score is logged as %s/raw)",
                        self.name, self.scale, self.offset, self.name)

    @property
    def normalized(self) -> bool:
        """True when ``scale``/``offset`` change the raw score."""
        return self.scale != 1.0 or self.offset != 0.0

    def to(self, device: torch.device | str) -> "ModelReward":
        """Pin the reward to ``device`` (no automatic choice on the first call)."""
        self.auto_device = False
        return super().to(device)  # type: ignore[return-value]

    @staticmethod
    def default_device(images: torch.Tensor) -> torch.device:
        """The device ``device=None`` picks: the images' if not the CPU, else the current CUDA device, else CPU."""
        if images.device.type != "cpu":
            return images.device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _raw_scores(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw scores ``[b]`` of one chunk (override): ``pixels`` float32 ``[b, 3, H, W]`` in ``[0, 1]`` on
        ``self.device``."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any):
        if self.auto_device:
            self.to(self.default_device(images))
        prompts = list(prompts)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = images[start : start + self.batch_size].detach().to(self.device, torch.float32)
            chunks.append(self._raw_scores(pixels, prompts[start : start + self.batch_size]).float().reshape(-1))
        raw = torch.cat(chunks).to(images.device) if chunks else images.new_zeros(0, dtype=torch.float32)
        if not self.normalized:
            return raw
        return raw * self.scale + self.offset, {"raw": raw}


def size_entry(value: Any, *keys: str) -> Any:
    """``value[key]`` or ``value.key`` for the first key present and not None (image-processor size dicts are
    plain dicts in some transformers versions and ``SizeDict`` objects in others)."""
    for key in keys:
        got = None
        if isinstance(value, dict):
            got = value.get(key)
        else:
            got = getattr(value, key, None)
            if got is None:
                try:
                    got = value[key]
                except (KeyError, TypeError, IndexError):
                    got = None
        if got is not None:
            return got
    return None
