"""Shared builders for tests: a tiny random SD3 pipeline saved in diffusers format, and ``flowrl train`` in a
subprocess, alone or under ``accelerate launch`` (CPU, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from flowrl.embedded import MAX_SEQUENCE_LENGTH, TinySD3Config, build_pipeline, save_pipeline_atomic

TINY = TinySD3Config(
    resolution=16, patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16,
    text_layers=1, text_projection_dim=8,
)


def save_tiny_sd3(path: Path, guidance_scale: float = 2.0) -> Path:
    pipe = build_pipeline(TINY, seed=0)
    save_pipeline_atomic(
        pipe, path, {"resolution": TINY.resolution, "max_sequence_length": MAX_SEQUENCE_LENGTH,
                     "guidance_scale": guidance_scale, "num_inference_steps": 4},
    )
    return path


ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300  # a whole launch; a hung collective can never stall the suite past this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """The environment of a test's subprocess: one thread, offline, CPU accelerate, this checkout importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_train(args: list[str], timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m flowrl.cli train ARGS`` in one process."""
    cmd = [sys.executable, "-m", "flowrl.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def launch_train(nproc: int, args: list[str], timeout: float = LAUNCH_TIMEOUT_S, *, entry: list[str] | None = None,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N -m flowrl.cli train ARGS`` on CPU (gloo); ``entry`` replaces
    ``-m flowrl.cli`` (e.g. a runner script), ``env`` adds variables."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *(entry or ["-m", "flowrl.cli"]), "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def nan_losses(monkeypatch, module, name: str, which) -> dict:
    """Make the loss function ``module.name`` (returning ``(loss, stats)``) give a NaN loss on the calls (0-based,
    in order) for which ``which(i)`` is true; returns the call counter ``{"n": calls so far}``."""
    real = getattr(module, name)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        loss, st = real(*args, **kwargs)
        i = calls["n"]
        calls["n"] += 1
        return (loss * float("nan") if which(i) else loss), st

    monkeypatch.setattr(module, name, fake)
    return calls


def train_interrupted_then_resumed(monkeypatch, argv: list[str], stop_after_step: int) -> None:
    """Train ``argv`` (flowrl train flags with --output_dir) in this process, die right after checkpoint
    ``stop_after_step`` is complete, then run again with ``--resume_from_checkpoint latest`` to the end."""
    from flowrl.cli import build_config
    from flowrl.trainer import Trainer

    class Interrupt(Exception):
        pass

    save = Trainer.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.step == stop_after_step:
            raise Interrupt  # the process dies right after the checkpoint is complete
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    try:
        Trainer(build_config(argv)).train()
        raise AssertionError(f"the run did not reach checkpoint-{stop_after_step}")
    except Interrupt:
        pass
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    Trainer(build_config(["--resume_from_checkpoint", "latest", *argv])).train()
