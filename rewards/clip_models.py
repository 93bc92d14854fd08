"""CLIP-family preference rewards: HPSv2 / HPSv2.1, PickScore, CLIPScore and the LAION aesthetic predictor.

Every class here is a :class:`~rewards._models.ModelReward`: lazy loading, ``device`` (default: the GPU when
there is one, chosen on the first call), ``dtype``, ``batch_size``, and the optional ``scale``/``offset`` normalisation (off by default: the
score is the raw one of the docstring). Images are float ``[B, 3, H, W]`` in ``[0, 1]`` of any size; each model's
own preprocessing (resize of the shortest side with antialiased bicubic, centre crop, normalisation with the
model's mean/std) runs in torch (:func:`~rewards._models.resize_center_crop_normalize`).

Weights are named by a local file or folder, or by a Hugging Face hub id (downloaded once into the hub cache;
offline, only the cache is used). Nothing is imported or read before the first call.

=============  ==================================  ==================================================  ===========
name           architecture                        raw score                                           range
=============  ==================================  ==================================================  ===========
``hpsv2``      open_clip ViT-H-14                  ``cos(img, txt)`` (HPS papers report ``100 cos``)    ``[-1, 1]``
``hpsv21``     open_clip ViT-H-14                  ``cos(img, txt)``                                    ``[-1, 1]``
``pickscore``  transformers ``CLIPModel`` (H/14)   ``exp(logit_scale) * cos(img, txt)``                 ``[-100, 100]``
``clipscore``  transformers ``CLIPModel`` (L/14)   ``w * max(cos(img, txt), 0)``, ``w = 2.5``           ``[0, w]``
``aesthetic``  CLIP L/14 image embedding + MLP     ``MLP(img / ||img||)``                               about 1-10
=============  ==================================  ==================================================  ===========

Typical values on real images: HPSv2 0.2-0.3, PickScore 18-23, CLIPScore 0.6-0.9 (ViT-L/14), aesthetic 4-7.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._models import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelReward,
    load_into,
    load_state_dict_file,
    resize_center_crop_normalize,
    resolve_checkpoint_file,
    size_entry,
)
from .registry import register_reward

__all__ = ["Aesthetic", "CLIPScore", "HPSv2", "HPSv21", "PickScore", "linear_stack_from_state_dict"]


# ================================================================================================ open_clip: HPS
class _OpenClipHPS(ModelReward):
    """HPS (Human Preference Score): an open_clip CLIP fine-tuned on human preferences; see :class:`HPSv2`."""

    default_checkpoint = "xswu/HPSv2"
    filename = "HPS_v2_compressed.pt"

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        architecture: str = "ViT-H-14",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, scale=scale, offset=offset)
        self.checkpoint = str(checkpoint) if checkpoint is not None else self.default_checkpoint
        self.architecture = str(architecture)

    def _load(self) -> None:
        path = resolve_checkpoint_file(self.checkpoint, self.filename, reward=self.name)
        try:
            import open_clip
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"reward {self.name!r} needs open_clip: pip install 'flowrl[rewards]' (open_clip_torch, torchvision)"
            ) from exc
        arch = self.architecture
        if arch.endswith(".json") and Path(arch).is_file():  # a model-config file: register it under its stem
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"reward {self.name!r}: open_clip has no model config {arch!r}")
        model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
        state = load_state_dict_file(path, reward=self.name)
        scale = state.get("logit_scale")
        if scale is not None and scale.ndim != model.logit_scale.ndim:  # stored as [] in some versions, [1] in others
            state["logit_scale"] = scale.reshape(model.logit_scale.shape)
        load_into(model, state, reward=self.name, source=repr(path))
        self.model = model.eval().requires_grad_(False).to(self.dtype)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_CLIP_STD))

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """HPS's validation transform: ``Resize(size, bicubic)`` of the shortest side, ``CenterCrop(size)``,
        ``Normalize(mean, std)`` with the model config's values (OpenAI's for ViT-H-14), in torch."""
        return resize_center_crop_normalize(pixels, self.image_size, self.mean, self.std)

    def _raw_scores(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = self.preprocess(pixels).to(self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(x, normalize=True).float()
        txt = self.model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1)


@register_reward("hpsv2")
class HPSv2(_OpenClipHPS):
    """HPSv2 (Wu et al., 2023): ``score = cos(f_img, f_txt)``, the cosine similarity of the L2-normalised image and
    text embeddings of open_clip ViT-H-14 with the weights of ``HPS_v2_compressed.pt``. Range ``[-1, 1]``; about
    0.2-0.3 on generated images. (HPSv2's benchmark tables report ``100 * cos``; this is the raw cosine, exactly
    what ``hpsv2.score`` returns.)

    Args:
        checkpoint: the ``HPS_v2_compressed.pt`` file, a folder holding it, or a hub repo id (default
            ``"xswu/HPSv2"``). The file is a state dict of the open_clip model, possibly under ``"state_dict"``;
            read with ``torch.load(weights_only=True)``.
        architecture: open_clip model-config name (default ``"ViT-H-14"``) or the path of an open_clip
            model-config JSON file (registered under its stem), e.g. a tiny config in tests.
        device, dtype, batch_size, scale, offset: see :class:`~rewards._models.ModelReward`.
    """

    default_checkpoint = "xswu/HPSv2"
    filename = "HPS_v2_compressed.pt"


@register_reward("hpsv21")
class HPSv21(_OpenClipHPS):
    """HPSv2.1: as :class:`HPSv2` (raw cosine in ``[-1, 1]``, about 0.25-0.35 on generated images) with the
    weights of ``HPS_v2.1_compressed.pt`` (default: hub repo ``"xswu/HPSv2"``)."""

    default_checkpoint = "xswu/HPSv2"
    filename = "HPS_v2.1_compressed.pt"


# ============================================================================================ transformers CLIP
def _features(out: Any) -> torch.Tensor:
    """Projected features from ``CLIPModel.get_{image,text}_features``: a tensor (transformers 4.x) or an output
    object whose ``pooler_output`` holds them (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _HFClip(ModelReward):
    """A transformers ``CLIPModel`` plus its processor's tokenizer and image-normalisation constants."""

    default_model = "openai/clip-vit-large-patch14"
    default_processor: str | None = None  # None: the model's own repo/folder
    needs_text = True

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        processor_name_or_path: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, scale=scale, offset=offset)
        self.model_name_or_path = str(model_name_or_path or self.default_model)
        self.processor_name_or_path = str(
            processor_name_or_path
            or (self.default_processor if model_name_or_path is None and self.default_processor else None)
            or self.model_name_or_path
        )

    def _load_clip(self) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(self.model_name_or_path)
            ip = AutoImageProcessor.from_pretrained(self.processor_name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(self.processor_name_or_path) if self.needs_text else None
        except OSError as exc:
            raise FileNotFoundError(
                f"reward {self.name!r}: could not load CLIP model {self.model_name_or_path!r} / processor "
                f"{self.processor_name_or_path!r} ({str(exc).splitlines()[0]}); pass local folders as "
                f"model_name_or_path=... / processor_name_or_path=..."
            ) from exc
        self.model = model.eval().requires_grad_(False).to(self.dtype)
        self.tokenizer = tokenizer
        shortest = size_entry(ip.size, "shortest_edge")
        if shortest is not None:
            self.resize: int | tuple[int, int] = int(shortest)
        else:
            self.resize = (int(size_entry(ip.size, "height")), int(size_entry(ip.size, "width")))
        crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", True) else None
        self.crop = (int(size_entry(crop, "height")), int(size_entry(crop, "width"))) if crop else None
        self.mean = tuple(float(v) for v in (ip.image_mean or OPENAI_CLIP_MEAN))
        self.std = tuple(float(v) for v in (ip.image_std or OPENAI_CLIP_STD))
        resample = getattr(ip, "resample", 3)
        self.interpolation = "bilinear" if int(getattr(resample, "value", resample)) == 2 else "bicubic"

    def _load(self) -> None:
        self._load_clip()

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """The processor's resize (shortest edge, bicubic), centre crop and normalisation, in torch."""
        return resize_center_crop_normalize(pixels, self.resize, self.mean, self.std, crop=self.crop,
                                            interpolation=self.interpolation)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[b, D]`` (float32)."""
        feats = _features(self.model.get_image_features(pixel_values=self.preprocess(pixels).to(self.dtype)))
        return F.normalize(feats.float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[b, D]`` (float32); prompts truncated to the tokenizer's
        ``model_max_length`` (77 for CLIP; at most the text model's positions), padded to the longest."""
        limit = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=limit,
                             return_tensors="pt").to(self.device)
        feats = _features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                       attention_mask=tok["attention_mask"]))
        return F.normalize(feats.float(), dim=-1)


