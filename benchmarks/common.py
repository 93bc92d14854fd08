"""What every benchmark shares: the common flags, one training run's config, running it through the real trainer
(in-process, evaluation and setup excluded from its clock), reading its ``metrics.jsonl``, summarising it, and the
machine description that goes at the head of every report.

Used by the suite (``python -m benchmarks``) and by the single-purpose scripts ``benchmarks.windows`` (equal
iterations) and ``benchmarks.branching`` (equal wall-clock), which are thin drivers over :func:`train_run` and
:func:`summarize`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

SPLITS = ("eval", "heldout")
"""Evaluation prompt sets every run reports (``<split>/reward/<name>`` in metrics.jsonl)."""


# ------------------------------------------------------------------------------------------------------ flags
def add_run_args(ap: argparse.ArgumentParser, *, model: bool = True, seed: bool = True) -> argparse.ArgumentParser:
    """The flags every training benchmark takes (the rest go to ``flowrl train`` unchanged)."""
    if model:
        ap.add_argument("--model", default="embedded", help="--pretrained_model_name_or_path of every run")
    ap.add_argument("--num_inference_steps", type=int, default=10, help="T")
    if seed:
        ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset_args", action="append", default=[], metavar="'NAME: FLAGS'",
                    help="extra flags for one preset only (repeatable), e.g. \"g2rpo: --branch_factor 4\"")
    return ap


def parse_preset_args(specs: Iterable[str], names: Sequence[str]) -> dict[str, list[str]]:
    """``["NAME: FLAGS", ...]`` -> {name: [flags]}; SystemExit naming the spec when NAME is not one of ``names``."""
    own: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, flags = spec.partition(":")
        if not sep or name.strip() not in names:
            raise SystemExit(f"--preset_args {spec!r}: expected 'NAME: FLAGS' with NAME one of {list(names)}")
        own.setdefault(name.strip(), []).extend(shlex.split(flags))
    return own


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def set_threads_default() -> None:
    """Benchmarks default to one intra-op thread (set before torch is imported; an explicit value wins)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------------------------------------ one run
