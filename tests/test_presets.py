"""Algorithm presets end to end on the tiny SD3 pipeline: every preset trains through the CLI, NFE accounting per
iteration, the window schedule's iteration after resume, and the plan-config validation messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl.cli import build_config, main
from flowrl.config import ConfigError
from flowrl.presets import PRESETS, get_preset
from flowrl.trainer import make_plan
from tests.helpers import save_tiny_sd3

T = 6
SAMPLES = 4  # prompts_per_step x group_size
TINY = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", str(T),
    "--report_to", "none", "--eval_steps", "0", "--learning_rate", "1e-2", "--clip_range", "0.2", "--rank", "4",
    "--checkpointing_steps", "0",
]

# (per-trajectory NFE at iteration 0, trained steps) at T = 6 with each preset's own settings
EXPECTED = {
    "flow_grpo": (6, 5),  # all SDE, int(0.9 * 6) = 5 trained
    "flow_grpo_fast": (6, 4),  # window [0, 4), Euler outside
    "flow_grpo_cps": (6, 5),
    "mixgrpo": (6, 4),  # window [0, 4) at iteration 0, Euler tail
    "mixgrpo_flash": (5, 4),  # tail m = 2 -> max(int(0.8), 1) = 1 DPM-Solver++ step
    "mixgrpo_flash_star": (5, 4),  # m = 2 -> max(int(0.4), 1) = 1
    "dance_grpo": (6, 3),  # int(0.6 * 6) = 3 trained
    "grpo_guard": (6, 2),  # objective only: the default plan (full SDE, int(0.4 * 6) = 2 trained)
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")  # guidance 2.0: CFG doubles the NFE


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_preset_is_tested():
    from tests.test_branching import BRANCHING_PRESETS  # trained end to end in tests/test_branching.py

    assert set(EXPECTED) | set(BRANCHING_PRESETS) | {"diffusion_nft"} == set(PRESETS)  # nft: tests/test_nft_train.py


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_trains_through_the_cli_with_exact_nfe(name, tiny_model, tmp_path):
    out = tmp_path / name
    extra = ["--num_inner_epochs", "2", "--beta", "0.01"] if name == "dance_grpo" else []  # x2 epochs, x2 KL
    rc = main(["train", "--algorithm", name, "--pretrained_model_name_or_path", str(tiny_model), "--output_dir",
               str(out), "--max_train_steps", "1", *TINY, *extra])
    assert rc == 0
    (rec,) = _metrics(out)
    nfe, trained = EXPECTED[name]
    cfg = build_config(["--algorithm", name, *TINY])
    plan = make_plan(cfg)([1 - i / T for i in range(T)] + [0.0], 0)  # counts do not depend on sigma values
    assert (plan.nfe, plan.num_train_steps) == (nfe, trained)
    assert rec["nfe/sampling"] == nfe * SAMPLES * 2  # x2: CFG in sampling
    mult = 2 * 2 if name == "dance_grpo" else 1  # inner epochs, KL reference pass
    assert rec["nfe/training"] == trained * SAMPLES * 2 * mult  # x2: CFG in training
    assert sorted(int(k.rsplit("step", 1)[1]) for k in rec if k.startswith("train/ratio_mean/step")) == plan.train_indices
    if name not in ("dance_grpo", "grpo_guard"):  # one epoch, one update: exactly on-policy (grpo_guard: tests/test_guard.py)
        assert rec["train/ratio_min"] == 1.0 == rec["train/ratio_max"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_presets_compose_with_objective_options_and_flags():
    cfg = build_config(["--algorithm", "mixgrpo_flash", "--clip_range_high", "0.3", "--beta", "0.04",
                        "--window_tau", "25", "--num_inference_steps", "25"])
    p = cfg.plan
    assert (p.plan, p.window_schedule, p.window_tau, p.ode_solver, p.flash_ratio) == ("window", "progressive", 25,
                                                                                      "dpm2m", 0.4)
    assert cfg.grpo.clip_range_high == 0.3 and cfg.grpo.beta == 0.04 and cfg.sampling.same_noise_per_group
    star = build_config(["--algorithm", "mixgrpo_flash_star"]).plan
    assert (star.window_schedule, star.window_start, star.window_size, star.flash_ratio) == ("fixed", 0, 4, 0.2)
    dance = build_config(["--algorithm", "dance_grpo", "--plan", "window", "--window_size", "2"]).plan
    assert make_plan(build_config(["--algorithm", "dance_grpo", "--plan", "window", "--window_size", "2"])).kind == "dance"
    assert dance.step_kind == "dance" and dance.noise_level == 0.3
    get_preset("mixgrpo")["plan"]["window_tau"] = 1  # a copy: the registry is not modified
    assert PRESETS["mixgrpo"]["plan"]["window_tau"] == 10


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--flash_ratio", "0"], "flash_ratio must be in"),
        (["--flash_ratio", "1.5"], "flash_ratio must be in"),
        (["--ode_solver", "dpm2m", "--ode_after_train", "false"], "ode_after_train"),
        (["--ode_solver", "rk4"], "ode_solver"),
        (["--plan", "window", "--window_tau", "0"], "window_tau must be >= 1"),
        (["--plan", "window", "--window_shift", "0"], "window_shift must be >= 1"),
        (["--step_kind", "cps", "--noise_level", "1.2"], "CPS eta"),
        (["--algorithm", "mixgrpo", "--num_inference_steps", "3"], "window_size must be in"),
    ],
)
def test_plan_config_validation(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(flags)
    assert build_config(["--ode_solver", "dpm2m", "--ode_after_train", "true", "--flash_ratio", "0.5"])


def test_window_schedule_resumes_at_the_right_iteration(tiny_model, tmp_path):
    """Window l = iteration (tau 1, shift 1, w 2): steps 3 and 4 after a resume from checkpoint-2 train [2, 4), [3, 5)."""
    out = tmp_path / "run"
    args = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out), "--plan", "window",
            "--window_schedule", "progressive", "--window_tau", "1", "--window_size", "2", *TINY]
    assert main([*args, "--max_train_steps", "2"]) == 0
    assert main([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        trained = sorted(int(k.rsplit("step", 1)[1]) for k in r if k.startswith("train/ratio_mean/step"))
        l = r["step"] - 1  # iteration = step - 1
        assert trained == [l, l + 1], (r["step"], trained)
