"""Procedural captioned scenes: the data of the embedded default and the grammar its verifier parses.

A scene is one to four flat-coloured shapes on a light background, described by a caption in one of three
forms (GenEval's count / colour-attribution / position categories):

- ``count``:    ``"a red circle"``, ``"three yellow triangles"``  (one colour+shape, 1..4 copies)
- ``pair``:     ``"a red circle and a blue square"``              (two distinct colour+shape objects)
- ``relation``: ``"a red circle to the left of a blue square"``   (left of / right of / above / below)

Compositional split: six (colour, shape) combinations (:data:`HELDOUT_COMBOS`) never occur in training scenes
or training prompts; the ``heldout`` prompt set uses each at least once, so the model must compose a colour
and a shape it has only seen apart.

Everything here is pure and deterministic from its seed: :func:`render` draws with numpy only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 205, 20),
    "green": (30, 170, 50),
    "cyan": (20, 195, 215),
    "blue": (30, 60, 225),
    "purple": (165, 40, 200),
}
"""Colour name -> nominal sRGB. Hues are 60 degrees apart (0, 50, 130, 187, 228, 285)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (245, 245, 240)
NUMBERS: tuple[str, ...] = ("a", "two", "three", "four")
KINDS: tuple[str, ...] = ("count", "pair", "relation")

HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("yellow", "circle"),
        ("green", "square"),
        ("cyan", "triangle"),
        ("blue", "circle"),
        ("purple", "square"),
    }
)
"""(colour, shape) pairs that never occur in training data or training prompts."""


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """``count`` copies of one coloured shape."""

    color: str
    shape: str
    count: int = 1


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for. ``relation`` relates ``objects[0]`` to ``objects[1]`` (kind ``relation`` only)."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects}


def _noun(obj: ObjectSpec) -> str:
    plural = obj.count > 1
    return f"{NUMBERS[obj.count - 1]} {obj.color} {obj.shape}{'s' if plural else ''}"


def caption(spec: SceneSpec) -> str:
    """The prompt text of a scene, e.g. ``"two red circles"``."""
    if spec.kind == "count":
        return _noun(spec.objects[0])
    a, b = spec.objects
    if spec.kind == "pair":
        return f"{_noun(a)} and {_noun(b)}"
    rel = spec.relation if spec.relation in ("above", "below") else f"to the {spec.relation}"
    return f"{_noun(a)} {rel} {_noun(b)}"


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_NOUN_RE = rf"(a|an|one|two|three|four) ({_COLOR_RE}) ({_SHAPE_RE})s?"
_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def parse_prompt(prompt: str) -> SceneSpec:
    """Inverse of :func:`caption`. Raises ``ValueError`` naming the prompt when it is not in the grammar."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    m = re.fullmatch(_NOUN_RE, text)
    if m:
        return SceneSpec("count", (ObjectSpec(m[2], m[3], _NUM[m[1]]),))
    m = re.fullmatch(rf"{_NOUN_RE} (and|to the left of|to the right of|above|below) {_NOUN_RE}", text)
    if not m:
        raise ValueError(
            f"prompt {prompt!r} is not in the scenes grammar: expected e.g. 'two red circles', "
            f"'a red circle and a blue square' or 'a red circle to the left of a blue square' "
            f"(colours {sorted(COLORS)}, shapes {list(SHAPES)}, counts 1-4)"
        )
    a = ObjectSpec(m[2], m[3], _NUM[m[1]])
    b = ObjectSpec(m[6], m[7], _NUM[m[5]])
    if m[4] == "and":
        return SceneSpec("pair", (a, b))
    return SceneSpec("relation", (a, b), m[4].removeprefix("to the "))


# ----------------------------------------------------------------------------------------------------------------
# Sampling specs and prompt sets


def allowed_combos(split: str) -> list[tuple[str, str]]:
    """All (colour, shape) combos of the ``train`` split (held-out ones removed) or of ``all``."""
    combos = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        return [cs for cs in combos if cs not in HELDOUT_COMBOS]
    if split == "all":
        return combos
    raise ValueError(f"split {split!r} not allowed; use 'train' or 'all'")


def sample_spec(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> SceneSpec:
    """Draw a random scene spec. ``split='train'`` never uses :data:`HELDOUT_COMBOS`;
    ``split='heldout'`` always uses at least one of them."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    pool = allowed_combos("train" if split == "train" else "all")
    while True:
        if kind == "count":
            c, s = pool[int(rng.integers(len(pool)))]
            spec = SceneSpec("count", (ObjectSpec(c, s, int(rng.integers(1, 5))),))
        else:
            i, j = rng.choice(len(pool), size=2, replace=False)
            objs = (ObjectSpec(*pool[int(i)]), ObjectSpec(*pool[int(j)]))
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))] if kind == "relation" else None
            spec = SceneSpec(kind, objs, rel)
        if split != "heldout" or spec.combos & HELDOUT_COMBOS:
            return spec