@register_reward("pickscore")
class PickScore(_HFClip):
    """PickScore (Kirstain et al., 2023): ``score = exp(logit_scale) * cos(f_img, f_txt)`` with the CLIP-H/14
    ``yuvalkirstain/PickScore_v1`` (``exp(logit_scale)`` = 100 there, so about 18-23 on generated images; range
    ``[-exp(logit_scale), exp(logit_scale)]``). flow_grpo trains on ``PickScore / 26``: pass ``scale=1/26``.

    Args:
        model_name_or_path: a ``CLIPModel`` folder or hub id (default ``"yuvalkirstain/PickScore_v1"``).
        processor_name_or_path: tokenizer and image-processor folder or hub id (default
            ``"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"``, as in PickScore's reference code; when only
            ``model_name_or_path`` is given, that folder is used for both).
        device, dtype, batch_size, scale, offset: see :class:`~rewards._models.ModelReward`.
    """

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def _raw_scores(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_features(pixels) * self.text_features(prompts)).sum(-1)
        return self.model.logit_scale.detach().float().exp() * cos


@register_reward("clipscore")
class CLIPScore(_HFClip):
    """CLIPScore (Hessel et al., 2021): ``score = w * max(cos(f_img, f_txt), 0)`` with ``w = 2.5`` by default
    (the paper's rescaling; ``w = 100`` gives torchmetrics' convention, ``w = 1`` with ``clamp=False`` the raw
    cosine). Range ``[0, w]`` (``[-w, w]`` without the clamp). Default model ``"openai/clip-vit-large-patch14"``
    (torchmetrics' default; the paper used ViT-B/32).

    Args:
        model_name_or_path: a ``CLIPModel`` folder or hub id; its tokenizer and image processor are read from
            ``processor_name_or_path`` (default: the same).
        w: the multiplier.
        clamp: apply ``max(., 0)`` (default True, as in the paper).
        device, dtype, batch_size, scale, offset: see :class:`~rewards._models.ModelReward`.
    """

    default_model = "openai/clip-vit-large-patch14"

    def __init__(self, model_name_or_path: str | None = None, *, w: float = 2.5, clamp: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.w, self.clamp = float(w), bool(clamp)

    def _raw_scores(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_features(pixels) * self.text_features(prompts)).sum(-1)
        return self.w * (cos.clamp_min(0.0) if self.clamp else cos)


# ============================================================================================== aesthetic
AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)
"""Indices of the ``nn.Linear`` layers in the LAION predictor's ``layers`` Sequential (dropouts in between)."""


