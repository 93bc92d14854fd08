"""Every shipped YAML preset parses and validates; the embedded one is exactly the no-argument default."""

from pathlib import Path

import pytest

from flowrl.cli import build_config
from flowrl.config import to_dict

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml")
                 if p.parent.name != "accelerate")  # configs/accelerate/: accelerate launch configs, not flowrl


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_is_headed_by_its_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and ("flowrl" in first or "accelerate launch" in first), first
    build_config(["--config", str(path)])


def test_embedded_yaml_is_the_default():
    default = to_dict(build_config([]))
    yaml = Path(__file__).resolve().parents[1] / "configs" / "embedded_flow_grpo.yaml"
    spelled = to_dict(build_config(["--config", str(yaml)]))
    assert spelled == default


def test_no_and_off_reach_string_choices_as_written(tmp_path):
    """diffusers' ``--mixed_precision no`` (and YAML's ``mixed_precision: no``, which YAML 1.1 reads as false) set the
    choice "no"; a boolean where no choice is spelled so stays an error that names the choices."""
    from flowrl.config import ConfigError

    assert build_config(["--mixed_precision", "no"]).model.mixed_precision == "no"
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  mixed_precision: no\n")
    assert build_config(["--config", str(y)]).model.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"mixed_precision = True has the wrong type; expected one of 'no', 'fp16'"):
        build_config(["--mixed_precision", "yes"])


def test_leaf_index_names_every_leaf_once_with_its_resolved_type_and_hands_out_copies():
    """The flag table (cached: resolving the annotations per key made every build_config take seconds) covers every
    section field with its real annotation, not the string one, and a caller's edits do not reach the cache."""
    import dataclasses
    import typing

    from flowrl.config import SECTIONS, GRPOConfig, TrainConfig, leaf_index

    index = leaf_index()
    cfg = TrainConfig()
    expected = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS}
    for s in SECTIONS:
        expected |= {f.name for f in dataclasses.fields(getattr(cfg, s))}
    assert set(index) == expected
    assert index["learning_rate"] == ("optim", "learning_rate", float)
    assert index["objective"] == ("grpo", "objective", typing.get_type_hints(GRPOConfig)["objective"])
    assert index["seed"][0] is None
    index.pop("seed")
    assert "seed" in leaf_index()
