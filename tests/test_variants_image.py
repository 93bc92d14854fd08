"""Modality-agnostic LLM variants on image groups: NGRPO's advantages selected by ``grpo.advantage_variant`` for the
image trainer (shared code in flowrl.advantages), by hand and through ``flowrl train`` on the embedded default."""

from __future__ import annotations

import json
import math

import pytest
import torch

import flowrl.advantages as adv_mod
from flowrl.advantages import clip_advantages, variant_advantages
from flowrl.cli import build_config, main
from flowrl.config import ConfigError

SHORT = ["--max_train_steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2",
         "--num_inference_steps", "3", "--eval_steps", "0", "--checkpointing_steps", "0", "--report_to", "none"]


def test_ngrpo_on_image_rewards_by_hand():
    # scenes-like rewards in [0, 1], r_max = 1. Group 0 [0.5, 0.5]: plain GRPO gives 0; NGRPO adds the virtual 1:
    # mu 2/3, var = (2·(1/6)² + (1/3)²)/3 = 1/18 -> A = (-1/6)·sqrt(18) = -1/sqrt(2) each. Group 1 [1, 1]: all at
    # r_max -> 0 (zero_std).
    r = {"scenes": torch.tensor([0.5, 0.5, 1.0, 1.0])}
    g = torch.tensor([0, 0, 1, 1])
    out = variant_advantages("ngrpo", r, {"scenes": 1.0}, g, eps=0.0)
    a = -1 / math.sqrt(2)
    torch.testing.assert_close(out.advantages, torch.tensor([a, a, 0.0, 0.0]))
    assert out.zero_std.tolist() == [False, False, True, True]
    assert variant_advantages("group", r, {"scenes": 1.0}, g).advantages.abs().sum() == 0
    # the weight scales the reward before the virtual sample joins (r_max is in weighted units)
    out2 = variant_advantages("ngrpo", {"scenes": torch.tensor([0.25, 0.25])}, {"scenes": 2.0},
                              torch.tensor([0, 0]), eps=0.0)
    torch.testing.assert_close(out2.advantages, torch.full((2,), a))


def test_advantage_variant_config():
    assert build_config([]).grpo.advantage_variant == "group"
    assert build_config(["--advantage_variant", "ngrpo", "--ngrpo_r_max", "2"]).grpo.ngrpo_r_max == 2.0
    with pytest.raises(ConfigError, match="expected one of 'group', 'ngrpo'"):
        build_config(["--advantage_variant", "ngrpo2"])
    assert build_config(["--algorithm", "ngrpo"]).grpo.advantage_variant == "ngrpo"


def test_ngrpo_trains_the_embedded_default_through_the_cli(tmp_path, monkeypatch):
    """Two steps of the embedded tiny SD3 with ``--algorithm ngrpo``: the image trainer's advantages are NGRPO's
    (spied in flowrl.advantages, where both trainers dispatch) and the logged |A| is theirs."""
    outputs = []
    real = adv_mod.ngrpo_advantages

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(adv_mod, "ngrpo_advantages", spy)
    out_dir = tmp_path / "run"
    assert main(["train", "--algorithm", "ngrpo", *SHORT, "--output_dir", str(out_dir)]) == 0
    assert len(outputs) == 2  # one advantage computation per step
    recs = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for rec, o in zip(recs, outputs):
        assert rec["train/adv_abs_mean"] == pytest.approx(float(clip_advantages(o.advantages, 5.0).abs().mean()))
        assert rec["train/ratio_min"] == 1.0 == rec["train/ratio_max"]  # first pass on-policy
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
