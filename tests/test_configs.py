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
