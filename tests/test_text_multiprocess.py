"""The text trainer under two processes (accelerate launch, CPU/gloo): LoRA through the bare peft model (reference =
adapter disabled, peft export), one learning-rate step per optimizer update as in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "text" / "arithmetic_tiny.yaml")
TIMEOUT_S = 300
ARGS = ["--config", CONFIG, "--sft_warmup_steps", "20", "--eval_steps", "0", "--prompts_per_step", "2",
        "--group_size", "4", "--sample_batch_size", "4", "--report_to", "none", "--checkpointing_steps", "0",
        "--max_train_steps", "3", "--rank", "4", "--beta", "0.01", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--gradient_accumulation_steps", "1", "--collective_timeout_s", "240"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_two_processes_lora_export_and_one_lr_step_per_update(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", *ARGS, "--output_dir", str(one)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r1.returncode == 0, r1.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "flowrl.cli", "train", *ARGS, "--output_dir", str(two)]
    r2 = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _records(one), _records(two)
    # 8 completions per process / sample_batch_size 4, one update per micro-batch: 2 updates per step in both runs;
    # the schedule must advance once per update (accelerate would step it num_processes times otherwise)
    assert [r["train/optimizer_updates"] for r in b] == [2, 2, 2]
    assert [r["train/lr"] for r in b] == pytest.approx([r["train/lr"] for r in a], rel=1e-12)
    assert all("train/kl" in r for r in b)  # the reference (adapter disabled) ran on the bare peft model
    assert (two / "final" / "adapter_config.json").is_file()  # peft export of the bare model
