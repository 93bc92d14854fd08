"""Text rewards (TRL's signature), their registry, and a verifiable arithmetic task generated in code.

A text reward is any callable with TRL's reward-function signature::

    reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

It is called with keyword arguments (``reward(prompts=..., completions=..., **kwargs)``), as TRL does, so
``def f(completions, **kwargs)`` works too. ``kwargs`` carries the per-sample columns of the task (here ``answer``:
``list[str]``, one per sample) plus whatever else the trainer knows (``question``, ``completion_ids``); a reward
ignores what it does not use. ``None`` means "not applicable to this sample": :func:`score_text` turns it into
``NaN``, which :mod:`flowrl.advantages` excludes from every statistic. So a reward function written for TRL's ``GRPOTrainer`` works unchanged here.

Text rewards live in their own registry (:data:`TEXT_REWARDS`), apart from the image rewards of
:mod:`rewards.registry`: an image reward takes ``(images, prompts)`` and a text reward ``(prompts, completions)``,
so one name must never resolve to both. Built-ins:

- ``exact_answer``: 1.0 when the completion's answer (the number after the last ``####``, else its last number)
  equals ``kwargs["answer"]`` numerically, else 0.0; ``None`` where the sample has no reference answer.
- ``format``: 1.0 when the stripped completion matches a regular expression (default: a bare integer), else 0.0.

This module imports nothing from ``flowrl`` or ``samplers``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .base import RewardError

__all__ = [
    "TEXT_REWARDS",
    "ArithmeticProblem",
    "arithmetic_problems",
    "available_text_rewards",
    "exact_answer",
    "extract_answer",
    "format_reward",
    "get_text_reward",
    "register_text_reward",
    "score_text",
]

TextReward = Callable[..., Sequence[float | None]]
TEXT_REWARDS: dict[str, Callable[..., Any]] = {}
"""Text reward name -> reward function (used as is) or factory (called with keyword arguments)."""


def register_text_reward(name: str, *, factory: bool = False) -> Callable:
    """Decorator: register a text reward function (or, with ``factory=True``, a factory returning one)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"text reward name {name!r} not allowed: use a non-empty string without ':'")

    def decorator(obj):
        old = TEXT_REWARDS.get(name)
        if old is not None and getattr(old, "__qualname__", None) != getattr(obj, "__qualname__", None):
            raise ValueError(f"text reward name {name!r} is already registered")
        obj._flowrl_factory = factory
        TEXT_REWARDS[name] = obj
        return obj

    return decorator


def available_text_rewards() -> list[str]:
    return sorted(TEXT_REWARDS)


def get_text_reward(spec: str, **kwargs: Any) -> TextReward:
    """The text reward a spec names: a registered name (:data:`TEXT_REWARDS`) or ``module:attr`` (e.g. a TRL
    reward function). Keyword arguments go to a registered factory, or are bound to a function with
    ``functools.partial``.

    Raises:
        ValueError: unknown name (the message lists the available ones) or unimportable ``module:attr``.
    """
    import functools

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"text reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in TEXT_REWARDS:
        obj = TEXT_REWARDS[spec]
        if getattr(obj, "_flowrl_factory", False):
            return obj(**kwargs)
        return functools.partial(obj, **kwargs) if kwargs else obj
    if ":" in spec:
        from .registry import _import_attr

        obj, _ = _import_attr(spec)
        if not callable(obj):
            raise ValueError(f"text reward {spec!r} points at {type(obj).__name__}, which is not callable")
        return functools.partial(obj, **kwargs) if kwargs else obj
    raise ValueError(f"unknown text reward {spec!r}; available: {', '.join(available_text_rewards())}, "
                     "or 'module:attr' of a function (prompts, completions, **kwargs) -> list[float | None]")


