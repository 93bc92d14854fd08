"""ImageReward (Xu et al., 2023) natively on transformers' BLIP modules, loading the official ``ImageReward.pt``.

Architecture (as THUDM's reference ``ImageReward`` class): a BLIP ViT-L/16 image encoder (224 px, width 1024,
24 blocks, 16 heads, LayerNorm eps 1e-6); a BERT-base text encoder with cross-attention to the image tokens in
every layer (BLIP's "med" config: width 768, 12 layers, 12 heads, vocabulary 30524 = ``bert-base-uncased`` plus
``[DEC]`` and ``[ENC]``, LayerNorm eps 1e-12), run as an *encoder* (bidirectional self-attention); the first
token's final hidden state goes through a linear head 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations; the
reference's dropouts sit at indices 1, 3, 5 of its ``Sequential``). Here the image encoder is
``transformers.BlipVisionModel`` and the text encoder ``transformers.BlipTextModel`` built with
``is_decoder=True`` in its config (which is what creates the cross-attention layers) and called with
``is_decoder=False`` (so the self-attention is not causal).

Weight names: official key -> module here (``vision`` = ``BlipVisionModel``, ``text`` = ``BlipTextModel``,
``mlp`` = the head; ``{i}`` a block index, ``{p}`` ``weight`` or ``bias``):

==========================================================  ====================================================
official (``ImageReward.pt``)                               here
==========================================================  ====================================================
``blip.visual_encoder.cls_token``                           ``vision.embeddings.class_embedding``
``blip.visual_encoder.pos_embed``                           ``vision.embeddings.position_embedding``
``blip.visual_encoder.patch_embed.proj.{p}``                ``vision.embeddings.patch_embedding.{p}``
``blip.visual_encoder.blocks.{i}.norm1.{p}``                ``vision.encoder.layers.{i}.layer_norm1.{p}``
``blip.visual_encoder.blocks.{i}.attn.qkv.{p}``             ``vision.encoder.layers.{i}.self_attn.qkv.{p}``
``blip.visual_encoder.blocks.{i}.attn.proj.{p}``            ``vision.encoder.layers.{i}.self_attn.projection.{p}``
``blip.visual_encoder.blocks.{i}.norm2.{p}``                ``vision.encoder.layers.{i}.layer_norm2.{p}``
``blip.visual_encoder.blocks.{i}.mlp.fc1.{p}``              ``vision.encoder.layers.{i}.mlp.fc1.{p}``
``blip.visual_encoder.blocks.{i}.mlp.fc2.{p}``              ``vision.encoder.layers.{i}.mlp.fc2.{p}``
``blip.visual_encoder.norm.{p}``                            ``vision.post_layernorm.{p}``
``blip.text_encoder.{rest}``                                ``text.{rest}`` (same names below the prefix)
``mlp.layers.{k}.{p}``, ``k`` in 0, 2, 4, 6, 7              ``mlp.{k}.{p}``
``blip.text_encoder.embeddings.position_ids``               dropped (a buffer: ``arange``)
``blip.vision_proj.*``, ``blip.text_proj.*``, other keys    dropped (BLIP's contrastive projections, unused; the
outside ``blip.visual_encoder.``/``blip.text_encoder.``/    reference loads with ``strict=False``); listed in the
``mlp.``                                                    log at INFO level
==========================================================  ====================================================

The text encoder's names are BLIP's ``med.py`` ones in both: ``embeddings.{word_embeddings,position_embeddings,
LayerNorm}``, ``encoder.layer.{i}.attention.self.{query,key,value}``, ``encoder.layer.{i}.attention.output.{dense,
LayerNorm}``, ``encoder.layer.{i}.crossattention.self.{query,key,value}`` (key/value take the 1024-d image tokens),
``encoder.layer.{i}.crossattention.output.{dense,LayerNorm}``, ``encoder.layer.{i}.intermediate.dense``,
``encoder.layer.{i}.output.{dense,LayerNorm}``; there is no token-type embedding and no pooler.
The ViT's ``qkv`` is one ``Linear(D, 3D)`` whose output splits as ``[3, heads, head_dim]`` in both
implementations, so it copies as is. :func:`official_to_native` / :func:`native_to_official` apply the table.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ._models import ModelReward, load_into, logger, load_state_dict_file, resize_center_crop_normalize, resolve_checkpoint_file
from ._models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .clip_models import linear_stack_from_state_dict
from .registry import register_reward

__all__ = [
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageReward",
    "ImageRewardModel",
    "native_to_official",
    "official_to_native",
]

IMAGEREWARD_MEAN = 0.16717362830052426
"""Mean of the head's output over ImageReward's training data (subtracted)."""
IMAGEREWARD_STD = 1.0333394966054072
"""Std of the head's output over ImageReward's training data (divided by)."""
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)

DEFAULT_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
)
"""BLIP ViT-L/16 at 224 px, as ``create_vit('large', 224)`` in the reference."""
DEFAULT_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)
"""BLIP's ``med_config.json`` (``encoder_hidden_size`` is set to the vision width)."""

