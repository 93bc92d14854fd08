"""flowrl pretrain: continuing from a saved pipeline (--pretrained_model_name_or_path) starts from its weights and keeps
its architecture; a path that holds no SD3 pipeline is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flowrl.embedded import MAX_SEQUENCE_LENGTH, TinySD3Config, build_pipeline, save_pipeline_atomic
from flowrl.pretrain import main

FAST = ["--max_train_steps", "2", "--dataset_size", "8", "--train_batch_size", "4", "--lr_warmup_steps", "1",
        "--checkpointing_steps", "100"]


def _save_small(path):
    """A small pipeline at the scenes' 32 px (the renderer needs room for four objects)."""
    cfg = TinySD3Config(resolution=32, patch_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                        text_hidden_size=16, text_layers=1, text_projection_dim=8)
    save_pipeline_atomic(build_pipeline(cfg, seed=0), path,
                         {"resolution": 32, "max_sequence_length": MAX_SEQUENCE_LENGTH, "num_inference_steps": 4})
    return path


def _weights(path):
    return load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_continues_from_the_given_pipeline_with_its_architecture(tmp_path):
    init = _save_small(tmp_path / "init")
    # --num_layers etc. name another architecture: the loaded pipeline's wins
    main([*FAST, "--pretrained_model_name_or_path", str(init), "--learning_rate", "0", "--num_layers", "3",
          "--output_dir", str(tmp_path / "same")])
    a, b = _weights(init), _weights(tmp_path / "same")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the EMA of the start
    arch = ("sample_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim")
    cfg = json.loads((tmp_path / "same" / "transformer" / "config.json").read_text())
    before = json.loads((init / "transformer" / "config.json").read_text())
    assert {k: cfg[k] for k in arch} == {k: before[k] for k in arch} and cfg["num_layers"] == 1
    assert json.loads((tmp_path / "same" / "flowrl_defaults.json").read_text())["resolution"] == cfg["sample_size"]

    main([*FAST, "--pretrained_model_name_or_path", str(init), "--learning_rate", "1e-3",
          "--output_dir", str(tmp_path / "moved")])
    c = _weights(tmp_path / "moved")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    delta = max(float((a[k] - c[k]).abs().max()) for k in a)
    assert delta < 0.05  # two small steps from the start, not a fresh random init


def test_a_path_without_an_sd3_pipeline_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"'.*empty' is not a directory holding a StableDiffusion3Pipeline"):
        main([*FAST, "--pretrained_model_name_or_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arg,message", [
    ("--max_train_steps=0", "--max_train_steps 0: must be >= 1"),
    ("--train_batch_size=-4", "--train_batch_size -4: must be >= 1"),
    ("--dataset_size=0", "--dataset_size 0: must be >= 1"),
    ("--checkpointing_steps=0", "--checkpointing_steps 0: must be >= 1"),
    ("--lr_warmup_steps=-1", "--lr_warmup_steps -1: must be >= 0"),
    ("--learning_rate=-1e-3", "--learning_rate -0.001: must be >= 0"),
    ("--learning_rate=nan", "--learning_rate nan: must be >= 0"),
    ("--p_uncond=1.5", "--p_uncond 1.5: must be in [0, 1]"),
    ("--ema_decay=1", "--ema_decay 1.0: must be in [0, 1)"),
    ("--device=toaster", "--device 'toaster': not a torch device; use cpu, cuda, cuda:N or mps"),
    ("--device=meta", "--device 'meta': use cpu, cuda, cuda:N or mps"),
])
def test_bad_flags_stop_before_any_work_naming_the_value(tmp_path, arg, message):
    with pytest.raises(SystemExit) as e:
        main([*FAST, arg, "--output_dir", str(tmp_path / "o")])
    assert str(e.value) == f"flowrl pretrain: error: {message}"
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--device 'cuda:1': CUDA is not available on this machine; use cpu"):
        main([*FAST, "--device", "cuda:1", "--output_dir", str(tmp_path / "o")])


def test_device_flag_trains_the_same_weights(tmp_path):
    """``--device cpu`` is the default spelled out: the weights match bit for bit. On a machine with CUDA the same
    draws (all from the CPU generator) train on the GPU, and the weights agree up to float rounding."""
    init = _save_small(tmp_path / "init")
    common = [*FAST, "--pretrained_model_name_or_path", str(init), "--learning_rate", "1e-3"]
    main([*common, "--output_dir", str(tmp_path / "default")])
    main([*common, "--device", "cpu", "--output_dir", str(tmp_path / "cpu")])
    a, b, start = _weights(tmp_path / "default"), _weights(tmp_path / "cpu"), _weights(init)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    if torch.cuda.is_available():
        main([*common, "--device", "cuda", "--output_dir", str(tmp_path / "cuda")])
        c = _weights(tmp_path / "cuda")
        assert all(c[k].device.type == "cpu" for k in c)
        assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-3
