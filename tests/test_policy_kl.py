"""The measured size of an update (``--kl_probe_rows``, ``train/policy_kl``) and the KL-adaptive learning rate
(``--target_kl``): hand-computed rule, exactness of the probe, its scaling with the step, and resume exactness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.cli import build_config
from flowrl.config import ConfigError
from flowrl.objectives import adaptive_lr_scale
from flowrl.trainer import Trainer
from tests.helpers import save_tiny_sd3, train_interrupted_then_resumed

FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--clip_range", "0.2", "--rank", "4",
    "--eval_steps", "0", "--checkpointing_steps", "0", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
    "--reward", "random",  # tied scores on a random-weight model would give zero advantages and no update
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scale, kl, expected", [
    (1.0, 3.0, 1 / 1.5),      # kl > 2 target: smaller steps
    (1.0, 0.4, 1.5),          # kl < target / 2: larger steps
    (1.0, 1.0, 1.0),          # in the band: kept
    (1.0, 2.0, 1.0),          # the band's edges are inside it
    (1.0, 0.5, 1.0),
    (9.0, 0.0, 10.0),         # clamped to max_scale
    (0.11, 10.0, 0.1),        # and to 1 / max_scale
    (2.0, float("nan"), 2.0),  # no measurement: kept
])
def test_adaptive_lr_scale_rule(scale, kl, expected):
    assert adaptive_lr_scale(scale, kl, 1.0, max_scale=10.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kwargs", [dict(target_kl=0.0), dict(target_kl=1.0, factor=1.0),
                                    dict(target_kl=1.0, max_scale=0.5)])
def test_adaptive_lr_scale_rejects_bad_arguments(kwargs):
    target = kwargs.pop("target_kl")
    with pytest.raises(ValueError, match="target_kl"):
        adaptive_lr_scale(1.0, 0.1, target, **kwargs)


def _trainer(model: Path, out: Path, *extra: str) -> Trainer:
    tr = Trainer(build_config(["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), *FAST,
                               "--kl_probe_rows", "4", *extra]))
    tr.setup()
    return tr


def test_probe_is_zero_on_policy_and_grows_as_the_square_of_the_step(tiny_model, tmp_path):
    """Before the update the probe compares the sampling policy with itself: exactly 0 (the stored means are
    reproduced bit for bit, as the ratio is). One Adam step from a fresh optimizer moves every parameter by +-lr
    whatever the gradient's size, so for small steps the mean moves in proportion to lr and the KL as lr²."""
    kls = []
    for lr in ("1e-4", "2e-4"):
        tr = _trainer(tiny_model, tmp_path / lr, "--learning_rate", lr, "--adam_weight_decay", "0")
        batch, _ = tr.sample_and_score(1)
        before = tr.policy_kl(batch)
        # steps 0-1 of 3 are trained; the policy is still the base, so its drift is 0 too
        assert set(before) == {"policy_kl", "policy_kl/step0", "policy_kl/step1", "policy_ref_kl"}
        assert all(v == 0.0 for v in before.values())
        stats = tr.update(batch)
        after = tr.policy_kl(batch)
        assert stats["policy_kl"] == after["policy_kl"] > 0
        assert after["policy_kl"] == pytest.approx((after["policy_kl/step0"] + after["policy_kl/step1"]) / 2)
        assert after["policy_ref_kl"] == pytest.approx(after["policy_kl"], rel=1e-9)  # one step from the base
        kls.append(stats["policy_kl"])
    assert kls[1] / kls[0] == pytest.approx(4.0, rel=0.02)


def test_full_finetune_probe_measures_the_drift_from_a_frozen_copy(tiny_model, tmp_path):
    """A full fine-tune has no adapter to disable: the probe keeps a frozen copy of the base. The drift grows over
    steps while each step's own KL is measured against the weights that sampled it."""
    tr = _trainer(tiny_model, tmp_path, "--rank", "0", "--learning_rate", "1e-3")
    stats = []
    for step in (1, 2, 3):
        batch, _ = tr.sample_and_score(step)
        if step == 1:
            assert tr.policy_kl(batch)["policy_ref_kl"] == 0.0
        stats.append(tr.update(batch))
    assert stats[0]["policy_ref_kl"] == pytest.approx(stats[0]["policy_kl"], rel=1e-9)
    assert stats[2]["policy_ref_kl"] > stats[2]["policy_kl"] > 0


