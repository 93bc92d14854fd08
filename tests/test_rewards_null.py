"""``random``: the null-control reward (uniform noise keyed by the image), and the weight-0 pairing that keeps the
real reward logged and evaluated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.advantages import group_advantages, multi_reward_advantages
from flowrl.cli import main
from rewards import available_rewards, get_reward
from rewards.null import random_scores
from tests.helpers import save_tiny_sd3
from tests.test_multi_reward import FAST


def test_score_is_the_documented_hash():
    img = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels = (img * 255).round().clamp(0, 255).to(torch.uint8)[0].numpy()
    h = hashlib.blake2b(digest_size=8, key=b"3")
    h.update(b"a red circle")
    h.update(pixels.tobytes())
    expected = int.from_bytes(h.digest(), "little") / 2.0**64
    assert float(random_scores(img, ["a red circle"], seed=3)[0]) == pytest.approx(expected, rel=1e-6)


def test_deterministic_and_keyed_by_pixels_prompt_and_seed():
    reward = get_reward("random")
    assert "random" in available_rewards() and reward.name == "random"
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    s = reward.score(x, ["p"] * 6)
    torch.testing.assert_close(s, reward.score(x.clone(), ["p"] * 6))
    assert s.dtype == torch.float32 and s.shape == (6,)
    y = x.clone()
    y[0, 0, 0, 0] = (torch.round(y[0, 0, 0, 0] * 255) + (1 if y[0, 0, 0, 0] < 0.5 else -1)) / 255  # one level
    changed = reward.score(y, ["p"] * 6)
    assert changed[0] != s[0] and torch.equal(changed[1:], s[1:])
    assert not torch.equal(reward.score(x, ["q"] * 6), s)
    assert not torch.equal(get_reward("random", seed=1).score(x, ["p"] * 6), s)


def test_scores_are_uniform_and_carry_no_image_information():
    x = torch.rand(2000, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    s = random_scores(x, ["p"] * 2000).numpy()
    assert s.min() >= 0 and s.max() < 1
    counts, _ = np.histogram(s, bins=10, range=(0, 1))
    assert counts.min() > 150 and counts.max() < 250  # 200 expected per bin; a 4.5-sigma band
    brightness = x.mean(dim=(1, 2, 3)).numpy()
    assert abs(np.corrcoef(s, brightness)[0, 1]) < 0.1


def test_rejects_mismatched_prompts():
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        random_scores(torch.rand(3, 3, 2, 2), ["a", "b"])


def test_weight_zero_reward_does_not_enter_the_advantages():
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    rnd, scenes = torch.rand(6), torch.rand(6)
    out = multi_reward_advantages({"random": rnd, "scenes": scenes}, {"random": 1.0, "scenes": 0.0}, g)
    torch.testing.assert_close(out.advantages, group_advantages(rnd, g).advantages)


def test_null_control_run_logs_the_real_reward_at_weight_zero(tmp_path: Path):
    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
               "--max_train_steps", "1", "--reward", "random", "--reward", "scenes:0", *FAST])
    assert rc == 0
    (rec,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= rec["reward/random/mean"] < 1 and 0 <= rec["reward/scenes/mean"] <= 1
    assert rec["reward/mean"] == pytest.approx(rec["reward/random/mean"], rel=1e-5)
