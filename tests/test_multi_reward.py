"""Several rewards end to end through ``flowrl train`` on the tiny pipeline, and NaN masking of a plug-in reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flowrl.cli import main
from tests.helpers import save_tiny_sd3

FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "2",
    "--train_fraction", "0.5", "--report_to", "none", "--learning_rate", "1e-2", "--rank", "2", "--eval_steps", "0",
]


def first_is_nan(images, prompts, **metadata):
    """A plug-in reward (``tests.test_multi_reward:first_is_nan``): mean brightness, NaN for the first image."""
    scores = images.mean(dim=(1, 2, 3)).float()
    scores[0] = float("nan")
    return scores


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_two_rewards_are_logged_and_weighted(tiny_model, tmp_path, aggregation):
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
               "--max_train_steps", "1", "--reward", "scenes", "--reward", "jpeg_compressibility:0.5",
               "--reward_aggregation", aggregation, *FAST])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rewards"] == {"scenes": 1.0, "jpeg_compressibility": 0.5}
    assert cfg["grpo"]["reward_aggregation"] == aggregation
    (rec,) = _metrics(out)
    for name in ("scenes", "jpeg_compressibility"):
        for stat in ("mean", "std", "nan_count"):
            assert f"reward/{name}/{stat}" in rec, (name, stat)
        assert rec[f"reward/{name}/nan_count"] == 0
    assert -2.0 < rec["reward/jpeg_compressibility/mean"] < 0 <= rec["reward/scenes/mean"] <= 1
    # reward/mean is the weighted sum, averaged over the batch
    expected = rec["reward/scenes/mean"] + 0.5 * rec["reward/jpeg_compressibility/mean"]
    assert math.isclose(rec["reward/mean"], expected, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isfinite(rec["train/loss"])


def test_nan_from_a_plugin_reward_is_masked_and_counted(tiny_model, tmp_path):
    out = tmp_path / "run"
    spec = "tests.test_multi_reward:first_is_nan"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
               "--max_train_steps", "2", "--reward", spec, "--reward_worker", "false", *FAST])  # one call per step
    assert rc == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2]  # training went on after the NaN
    for rec in recs:
        assert rec[f"reward/{spec}/nan_count"] == 1
        assert math.isfinite(rec[f"reward/{spec}/mean"]) and math.isfinite(rec["train/loss"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_raising_plugin_reward_stops_with_its_name(tiny_model, tmp_path):
    from rewards import RewardError

    out = tmp_path / "run"
    # the message names the reward by its function name (evaluate_reward uses reward_name(); see report)
    with pytest.raises(RewardError, match=r"reward 'broken' raised ZeroDivisionError"):
        main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
              "--max_train_steps", "1", "--reward", "tests.test_multi_reward:broken", *FAST])


def broken(images, prompts, **metadata):
    """A plug-in reward that fails."""
    raise ZeroDivisionError("integer division or modulo by zero")
