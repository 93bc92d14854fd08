"""Rewards for flowrl: a small protocol, built-in rewards and a registry for plug-ins.

A reward is a callable ``reward(images [B,3,H,W] in [0,1], prompts: list[str], **metadata) -> scores [B]`` (float32,
``NaN`` = not applicable) or ``-> (scores, info: dict[str, Tensor[B]])``; see :mod:`rewards.base`.

Built-ins (registered on import):

- ``scenes``: compositional verifier of the procedural scenes (:mod:`rewards.scene_verifier`), soft score in [0, 1]
  plus ``info["strict"]``;
- ``jpeg_compressibility`` / ``jpeg_incompressibility``: DDPO's ``-/+`` JPEG size in kB (:mod:`rewards.jpeg`).

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

__all__ = [
    "ENTRY_POINT_GROUP",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "RewardError",
    "SceneVerifier",
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
