"""Faults: non-finite losses (skipped, counted, bounded), SIGTERM (checkpoint + export, exit 0), a stale temporary
checkpoint from a kill mid-save (ignored on resume), a disk full mid-save (clear error, nothing partial left, the
previous checkpoint resumes exactly), SIGKILL mid-save on 2 processes (``--resume_from_checkpoint latest`` continues
exactly), a failing rank (the whole multi-process job stops)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import flowrl.trainer as trainer_mod
from flowrl.cli import build_config
from flowrl.trainer import Trainer
from tests.helpers import ROOT, launch_train, nan_losses, save_tiny_sd3, subprocess_env

FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--learning_rate", "1e-2", "--clip_range", "0.2",
    "--rank", "4", "--eval_steps", "0",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _nan_losses(monkeypatch, which):
    """Make the image trainer's surrogate loss NaN on the calls (0-based, in order) for which ``which(i)`` is true."""
    return nan_losses(monkeypatch, trainer_mod, "clipped_surrogate", which)


def test_nan_loss_is_skipped_with_a_counted_warning(tiny_model, monkeypatch, tmp_path):
    _nan_losses(monkeypatch, lambda i: i == 0)  # the first trained step of step 1
    out = tmp_path / "run"
    cfg = build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
                        "--max_train_steps", "2", *FAST])
    with pytest.warns(RuntimeWarning, match=r"non-finite loss .* skipped \(1 skipped in all, 1 in a row\)"):
        Trainer(cfg).train()
    recs = _metrics(out)
    assert [r["train/nan_loss_skips"] for r in recs] == [1, 1]
    assert all(r["train/loss"] == r["train/loss"] for r in recs)  # the logged loss stays finite
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_run_stops_after_max_nan_skips_in_a_row(tiny_model, monkeypatch, tmp_path):
    # isolated NaNs (every other loss) never stop the run ...
    _nan_losses(monkeypatch, lambda i: i % 2 == 0)
    cfg = build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "a"),
                        "--max_train_steps", "2", "--max_nan_skips", "2", *FAST])
    with pytest.warns(RuntimeWarning):
        Trainer(cfg).train()
    assert _metrics(tmp_path / "a")[-1]["train/nan_loss_skips"] == 4  # of 8 losses (2 steps x 2 micro x 2 trained)
    # ... a streak of max_nan_skips does, with a clear error
    _nan_losses(monkeypatch, lambda i: i >= 1)
    cfg = build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "b"),
                        "--max_train_steps", "5", "--max_nan_skips", "3", *FAST])
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match=r"3 non-finite losses in a row"):
        Trainer(cfg).train()


def test_max_nan_skips_is_validated():
    from flowrl.config import ConfigError

    with pytest.raises(ConfigError, match="max_nan_skips"):
        build_config(["--max_nan_skips", "0"])


def test_sigterm_checkpoints_exports_and_exits_cleanly(tiny_model, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flowrl.cli", "train", "--pretrained_model_name_or_path", str(tiny_model),
           "--output_dir", str(out), "--max_train_steps", "100000", "--checkpointing_steps", "0",
           "--max_time_minutes", "null", *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    steps = [r["step"] for r in _metrics(out)]
    cks = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in cks] == [f"checkpoint-{steps[-1]}"]  # the step in flight finished, then was saved
    state = json.loads((cks[0] / "flowrl_state.json").read_text())
    assert state["step"] == steps[-1] < 100000
    assert (cks[0] / "trainable.safetensors").is_file()
    assert not list(out.glob(".tmp-*"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_stale_tmp_checkpoint_is_ignored_on_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out), "--checkpointing_steps",
            "1", *FAST]
    Trainer(build_config([*args, "--max_train_steps", "2"])).train()
    # a SIGKILL during the save of step 3 leaves a half-written temporary directory (no flowrl_state.json)
    stale = out / ".tmp-checkpoint-3"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"\0" * 10)
    half = out / "checkpoint-4"  # and a directory that never got its state file
    half.mkdir()
    from flowrl.checkpoint import find_checkpoint

    assert find_checkpoint(out, "latest") == out / "checkpoint-2"
    t = Trainer(build_config([*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]))
    t.train()
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]  # resumed after step 2, not from scratch
    assert (out / "checkpoint-3" / "flowrl_state.json").is_file() and not stale.exists()


