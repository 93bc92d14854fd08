"""Rewards for flowrl: a small protocol, built-in rewards and a registry for plug-ins.

A reward is a callable ``reward(images [B,3,H,W] in [0,1], prompts: list[str], **metadata) -> scores [B]`` (float32,
``NaN`` = not applicable) or ``-> (scores, info: dict[str, Tensor[B]])``; see :mod:`rewards.base`.

Built-ins (registered on import):

- ``scenes``: compositional verifier of the procedural scenes (:mod:`rewards.scene_verifier`), soft score in [0, 1]
  plus ``info["strict"]``;
- ``jpeg_compressibility`` / ``jpeg_incompressibility``: DDPO's ``-/+`` JPEG size in kB (:mod:`rewards.jpeg`);
- ``hpsv2``, ``hpsv21``, ``pickscore``, ``clipscore``, ``aesthetic``: CLIP-family preference models
  (:mod:`rewards.clip_models`; HPS needs ``pip install 'flowrl[rewards]'``);
- ``imagereward``: ImageReward on transformers' BLIP modules, from the official ``ImageReward.pt``
  (:mod:`rewards.imagereward`);
- ``http``: scores from a server, JSON over HTTP (:mod:`rewards.http`);
- ``random``: uniform noise keyed by the image, a null control (:mod:`rewards.null`).

The model-based rewards load their weights lazily (first call), by hub id or local path, onto the GPU when there is
one unless given a device (:mod:`rewards._models`). :class:`AsyncReward` (:mod:`rewards.executor`) scores in a
background thread.

Text rewards (TRL's ``(prompts, completions, **kwargs) -> list[float | None]``) have their own registry,
:data:`TEXT_REWARDS` (:mod:`rewards.text`): ``exact_answer``, ``format``.

Usage::

    from rewards import get_reward, evaluate_reward, parse_reward_spec
    name, weight = parse_reward_spec("scenes:1.0")
    scores, info = evaluate_reward(get_reward(name), images, prompts)

This package imports nothing from ``flowrl`` or ``samplers``.
"""

from .base import Reward, RewardError, evaluate_reward, reward_name
from .registry import ENTRY_POINT_GROUP, available_rewards, get_reward, parse_reward_spec, register_reward
from .jpeg import JpegCompressibility, JpegIncompressibility, jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from .scene_verifier import SceneVerifier
from .text import TEXT_REWARDS, available_text_rewards, get_text_reward, register_text_reward, score_text
from .clip_models import Aesthetic, CLIPScore, HPSv2, HPSv21, PickScore
from .imagereward import ImageReward
from .http import HttpReward
from .null import RandomReward
from .executor import AsyncReward

__all__ = [
    "ENTRY_POINT_GROUP",
    "Aesthetic",
    "AsyncReward",
    "CLIPScore",
    "HPSv2",
    "HPSv21",
    "HttpReward",
    "ImageReward",
    "PickScore",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "RandomReward",
    "RewardError",
    "SceneVerifier",
    "TEXT_REWARDS",
    "available_text_rewards",
    "get_text_reward",
    "register_text_reward",
    "score_text",
    "available_rewards",
    "evaluate_reward",
    "get_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "parse_reward_spec",
    "register_reward",
    "reward_name",
]