def prompt_set(name: str) -> list[str]:
    """The shipped prompt sets, deterministic: ``train`` (114), ``eval`` (36 training prompts), ``heldout`` (36)."""
    rng = np.random.default_rng({"train": 0, "eval": 1, "heldout": 2}[name])
    if name == "train":
        pool = allowed_combos("train")
        prompts = [caption(SceneSpec("count", (ObjectSpec(c, s, n),))) for c, s in pool for n in range(1, 5)]
        pairs = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1 :]]
        for k, (a, b) in enumerate(pairs):
            if rng.random() < 0.5:
                a, b = b, a
            objs = (ObjectSpec(*a), ObjectSpec(*b))
            if k % 2 == 0:
                prompts.append(caption(SceneSpec("pair", objs)))
            else:
                prompts.append(caption(SceneSpec("relation", objs, RELATIONS[int(rng.integers(4))])))
        return prompts
    if name == "eval":
        train = prompt_set("train")
        by_kind: dict[str, list[str]] = {k: [p for p in train if parse_prompt(p).kind == k] for k in KINDS}
        return [by_kind[k][int(i)] for k in KINDS for i in rng.choice(len(by_kind[k]), 12, replace=False)]
    if name == "heldout":
        out: list[str] = []
        for k in KINDS:
            seen: set[str] = set()
            while len(seen) < 12:
                p = caption(sample_spec(rng, "heldout", k))
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        return out
    raise ValueError(f"prompt set {name!r} unknown; choose from 'train', 'eval', 'heldout'")


# ----------------------------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class Placed:
    """One drawn object: colour, shape, centre (x, y) and size in pixels of the output image."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float


def _shape_mask(shape: str, cx: float, cy: float, size: float, h: int, w: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape [h, w], by ``ss``x``ss`` supersampling."""
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    X, Y = np.meshgrid(xs, ys)
    r = size / 2
    if shape == "circle":
        m = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
    elif shape == "square":
        q = r * 0.9  # same visual area as the circle, roughly
        m = (np.abs(X - cx) <= q) & (np.abs(Y - cy) <= q)
    elif shape == "triangle":
        top, bottom = cy - r, cy + r
        half = (Y - top) / (2 * r) * r * 1.1  # half width grows linearly from the apex
        m = (Y >= top) & (Y <= bottom) & (np.abs(X - cx) <= half)
    else:
        raise ValueError(f"shape {shape!r} unknown; choose from {SHAPES}")
    return m.reshape(h, ss, w, ss).mean(axis=(1, 3))


def layout(spec: SceneSpec, rng: np.random.Generator, size: int = 32) -> list[Placed]:
    """Random non-overlapping placement honouring the spec's relation (centres >= size/5 apart on that axis)."""
    objs = [(o.color, o.shape) for o in spec.objects for _ in range(o.count)]
    n = len(objs)
    lo, hi = (0.26, 0.36) if n <= 2 else (0.22, 0.28)
    for _attempt in range(1000):
        placed: list[Placed] = []
        for idx, (c, s) in enumerate(objs):
            d = float(rng.uniform(lo, hi) * size)
            m = d / 2 + 1
            cx, cy = rng.uniform(m, size - m, 2)
            if spec.kind == "relation":
                first = idx == 0
                left_half = (m, size / 2 - 1)
                right_half = (size / 2 + 1, size - m)
                if spec.relation in ("left of", "right of"):
                    cx = rng.uniform(*(left_half if first == (spec.relation == "left of") else right_half))
                else:
                    cy = rng.uniform(*(left_half if first == (spec.relation == "above") else right_half))
            p = Placed(c, s, float(cx), float(cy), d)
            if all(np.hypot(p.cx - q.cx, p.cy - q.cy) > (p.size + q.size) / 2 * 1.2 + 1 for q in placed):
                placed.append(p)
            else:
                break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not lay out {spec}")  # pragma: no cover - sizes are chosen so this never happens


def draw(placed: Sequence[Placed], size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Paint placed objects on the background: uint8 [size, size, 3]. ``rng`` jitters colours by up to +-12."""
    img = np.empty((size, size, 3), np.float64)
    img[:] = BACKGROUND
    for p in placed:
        col = np.array(COLORS[p.color], np.float64)
        if rng is not None:
            col = np.clip(col + rng.uniform(-12, 12, 3), 0, 255)
        a = _shape_mask(p.shape, p.cx, p.cy, p.size, size, size)[..., None]
        img = img * (1 - a) + col * a
    return np.round(img).astype(np.uint8)


def render(spec: SceneSpec, seed: int, size: int = 32) -> np.ndarray:
    """Deterministic render of a spec: uint8 [size, size, 3]; same (spec, seed, size) -> same pixels."""
    rng = np.random.default_rng(seed)
    return draw(layout(spec, rng, size), size, rng)


def dataset(n: int, seed: int, size: int = 32, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """``n`` random training scenes: images uint8 [n, size, size, 3] and their captions."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, split) for _ in range(n)]
    seeds = rng.integers(0, 2**31, n)
    return np.stack([render(s, int(k), size) for s, k in zip(specs, seeds)]), [caption(s) for s in specs]


def iter_vocabulary() -> Iterable[str]:
    """Every word the grammar can produce (for building tokenizers)."""
    yield from ("a", "an", "one", "two", "three", "four", "and", "to", "the", "left", "right", "of", "above", "below")
    yield from COLORS
    for s in SHAPES:
        yield s
        yield s + "s"