# (official, native) name patterns; {i}: block index, {p}: weight|bias, {n}: 1|2, {k}: linear index, {rest}: any
_RULES: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm1.{p}", "vision.encoder.layers.{i}.layer_norm1.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.{p}", "vision.encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.proj.{p}", "vision.encoder.layers.{i}.self_attn.projection.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm2.{p}", "vision.encoder.layers.{i}.layer_norm2.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc{n}.{p}", "vision.encoder.layers.{i}.mlp.fc{n}.{p}"),
    ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
    ("mlp.layers.{k}.{p}", "mlp.{k}.{p}"),
    ("blip.text_encoder.{rest}", "text.{rest}"),
)
_DROPPED = re.compile(r"^(blip\.vision_proj\.|blip\.text_proj\.|blip\.text_encoder\.embeddings\.position_ids$)")
_USED_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
_FIELDS = {"i": r"\d+", "p": r"weight|bias", "n": r"[12]", "k": r"\d+", "rest": r".+"}


def _compile(pattern: str) -> re.Pattern[str]:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile("^" + out + re.escape(pattern[pos:]) + "$")


_FORWARD = [(_compile(a), b) for a, b in _RULES]
_BACKWARD = [(_compile(b), a) for a, b in _RULES]


def official_to_native(key: str) -> str | None:
    """The name in :class:`ImageRewardModel` of an official ``ImageReward.pt`` key; ``None`` for dropped keys
    (the table's, and any key outside ``blip.visual_encoder.``, ``blip.text_encoder.`` and ``mlp.``, as the
    reference loads with ``strict=False``); the key unchanged when no rule matches (it then shows up as
    unexpected when loading)."""
    if _DROPPED.match(key) or not key.startswith(_USED_PREFIXES):
        return None
    for pattern, template in _FORWARD:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    return key


def native_to_official(key: str) -> str:
    """Inverse of :func:`official_to_native` on the names of :class:`ImageRewardModel` (for writing checkpoints
    in the official layout, e.g. in tests)."""
    for pattern, template in _BACKWARD:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    raise KeyError(f"no official name for {key!r}")


class ImageRewardModel(nn.Module):
    """BLIP image encoder + cross-attending text encoder + linear head; :meth:`forward` returns the head's raw
    output ``[B]`` (float32), before ImageReward's standardisation."""

    def __init__(self, vision_config: dict[str, Any], text_config: dict[str, Any], mlp: nn.Sequential) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision = BlipVisionModel(BlipVisionConfig(**vision_config))
        text_cfg = BlipTextConfig(**{"encoder_hidden_size": vision_config["hidden_size"], **text_config,
                                     "is_decoder": True, "use_cache": False})
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = mlp

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False, use_cache=False)
        feats = out.last_hidden_state[:, 0, :].float()
        return self.mlp(feats).squeeze(-1)


