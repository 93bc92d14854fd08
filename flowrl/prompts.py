"""Prompt sets: the shipped scenes sets (``scenes:train``, ``scenes:eval``, ``scenes:heldout``; bare ``eval`` /
``heldout`` too) or a user file (``.txt``: one prompt per line; ``.jsonl``: objects with a ``prompt`` field)."""

from __future__ import annotations

import json
from pathlib import Path

from rewards import scenes

SHIPPED = ("train", "eval", "heldout")


def load_prompts(spec: str) -> list[str]:
    """Resolve a prompt-set spec to a non-empty list of prompts. Errors name the file and the problem."""
    name = spec.removeprefix("scenes:")
    if name in SHIPPED and not Path(spec).is_file():
        return scenes.prompt_set(name)
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(
            f"prompt file {spec!r} does not exist (use a .txt or .jsonl file, or one of "
            f"{', '.join('scenes:' + s for s in SHIPPED)})"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {spec!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"prompt file {spec!r} line {i} is not JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"prompt file {spec!r} line {i}: expected an object with a string 'prompt' field")
            prompts.append(obj["prompt"])
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"prompt file {spec!r} contains no prompts")
    return prompts