def _half_write_then(tensors, filename, metadata, then) -> None:
    """Write the first half of what ``safetensors.torch.save_file`` would write, then ``then()``."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    then()


@pytest.mark.parametrize("where", ["safetensors_write", "rename"])
def test_disk_full_mid_save_leaves_nothing_partial_and_the_previous_checkpoint_resumes(tiny_model, monkeypatch,
                                                                                        tmp_path, where):
    import errno

    import safetensors.torch

    import flowrl.checkpoint as ck_mod
    from flowrl.checkpoint import find_checkpoint

    out = tmp_path / "run"
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out), "--checkpointing_steps",
            "1", "--max_train_steps", "2", *FAST]

    def enospc():
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save, real_replace = safetensors.torch.save_file, os.replace
    if where == "safetensors_write":  # the trained weights of checkpoint-2 half written when the disk fills up
        def save_file(tensors, filename, metadata=None):
            if ".tmp-checkpoint-2" in str(filename):
                return _half_write_then(tensors, filename, metadata, enospc)
            return real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:  # everything written, the final rename fails
        def replace(src, dst):
            if str(src).endswith(".tmp-checkpoint-2"):
                enospc()
            return real_replace(src, dst)

        monkeypatch.setattr(ck_mod.os, "replace", replace)
    with pytest.raises(OSError, match=r"saving checkpoint-2 .* failed \(No space left on device\); its partial files "
                                      r"were removed, checkpoint-1 is intact and stays the latest") as err:
        Trainer(build_config(args)).train()
    assert err.value.errno == errno.ENOSPC
    assert not (out / ".tmp-checkpoint-2").exists() and not (out / "checkpoint-2").exists()
    assert find_checkpoint(out, "latest") == out / "checkpoint-1"
    monkeypatch.undo()

    # space is back: resume from checkpoint-1 and end exactly where an uninterrupted run ends
    Trainer(build_config([*args, "--resume_from_checkpoint", "latest"])).train()
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    ref = tmp_path / "ref"
    Trainer(build_config([*args, "--output_dir", str(ref)])).train()
    from safetensors.torch import load_file

    a = load_file(str(out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(ref / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _LateRankAccelerator:
    """The main process's view of a 2-process job whose rank 1 writes its ``save_state`` file late: the write lands at
    the next barrier at the latest, as with accelerate's save_state, which has no barrier of its own."""

    is_main_process = True

    def __init__(self):
        self.pending: list[Path] = []

    def save_state(self, out: str) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "random_states_0.pkl").write_bytes(b"rank0")
        self.pending.append(Path(out) / "random_states_1.pkl")

    def wait_for_everyone(self) -> None:
        for f in self.pending:
            f.write_bytes(b"rank1")  # FileNotFoundError if the main process already renamed the directory away
        self.pending.clear()


def test_checkpoint_rename_waits_for_every_process_files(tmp_path):
    """Regression (a CI flake): the main process renamed ``.tmp-checkpoint-N`` while rank 1 was still writing its
    RNG state into it, so rank 1 crashed. Every process's files are now inside the checkpoint when it is renamed."""
    from flowrl.checkpoint import find_checkpoint, save_checkpoint

    acc = _LateRankAccelerator()
    final = save_checkpoint(acc, tmp_path, 2, {"step": 2}, total_limit=None)
    assert final == tmp_path / "checkpoint-2" and find_checkpoint(tmp_path, "latest") == final
    assert sorted(f.name for f in final.iterdir()) == ["flowrl_state.json", "random_states_0.pkl", "random_states_1.pkl"]
    assert not (tmp_path / ".tmp-checkpoint-2").exists()


KILL_MID_SAVE_RUNNER = textwrap.dedent(
    '''
    """flowrl train, with rank 0 SIGKILLed halfway through writing the trained weights of checkpoint-$FLOWRL_KILL_STEP
    (test only: the file is half on disk, flowrl_state.json and the rename never happen)."""
    import os
    import signal
    import sys

    import safetensors.torch as st

    _save, _serialize = st.save_file, st.save
    tmp = ".tmp-checkpoint-" + os.environ["FLOWRL_KILL_STEP"]


    def save_file(tensors, filename, metadata=None):
        if os.environ.get("RANK") == "0" and tmp in str(filename):
            data = _serialize(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(tensors, filename, metadata=metadata)


    st.save_file = save_file
    from flowrl.cli import main

    sys.exit(main(sys.argv[1:]))
    '''
)