def linear_stack_from_state_dict(
    state: dict[str, torch.Tensor], prefix: str, indices: tuple[int, ...], *, reward: str
) -> nn.Sequential:
    """An ``nn.Sequential`` of ``nn.Linear`` at ``indices`` (``nn.Identity`` in the gaps, where the reference
    models have their dropouts, so that state-dict names match) with sizes read from the checkpoint, weights
    loaded. Used for the LAION aesthetic MLP (``layers.{0,2,4,6,7}``) and ImageReward's head (``mlp.layers.*``).

    There is no non-linearity between the layers: both reference models have their ReLUs commented out.
    """
    layers: list[nn.Module] = [nn.Identity() for _ in range(max(indices) + 1)]
    sub: dict[str, torch.Tensor] = {}
    for i in indices:
        w, b = state.get(f"{prefix}{i}.weight"), state.get(f"{prefix}{i}.bias")
        if w is None or b is None or w.ndim != 2:
            raise ValueError(f"reward {reward!r}: checkpoint lacks a linear layer '{prefix}{i}.weight/bias'")
        layers[i] = nn.Linear(w.shape[1], w.shape[0])
        sub[f"{i}.weight"], sub[f"{i}.bias"] = w, b
    stack = nn.Sequential(*layers)
    for a, b_ in zip(indices, indices[1:]):
        if layers[a].out_features != layers[b_].in_features:  # type: ignore[union-attr]
            raise ValueError(f"reward {reward!r}: layer {prefix}{a} outputs {layers[a].out_features} features "
                             f"but {prefix}{b_} takes {layers[b_].in_features}")  # type: ignore[union-attr]
    load_into(stack, sub, reward=reward, source=f"{prefix}*")
    return stack


