"""End-to-end training on a tiny random SD3 pipeline: metrics, on-policy ratio, resume exactness, LoRA export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.cli import build_config, main
from flowrl.trainer import Trainer
from tests.helpers import train_interrupted_then_resumed, run_train, save_tiny_sd3

FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--learning_rate", "1e-2", "--clip_range", "0.2",
    "--rank", "4",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_cli_writes_metrics_lora_and_ratio_is_one(tiny_model, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
               "--max_train_steps", "2", "--eval_steps", "2", "--eval_images_per_prompt", "1",
               "--eval_sets", "scenes:eval", *FAST])
    assert rc == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [0, 1, 2]
    first = recs[1]
    for key in ("reward/scenes/mean", "train/loss", "train/ratio_mean", "train/clipfrac", "train/approx_kl",
                "train/zero_std_share", "time/sampling_s", "time/training_s", "nfe/sampling", "nfe/training"):
        assert key in first, key
    # the first pass over freshly sampled data is exactly on-policy
    assert first["train/ratio_min"] == 1.0 and first["train/ratio_max"] == 1.0
    assert "eval/reward/scenes" in recs[0] and "eval/reward/scenes" in recs[2]
    # NFE: 4 samples x 3 steps x 2 (CFG) sampling; 4 samples x 2 trained steps x 2 (CFG) training
    assert first["nfe/sampling"] == 24 and first["nfe/training"] == 16
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert list((out / "grids").glob("eval-step00000.png"))


def test_bf16_mixed_precision_stays_on_policy_and_exports_fp32_lora(tiny_model, tmp_path):
    """The GPU recipes' ``--mixed_precision bf16`` (autocast, here on the CPU): sampling and the first training pass
    run the same bf16 forwards, so the ratio is still exactly 1; the update is finite and nonzero, and the exported
    LoRA is fp32 (diffusers' loaders cast on load)."""
    out = tmp_path / "run"
    # its own process: accelerate's state is per process, and other tests in this one set mixed_precision "no"
    proc = run_train(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
                      "--max_train_steps", "2", "--eval_steps", "0", *FAST, "--group_size", "4",
                      "--sample_batch_size", "4", "--mixed_precision", "bf16", "--beta", "0.04"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = _metrics(out)
    for r in recs:
        assert r["train/ratio_min"] == 1.0 and r["train/ratio_max"] == 1.0
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"])
    assert any(r["train/grad_norm"] > 0 for r in recs)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())


def test_resume_is_exact(tiny_model, tmp_path, monkeypatch):
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--eval_steps", "0", "--lr_scheduler", "cosine", *FAST]
    Trainer(build_config(["--output_dir", str(tmp_path / "a"), *args])).train()
    train_interrupted_then_resumed(monkeypatch, ["--output_dir", str(tmp_path / "b"), *args], stop_after_step=2)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # training moved the LoRA
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4]


def test_lora_loads_into_stock_pipeline_and_reproduces_policy(tiny_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowrl.evaluate import generate
    from flowrl.seeding import gaussian

    out = tmp_path / "run"
    trainer = Trainer(build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
                                    "--max_train_steps", "2", "--eval_steps", "0", "--use_ema", "false", *FAST]))
    trainer.train()
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sd and all(k.startswith("transformer.") for k in sd)

    prompts = ["two red circles", "a blue square to the left of a green triangle"]
    ours, _, _ = generate(trainer.policy, prompts, num_steps=4, guidance_scale=2.0, resolution=16, seed=7)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.stack([gaussian((3, 16, 16), 7, i, 0) for i in range(2)])
    stock = pipe(prompts, num_inference_steps=4, guidance_scale=2.0, max_sequence_length=4, height=16, width=16,
                 latents=latents, output_type="pt").images
    torch.testing.assert_close(stock.float(), ours, rtol=0, atol=2e-4)
    # and the LoRA matters: without it the images differ
    pipe.unload_lora_weights()
    base = pipe(prompts, num_inference_steps=4, guidance_scale=2.0, max_sequence_length=4, height=16, width=16,
                latents=latents, output_type="pt").images
    assert float((base.float() - ours).abs().max()) > 1e-3


def test_background_reward_worker_matches_synchronous_scoring(tiny_model, tmp_path):
    """Scoring micro-batches in a worker thread while the next samples changes nothing but the wall-clock."""
    results = {}
    for worker in ("true", "false"):
        out = tmp_path / worker
        Trainer(build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
                              "--max_train_steps", "2", "--eval_steps", "0", "--reward_worker", worker, *FAST])).train()
        results[worker] = (_metrics(out), load_file(str(out / "pytorch_lora_weights.safetensors")))
    (m_async, w_async), (m_sync, w_sync) = results["true"], results["false"]
    for a, b in zip(m_async, m_sync):
        assert a["reward/scenes/mean"] == b["reward/scenes/mean"]
        assert a["train/loss"] == b["train/loss"]
    for k in w_async:
        torch.testing.assert_close(w_async[k], w_sync[k], rtol=0, atol=0)


def test_antithetic_noise_pairs_opposite_sde_noise_and_keeps_log_probs_exact(tiny_model, tmp_path):
    """--antithetic_noise: in every group, samples 2k and 2k+1 took eps and -eps at each SDE step (recovered from the
    rollout as (next - mean) / std), different pairs differ, and the stored log-probs are the Gaussian's own."""
    cfg = build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "a"),
                        "--prompts_per_step", "2", "--group_size", "4", "--sample_batch_size", "4",
                        "--num_inference_steps", "4", "--train_fraction", "0.5", "--rank", "4",
                        "--antithetic_noise", "true", "--report_to", "none", "--eval_steps", "0"])
    trainer = Trainer(cfg)
    trainer.setup()
    batch, _ = trainer.sample_and_score(1)
    for r, cond in zip(batch.rollouts, trainer._conds):
        eps = (r.next_latents - r.means) / r.stds.view(*r.stds.shape, *([1] * (r.means.dim() - 2)))
        torch.testing.assert_close(eps[0::2], -eps[1::2], atol=1e-4, rtol=1e-4)
        assert (eps[0] - eps[2]).abs().mean() > 0.5  # pairs are independent of each other
        # the log-prob of a Gaussian step depends on |eps| only: a pair's log-probs agree, and equal the formula
        torch.testing.assert_close(r.log_probs[0::2], r.log_probs[1::2], atol=1e-5, rtol=1e-5)
        std = r.stds.view(*r.stds.shape, *([1] * (r.means.dim() - 2)))
        by_hand = (-0.5 * eps**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(2).mean(-1)
        torch.testing.assert_close(r.log_probs, by_hand, atol=1e-4, rtol=1e-4)


def test_antithetic_noise_needs_an_even_group(tiny_model, tmp_path):
    from flowrl.config import ConfigError

    with pytest.raises(ConfigError, match="group_size must be even, got 3"):
        build_config(["--output_dir", str(tmp_path), "--group_size", "3", "--sample_batch_size", "3",
                      "--antithetic_noise", "true"])