@pytest.mark.slow
def test_sigkill_mid_save_on_two_processes_resumes_exactly(tiny_model, tmp_path):
    """Rank 0 dies mid-write of checkpoint-2 (2 processes): the job stops, checkpoint-1 stays the latest complete one,
    and ``--resume_from_checkpoint latest`` on 2 processes ends where one uninterrupted process with the same global
    batch ends (2 processes == 1 process, tests/test_multiprocess.py)."""
    from safetensors.torch import load_file

    from tests.test_multiprocess import ARGS

    runner = tmp_path / "kill_mid_save.py"
    runner.write_text(KILL_MID_SAVE_RUNNER)
    out = tmp_path / "run"
    common = ["--pretrained_model_name_or_path", str(tiny_model), *ARGS[: ARGS.index("--max_train_steps")],
              *ARGS[ARGS.index("--max_train_steps") + 2:], "--max_train_steps", "3", "--checkpointing_steps", "1"]
    killed = launch_train(2, [*common, "--prompts_per_step", "2", "--output_dir", str(out)], entry=[str(runner)],
                          env={"FLOWRL_KILL_STEP": "2"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (out / ".tmp-checkpoint-2" / "trainable.safetensors").is_file()  # the half-written file is there
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1" / "flowrl_state.json").is_file()
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # step 2 was logged before its save died

    resumed = launch_train(2, [*common, "--prompts_per_step", "2", "--output_dir", str(out),
                               "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "checkpoint-1" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]  # step 2's old record was dropped, then re-logged
    assert not (out / ".tmp-checkpoint-2").exists() and (out / "checkpoint-3" / "flowrl_state.json").is_file()

    ref = tmp_path / "ref"  # one process, same global batch, never interrupted
    Trainer(build_config([*common, "--prompts_per_step", "4", "--output_dir", str(ref)])).train()
    a = load_file(str(ref / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |dLoRA| killed + resumed on 2 processes vs 1 uninterrupted process: {diff:.3g}")
    assert diff <= 1e-5


FAILING_REWARD = textwrap.dedent(
    '''
    import os


    def fail_on_rank1(images, prompts, **metadata):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("injected reward failure on rank 1")
        return images.mean(dim=(1, 2, 3))
    '''
)


@pytest.mark.slow
def test_a_failing_rank_stops_the_whole_job_promptly(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "flowrl_failing_reward.py").write_text(FAILING_REWARD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    res = launch_train(2, ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "run"),
                           "--max_train_steps", "3", "--reward", "flowrl_failing_reward:fail_on_rank1",
                           "--collective_timeout_s", "60", *FAST], timeout=200)
    elapsed = time.time() - t0
    assert res.returncode != 0
    assert "injected reward failure on rank 1" in res.stderr
    assert elapsed < 150, elapsed  # the launcher tears the other rank down; nobody waits on a dead peer


HANGING_REWARD = textwrap.dedent(
    '''
    import os
    import time


    def hang_on_rank1(images, prompts, **metadata):
        if os.environ.get("RANK") == "1":
            time.sleep(3600)
        return images.mean(dim=(1, 2, 3))
    '''
)


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_collective_timeout(tiny_model, tmp_path, monkeypatch):
    """Rank 1 never reaches the reward gather: rank 0's collective times out after collective_timeout_s and fails;
    the launcher then tears rank 1 down (after its SIGTERM grace period: the trainer's handler only sets a flag)."""
    (tmp_path / "flowrl_hanging_reward.py").write_text(HANGING_REWARD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    res = launch_train(2, ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "run"),
                           "--max_train_steps", "2", "--reward", "flowrl_hanging_reward:hang_on_rank1",
                           "--reward_worker", "false", "--collective_timeout_s", "10", *FAST], timeout=240)
    assert res.returncode != 0
    assert "Timed out" in res.stderr or "timed out" in res.stderr.lower(), res.stderr[-3000:]
    assert time.time() - t0 < 200


def test_branching_plans_skip_non_finite_losses_the_same_way(tiny_model, monkeypatch, tmp_path):
    """The tree trainer shares the linear trainer's rule: counted, warned skip; a streak of max_nan_skips stops."""
    import flowrl.branching_trainer as branching_mod

    nan_losses(monkeypatch, branching_mod, "clipped_surrogate", lambda i: i == 0)
    tree = ["--algorithm", "dynamic_treerpo", "--tree_depth", "2", "--window_size", "2", "--group_size", "1",
            "--prompts_per_step", "2", "--num_inference_steps", "4", "--report_to", "none", "--rank", "4",
            "--eval_steps", "0", "--pretrained_model_name_or_path", str(tiny_model)]
    cfg = build_config(["--output_dir", str(tmp_path / "a"), "--max_train_steps", "1", *tree])
    with pytest.warns(RuntimeWarning, match=r"non-finite loss .* at branch step \d+ skipped \(1 skipped in all"):
        Trainer(cfg).train()
    assert _metrics(tmp_path / "a")[-1]["train/nan_loss_skips"] == 1
    monkeypatch.undo()
    nan_losses(monkeypatch, branching_mod, "clipped_surrogate", lambda i: True)
    cfg = build_config(["--output_dir", str(tmp_path / "b"), "--max_train_steps", "3", "--max_nan_skips", "2", *tree])
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match=r"2 non-finite losses in a row"):
        Trainer(cfg).train()