@register_reward("imagereward")
class ImageReward(ModelReward):
    """ImageReward: ``score = (MLP(h_cls) - 0.16717362830052426) / 1.0333394966054072``, ``h_cls`` the first
    token's output of BLIP's text encoder cross-attending to the image (see the module docstring). Standardised on
    ImageReward's training data: about -2 to 2 (unbounded); exactly ``ImageReward.score``'s value.

    Text: ``bert-base-uncased``'s tokenizer with ``[DEC]`` (bos) and ``[ENC]`` added as in BLIP, padded/truncated
    to 35 tokens. Images: ``Resize(224, bicubic)`` of the shortest side, ``CenterCrop(224)``, OpenAI CLIP's
    mean/std, in torch.

    Args:
        checkpoint: ``ImageReward.pt`` (a flat state dict in the official key layout), a folder holding it, or a
            hub repo id (default ``"THUDM/ImageReward"``). Read with ``torch.load(weights_only=True)``.
        tokenizer_name_or_path: a BERT tokenizer folder or hub id (default ``"bert-base-uncased"``).
        vision_config, text_config: overrides of :data:`DEFAULT_VISION_CONFIG` / :data:`DEFAULT_TEXT_CONFIG`
            (``BlipVisionConfig`` / ``BlipTextConfig`` fields), e.g. a tiny architecture in tests. The head's sizes
            are read from the checkpoint.
        device, dtype, batch_size, scale, offset: see :class:`~rewards._models.ModelReward` (the head always runs
            in float32, as in the reference).
    """

    default_checkpoint = "THUDM/ImageReward"
    filename = "ImageReward.pt"
    max_length = 35

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        tokenizer_name_or_path: str = "bert-base-uncased",
        vision_config: dict[str, Any] | None = None,
        text_config: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, scale=scale, offset=offset)
        self.checkpoint = str(checkpoint or self.default_checkpoint)
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.vision_config = {**DEFAULT_VISION_CONFIG, **(vision_config or {})}
        self.text_config = {**DEFAULT_TEXT_CONFIG, **(text_config or {})}

    def _load(self) -> None:
        from transformers import AutoTokenizer

        path = resolve_checkpoint_file(self.checkpoint, self.filename, reward=self.name)
        official = load_state_dict_file(path, reward=self.name)
        state: dict[str, torch.Tensor] = {}
        dropped = []
        for key, value in official.items():
            new = official_to_native(key)
            if new is None:
                dropped.append(key)
            else:
                state[new] = value
        if dropped:
            logger.info("reward %r: ignoring %d unused checkpoint entries (%s)", self.name, len(dropped),
                        ", ".join(sorted(dropped)[:6]) + (", ..." if len(dropped) > 6 else ""))
        mlp = linear_stack_from_state_dict(state, "mlp.", MLP_LINEAR_INDICES, reward=self.name)
        model = ImageRewardModel(self.vision_config, self.text_config, mlp)
        load_into(model, state, reward=self.name, source=repr(path))
        model.eval().requires_grad_(False)
        model.vision.to(self.dtype)
        model.text.to(self.dtype)
        self.model = model
        try:
            tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        except OSError as exc:
            raise FileNotFoundError(
                f"reward {self.name!r}: could not load tokenizer {self.tokenizer_name_or_path!r} "
                f"({str(exc).splitlines()[0]}); pass a local folder as tokenizer_name_or_path=..."
            ) from exc
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(tok) > self.text_config["vocab_size"]:
            raise ValueError(f"reward {self.name!r}: tokenizer {self.tokenizer_name_or_path!r} has {len(tok)} tokens, "
                             f"more than the text encoder's vocabulary ({self.text_config['vocab_size']})")
        self.tokenizer = tok
        self.image_size = int(self.vision_config["image_size"])

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """``Resize(image_size, bicubic)`` of the shortest side, ``CenterCrop``, OpenAI mean/std (in torch)."""
        return resize_center_crop_normalize(pixels, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def head_output(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``MLP(h_cls)`` ``[b]`` (float32) before standardisation."""
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return self.model(self.preprocess(pixels).to(self.dtype), tok["input_ids"], tok["attention_mask"])

    def _raw_scores(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.head_output(pixels, prompts) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
