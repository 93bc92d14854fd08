"""Bad input to ``flowrl train``: exit code 2, a message naming the bad key/value and what is allowed, no output dir.

Every case fails before any heavy work, so the inputs need no real model: a directory whose ``model_index.json``
names the SD3 pipeline passes the model checks of ``preflight``. Only the checkpoint cases train (1 step) on the
tiny random SD3 pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flowrl.cli import build_config, main, preflight
from flowrl.config import ConfigError

# name -> (argv with {tmp} for the case directory, substrings the error message must contain)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "yaml_malformed": (["--config", "{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
    "yaml_missing": (["--config", "{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
    "yaml_list": (["--config", "{tmp}/list.yaml"], ["list.yaml", "expected a mapping", "got list"]),
    "yaml_unknown_top_key": (["--config", "{tmp}/typo_top.yaml"],
                             ["'lerning_rate'", "did you mean learning_rate", "top-level keys", "grpo"]),
    "yaml_unknown_section_key": (["--config", "{tmp}/typo_section.yaml"],
                                 ["'grpo.group_sise'", "group_size", "section 'grpo' allows"]),
    "yaml_key_in_wrong_section": (["--config", "{tmp}/wrong_section.yaml"],
                                  ["'optim.group_size'", "belongs in section 'grpo'"]),
    "flag_unknown": (["--lerning_rate", "0.1"], ["'--lerning_rate'", "--learning_rate", "--help"]),
    "type_str_for_int": (["--max_train_steps", "abc"], ["max_train_steps", "'abc'", "expected int"]),
    "type_list_for_float": (["--learning_rate", "[1, 2]"], ["learning_rate", "[1, 2]", "expected float"]),
    "range_learning_rate": (["--learning_rate", "-1"], ["learning_rate", "> 0", "-1"]),
    "range_clip_range": (["--clip_range", "2"], ["clip_range", "(0, 1)", "2.0"]),
    "range_group_size": (["--group_size", "1"], ["group_size", ">= 2", "got 1"]),
    "range_num_inference_steps": (["--num_inference_steps", "0"], ["num_inference_steps", "[1, 1000]", "got 0"]),
    "range_noise_level": (["--noise_level", "0"], ["noise_level", "> 0", "got 0"]),
    "range_train_fraction": (["--train_fraction", "1.5"], ["train_fraction", "(0, 1]", "1.5"]),
    "range_resolution": (["--resolution", "30"], ["resolution", "multiple of 8", "30"]),
    "literal_mixed_precision": (["--mixed_precision", "fp8"], ["mixed_precision", "'fp8'", "'no'", "'bf16'"]),
    "literal_plan": (["--plan", "foo"], ["plan", "'foo'", "'full'", "'window'"]),
    "batch_not_divisible": (["--prompts_per_step", "3", "--group_size", "3", "--sample_batch_size", "4"],
                            ["sample_batch_size=4", "prompts_per_step*group_size=9"]),
    "window_larger_than_steps": (["--plan", "window", "--window_size", "20"],
                                 ["window_size", "num_inference_steps=10", "20"]),
    "model_missing": (["--pretrained_model_name_or_path", "{tmp}/no_model"], ["no_model", "does not exist"]),
    "model_not_diffusers": (["--pretrained_model_name_or_path", "{tmp}/not_a_pipeline"],
                            ["not_a_pipeline", "model_index.json"]),
    "model_unsupported_class": (["--pretrained_model_name_or_path", "{tmp}/sdxl"],
                                ["'StableDiffusionXLPipeline'", "StableDiffusion3Pipeline", "FluxPipeline"]),
    "prompts_missing": (["--prompts", "{tmp}/nope.txt"], ["nope.txt", "does not exist", "scenes:train"]),
    "prompts_empty": (["--prompts", "{tmp}/empty.txt"], ["empty.txt", "no prompts"]),
    "prompts_not_utf8": (["--prompts", "{tmp}/latin1.txt"], ["latin1.txt", "not UTF-8"]),
    "prompts_jsonl_bad_line": (["--prompts", "{tmp}/bad.jsonl"], ["bad.jsonl", "line 2", "not JSON"]),
    "prompts_jsonl_no_prompt_field": (["--prompts", "{tmp}/noprompt.jsonl"], ["noprompt.jsonl", "line 1", "'prompt'"]),
    "eval_set_missing": (["--eval_sets", "{tmp}/nope_eval.txt"], ["nope_eval.txt", "does not exist"]),
    "reward_unknown": (["--reward", "nope"], ["'nope'", "scenes", "jpeg_compressibility", "module:attr"]),
    "reward_bad_weight": (["--reward", "scenes:abc"], ["'scenes:abc'", "'abc'", "not a number", "NAME[:WEIGHT]"]),
    "reward_module_missing": (["--reward", "no_such_module_xyz:fn"], ["no_such_module_xyz"]),
    "resume_missing": (["--resume_from_checkpoint", "/does/not/exist"], ["/does/not/exist", "latest"]),
    "resume_not_a_checkpoint": (["--resume_from_checkpoint", "{tmp}/not_a_pipeline"],
                                ["not_a_pipeline", "flowrl_state.json"]),
    "resume_corrupt_state": (["--resume_from_checkpoint", "{tmp}/checkpoint-3"],
                             ["checkpoint-3", "corrupt", "flowrl_state.json"]),
    "algorithm_unknown": (["--algorithm", "nope"], ["'nope'", "flow_grpo", "flow_grpo_fast"]),
    "output_dir_parent_is_file": (["--output_dir", "{tmp}/a_file/run"], ["a_file", "is a file"]),
}


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """The bad (and good) input files every case refers to."""
    (tmp_path / "bad.yaml").write_text("grpo: {group_size: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- learning_rate\n- 0.1\n")
    (tmp_path / "typo_top.yaml").write_text("lerning_rate: 0.1\n")
    (tmp_path / "typo_section.yaml").write_text("grpo:\n  group_sise: 4\n")
    (tmp_path / "wrong_section.yaml").write_text("optim:\n  group_size: 4\n")
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 with two red circles\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "two red circles"}\n{"prompt": oops}\n')
    (tmp_path / "noprompt.jsonl").write_text('{"text": "two red circles"}\n')
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "not_a_pipeline").mkdir()
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "flowrl_state.json").write_text('{"step": 3, "config": ')
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    fake = tmp_path / "fake_sd3"  # passes preflight's model checks; nothing here loads weights
    fake.mkdir()
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return tmp_path


def _run_train(argv: list[str]) -> int:
    try:
        return main(["train", *argv])
    except SystemExit as e:  # argparse; must not happen for bad values
        return e.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_message_and_no_output(case, inputs, capsys):
    argv, expected = CASES[case]
    argv = [a.replace("{tmp}", str(inputs)) for a in argv]
    out_dir = inputs / "out"
    full = ["--pretrained_model_name_or_path", str(inputs / "fake_sd3"), "--output_dir", str(out_dir), *argv]
    rc = _run_train(full)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("flowrl train: error: "), err
    assert "Traceback" not in err
    for s in expected:
        assert s in err, f"{s!r} missing from: {err}"
    assert not out_dir.exists()
    assert not (inputs / "a_file").is_dir()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_in_read_only_parent(inputs, capsys):
    parent = inputs / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        rc = _run_train(["--pretrained_model_name_or_path", str(inputs / "fake_sd3"),
                         "--output_dir", str(parent / "run")])
    finally:
        parent.chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and "read_only" in err
    assert not (parent / "run").exists()


def test_build_config_and_preflight_raise_config_error(inputs):
    with pytest.raises(ConfigError, match="unknown flag '--nope'"):
        build_config(["--nope", "1"])
    with pytest.raises(ConfigError, match="clip_range must be in"):
        build_config(["--clip_range", "2"])
    cfg = build_config(["--pretrained_model_name_or_path", str(inputs / "sdxl"), "--output_dir", str(inputs / "o")])
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline"):
        preflight(cfg)
    cfg = build_config(["--pretrained_model_name_or_path", str(inputs / "fake_sd3"),
                        "--output_dir", str(inputs / "a_file" / "run")])
    with pytest.raises(ConfigError, match="is a file"):
        preflight(cfg)
    # a good config passes preflight without creating anything
    cfg = build_config(["--pretrained_model_name_or_path", str(inputs / "fake_sd3"), "--output_dir", str(inputs / "o")])
    preflight(cfg)
    assert not (inputs / "o").exists()


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        build_config(["--help"])
    assert e.value.code == 0
    assert "--learning_rate" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ checkpoints
FAST = ["--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "4", "--num_inference_steps", "2",
        "--report_to", "none", "--eval_steps", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model, run dir with checkpoint-1) from one rank-4 training step."""
    from tests.helpers import save_tiny_sd3

    root = tmp_path_factory.mktemp("ckpt")
    model = save_tiny_sd3(root / "tiny-sd3")
    run = root / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(model), "--output_dir", str(run),
               "--max_train_steps", "1", "--rank", "4", "--checkpointing_steps", "1", *FAST])
    assert rc == 0 and (run / "checkpoint-1" / "flowrl_state.json").is_file()
    return model, run


