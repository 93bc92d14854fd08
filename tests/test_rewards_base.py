"""The reward protocol (evaluate_reward), the registry (names, module:attr, entry points) and the JPEG rewards."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import (
    Reward,
    RewardError,
    available_rewards,
    evaluate_reward,
    get_reward,
    parse_reward_spec,
    register_reward,
)
from rewards import registry as registry_module


def _images(b: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# JPEG


def _pil_jpeg_kb(image: torch.Tensor, quality: int = 95) -> float:
    """Hand-made reference: uint8 HWC -> PIL JPEG -> bytes / 1000."""
    arr = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


def test_jpeg_formula_matches_hand_encoding():
    images = _images(4)
    images[1] = 0.5  # a flat image compresses far better than noise
    expected = torch.tensor([_pil_jpeg_kb(im) for im in images], dtype=torch.float32)
    comp = get_reward("jpeg_compressibility")
    incomp = get_reward("jpeg_incompressibility")
    s_comp, info = evaluate_reward(comp, images, ["x"] * 4)
    s_incomp, _ = evaluate_reward(incomp, images, ["x"] * 4)
    assert info == {}
    assert s_comp.dtype == torch.float32 and s_comp.shape == (4,)
    torch.testing.assert_close(s_comp, -expected)
    torch.testing.assert_close(s_incomp, expected)
    assert s_comp[1] > s_comp[0]  # flat is more compressible
    # the plain functions agree with the classes, and quality is a parameter
    torch.testing.assert_close(rewards.jpeg_compressibility(images, None), -expected)
    low = get_reward("jpeg_incompressibility", quality=50)(images, ["x"] * 4)
    torch.testing.assert_close(low, torch.tensor([_pil_jpeg_kb(im, 50) for im in images]))


# ----------------------------------------------------------------------------------------------------------------
# evaluate_reward


def _named(fn, name):
    fn.name = name
    return fn


def test_evaluate_reward_accepts_scores_and_info_and_keeps_nan():
    def reward(images, prompts, **metadata):
        s = images.mean(dim=(1, 2, 3)).double()  # float64 is cast to float32
        s[1] = float("nan")
        return s, {"flag": torch.tensor([True, False, True]), "count": torch.tensor([1, 2, 3])}

    scores, info = evaluate_reward(reward, _images(), ["a", "b", "c"], step=3)
    assert scores.dtype == torch.float32 and torch.isnan(scores[1]) and not torch.isnan(scores[0])
    assert set(info) == {"flag", "count"}
    assert info["flag"].dtype == torch.float32 and info["flag"].tolist() == [1.0, 0.0, 1.0]
    assert info["count"].tolist() == [1.0, 2.0, 3.0]


def test_evaluate_reward_passes_metadata():
    seen = {}

    def reward(images, prompts, **metadata):
        seen.update(metadata)
        return torch.zeros(len(prompts))

    evaluate_reward(reward, _images(2), ["a", "b"], step=7, seeds=[1, 2])
    assert seen == {"step": 7, "seeds": [1, 2]}


@pytest.mark.parametrize(
    "output, expected",
    [
        (torch.zeros(3, 1), r"shape \[3, 1\]; expected \[3\]"),
        (torch.zeros(2), r"shape \[2\]; expected \[3\]"),
        ([0.0, 0.0, 0.0], r"type list; expected a torch.Tensor"),
        (np.zeros(3), r"type ndarray; expected a torch.Tensor"),
        (torch.zeros(3, dtype=torch.long), r"dtype torch.int64; expected a floating-point"),
        (torch.tensor([0.0, float("inf"), 1.0]), r"infinite"),
        ((torch.zeros(3), {"m": torch.zeros(2)}), r"info\['m'\] of shape \[2\]"),
        ((torch.zeros(3), [1]), r"tuple of 2 items whose second is list"),
        ((torch.zeros(3), {}, {}), r"tuple of 3 items"),
    ],
)
def test_evaluate_reward_rejects_bad_outputs(output, expected):
    reward = _named(lambda images, prompts, **m: output, "bad_plugin")
    with pytest.raises(RewardError, match=expected) as err:
        evaluate_reward(reward, _images(), ["a", "b", "c"])
    assert "'bad_plugin'" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_evaluate_reward_chains_exceptions():
    def exploding(images, prompts, **metadata):
        raise KeyError("missing weights")

    with pytest.raises(RewardError, match=r"reward 'exploding' raised KeyError") as err:
        evaluate_reward(exploding, _images(), ["a", "b", "c"])
    assert isinstance(err.value.__cause__, KeyError)


def test_evaluate_reward_validates_inputs():
    ok = _named(lambda images, prompts, **m: torch.zeros(len(prompts)), "ok")
    with pytest.raises(RewardError, match=r"\[B, 3, H, W\]"):
        evaluate_reward(ok, torch.zeros(3, 32, 32), ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"floats in \[0, 1\]"):
        evaluate_reward(ok, torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"2 prompts for 3 images"):
        evaluate_reward(ok, _images(), ["a", "b"])


def test_reward_base_class_loads_lazily_once_and_moves():
    class Counting(Reward):
        """score = 1 everywhere (test double)."""

        name = "counting"

        def __init__(self):
            super().__init__()
            self.loads = 0
            self.table = None

        def _load(self):
            self.loads += 1
            self.table = torch.ones(3)

        def score(self, images, prompts, **metadata):
            return self.table.to(images.device)[: len(prompts)]

    r = Counting().to("cpu")
    assert r.loads == 0 and r.table is None  # nothing loaded until used
    evaluate_reward(r, _images(), ["a", "b", "c"])
    evaluate_reward(r, _images(), ["a", "b", "c"])
    assert r.loads == 1 and r.table.device.type == "cpu"
    assert r.load() is r and r.loads == 1
    assert "counting" in repr(r)


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_builtins_registered_on_import():
    names = available_rewards()
    for name in ("scenes", "jpeg_compressibility", "jpeg_incompressibility"):
        assert name in names
        reward = get_reward(name)
        assert reward.name == name and callable(reward)


def test_unknown_reward_lists_available():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; available: .*jpeg_compressibility.*scenes"):
        get_reward("nope")
    with pytest.raises(ValueError, match=r"split it with parse_reward_spec"):
        get_reward("scenes:0.5")
    with pytest.raises(ValueError, match=r"no module named 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:thing")
    with pytest.raises(ValueError, match=r"has no attribute 'nothing_here'"):
        get_reward("rewards.jpeg:nothing_here")


def test_register_reward_decorator(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_reward("brightness_test")
    class Brightness(Reward):
        """score = mean pixel value * scale."""

        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

        def score(self, images, prompts, **metadata):
            return images.mean(dim=(1, 2, 3)) * self.scale

    @register_reward("const_test")
    def make_const(value=2.0):  # a factory
        return lambda images, prompts, **m: torch.full((len(prompts),), value)

    assert Brightness.name == "brightness_test"
    assert "brightness_test" in available_rewards()
    images = _images(2)
    r = get_reward("brightness_test", scale=2.0)
    torch.testing.assert_close(r(images, ["a", "b"]), images.mean(dim=(1, 2, 3)) * 2)
    assert get_reward("const_test", value=5.0)(images, ["a", "b"]).tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("brightness_test")(make_const)
    with pytest.raises(ValueError, match="not allowed"):
        register_reward("bad:name")


PLUGIN = textwrap.dedent(
    '''
    import torch
    from rewards import Reward

    class Redness(Reward):
        """score = mean of the red channel minus the others, times gain; in [-gain, gain]."""

        def __init__(self, gain=1.0):
            super().__init__()
            self.gain = gain

        def score(self, images, prompts, **metadata):
            return (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2)) * self.gain

    def make_redness(gain=3.0):
        return Redness(gain)

    def darkness(images, prompts, **metadata):
        return 1 - images.mean(dim=(1, 2, 3))

    class Holder:
        @staticmethod
        def build(gain=1.0):
            return Redness(gain)
    '''
)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    name = "flowrl_test_plugin_mod"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_module_attr_specs(plugin_module):
    images = _images(2)
    red = get_reward(f"{plugin_module}:Redness", gain=2.0)
    assert red.gain == 2.0 and red.name == "Redness"  # a Reward without its own name takes the attr's
    assert get_reward(f"{plugin_module}:make_redness").gain == 3.0  # factory called with kwargs
    assert get_reward(f"{plugin_module}:Holder.build", gain=4.0).gain == 4.0  # dotted attr
    dark = get_reward(f"{plugin_module}:darkness")  # a plain function is used as is
    assert dark.__name__ == "darkness"
    scores, _ = evaluate_reward(dark, images, ["a", "b"])
    torch.testing.assert_close(scores, 1 - images.mean(dim=(1, 2, 3)))
    assert rewards.reward_name(dark) == "darkness"


def test_entry_point_via_fake_dist_info(tmp_path, monkeypatch, plugin_module):
    dist = tmp_path / "flowrl_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flowrl-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[flowrl.rewards]\nredness_ep = {plugin_module}:Redness\ndarkness_ep = {plugin_module}:darkness\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"redness_ep", "darkness_ep", "scenes"} <= set(available_rewards())
    red = get_reward("redness_ep", gain=0.5)
    assert red.gain == 0.5 and red.name == "redness_ep"
    images = torch.zeros(2, 3, 8, 8)
    images[:, 0] = 1.0
    scores, _ = evaluate_reward(red, images, ["a", "b"])
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5]))
    assert get_reward("darkness_ep")(images, ["a", "b"]).shape == (2,)


def test_entry_point_via_monkeypatched_entry_points(monkeypatch):
    from importlib.metadata import EntryPoint

    real = registry_module.importlib.metadata.entry_points

    def fake_entry_points(**kwargs):
        if kwargs.get("group") == "flowrl.rewards":
            return [EntryPoint("jpeg_alias", "rewards.jpeg:JpegCompressibility", "flowrl.rewards")]
        return real(**kwargs)

    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", fake_entry_points)
    assert "jpeg_alias" in available_rewards()
    r = get_reward("jpeg_alias", quality=80)
    assert isinstance(r, rewards.JpegCompressibility) and r.quality == 80


def test_broken_entry_point_names_itself(monkeypatch):
    from importlib.metadata import EntryPoint

    monkeypatch.setattr(
        registry_module.importlib.metadata,
        "entry_points",
        lambda **kw: [EntryPoint("broken_ep", "no_such_pkg_abc:Thing", "flowrl.rewards")],
    )
    with pytest.raises(ImportError, match=r"'broken_ep' \(no_such_pkg_abc:Thing\) failed to load"):
        get_reward("broken_ep")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("scenes", ("scenes", 1.0)),
        ("scenes:0.5", ("scenes", 0.5)),
        (" scenes : 2 ", ("scenes", 2.0)),
        ("jpeg_compressibility:-1e-1", ("jpeg_compressibility", -0.1)),
        ("pkg.mod:Reward", ("pkg.mod:Reward", 1.0)),
        ("pkg.mod:Reward:3", ("pkg.mod:Reward", 3.0)),
        ("pkg.mod:Class.factory:.25", ("pkg.mod:Class.factory", 0.25)),
        ("pkg.mod:inf", ("pkg.mod:inf", 1.0)),  # non-finite is never a weight
    ],
)
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", ":", "scenes:", ":0.5", "a::b", "a:b:c:1", "a:b:c"])
def test_parse_reward_spec_rejects(spec):
    with pytest.raises(ValueError):
        parse_reward_spec(spec)


def test_rewards_is_a_leaf_package():
    code = "import sys, rewards; print([m for m in sys.modules if m.split('.')[0] in ('flowrl', 'samplers')])"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.strip() == "[]"
