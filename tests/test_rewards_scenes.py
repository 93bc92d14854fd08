"""The scenes grammar / renderer and the ``scenes`` verifier reward.

Accuracy is checked both ways on renders of the held-out prompts: a faithful render must be strictly correct, and
a render that breaks one clause (count, colour, shape, side) must score lower than the faithful one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from rewards import evaluate_reward, get_reward, scenes
from rewards.scene_verifier import SceneVerifier, check, classify_shape, detect, verify
from rewards.scenes import ObjectSpec, Placed, SceneSpec

N_ACCURACY = 1000
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _replace(spec: SceneSpec, i: int, obj: ObjectSpec) -> SceneSpec:
    return SceneSpec(spec.kind, tuple(obj if j == i else o for j, o in enumerate(spec.objects)), spec.relation)


def violations(spec: SceneSpec, rng: np.random.Generator) -> dict[str, SceneSpec]:
    """Specs that break exactly one clause of ``spec`` (for one randomly chosen object)."""
    i = int(rng.integers(len(spec.objects)))
    o = spec.objects[i]
    counts = [k for k in range(1, 5) if k != o.count] if spec.kind == "count" else [2]
    colors = [c for c in scenes.COLORS if c != o.color and (c, o.shape) not in spec.combos]
    shapes = [s for s in scenes.SHAPES if s != o.shape and (o.color, s) not in spec.combos]
    out = {
        "count": _replace(spec, i, ObjectSpec(o.color, o.shape, int(rng.choice(counts)))),
        "color": _replace(spec, i, ObjectSpec(str(rng.choice(colors)), o.shape, o.count)),
        "shape": _replace(spec, i, ObjectSpec(o.color, str(rng.choice(shapes)), o.count)),
    }
    if spec.kind == "relation":
        out["side"] = SceneSpec(spec.kind, spec.objects, OPPOSITE[spec.relation])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Grammar and renderer


@pytest.mark.parametrize("name", ["train", "eval", "heldout"])
def test_parse_caption_round_trip(name):
    prompts = scenes.prompt_set(name)
    assert len(prompts) == len(set(prompts)) > 0
    for p in prompts:
        spec = scenes.parse_prompt(p)
        assert scenes.caption(spec) == p
        assert scenes.parse_prompt(scenes.caption(spec)) == spec
    combos = set().union(*(scenes.parse_prompt(p).combos for p in prompts))
    if name == "heldout":
        assert all(scenes.parse_prompt(p).combos & scenes.HELDOUT_COMBOS for p in prompts)
        assert combos >= scenes.HELDOUT_COMBOS
    else:
        assert not combos & scenes.HELDOUT_COMBOS


def test_parse_rejects_out_of_grammar():
    with pytest.raises(ValueError, match="not in the scenes grammar"):
        scenes.parse_prompt("a photo of a cat")
    assert scenes.parse_prompt("  Two RED circles. ") == SceneSpec("count", (ObjectSpec("red", "circle", 2),))


def test_render_is_deterministic():
    spec = scenes.parse_prompt("a red circle to the left of a blue square")
    a, b, c = scenes.render(spec, 7), scenes.render(spec, 7), scenes.render(spec, 8)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert scenes.render(spec, 7, size=64).shape == (64, 64, 3)
    x1, p1 = scenes.dataset(4, seed=3)
    x2, p2 = scenes.dataset(4, seed=3)
    np.testing.assert_array_equal(x1, x2)
    assert p1 == p2


# ----------------------------------------------------------------------------------------------------------------
# Verifier on hand-placed scenes


def _scene(*objects: tuple[str, str, float, float], size: int = 32, d: float = 0.3) -> np.ndarray:
    """Objects given as (colour, shape, x, y) in fractions of the image."""
    return scenes.draw([Placed(c, s, x * size, y * size, d * size) for c, s, x, y in objects], size)


@pytest.mark.parametrize("size", [32, 64])
def test_detects_colours_shapes_and_positions(size):
    img = _scene(("red", "circle", 0.25, 0.3), ("blue", "square", 0.75, 0.35), ("green", "triangle", 0.5, 0.75),
                 size=size)
    dets = sorted(detect(img), key=lambda d: d.x)
    assert [(d.color, d.shape) for d in dets] == [("red", "circle"), ("green", "triangle"), ("blue", "square")]
    np.testing.assert_allclose([d.x for d in dets], [0.25, 0.5, 0.75], atol=0.02)
    assert abs(dets[1].y - 0.75) < 0.03  # extent centre, not the (lower) triangle centroid


def test_clauses_of_a_relation_prompt():
    prompt = "a red circle to the left of a blue square"
    good = verify(_scene(("red", "circle", 0.25, 0.5), ("blue", "square", 0.75, 0.5)), prompt)
    assert good.strict and good.soft == 1.0 and len(good.clauses) == 8
    swapped = verify(_scene(("red", "circle", 0.75, 0.5), ("blue", "square", 0.25, 0.5)), prompt)
    assert [k for k, ok in swapped.clauses.items() if not ok] == ["position"]
    assert swapped.soft == 7 / 8
    extra = verify(
        _scene(("red", "circle", 0.25, 0.3), ("blue", "square", 0.75, 0.3), ("green", "triangle", 0.5, 0.75)), prompt
    )
    assert [k for k, ok in extra.clauses.items() if not ok] == ["no_extra"] and not extra.strict
    wrong_shape = verify(_scene(("red", "triangle", 0.25, 0.5), ("blue", "square", 0.75, 0.5)), prompt)
    # colour present, shape and count wrong, position still judged on the red object, and it is an extra
    assert {k for k, ok in wrong_shape.clauses.items() if not ok} == {"shape:0", "count:0", "no_extra"}


def test_count_clause_fails_on_too_many():
    img = _scene(("red", "circle", 0.25, 0.25), ("red", "circle", 0.75, 0.25), ("red", "circle", 0.5, 0.75), d=0.25)
    assert verify(img, "three red circles").strict
    too_many = verify(img, "two red circles")
    assert [k for k, ok in too_many.clauses.items() if not ok] == ["count:0"]
    assert verify(img, "four red circles").soft == 0.75


def test_shape_classifier_thresholds():
    assert classify_shape(-0.5, 1.0) == "triangle"
    assert classify_shape(0.0, 1.3) == "square"
    assert classify_shape(0.0, 1.0) == "circle"


def test_reward_output_and_not_applicable():
    reward = get_reward("scenes")
    assert isinstance(reward, SceneVerifier)
    spec = scenes.parse_prompt("two yellow triangles")
    images = _batch([scenes.render(spec, 0), scenes.render(spec, 1), np.full((32, 32, 3), 245, np.uint8)])
    scores, info = evaluate_reward(reward, images, ["two yellow triangles", "not a scene prompt", "a red circle"])
    assert scores[0] == 1.0 and torch.isnan(scores[1])
    assert scores[2] == 0.25  # blank image: only 'no_extra' holds
    assert set(info) == {"strict", "count", "color", "shape", "position", "no_extra", "n_objects"}
    assert info["strict"].tolist()[0] == 1.0 and torch.isnan(info["strict"][1]) and info["strict"][2] == 0.0
    assert torch.isnan(info["position"][0])  # no relation in the prompt
    assert info["n_objects"][0] == 2.0


# ----------------------------------------------------------------------------------------------------------------
# Accuracy on renders of the held-out prompts, both ways


@pytest.fixture(scope="module")
def heldout_renders():
    prompts = scenes.prompt_set("heldout")
    rng = np.random.default_rng(2024)
    seeds = rng.integers(0, 2**31, N_ACCURACY)
    faithful, texts, broken = [], [], {k: ([], []) for k in ("count", "color", "shape", "side")}
    for k in range(N_ACCURACY):
        prompt = prompts[k % len(prompts)]
        spec = scenes.parse_prompt(prompt)
        faithful.append(scenes.render(spec, int(seeds[k])))
        texts.append(prompt)
        for kind, bad in violations(spec, rng).items():
            broken[kind][0].append(k)
            broken[kind][1].append(scenes.render(bad, int(seeds[k])))
    return texts, faithful, broken


def test_faithful_heldout_renders_are_strictly_correct(heldout_renders):
    texts, faithful, _ = heldout_renders
    scores, info = SceneVerifier()(_batch(faithful), texts)
    strict = info["strict"].numpy()
    failures = [texts[i] for i in np.flatnonzero(strict < 1)]
    assert strict.mean() >= 0.99, f"strict accuracy {strict.mean():.4f}; failures e.g. {failures[:5]}"
    assert scores.mean() >= 0.99


@pytest.mark.parametrize("kind", ["count", "color", "shape", "side"])
def test_one_clause_violations_score_lower(heldout_renders, kind):
    texts, faithful, broken = heldout_renders
    reward = SceneVerifier()
    index, images = broken[kind]
    assert len(index) >= (0.3 * N_ACCURACY if kind == "side" else N_ACCURACY)  # a third of the prompts relate
    good, _ = reward(_batch([faithful[i] for i in index]), [texts[i] for i in index])
    bad, info = reward(_batch(images), [texts[i] for i in index])
    lower = (bad < good).float().mean().item()
    assert lower >= 0.99, f"{kind}: violation scored lower in only {lower:.4f} of {len(index)} cases"
    assert info["strict"].mean() <= 0.01


def test_tolerates_blur_and_noise():
    """Model samples are blurrier and noisier than renders: Gaussian blur (sigma 0.8 px) plus noise (std 6/255)."""
    prompts = scenes.prompt_set("heldout")
    rng = np.random.default_rng(5)
    images, texts = [], []
    for k in range(180):
        img = scenes.render(scenes.parse_prompt(prompts[k % len(prompts)]), 10_000 + k).astype(np.float64)
        img = ndimage.gaussian_filter(img, (0.8, 0.8, 0)) + rng.normal(0, 6, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        texts.append(prompts[k % len(prompts)])
    _, info = SceneVerifier()(_batch(images), texts)
    assert info["strict"].mean() >= 0.98


@pytest.mark.parametrize("min_area", [0.005, 0.015, 0.05])
def test_pruning_small_components_is_exact(min_area):
    """Noisy samples (a collapsing policy's) break into hundreds of tiny components per colour; the summed-area bound
    skips those that cannot reach ``min_area``. The detections must equal those of analysing every component."""
    from rewards.scene_verifier import _detect_one, segment

    prompts = scenes.prompt_set("eval")
    rng = np.random.default_rng(7)
    most_components = 0
    for k in range(40):
        img = scenes.render(scenes.parse_prompt(prompts[k % len(prompts)]), 20_000 + k).astype(np.float64)
        kind = k % 4
        if kind == 1:
            img = img + rng.normal(0, rng.uniform(10, 80), img.shape)
        elif kind == 2:
            img = ndimage.gaussian_filter(img, (1.0, 1.0, 0)) + rng.normal(0, 30, img.shape)
        elif kind == 3:
            img = rng.uniform(0, 255, img.shape)
        index, alpha = segment(np.clip(img, 0, 255))
        args = (index, alpha, min_area, 0.4, 0.15, 1.08)
        pruned, full = _detect_one(*args), _detect_one(*args, prune=False)
        assert pruned == full, f"image {k} (kind {kind}): {pruned} != {full}"
        for ci in np.unique(index):
            most_components = max(most_components, ndimage.label((index == ci) & (alpha >= 0.4))[1])
    assert most_components >= 50  # the speckle the bound exists for was there


def test_check_handles_repeated_combo_in_prompt():
    spec = scenes.parse_prompt("a red circle to the left of a red circle")
    img = _scene(("red", "circle", 0.25, 0.5), ("red", "circle", 0.75, 0.5))
    verdict = check(spec, detect(img))
    assert verdict.strict  # two red circles in total, one left of the other


def test_shipped_prompt_files_match_the_generator():
    """The prompt sets are shipped as files (reproducible evaluation) and equal what the generator produces."""
    from pathlib import Path

    from rewards import scenes as _scenes

    data = Path(_scenes.__file__).parent / "data"
    for name in ("train", "eval", "heldout"):
        lines = (data / f"scenes_{name}.txt").read_text(encoding="utf-8").splitlines()
        assert lines == _scenes.prompt_set(name)
    heldout = set((data / "scenes_heldout.txt").read_text().splitlines())
    train = set((data / "scenes_train.txt").read_text().splitlines())
    assert not heldout & train
    assert all(_scenes.parse_prompt(p).combos & _scenes.HELDOUT_COMBOS for p in heldout)
    assert not any(_scenes.parse_prompt(p).combos & _scenes.HELDOUT_COMBOS for p in train)
