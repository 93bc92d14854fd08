"""The text trainer under two processes (accelerate launch, CPU/gloo) trains exactly like one process with the same
global batch: 2 x P prompts and 1 x 2P prompts draw the same problems, and each micro-batch of completions samples
with a generator seeded by (seed, step, round, global index of its first completion), so both sample the same
completions; LoRA runs through the bare peft model (reference = adapter disabled, peft export), the gradients are
averaged over processes once per update, and the learning-rate schedule steps once per update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, launch_train, run_train

CONFIG = str(ROOT / "configs" / "text" / "arithmetic_tiny.yaml")
# 8 completions per process in micro-batches of 4 (16 in 4 on one process), one optimizer update per step
ARGS = ["--config", CONFIG, "--sft_warmup_steps", "20", "--eval_steps", "0", "--group_size", "4",
        "--sample_batch_size", "4", "--report_to", "none", "--checkpointing_steps", "0", "--max_train_steps", "3",
        "--rank", "4", "--beta", "0.01", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--learning_rate", "1e-2", "--collective_timeout_s", "240"]


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_completions_follow_their_global_index_not_the_process_layout():
    """The sampling of TextTrainer.generate, in process: rows [0, 8) on rank 0 and [8, 16) on rank 1 of 2 processes
    get exactly the completions that one process sampling all 16 rows gives them."""
    import types

    import torch

    from flowrl.cli import build_config
    from flowrl.policies.text import TextPolicy, build_char_tokenizer, build_tiny_lm
    from flowrl.text_trainer import TextTrainer, task_problems

    cfg = build_config(["--config", CONFIG, "--sample_batch_size", "4", "--max_new_tokens", "6"])
    tok = build_char_tokenizer()
    policy = TextPolicy(build_tiny_lm(tok, seed=0), tok)  # untrained: every completion is random
    problems = task_problems(cfg, "train")[:4]
    rows = [p for p in problems for _ in range(4)]

    def generate(rank: int, rows: list, step: int = 3):
        trainer = types.SimpleNamespace(cfg=cfg, policy=policy, rank=rank, device=torch.device("cpu"))
        return TextTrainer.generate(trainer, rows, step, 0).completions

    one = generate(0, rows)
    assert generate(0, rows[:8]) + generate(1, rows[8:]) == one
    assert len(set(one)) > 4  # sampled, not constant
    assert generate(0, rows, step=4) != one  # and different at another step


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_train([*ARGS, "--prompts_per_step", "4", "--output_dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = launch_train(2, [*ARGS, "--prompts_per_step", "2", "--output_dir", str(two)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _records(one), _records(two)
    assert [r["step"] for r in b] == [1, 2, 3]  # only the main process logs
    assert [r["train/optimizer_updates"] for r in a] == [r["train/optimizer_updates"] for r in b] == [1, 1, 1]
    # the schedule advances once per update (accelerate would step it num_processes times otherwise)
    assert [r["train/lr"] for r in b] == pytest.approx([r["train/lr"] for r in a], rel=1e-12)
    assert all("train/kl" in r for r in b)  # the reference (adapter disabled) ran on the bare peft model
    assert (two / "final" / "adapter_config.json").is_file()  # peft export of the bare model

    la = load_file(str(one / "final" / "adapter_model.safetensors"))
    lb = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert la.keys() == lb.keys() and la
    assert max(float(v.abs().max()) for k, v in la.items() if "lora_B" in k) > 1e-4  # training moved the LoRA
    diff = max(float((la[k] - lb[k]).abs().max()) for k in la)
    print(f"max |dLoRA| text, 1 vs 2 processes: {diff:.3g}")
    assert diff <= 1e-5, f"max |dLoRA| between 1 and 2 processes: {diff}"
