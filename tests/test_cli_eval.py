"""``flowrl eval`` / ``flowrl sample`` / ``--help`` on the tiny random SD3 pipeline (resolution 16)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from flowrl.cli import main
from tests.helpers import save_tiny_sd3

EVAL = ["--prompts", "scenes:heldout", "--num_images_per_prompt", "1", "--num_inference_steps", "2"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory) -> Path:
    """A LoRA trained for one step by ``flowrl train``."""
    run = tmp_path_factory.mktemp("lora") / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(run),
               "--max_train_steps", "1", "--rank", "4", "--prompts_per_step", "2", "--group_size", "2",
               "--sample_batch_size", "4", "--num_inference_steps", "2", "--report_to", "none", "--eval_steps", "0"])
    assert rc == 0 and (run / "pytorch_lora_weights.safetensors").is_file()
    return run


def test_eval_writes_results_table_csv_and_grid(tiny_model, tmp_path):
    from rewards.scenes import prompt_set

    out = tmp_path / "eval"
    assert main(["eval", "--output_dir", str(out), "--pretrained_model_name_or_path", str(tiny_model), *EVAL]) == 0
    res = json.loads((out / "results.json").read_text())
    n = len(prompt_set("heldout"))
    scenes = res["rewards"]["scenes"]
    assert set(scenes) == {"mean", "std", "n"} and scenes["n"] == n and 0 <= scenes["mean"] <= 1
    assert list(res["models"]) == ["base"]
    md = (out / "results.md").read_text()
    assert "| base | scenes |" in md
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == n and {"model", "prompt_index", "image_index", "prompt", "scenes"} <= set(rows[0])
    assert Image.open(out / "grids" / "base.png").size[0] > 0


def test_eval_lora_compare_has_base_and_lora(tiny_model, lora_run, tmp_path):
    out = tmp_path / "eval"
    rc = main(["eval", "--output_dir", str(out), "--pretrained_model_name_or_path", str(tiny_model), *EVAL,
               "--lora", str(lora_run), "--compare"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"base", "lora"} and res["lora"] == str(lora_run)
    assert res["rewards"] == res["models"]["lora"]
    assert (out / "grids" / "base.png").is_file() and (out / "grids" / "lora.png").is_file()
    models = {r["model"] for r in csv.DictReader((out / "per_image.csv").open())}
    assert models == {"base", "lora"}


def test_eval_with_plugin_reward(tiny_model, tmp_path, monkeypatch):
    mod = tmp_path / "plugins"
    mod.mkdir()
    (mod / "flowrl_test_brightness.py").write_text(
        "def brightness(images, prompts, **kw):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(mod))
    out = tmp_path / "eval"
    rc = main(["eval", "--output_dir", str(out), "--pretrained_model_name_or_path", str(tiny_model), *EVAL,
               "--reward", "flowrl_test_brightness:brightness", "--reward", "scenes"])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "flowrl_test_brightness:brightness" in md and "| base | scenes |" in md
    res = json.loads((out / "results.json").read_text())
    b = res["rewards"]["flowrl_test_brightness:brightness"]
    assert 0 <= b["mean"] <= 1 and b["n"] > 0


def test_eval_bad_lora_dir_is_an_error(tiny_model, tmp_path, capsys):
    rc = main(["eval", "--output_dir", str(tmp_path / "eval"), "--pretrained_model_name_or_path", str(tiny_model),
               *EVAL, "--lora", str(tmp_path)])
    assert rc == 2 and "pytorch_lora_weights.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_lists_rewards_and_algorithms(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("scenes", "jpeg_compressibility", "flow_grpo"):
        assert name in text, name


def test_sample_writes_images_at_model_resolution_and_grid(tiny_model, tmp_path):
    out = tmp_path / "samples"
    rc = main(["sample", "--prompt", "two red circles", "--output_dir", str(out),
               "--pretrained_model_name_or_path", str(tiny_model), "--num_images_per_prompt", "2",
               "--num_inference_steps", "2"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("p*.png"))
    assert pngs == ["p000_00.png", "p000_01.png"]
    assert all(Image.open(out / p).size == (16, 16) for p in pngs)  # flowrl_defaults.json of the tiny model
    assert (out / "grid.png").is_file()