def run_argv(
    algorithm: str | None,
    output_dir: str | Path,
    *,
    steps: int,
    model: str = "embedded",
    num_inference_steps: int | None = 10,
    seed: int = 0,
    eval_steps: int | None = None,
    budget_s: float | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``flowrl train`` flags of one benchmark run (no checkpoints, no trackers; ``extra`` last, so it wins).

    ``eval_steps`` None = evaluate before training and after the last iteration only. ``budget_s``: stop after the
    first iteration that crosses this much training time (``max_time_minutes``; see :class:`BudgetTrainer`).
    """
    argv = [] if algorithm in (None, "", "default") else ["--algorithm", algorithm]
    argv += [
        "--pretrained_model_name_or_path", model, "--output_dir", str(output_dir), "--max_train_steps", str(steps),
        "--seed", str(seed), "--eval_steps", str(eval_steps if eval_steps else 10**9),
        "--checkpointing_steps", "0", "--report_to", "none",
    ]
    if num_inference_steps is not None:
        argv += ["--num_inference_steps", str(num_inference_steps)]
    if budget_s is not None:
        argv += ["--max_time_minutes", repr(budget_s / 60)]
    return argv + list(extra)


def make_config(argv: Sequence[str]):
    """The validated, preflighted config of ``argv`` (raises :class:`flowrl.config.ConfigError`)."""
    from flowrl.cli import build_config, preflight

    cfg = build_config(list(argv))
    preflight(cfg)
    return cfg


def budget_trainer_class(base=None):
    """A Trainer subclass for benchmarks (``base`` defaults to :class:`flowrl.trainer.Trainer`):

    * its wall-clock budget (``max_time_minutes``) excludes evaluation: each evaluation extends the budget by its
      own duration, so the budget is training time only; setup and evaluation time are recorded (``setup_s``,
      ``eval_s``);
    * ``train_clock()`` = training seconds so far (wall-clock since the loop started, minus evaluations), logged with
      every step as ``time/train_clock_s``; the process CPU time of each phase (all threads, so the reward worker's
      scoring counts) as ``time/sampling_cpu_s`` / ``time/training_cpu_s`` and their running sum as
      ``time/train_cpu_clock_s``: on a shared machine CPU time is far less disturbed by other processes;
    * ``cpu_budget_s``: stop after the first iteration whose CPU clock reaches it (a compute budget, for shared
      machines; it ends the loop by lowering ``max_train_steps`` to the current step, so the final evaluation,
      checkpoint and export happen as after any last step);
    * ``eval_every_s``: also evaluate whenever another ``eval_every_s`` seconds of the budget's clock (CPU with a
      CPU budget, else wall) have passed, for curves against time (the ``eval_steps`` schedule keeps working).
    """
    if base is None:
        from flowrl.trainer import Trainer as base  # noqa: N813

    class BudgetTrainer(base):
        setup_s = 0.0
        eval_s = 0.0
        eval_every_s: float | None = None
        cpu_budget_s: float | None = None
        _loop_t0: float | None = None
        _next_eval = math.inf
        _cpu_clock = 0.0
        _cpu_sample = _cpu_train = math.nan

        def setup(self) -> None:
            t0 = time.time()
            super().setup()
            self.setup_s = time.time() - t0
            self._loop_t0 = time.time()  # the loop starts right after setup (the step-0 evaluation is excluded)
            self._next_eval = self.eval_every_s if self.eval_every_s else math.inf

        def train_clock(self) -> float:
            return 0.0 if self._loop_t0 is None else time.time() - self._loop_t0 - self.eval_s

        def evaluate(self, step: int) -> dict:
            t0 = time.time()
            out = super().evaluate(step)
            dt = time.time() - t0
            self.eval_s += dt
            if self.cfg.max_time_minutes is not None:
                self.cfg.max_time_minutes += dt / 60
            return out

        def sample_and_score(self, step: int):
            c0 = time.process_time()
            out = super().sample_and_score(step)
            self._cpu_sample = time.process_time() - c0
            return out

        def update(self, batch) -> dict:
            c0 = time.process_time()
            out = super().update(batch)
            self._cpu_train = time.process_time() - c0
            return out

        def step_metrics(self, batch, train, t_sample, t_train) -> dict:
            m = super().step_metrics(batch, train, t_sample, t_train)
            self._cpu_clock += (self._cpu_sample if self._cpu_sample == self._cpu_sample else 0.0) + (
                self._cpu_train if self._cpu_train == self._cpu_train else 0.0)
            wall = self.train_clock()
            m["time/train_clock_s"] = wall
            m["time/sampling_cpu_s"] = self._cpu_sample
            m["time/training_cpu_s"] = self._cpu_train
            m["time/train_cpu_clock_s"] = self._cpu_clock
            if self.cpu_budget_s is not None and self._cpu_clock >= self.cpu_budget_s:
                self.cfg.max_train_steps = self.step  # the loop ends after this step
            clock = self._cpu_clock if self.cpu_budget_s is not None else wall
            # the trainer evaluates after its last step itself (max_train_steps reached or the budget crossed)
            last = self.step >= self.cfg.max_train_steps or (
                self.cfg.max_time_minutes is not None and (time.time() - self._loop_t0) / 60 > self.cfg.max_time_minutes)
            if clock >= self._next_eval and not last:
                while self._next_eval <= clock:
                    self._next_eval += self.eval_every_s
                if not (self.cfg.eval.eval_steps and self.step % self.cfg.eval.eval_steps == 0):
                    m.update(self.evaluate(self.step))
            return m

    return BudgetTrainer


def train_run(argv: Sequence[str], *, eval_every_s: float | None = None, cpu_budget_s: float | None = None,
              trainer_base=None, cfg=None) -> tuple[list[dict], dict]:
    """Train one config through the real trainer, in this process; returns (metrics.jsonl records, run info).

    The output directory is wiped first. ``info``: argv, rewards (name -> weight), ``wall_s`` (whole run),
    ``setup_s``, ``eval_s``, ``train_wall_s`` (= wall - setup - evaluations: the training loop's own time).
    ``cpu_budget_s`` / ``eval_every_s``: see :func:`budget_trainer_class`.
    """
    cfg = cfg if cfg is not None else make_config(argv)
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    trainer = budget_trainer_class(trainer_base)(cfg)
    trainer.eval_every_s = eval_every_s
    trainer.cpu_budget_s = cpu_budget_s
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    recs = read_metrics(out)
    return recs, {
        "argv": list(argv), "rewards": dict(cfg.rewards), "wall_s": wall, "setup_s": trainer.setup_s,
        "eval_s": trainer.eval_s, "train_wall_s": wall - trainer.setup_s - trainer.eval_s,
    }


RUN_RECORD = "run_record.json"
"""Written into a benchmark run's output directory when it has finished: the key it ran under (its training flags
and budgets) and what the benchmark keeps of it. ``--reuse`` reads a run back instead of training it again when the
key matches, so a long benchmark can run in pieces, in parallel processes, or be resumed after an interruption."""


def record_run(run_dir: str | Path, key: dict, data: dict) -> None:
    """Mark the run in ``run_dir`` finished under ``key`` (JSON-able), keeping ``data`` (written atomically)."""
    write_json(Path(run_dir) / RUN_RECORD, {"key": key, **data})


def finished_run(run_dir: str | Path, key: dict) -> dict | None:
    """The record of a finished run in ``run_dir`` whose key equals ``key`` (a changed flag is a different run);
    None when there is none or it ran under another key."""
    try:
        rec = json.loads((Path(run_dir) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if rec.get("key") == json.loads(json.dumps(key, default=_json_default)) else None


def _init_worker(slots, devices: list[str] | None) -> None:
    """Pool-worker start: take a slot and, when GPUs are listed, see only the slot's GPU (set before torch loads)."""
    slot = slots.get()
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]