def _resume(model: Path, out: Path, checkpoint: Path, *extra: str) -> int:
    return main(["train", "--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
                 "--max_train_steps", "2", "--resume_from_checkpoint", str(checkpoint), *FAST, *extra])


def test_resume_with_other_rank_is_a_clear_error(trained, tmp_path, capsys):
    model, run = trained
    capsys.readouterr()
    ck = run / "checkpoint-1"
    rc = _resume(model, tmp_path / "out", ck, "--rank", "8")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(ck) in err and "rank=4" in err and "rank=8" in err
    assert not (tmp_path / "out").exists()


def test_resume_from_corrupt_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    model, run = trained
    ck = tmp_path / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", ck)
    (ck / "trainable.safetensors").unlink()
    capsys.readouterr()
    rc = _resume(model, tmp_path / "out", ck, "--rank", "4")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "trainable.safetensors" in err and str(ck) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_with_mismatched_weights_reports_the_load_hook_error(trained, tmp_path, capsys):
    """Settings match, weights do not (keys renamed): the trainer's load hook raises ValueError -> exit 2."""
    from safetensors.torch import load_file, save_file

    model, run = trained
    ck = tmp_path / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", ck)
    sd = load_file(str(ck / "trainable.safetensors"))
    save_file({k.replace("lora_A", "lora_X"): v for k, v in sd.items()}, str(ck / "trainable.safetensors"))
    capsys.readouterr()
    rc = _resume(model, tmp_path / "out", ck, "--rank", "4")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(ck) in err and "does not match" in err
    assert not (tmp_path / "out").exists()