@register_reward("aesthetic")
class Aesthetic(_HFClip):
    """LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``; used by DDPO, flow_grpo):
    ``score = MLP(e / ||e||)``, ``e`` the projected CLIP ViT-L/14 image embedding, ``MLP`` five linear layers
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activation. Prompts are ignored. Trained on 1-10 ratings: about
    4-7 on generated images (unbounded in principle).

    Args:
        checkpoint: the MLP's state dict (``layers.{0,2,4,6,7}.weight/bias``, the layout of the official
            ``sac+logos+ava1-l14-linearMSE.pth``): a file, a folder holding ``filename``, or a hub repo id
            (default ``"trl-lib/ddpo-aesthetic-predictor"``, TRL's copy, file ``aesthetic-model.pth``).
        filename: file to take from a folder or hub repo.
        model_name_or_path: the CLIP model (default ``"openai/clip-vit-large-patch14"``); its image processor
            from ``processor_name_or_path`` (default: the same).
        device, dtype, batch_size, scale, offset: see :class:`~rewards._models.ModelReward`.
    """

    default_model = "openai/clip-vit-large-patch14"
    default_checkpoint = "trl-lib/ddpo-aesthetic-predictor"
    needs_text = False

    def __init__(self, checkpoint: str | None = None, *, filename: str = "aesthetic-model.pth",
                 model_name_or_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.checkpoint = str(checkpoint or self.default_checkpoint)
        self.filename = filename

    def _load(self) -> None:
        self._load_clip()
        path = resolve_checkpoint_file(self.checkpoint, self.filename, reward=self.name)
        state = load_state_dict_file(path, reward=self.name)
        extra = sorted(k for k in state if not any(k == f"layers.{i}.{p}" for i in AESTHETIC_LINEAR_INDICES
                                                   for p in ("weight", "bias")))
        if extra:
            raise ValueError(f"reward {self.name!r}: unexpected keys in {path!r}: {', '.join(extra[:5])}")
        mlp = nn.Module()
        mlp.layers = linear_stack_from_state_dict(state, "layers.", AESTHETIC_LINEAR_INDICES, reward=self.name)
        dim = self.model.config.projection_dim
        if mlp.layers[0].in_features != dim:
            raise ValueError(f"reward {self.name!r}: the MLP takes {mlp.layers[0].in_features}-d embeddings but "
                             f"the CLIP model {self.model_name_or_path!r} projects to {dim}")
        self.mlp = mlp.eval().requires_grad_(False)  # float32 whatever the CLIP dtype

    def _raw_scores(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.mlp.layers(self.image_features(pixels)).squeeze(-1)
