"""The reward protocol: what a reward is, and the one function the trainer calls to run one.

A reward is any callable::

    reward(images, prompts, **metadata) -> scores
    reward(images, prompts, **metadata) -> (scores, info)

Args (what the caller passes):
    images: float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` (any device).
    prompts: ``list[str]`` of length ``B``, the prompt each image was generated from.
    **metadata: optional extras the trainer knows (e.g. ``step``, ``seeds``); a reward ignores what it does not use.

Returns (what the reward gives back):
    scores: float32 tensor ``[B]``, the *raw* reward (its formula and range in the reward's docstring; any
        normalisation happens in the trainer, explicitly configured). ``NaN`` means "not applicable to this
        sample" (e.g. a prompt outside a verifier's grammar); the caller masks those.
    info: optional ``dict[str, Tensor[B]]`` of extra per-sample metrics to log (e.g. the strict 0/1 success of
        the ``scenes`` verifier); numeric, shape ``[B]``, ``NaN`` allowed.

:class:`Reward` is a convenience base class (name, lazy loading, device placement); plain functions are rewards
too. :func:`evaluate_reward` runs any reward and checks what it returned, so that a plug-in's mistake surfaces as a
:class:`RewardError` that names the plug-in, not as a shape error deep inside the advantage computation.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["Reward", "RewardError", "evaluate_reward", "quantize_uint8", "reward_name"]


class RewardError(ValueError):
    """A reward was called with, or returned, something outside the protocol, or raised while scoring.

    The message names the reward; when the reward itself raised, the original exception is the ``__cause__``.
    """


class Reward:
    """Base class for rewards: a ``name``, lazy :meth:`load`, :meth:`to` for device placement.

    Subclasses implement :meth:`score` (same signature and return as the protocol in this module's docstring) and,
    when they need weights or other heavy resources, :meth:`_load`, which runs once, on the first call or on an
    explicit :meth:`load`. Every subclass states in its docstring the raw formula of its score and its range.

    Attributes:
        name: the reward's name, used in logs (``reward/<name>``) and error messages. :func:`register_reward`
            sets it to the registered name when a subclass does not define its own.
        device: where the reward computes (``cpu`` until :meth:`to` moves it).
    """

    name: str = "reward"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._loaded = False

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Load weights or other resources (override). Called at most once, by :meth:`load`."""

    def load(self) -> "Reward":
        """Load resources now instead of on the first call; idempotent. Returns ``self``."""
        if not getattr(self, "_loaded", False):
            self._load()
            self._loaded = True
            self._move(getattr(self, "device", torch.device("cpu")))
        return self

    def _move(self, device: torch.device) -> None:
        """Move loaded resources to ``device``. The default moves every ``nn.Module`` / ``Tensor`` attribute."""
        for key, value in vars(self).items():
            if isinstance(value, torch.nn.Module):
                value.to(device)
            elif isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))

    def to(self, device: torch.device | str) -> "Reward":
        """Compute on ``device`` from now on (moves loaded resources; unloaded ones are placed there on load)."""
        self.device = torch.device(device)
        if getattr(self, "_loaded", False):
            self._move(self.device)
        return self

    # -- scoring -------------------------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any):
        """Score a batch (override). See the module docstring for arguments and return value."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, prompts, **metadata)")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any):
        self.load()
        return self.score(images, prompts, **metadata)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float ``[B, 3, H, W]`` in ``[0, 1]`` -> uint8 ``[B, 3, H, W]`` on the CPU, as ``round(255 x)`` clipped to
    ``[0, 255]``: the pixels an image file of the sample would hold (what the JPEG, HTTP and random rewards see)."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def reward_name(reward: Any) -> str:
    """A reward's display name: its ``name`` attribute, else its ``__name__`` (functions), else its class name."""
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(reward, "__name__", None) or getattr(getattr(reward, "func", None), "__name__", None)
    return name if isinstance(name, str) and name else type(reward).__name__


def _check_vector(value: Any, batch: int, what: str, name: str, *, allow_int: bool) -> torch.Tensor:
    """``value`` as a detached float32 ``[batch]`` tensor, or a RewardError saying what was expected."""
    if not isinstance(value, torch.Tensor):
        raise RewardError(
            f"reward {name!r} returned {what} of type {type(value).__name__}; expected a torch.Tensor of shape "
            f"[{batch}] (float32){' — wrap it with torch.as_tensor' if hasattr(value, '__len__') else ''}"
        )
    if value.is_complex() or not (value.is_floating_point() or allow_int):
        raise RewardError(
            f"reward {name!r} returned {what} of dtype {value.dtype}; expected a floating-point tensor "
            f"(float32 preferred; NaN marks 'not applicable')"
        )
    if tuple(value.shape) != (batch,):
        raise RewardError(
            f"reward {name!r} returned {what} of shape {list(value.shape)}; expected [{batch}] (one value per image)"
        )
    value = value.detach().to(torch.float32)
    if torch.isinf(value).any():
        raise RewardError(
            f"reward {name!r} returned infinite values in {what}; expected finite floats (NaN for 'not applicable')"
        )
    return value


def evaluate_reward(
    reward: Callable[..., Any], images: torch.Tensor, prompts: Sequence[str], **metadata: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``reward`` on a batch and check that it kept the protocol.

    Args:
        reward: any reward callable (a :class:`Reward`, a plain function, ...).
        images: float tensor ``[B, 3, H, W]`` in ``[0, 1]``.
        prompts: ``B`` prompt strings.
        **metadata: passed through to the reward.

    Returns:
        ``(scores, info)``: ``scores`` float32 ``[B]`` on ``images.device`` (``NaN`` kept: the caller masks those),
        ``info`` a ``dict[str, Tensor[B]]`` (float32, on ``images.device``; empty when the reward returned none).
        Floating-point scores of another precision are cast to float32; integer/bool ``info`` values are cast too
        (a 0/1 flag is fine there) but integer *scores* are rejected as a likely bug.

    Raises:
        RewardError: the inputs are malformed, the reward raised (chained from the original exception), or it
            returned something other than ``scores`` or ``(scores, info)`` of the documented types and shapes, or
            infinite values. The message names the reward and what was expected.
    """
    name = reward_name(reward)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardError(f"images passed to reward {name!r} are {shape}; expected a tensor [B, 3, H, W]")
    if not images.is_floating_point():
        raise RewardError(
            f"images passed to reward {name!r} have dtype {images.dtype}; expected floats in [0, 1] "
            f"(divide uint8 images by 255)"
        )
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise RewardError(f"reward {name!r} got {got} for {images.shape[0]} images; expected one prompt per image")
    batch = images.shape[0]

    try:
        out = reward(images, list(prompts), **metadata)
    except Exception as exc:  # noqa: BLE001 - re-raised with the reward's name, chained
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc

    info_in: Mapping[str, Any] = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise RewardError(
                f"reward {name!r} returned a tuple of {len(out)} items"
                f"{'' if len(out) != 2 else ' whose second is ' + type(out[1]).__name__}; "
                f"expected scores or (scores, info: dict[str, Tensor[{batch}]])"
            )
        out, info_in = out
    scores = _check_vector(out, batch, "scores", name, allow_int=False).to(images.device)
    info: dict[str, torch.Tensor] = {}
    for key, value in info_in.items():
        if not isinstance(key, str):
            raise RewardError(f"reward {name!r} returned an info key {key!r}; expected str keys")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            value = value.float()
        info[key] = _check_vector(value, batch, f"info[{key!r}]", name, allow_int=True).to(images.device)
    return scores, info