def test_probe_does_not_change_training_and_target_kl_steers_the_learning_rate(tiny_model, tmp_path):
    """The probe is a no-grad forward: with it on, a run trains exactly as without. With a target far below the
    measured KL the multiplier falls by 1.5 per step, and the logged (and applied) learning rate with it."""
    base = ["--pretrained_model_name_or_path", str(tiny_model), *FAST, "--max_train_steps", "3",
            "--learning_rate", "1e-2"]
    Trainer(build_config(["--output_dir", str(tmp_path / "off"), *base])).train()
    Trainer(build_config(["--output_dir", str(tmp_path / "on"), *base, "--kl_probe_rows", "3"])).train()
    off, on = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("off", "on"))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    m_on = _metrics(tmp_path / "on")
    assert all(r["train/policy_kl"] > 0 for r in m_on)
    assert all("train/policy_kl" not in r for r in _metrics(tmp_path / "off"))

    tr = Trainer(build_config(["--output_dir", str(tmp_path / "adapt"), *base, "--kl_probe_rows", "3",
                               "--target_kl", "1e-12"]))
    tr.train()
    recs = _metrics(tmp_path / "adapt")
    assert [r["train/lr_scale"] for r in recs] == pytest.approx([1 / 1.5, 1 / 1.5**2, 1 / 1.5**3], rel=1e-12)
    assert [r["train/lr"] for r in recs] == pytest.approx([1e-2 / 1.5, 1e-2 / 1.5**2, 1e-2 / 1.5**3], rel=1e-12)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 1.5**3, rel=1e-12)
    # the first step is the same update as without the rule; the smaller later steps end elsewhere
    assert recs[0]["train/policy_kl"] == m_on[0]["train/policy_kl"]
    adapt = load_file(str(tmp_path / "adapt" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(adapt[k], on[k]) for k in on)


def test_resume_with_target_kl_is_exact(tiny_model, tmp_path, monkeypatch):
    """The multiplier is part of the checkpoint: a run stopped after checkpoint-2 and resumed ends with the same
    weights and multipliers as an uninterrupted one."""
    args = ["--pretrained_model_name_or_path", str(tiny_model), *FAST, "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--learning_rate", "1e-2", "--kl_probe_rows", "2", "--target_kl", "1e-5"]
    Trainer(build_config(["--output_dir", str(tmp_path / "a"), *args])).train()
    train_interrupted_then_resumed(monkeypatch, ["--output_dir", str(tmp_path / "b"), *args], stop_after_step=2)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ra, rb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    # two steps above 2 x target lower the multiplier, then the measured KL lies in the band and it is kept; a
    # resume that forgot it would restart from 1 and keep that
    assert [r["train/lr_scale"] for r in ra] == pytest.approx([1 / 1.5, 1 / 1.5**2, 1 / 1.5**2, 1 / 1.5**2])
    assert [r["train/lr_scale"] for r in rb] == [r["train/lr_scale"] for r in ra]


@pytest.mark.parametrize("flags, message", [
    (["--kl_probe_rows", "-1"], "kl_probe_rows must be >= 0"),
    (["--target_kl", "0.001"], "set kl_probe_rows > 0"),
    (["--kl_probe_rows", "4", "--target_kl", "0"], "target_kl must be > 0"),
    (["--kl_probe_rows", "4", "--target_kl", "0.001", "--max_lr_scale", "0.5"], "max_lr_scale must be >= 1"),
    (["--kl_probe_rows", "4", "--objective", "nft"], "objective='nft'"),
    (["--kl_probe_rows", "4", "--algorithm", "tempflow_grpo"], "plan='tempflow'"),
])
def test_invalid_settings_are_clear_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(["--output_dir", "/nonexistent/never-written", *flags])