def test_errors_during_training_are_not_swallowed(trained, tmp_path, monkeypatch):
    from flowrl.trainer import Trainer

    model, _ = trained

    def boom(self, batch):
        raise ValueError("boom in update")

    monkeypatch.setattr(Trainer, "update", boom)
    with pytest.raises(ValueError, match="boom in update"):
        main(["train", "--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "out"),
              "--max_train_steps", "1", "--rank", "4", *FAST])


def test_full_finetune_of_a_large_transformer_is_refused_before_loading(tmp_path, monkeypatch):
    """rank 0 (the CPU default's full fine-tuning) pointed at a > 1B-parameter transformer stops before any weight is
    read, naming the size and the two ways on; the parameter count comes from the safetensors headers alone."""
    import flowrl.policies
    from flowrl.policies.base import transformer_num_params
    from flowrl.trainer import Trainer
    from tests.helpers import save_tiny_sd3

    model = save_tiny_sd3(tmp_path / "m")
    from diffusers import SD3Transformer2DModel

    n_real = sum(v.numel() for v in SD3Transformer2DModel.from_pretrained(model / "transformer").state_dict().values())
    assert transformer_num_params(model) == n_real
    # a header declaring a 40000 x 40000 weight (1.6B parameters); no data behind it: it must never be loaded
    header = json.dumps({"huge.weight": {"dtype": "F32", "shape": [40000, 40000], "data_offsets": [0, 0]}}).encode()
    (model / "transformer" / "zz-huge.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert transformer_num_params(model) == n_real + 40000 * 40000
    cfg = build_config(["--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "o"),
                        "--report_to", "none"])

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(flowrl.policies, "load_policy", no_loading)
    with pytest.raises(ConfigError, match=r"1\.60B parameters: pass --rank 32 .*--allow_large_full_finetune true"):
        Trainer(cfg).setup()
    # explicitly allowed (or LoRA): the check lets it through to loading
    for flags in (["--allow_large_full_finetune", "true"], ["--rank", "32"]):
        cfg = build_config(["--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "o"),
                            "--report_to", "none", *flags])
        with pytest.raises(AssertionError, match="weights were loaded"):
            Trainer(cfg).setup()
