"""benchmarks.shape_binding: shape confusion of single-object prompts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.shape_binding import main, shape_confusion, single_object_prompts
from rewards import scenes
from tests.helpers import save_tiny_sd3


def _renders(prompts: list[str], seed: int = 0) -> torch.Tensor:
    imgs = [scenes.render(scenes.parse_prompt(p), seed + i) for i, p in enumerate(prompts)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def test_faithful_renders_bind_perfectly():
    prompts = single_object_prompts("train") * 3
    r = shape_confusion(_renders(prompts), prompts)
    for s in scenes.SHAPES:
        assert r["confusion"][s][s] == 1.0
        assert sum(r["confusion"][s].values()) == pytest.approx(1.0)
    assert r["binding"] == 1.0 and r["objects_per_image"] == 1.0


def test_shapes_that_ignore_the_prompt_do_not_bind():
    """Every image draws a circle whatever shape the prompt asks: binding 0 (the prompt's shape word is ignored)."""
    prompts = single_object_prompts("all")
    circles = [f"a {scenes.parse_prompt(p).objects[0].color} circle" for p in prompts]
    r = shape_confusion(_renders(circles), prompts)
    assert all(r["confusion"][s]["circle"] == 1.0 for s in scenes.SHAPES)
    assert r["binding"] == 0.0
    # Always drawing the next shape in the cycle circle -> square -> triangle -> circle: each asked shape is
    # never drawn, and drawn for half of the other requests: binding 0 - 1/2 = -1/2.
    swap = {"circle": "square", "square": "triangle", "triangle": "circle"}
    drawn = [f"a {o.color} {swap[o.shape]}" for o in (scenes.parse_prompt(p).objects[0] for p in prompts)]
    assert shape_confusion(_renders(drawn), prompts)["binding"] == pytest.approx(-0.5)


def test_hand_counted_tally():
    # Two images asking for a red triangle: one shows two red triangles, the other a red square and a blue circle
    # (not the asked colour, so not counted).
    ask = "a red triangle"
    two = scenes.SceneSpec("count", (scenes.ObjectSpec("red", "triangle", 2),))
    mixed = scenes.SceneSpec("pair", (scenes.ObjectSpec("red", "square"), scenes.ObjectSpec("blue", "circle")))
    imgs = torch.from_numpy(np.stack([scenes.render(two, 1), scenes.render(mixed, 2)])).permute(0, 3, 1, 2) / 255
    r = shape_confusion(imgs.float(), [ask, ask])
    assert r["tally"]["triangle"] == {"circle": 0, "square": 1, "triangle": 2}
    assert r["confusion"]["triangle"]["triangle"] == pytest.approx(2 / 3)
    assert math.isnan(r["confusion"]["circle"]["circle"]) and math.isnan(r["binding"])
    assert r["objects_per_image"] == 1.5


def test_rejects_multi_object_prompts():
    with pytest.raises(ValueError, match="not a single object"):
        shape_confusion(_renders(["two red circles"]), ["two red circles"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shape_confusion(_renders(["a red circle"] * 2), ["a red circle"])


def test_runs_on_a_pipeline(tmp_path):
    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    out = tmp_path / "sb"
    r = main(["--out", str(out), "--pretrained_model_name_or_path", str(model), "--images_per_prompt", "1"])
    saved = json.loads((out / "shape_binding.json").read_text())
    assert saved["n_images"] == 12 == r["n_images"] and 0 <= saved["score"] <= 1
    assert (out / "shape_binding.md").read_text().startswith("| asked")
