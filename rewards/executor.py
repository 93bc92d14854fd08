"""Scoring in a background thread, so that a slow reward (a big model, a remote server) overlaps other work.

:class:`AsyncReward` wraps any reward. ``submit(images, prompts, **metadata)`` returns a
``concurrent.futures.Future`` of ``(scores, info)`` (the checked result of :func:`~rewards.base.evaluate_reward`,
so errors surface as :class:`~rewards.base.RewardError` from ``future.result()``); calling the wrapper directly
scores synchronously, so it is also a drop-in reward. Typical use in a sampling loop::

    scorer = AsyncReward(get_reward("pickscore"))
    pending = None
    for step in ...:
        images, prompts = sample(step)                 # the GPU samples batch k ...
        if pending is not None:
            scores, info = pending.result()            # ... while batch k-1 was being scored
        pending = scorer.submit(images, prompts, step=step)

The images are detached (and, with ``to_cpu=True``, copied to the CPU) before the job is queued, so the caller may
reuse its buffers. PyTorch releases the GIL inside its kernels and ``urllib`` while waiting on the network, so one
worker thread overlaps well; several workers are only useful for thread-safe rewards (not a shared model).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import torch

from .base import evaluate_reward, reward_name

__all__ = ["AsyncReward"]


class AsyncReward:
    """A reward plus a thread pool that scores submitted batches in order.

    Args:
        reward: any reward callable.
        max_workers: worker threads (default 1: jobs run one at a time, in submission order).
        to_cpu: move the images to the CPU before queueing (frees the caller's device memory early; the reward
            then sees CPU images).
    """

    def __init__(self, reward: Callable[..., Any], *, max_workers: int = 1, to_cpu: bool = False) -> None:
        self.reward = reward
        self.name = reward_name(reward)
        self.to_cpu = bool(to_cpu)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers,
                                                           thread_name_prefix=f"reward-{self.name}")

    def submit(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> concurrent.futures.Future:
        """Queue a batch; the future's result is ``(scores [B] float32, info)`` or it raises ``RewardError``."""
        images = images.detach()
        if self.to_cpu:
            images = images.cpu()
        return self._pool.submit(evaluate_reward, self.reward, images, list(prompts), **metadata)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any):
        """Score synchronously (the wrapped reward's own return value)."""
        return self.reward(images, prompts, **metadata)

    def close(self, wait: bool = True) -> None:
        """Stop the worker threads (after the queued jobs when ``wait``)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> "AsyncReward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AsyncReward({self.reward!r})"
