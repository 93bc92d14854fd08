"""``objective: nft`` (DiffusionNFT) in the image trainer, on a tiny random SD3 pipeline: it trains and logs, resumes
exactly, keeps the sampling policy's velocities once the weights move within a step, seeds its forward-process points
per sample, and rejects options that only the clipped surrogate has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flowrl.trainer as trainer_mod
from flowrl.cli import build_config, main
from flowrl.config import ConfigError
from flowrl.trainer import Trainer
from tests.helpers import train_interrupted_then_resumed, save_tiny_sd3

FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--learning_rate", "1e-2", "--rank", "4",
    "--objective", "nft", "--nft_timesteps", "2", "--eval_steps", "0",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_nft_trains_logs_and_resumes_exactly(tiny_model, tmp_path, monkeypatch):
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--max_train_steps", "4", "--checkpointing_steps", "2",
            *FAST]
    Trainer(build_config(["--output_dir", str(tmp_path / "a"), *args])).train()
    recs = _metrics(tmp_path / "a")
    for r in recs:
        assert {"train/loss", "train/nft_pos_loss", "train/nft_neg_loss", "train/nft_r_mean"} <= r.keys()
        assert "train/ratio_mean" not in r  # no likelihood ratio in this objective
        # 4 samples x 2 forward-process points x 2 (CFG), one pass: v_old is v.detach() (one update per step)
        assert r["nfe/training"] == 16
    assert any(r["train/grad_norm"] > 0 for r in recs)

    train_interrupted_then_resumed(monkeypatch, ["--output_dir", str(tmp_path / "b"), *args], stop_after_step=2)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_nft_keeps_sampling_velocities_when_weights_move_within_a_step(tiny_model, tmp_path, monkeypatch):
    """Two inner epochs: v_old is computed before any update, so it equals v on the first pass of the first
    micro-batch and differs from it on the second epoch (the weights moved)."""
    gaps = []
    real = trainer_mod.nft_loss

    def spy(v, v_old, *a, **k):
        gaps.append(float((v.detach() - v_old).abs().max()))
        return real(v, v_old, *a, **k)

    monkeypatch.setattr(trainer_mod, "nft_loss", spy)
    out = tmp_path / "run"
    t = Trainer(build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
                              "--max_train_steps", "1", "--num_inner_epochs", "2", "--lr_warmup_steps", "0", *FAST,
                              "--reward", "random"]))  # never a zero-std group: the first update moves the weights
    t.train()
    assert t.nft_needs_old
    # calls: epoch 1 (micro-batch 0: points 0, 1; micro-batch 1: points 0, 1), then epoch 2 the same
    assert len(gaps) == 8
    assert gaps[0] == 0.0 and gaps[1] == 0.0  # nothing has moved before the first micro-batch's update
    assert max(gaps[4:]) > 0  # the second epoch sees moved weights against the stored v_old
    # 4 samples x 2 points x 2 (CFG) x (2 epochs + the up-front v_old pass)
    assert _metrics(out)[0]["nfe/training"] == 48


def test_nft_points_depend_on_sample_id_not_on_batch_layout(tiny_model, tmp_path):
    t = Trainer(build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "r"),
                              "--max_train_steps", "1", *FAST]))
    t.setup()
    t.step = 3
    x0 = torch.randn(4, *t.latent_shape)
    whole = t.nft_points(x0, torch.tensor([0, 1, 2, 3]))
    part = t.nft_points(x0[2:], torch.tensor([2, 3]))
    for (t_w, xt_w, _), (t_p, xt_p, _) in zip(whole, part):
        torch.testing.assert_close(t_w[2:], t_p, rtol=0, atol=0)
        torch.testing.assert_close(xt_w[2:], xt_p, rtol=0, atol=0)
        assert bool(((t_w >= 0) & (t_w <= 1)).all()) and len(set(t_w.tolist())) == 4
    t.step = 4  # another iteration draws other points
    assert not torch.equal(t.nft_points(x0, torch.tensor([0, 1, 2, 3]))[0][1], whole[0][1])


@pytest.mark.parametrize("flags, match", [
    (["--ratio_norm", "true"], "ratio_norm acts on the clipped surrogate"),
    (["--frozen_uncond", "true"], "frozen_uncond acts on the clipped surrogate"),
    (["--plan", "tree"], "objective='nft' is implemented for the linear plans"),
    (["--nft_t_min", "0.5", "--nft_t_max", "0.5"], "need 0 <= nft_t_min < nft_t_max <= 1"),
    (["--nft_beta", "0"], "nft_beta must be > 0, got 0"),
])
def test_nft_rejects_options_it_does_not_have(tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match):
        build_config(["--output_dir", str(tmp_path / "x"), "--objective", "nft", *flags])


def test_diffusion_nft_preset_trains_through_the_cli(tiny_model, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--algorithm", "diffusion_nft", "--pretrained_model_name_or_path", str(tiny_model),
               "--output_dir", str(out), "--max_train_steps", "1", "--prompts_per_step", "2", "--group_size", "2",
               "--sample_batch_size", "2", "--num_inference_steps", "3", "--report_to", "none", "--eval_steps", "0",
               "--rank", "4"])
    assert rc == 0
    (rec,) = _metrics(out)
    # CFG-free (guidance 1): one pass per velocity; 4 samples x 3 steps sampling, 4 samples x 4 points training
    assert rec["nfe/sampling"] == 12 and rec["nfe/training"] == 16
    assert (out / "pytorch_lora_weights.safetensors").is_file()