def visible_gpus() -> list[str]:
    """The GPU ids a job can be pinned to (``CUDA_VISIBLE_DEVICES`` order), or [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def run_parallel(tasks: dict, jobs: int = 1) -> dict:
    """Run ``tasks`` ({key: (fn, args)}: a module-level function and its picklable arguments) and return {key:
    result}, in the order given.

    ``jobs`` <= 1: one after another in this process. Otherwise a pool of ``jobs`` fresh (spawned) worker processes,
    each running tasks one at a time in submission order; with several GPUs visible, worker ``i`` sees only GPU
    ``i mod n`` (one run per device). Each worker inherits the environment, so ``OMP_NUM_THREADS`` (1 by default in
    the benchmarks) sets its threads: on a CPU, ``jobs`` x threads should not exceed the cores. The first failing
    task's exception is raised once the running tasks have ended (the queued ones are cancelled).
    """
    if jobs <= 1 or len(tasks) <= 1:
        return {k: fn(*a) for k, (fn, a) in tasks.items()}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for i in range(jobs):
        slots.put(i)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(slots, visible_gpus() or None)) as pool:
        futs = {k: pool.submit(fn, *a) for k, (fn, a) in tasks.items()}
        for f in as_completed(futs.values()):
            if f.exception() is not None:
                pool.shutdown(cancel_futures=True)  # the queued tasks never start; the running ones end
                raise f.exception()
    return {k: f.result() for k, f in futs.items()}


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ summaries
def fmean(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None and x == x]
    return statistics.fmean(xs) if xs else math.nan


def fstd(xs: Iterable[float]) -> float:
    """Sample std (n - 1); 0 for one value, NaN for none."""
    xs = [float(x) for x in xs if x is not None and x == x]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else math.nan)


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else math.nan


def eval_curve(recs: list[dict], rewards: dict[str, float]) -> list[dict]:
    """Every evaluation point: ``{step, train_s, eval/<reward>, eval/total, heldout/...}`` (``train_s`` = training
    seconds when it was taken; 0 for the step-0 evaluation)."""
    out = []
    for r in recs:
        pt: dict[str, Any] = {}
        for split in SPLITS:
            total, have = 0.0, False
            for rname, w in rewards.items():
                k = f"{split}/reward/{rname}"
                if k in r:
                    pt[f"{split}/{rname}"] = r[k]
                    total, have = total + w * r[k], True
            if have:
                pt[f"{split}/total"] = total
        if pt:
            pt["step"] = r["step"]
            pt["train_s"] = r.get("time/train_clock_s", math.nan) if r["step"] > 0 else 0.0
            pt["train_cpu_s"] = r.get("time/train_cpu_clock_s", math.nan) if r["step"] > 0 else 0.0
            out.append(pt)
    # the trainer appends the final evaluation to the last step's record when it was not on the schedule: same step
    merged: dict[int, dict] = {}
    for pt in out:
        merged.setdefault(pt["step"], {}).update(pt)
    return [merged[s] for s in sorted(merged)]


def summarize(recs: list[dict], info: dict) -> dict:
    """One run: iterations, times (mean over iterations 2..N: the first pays for warm-up; N = 1: the only one),
    exact NFE per iteration and in total, training reward, evaluation curve, initial / final scores and gains.

    ``train_s`` is the training loop's time up to the end of the last iteration (evaluations excluded; runs made by
    :func:`train_run` log it), ``train_cpu_s`` the process CPU time of its iterations; ``train_wall_s`` also counts
    the final checkpoint and export.
    """
    its = [r for r in recs if r["step"] >= 1 and "time/sampling_s" in r]
    timed = its[1:] if len(its) > 1 else its
    mean = lambda key: fmean(r[key] for r in timed if key in r)  # noqa: E731
    curve = eval_curve(recs, info["rewards"])
    first, last = (curve[0], curve[-1]) if curve else ({}, {})
    final = {k: v for k, v in last.items() if k not in ("step", "train_s", "train_cpu_s")}
    gains = {k: v - first[k] for k, v in final.items() if k in first}
    return {
        "iterations": len(its),
        "timed_iterations": len(timed),
        "time_per_iter_s": mean("time/sampling_s") + mean("time/training_s"),
        "sampling_s": mean("time/sampling_s"),
        "training_s": mean("time/training_s"),
        "cpu_per_iter_s": mean("time/sampling_cpu_s") + mean("time/training_cpu_s"),
        "nfe_sampling": mean("nfe/sampling"),
        "nfe_training": mean("nfe/training"),
        "nfe_total": sum(r.get("nfe/sampling", 0) + r.get("nfe/training", 0) for r in its),
        "train_reward_first": its[0]["reward/mean"] if its else math.nan,
        "train_reward_last": its[-1]["reward/mean"] if its else math.nan,
        "reward_initial": {k: v for k, v in (next((r for r in recs if r["step"] == 0), {})).items() if "/reward/" in k},
        "reward_final": {k: v for k, v in recs[-1].items() if "/reward/" in k} if recs else {},
        "final": final,
        "gains": gains,
        "curve": curve,
        "train_s": max((r["time/train_clock_s"] for r in its if "time/train_clock_s" in r), default=math.nan),
        "train_cpu_s": max((r["time/train_cpu_clock_s"] for r in its if "time/train_cpu_clock_s" in r),
                           default=math.nan),
        "wall_s": info.get("wall_s", math.nan),
        "train_wall_s": info.get("train_wall_s", math.nan),
        "setup_s": info.get("setup_s", math.nan),
        "eval_s": info.get("eval_s", math.nan),
        "argv": info.get("argv", []),
    }


# ------------------------------------------------------------------------------------------------------ reports
def machine_info() -> dict:
    """Where the figures came from: CPU model, cores, memory, torch version and threads, GPU if any, load."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb == mem_gb else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for pkg in ("diffusers", "peft", "accelerate", "transformers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    return info


def machine_line(m: dict) -> str:
    load = m.get("load_average")
    load_s = f"; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}" if load else ""
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores{gpu}, {m.get('memory_gb')} GB RAM; torch {m['torch']} "
            f"({m['torch_threads']} intra-op threads, OMP_NUM_THREADS={m['omp_num_threads']}), "
            f"diffusers {m.get('diffusers', '?')}, peft {m.get('peft', '?')}, Python {m['python']}{load_s}")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file beside ``path``, then renamed)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    from flowrl.evaluate import atomic_write_text

    atomic_write_text(Path(path), text)


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """``fig.savefig`` to a temporary PNG beside ``path``, then renamed (no half-written plot on disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