def score_text(reward: TextReward, prompts: list[str], completions: list[str], name: str = "reward",
               **kwargs: Any) -> torch.Tensor:
    """Run a text reward and check what it returned: ``[B]`` float32 scores, ``None`` -> ``NaN``.

    Raises:
        RewardError: naming the reward, when it raised, or returned a non-sequence, a wrong length or a non-number.
    """
    try:
        out = reward(prompts=prompts, completions=completions, **kwargs)  # by keyword, as TRL calls them
    except Exception as exc:  # a plug-in's bug: name it
        raise RewardError(f"text reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().flatten().tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"text reward {name!r} returned {type(out).__name__}; expected a list of float | None")
    if len(out) != len(completions):
        raise RewardError(f"text reward {name!r} returned {len(out)} scores for {len(completions)} completions")
    vals = []
    for i, v in enumerate(out):
        if v is None:
            vals.append(math.nan)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.append(float(v))
        else:
            raise RewardError(f"text reward {name!r} returned {v!r} at index {i}; expected float or None")
    return torch.tensor(vals, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------ built-ins
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: the first number after the last ``####`` if there is one (GSM8K's
    convention), else the last number in the text; commas are dropped (``1,234`` -> ``1234``). ``None`` if none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        return m.group(0).replace(",", "") if m else None
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


@register_text_reward("exact_answer")
def exact_answer(prompts: list[str], completions: list[str], answer: Sequence[str | None] | None = None,
                 **kwargs: Any) -> list[float | None]:
    """``1.0`` if :func:`extract_answer` of the completion equals ``answer[i]`` as a number (``"19"`` ==
    ``"19.0"``), ``0.0`` otherwise (also when the completion holds no number); ``None`` where ``answer[i]`` is None.
    Range {0, 1}. Without an ``answer`` column every sample is ``None`` (not applicable)."""
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        if a is None:
            out.append(None)
            continue
        got = extract_answer(c)
        out.append(1.0 if got is not None and _same_number(got, str(a)) else 0.0)
    return out


@register_text_reward("format", factory=True)
def format_reward(pattern: str = r"-?\d+") -> TextReward:
    """Factory: a reward that is ``1.0`` when ``re.fullmatch(pattern, completion.strip())`` (DOTALL), else ``0.0``.
    Default pattern: a bare integer (the arithmetic task's expected form). Range {0, 1}."""
    rx = re.compile(pattern, re.DOTALL)

    def format_match(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]

    format_match.__name__ = "format"
    return format_match


# ------------------------------------------------------------------------------------------------------ task
@dataclass(frozen=True)
class ArithmeticProblem:
    """One verifiable problem: ``question`` (``"12+7="``) and its exact ``answer`` (``"19"``)."""

    question: str
    answer: str


def _is_heldout(a: int, op: str, b: int, heldout_fraction: float) -> bool:
    """Deterministic split by a hash of the operands (independent of ordering and python's hash seed)."""
    h = (a * 7919 + b * 104729 + ord(op) * 1299709) % 1000
    return h < int(round(heldout_fraction * 1000))


def arithmetic_problems(
    split: str = "train",
    *,
    max_operand: int = 9,
    ops: str = "+",
    heldout_fraction: float = 0.2,
) -> list[ArithmeticProblem]:
    """All problems ``a<op>b=`` with ``0 <= a, b <= max_operand`` of one split, in a fixed order.

    ``split="heldout"`` is a fixed ``heldout_fraction`` of the (a, op, b) triples chosen by a hash, never trained on;
    ``"train"`` is the rest; ``"all"`` is both. Subtraction keeps ``a >= b`` (non-negative answers).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    bad = set(ops) - set("+-*")
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}")
    fn = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    out = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue
                held = _is_heldout(a, op, b, heldout_fraction)
                if split == "all" or (split == "heldout") == held:
                    out.append(ArithmeticProblem(f"{a}{op}{b}=", str(fn[op](a, b))))
    return out


def shuffled(problems: list[ArithmeticProblem], seed: int) -> list[ArithmeticProblem]:
    """A copy in a seeded random order."""
    out = list(problems)
    random.Random(seed).shuffle(out)
    return out
