"""Atomic, resumable checkpoints shared by the image and text trainers.

``checkpoint-{step}/`` holds ``accelerator.save_state`` output plus ``flowrl_state.json`` (step counters, config,
anything the recipe adds). It is written into ``.tmp-checkpoint-{step}`` and renamed only when complete, so a crash
mid-save leaves the previous checkpoint as the latest usable one. A save that fails (disk full, ...) removes its
temporary directory and raises, naming the checkpoint that remains the latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    n = len(CHECKPOINT_PREFIX)
    cks = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[n:].isdigit()]
    cks = [p for p in cks if (p / "flowrl_state.json").is_file()]
    return sorted(cks, key=lambda p: int(p.name[n:]))


def save_checkpoint(
    accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None,
    extra: Callable[[Path], None] | None = None, per_process: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``checkpoint-{step}`` atomically; ``extra(tmp_dir)`` writes recipe-specific files on the main process,
    ``per_process(tmp_dir)`` on every process (state sharded over processes, e.g. FSDP's EMA shards).

    When writing fails (e.g. disk full) the temporary directory is removed, no ``checkpoint-{step}`` appears, older
    checkpoints are untouched (they are pruned only after the new one is complete), and the error is raised again
    naming the checkpoint that stays the latest: ``OSError`` with the same errno, else ``RuntimeError``.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # every process writes its own files (random_states_{rank}.pkl, shards)
        if per_process is not None:
            per_process(tmp)
        # save_state has no barrier of its own: without this one the main process could rename ``tmp`` while another
        # process is still writing its RNG state into it (that process then fails, or the checkpoint lacks its file)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if extra is not None:
                extra(tmp)
            (tmp / "flowrl_state.json").write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as e:  # disk full surfaces as OSError, safetensors' SafetensorError or torch.save's RuntimeError
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = list_checkpoints(output_dir)
        kept = f"{latest[-1].name} is intact and stays the latest" if latest else "no earlier checkpoint exists"
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        msg = f"saving {final.name} in {str(output_dir)!r} failed ({reason}); its partial files were removed, {kept}"
        if isinstance(e, OSError):
            raise OSError(e.errno, msg) from e
        raise RuntimeError(msg) from e
    if accelerator.is_main_process and total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """``latest`` -> the newest complete checkpoint in ``output_dir`` (None if there is none); else ``which``."""
    if which == "latest":
        cks = list_checkpoints(output_dir)
        return cks[-1] if cks else None
    path = Path(which)
    if not (path / "flowrl_state.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a complete flowrl checkpoint (no flowrl_state.json)")
    return path


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records logged after ``step`` by an interrupted run (atomic rewrite)."""
    from .evaluate import atomic_write_text

    mpath = output_dir / "metrics.jsonl"
    if mpath.is_file():
        keep = [ln for ln in mpath.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(mpath, "".join(ln + "\n" for ln in keep))
