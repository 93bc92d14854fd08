"""The benchmark suite: every algorithm preset on the embedded default, the framework's overhead and memory against
the bare model work, and how cost grows with T, G and resolution.

    python -m benchmarks --output_dir outputs/benchmarks            # the full suite (hours on a 2-core CPU)
    python -m benchmarks --quick --output_dir outputs/bench-quick   # a few minutes: small batches, 2 iterations
    python -m benchmarks --help

Sections (``--sections``, default all):

* ``presets``: each preset (``--presets``) trains through the real trainer (in this process; ``metrics.jsonl`` is
  read back) for ``--max_train_steps`` iterations per seed (``--seeds``), evaluating every ``--eval_every``
  iterations on the ``eval`` and ``heldout`` prompt sets (ODE, fixed seeds, EMA weights): *equal iterations*.
  Then *equal time*: the budget is ``--time_budget_s`` or the baseline's (``flow_grpo``) mean training time (the
  loop's time, setup and evaluations excluded; wall-clock, or process CPU time with ``--budget_clock cpu``, the
  choice for a shared machine); every other preset trains again for that budget, with
  ``max_train_steps`` set to the iterations its own measured pace fits in the budget (so learning-rate schedules
  end as they would in a real run of that length) and the budget as a hard stop, evaluating at the same number of
  evenly spaced points of training time. Reported per preset: final ``eval`` / ``heldout`` scores (mean ± sample
  std over seeds) and gains, the curves, and from the equal-iteration runs the *cost*: time per iteration
  (sampling, training; mean over iterations 2..N and seeds) and the exact NFE per iteration (CFG included), each
  as a ratio to the baseline (``time_ratio/<preset>``, ``nfe_sampling_ratio/<preset>``, ...).
  ``--jobs N`` trains N runs at a time, each in its own worker process (one GPU each where several are visible);
  on a shared CPU use ``--budget_clock cpu``. Every finished run leaves ``run_record.json`` in its directory, and
  ``--reuse`` reads such runs back instead of training them again: an interrupted suite resumes where it stopped,
  and presets or seeds can be added to a finished one (the figures are recomputed over all of them).
* ``overhead``: :mod:`benchmarks.probe` in a fresh process on the default config: one iteration of the trainer
  against the bare transformer forwards / backwards and VAE decodes it contains, replayed on the same model and
  inputs in the same process (``overhead_ratio``, ``overhead_ratio/sampling``, ``overhead_ratio/training``), plus a
  cProfile of one iteration (``profile_iteration.txt``).
* ``memory``: the resident-set high-water mark of one iteration above the process's base, against the bare work's,
  each in its own fresh process (``memory_ratio``; method in :mod:`benchmarks.probe`).
* ``scaling``: iteration time, bare time and peak memory at a few values of T (``--sweep_T``), G (``--sweep_G``)
  and resolution (``--sweep_resolution``) around the default config, one axis at a time.

Writes to ``--output_dir``: ``results.json`` (figures under plain names at the top level, e.g. ``overhead_ratio``,
``memory_ratio``, ``time_ratio/mixgrpo``, ``final/equal_iterations/eval/flow_grpo``, ``final/equal_time/heldout/g2rpo``;
details, settings and the machine below them; rewritten after every section), ``report.md`` (tables, the machine, the method), PNG plots, and each run's own outputs in ``runs/``.
Flags the suite does not know go to every ``flowrl train`` run (e.g. ``--mixed_precision bf16``); ``--preset_args
"NAME: FLAGS"`` to one preset's runs; ``--overhead_args "FLAGS"`` to the overhead / memory / scaling config only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    SPLITS, add_run_args, finished_run, fmean, fstd, machine_info, make_config, parse_preset_args, ratio, record_run,
    run_argv, run_parallel, set_threads_default, split_list, summarize, train_run, write_json,
)

DEFAULT_PRESETS = (
    "flow_grpo", "flow_grpo_fast", "flow_grpo_cps", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star", "dance_grpo",
    "flow_grpo+grpo_guard", "tempflow_grpo", "g2rpo", "dynamic_treerpo", "diffusion_nft",
)
"""``diffusion_nft`` samples, trains and evaluates CFG-free as in its paper, so its "before" differs from the others'
(each preset's gain is against its own before)."""
SECTIONS = ("presets", "overhead", "memory", "scaling")

FULL = {"seeds": "0,1,2", "max_train_steps": 20, "eval_every": 5, "eval_prompts": 0, "eval_images_per_prompt": 2,
        "overhead_reps": 5, "sweep_reps": 2, "sweep_T": "5,10,20", "sweep_G": "4,8,16", "sweep_resolution": "16,24,32",
        "overhead_args": ""}
QUICK = {"seeds": "0", "max_train_steps": 2, "eval_every": 0, "eval_prompts": 6, "eval_images_per_prompt": 1,
         "overhead_reps": 3, "sweep_reps": 1, "sweep_T": "5,10", "sweep_G": "4,8", "sweep_resolution": "16,32",
         "overhead_args": "--prompts_per_step 4"}
"""Defaults of the full suite and of ``--quick`` (any of them can still be given explicitly)."""

QUICK_LINEAR_ARGS = ["--prompts_per_step", "2", "--group_size", "4", "--sample_batch_size", "8"]
QUICK_BRANCHING_ARGS = {
    "tempflow": ["--prompts_per_step", "2", "--group_size", "1", "--branch_factor", "2"],
    "g2rpo": ["--prompts_per_step", "2", "--branch_factor", "3"],
    "tree": ["--prompts_per_step", "2", "--tree_depth", "3"],
}
"""``--quick`` shrinks every preset's batch (flags before ``--preset_args``, which still win): linear plans 2 prompts
x 4 samples; branching plans 2 prompts with fewer children (TempFlow 1 seed x K = 2, G²RPO G = 3, tree depth 3)."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                 epilog="Full-suite defaults: " + ", ".join(f"{k}={v!r}" for k, v in FULL.items())
                                 + "\n--quick defaults: " + ", ".join(f"{k}={v!r}" for k, v in QUICK.items()))
    ap.add_argument("--output_dir", default="outputs/benchmarks", help="where results.json, report.md, plots go")
    ap.add_argument("--quick", action="store_true", help="a few-minute version (smaller batches, fewer steps)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated --algorithm values")
    ap.add_argument("--baseline", default="flow_grpo", help="preset the ratios and the time budget refer to")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds")
    ap.add_argument("--max_train_steps", type=int, default=None, help="iterations of the equal-iteration runs")
    ap.add_argument("--eval_every", type=int, default=None, help="iterations between evaluations (0 = start and end)")
    ap.add_argument("--time_budget_s", type=float, default=None,
                    help="training seconds of the equal-time runs (default: the baseline's measured time)")
    ap.add_argument("--budget_clock", choices=("wall", "cpu"), default="wall",
                    help="clock of the equal-time comparison: wall-clock, or process CPU time (for shared machines)")
    ap.add_argument("--eval_prompts", type=int, default=None, help="first N prompts of each eval set (0 = all 36)")
    ap.add_argument("--eval_images_per_prompt", type=int, default=None)
    ap.add_argument("--overhead_args", default=None, help="extra flowrl train flags of the overhead/memory/scaling config")
    ap.add_argument("--overhead_reps", type=int, default=None, help="(iteration, bare) pairs of the overhead probe")
    ap.add_argument("--sweep_T", default=None, help="num_inference_steps values ('' = skip this axis)")
    ap.add_argument("--sweep_G", default=None, help="group_size values ('' = skip)")
    ap.add_argument("--sweep_resolution", default=None, help="resolution values ('' = skip)")
    ap.add_argument("--sweep_reps", type=int, default=None, help="(iteration, bare) pairs per sweep point")
    ap.add_argument("--no_profile", action="store_true", help="skip the cProfile of one iteration")
    ap.add_argument("--jobs", type=int, default=1,
                    help="preset runs trained at a time, each in its own worker process (one GPU each when several "
                         "are visible); on a CPU with --budget_clock cpu, jobs x OMP_NUM_THREADS <= cores")
    ap.add_argument("--reuse", action="store_true",
                    help="read back a preset run already finished under the same flags (its run_record.json) "
                         "instead of training it again: resume an interrupted suite, or add presets or seeds")
    return add_run_args(ap, seed=False)


def _settings(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    if s["eval_every"] == 0 or s["eval_every"] is None:
        s["eval_every"] = s["max_train_steps"]
    return s


def _slug(name: str) -> str:
    return name.replace("+", "_plus_")


def _is_branching(name: str) -> str | None:
    from flowrl.presets import get_preset

    plan = get_preset(name).get("plan", {}).get("plan")
    return plan if plan in ("tempflow", "g2rpo", "tree") else None


def _eval_flags(out: Path, n: int, per_prompt: int) -> list[str]:
    """Evaluation flags of every run: the first ``n`` prompts of each set (0 = all), ``per_prompt`` images each."""
    flags = ["--eval_images_per_prompt", str(per_prompt)]
    if n <= 0:
        return flags + ["--eval_sets", "eval,heldout"]
    from flowrl.prompts import load_prompts

    # the trainer labels an eval set by its file stem ('eval') or by 'heldout' in its path: keep the directory neutral
    d = out / "eval_prompts" if "heldout" not in str(out.resolve()) else Path(tempfile.mkdtemp(prefix="flowrl-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for split in SPLITS:
        f = d / f"{split}.txt"
        f.write_text("\n".join(load_prompts(split)[:n]) + "\n", encoding="utf-8")
        files.append(str(f))
    return flags + ["--eval_sets", ",".join(files)]


# ------------------------------------------------------------------------------------------------------ presets
def train_job(argv: list[str], label: str, eval_every_s: float | None, cpu_budget_s: float | None,
              reuse: bool) -> dict:
    """One benchmark run, in this process or a :func:`~benchmarks.common.run_parallel` worker: its :func:`summarize`
    dict. The run is recorded in its output directory when it ends; with ``reuse`` a run already recorded under the
    same flags and budgets is read back instead of trained again (a resumed or piecewise suite)."""
    run_dir = argv[argv.index("--output_dir") + 1]
    key = {"argv": list(argv), "eval_every_s": eval_every_s, "cpu_budget_s": cpu_budget_s}
    t0 = time.time()
    rec = finished_run(run_dir, key) if reuse else None
    if rec is not None:
        print(f"[benchmarks] {label}: reused the finished run in {run_dir}", flush=True)
        return rec["summary"]
    print(f"[benchmarks] {label}: training", flush=True)
    summary = summarize(*train_run(argv, eval_every_s=eval_every_s, cpu_budget_s=cpu_budget_s))
    record_run(run_dir, key, {"summary": summary})
    print(f"[benchmarks] {label}: done in {time.time() - t0:.0f} s", flush=True)
    return summary


def run_presets(args, st: dict, presets: list[str], extra: list[str], own: dict, out: Path, log) -> dict:
    seeds = [int(s) for s in split_list(st["seeds"])]
    N, E = st["max_train_steps"], st["eval_every"]
    eval_flags = _eval_flags(out, st["eval_prompts"], st["eval_images_per_prompt"])
    T = args.num_inference_steps

    def flags(p: str) -> list[str]:
        quick = []
        if args.quick:
            b = _is_branching(p)
            quick = QUICK_BRANCHING_ARGS[b] if b else QUICK_LINEAR_ARGS
        return [*eval_flags, *quick, *extra, *own.get(p, [])]

    from flowrl.config import ConfigError

    try:  # every config is checked before anything trains
        for p in presets:
            make_config(run_argv(p, out / "runs" / "check", steps=N, model=args.model, num_inference_steps=T,
                                 extra=flags(p)))
    except ConfigError as e:
        raise SystemExit(f"benchmarks: preset {p!r}: {e}") from None

    def run_dir(p: str, s: int, mode: str) -> Path:
        return out / "runs" / _slug(p) / f"seed{s}" / mode

    tasks = {}
    for p in presets:
        for s in seeds:
            argv = run_argv(p, run_dir(p, s, "iterations"), steps=N, model=args.model, num_inference_steps=T, seed=s,
                            eval_steps=E, extra=flags(p))
            tasks[(p, s)] = (train_job, (argv, f"{p} seed {s}, {N} iterations", None, None, args.reuse))
    log(f"presets: {len(tasks)} equal-iteration runs, {args.jobs} at a time")
    done = run_parallel(tasks, args.jobs)
    iters = {p: {s: done[(p, s)] for s in seeds} for p in presets}
    base = args.baseline if args.baseline in presets else presets[0]
    cpu = args.budget_clock == "cpu"
    ck = "train_cpu_s" if cpu else "train_s"
    budget = args.time_budget_s or fmean(r[ck] for r in iters[base].values())
    n_evals = max(1, math.ceil(N / E))
    timed: dict[str, dict[int, dict]] = {p: {} for p in presets}
    tasks = {}
    for p in presets:
        for s in seeds:
            r = iters[p][s]
            pace = r[ck] / max(1, r["iterations"])  # the loop's seconds per iteration, all included
            n = max(1, round(budget / pace)) if pace > 0 else N
            if n == N and abs(r[ck] - budget) <= 0.1 * budget:
                timed[p][s] = {**r, "same_as_iterations": True}  # this run already is the equal-time run
                continue
            argv = run_argv(p, run_dir(p, s, "equal_time"), steps=n, model=args.model, num_inference_steps=T, seed=s,
                            budget_s=None if cpu else budget, extra=flags(p))
            tasks[(p, s)] = (train_job, (argv, f"{p} seed {s}, {budget:.1f} s of training ({args.budget_clock}; "
                                         f"~{n} iterations)", budget / n_evals, budget if cpu else None, args.reuse))
    log(f"presets: {len(tasks)} equal-time runs of {budget:.1f} s ({args.budget_clock}), {args.jobs} at a time")
    for (p, s), r in run_parallel(tasks, args.jobs).items():
        timed[p][s] = {**r, "same_as_iterations": False}
    timed = {p: dict(sorted(runs.items())) for p, runs in timed.items()}
    return {"seeds": seeds, "baseline": base, "budget_s": budget, "budget_clock": args.budget_clock,
            "iterations": N, "eval_every": E, "eval_flags": eval_flags, "jobs": args.jobs,
            "flags": {p: flags(p) for p in presets}, "equal_iterations": iters, "equal_time": timed}


def preset_figures(res: dict) -> dict:
    """Flat figures of the presets section (means over seeds; std = sample std over seeds)."""
    fig: dict[str, float] = {}
    base = res["baseline"]
    iters, timed = res["equal_iterations"], res["equal_time"]
    per = lambda runs, key: fmean(r[key] for r in runs.values())  # noqa: E731
    for p, runs in iters.items():
        for key in ("time_per_iter_s", "cpu_per_iter_s", "sampling_s", "training_s", "nfe_sampling", "nfe_training"):
            fig[f"{key}/{p}"] = per(runs, key)
    for p in iters:
        fig[f"time_ratio/{p}"] = ratio(fig[f"time_per_iter_s/{p}"], fig[f"time_per_iter_s/{base}"])
        fig[f"cpu_time_ratio/{p}"] = ratio(fig[f"cpu_per_iter_s/{p}"], fig[f"cpu_per_iter_s/{base}"])
        fig[f"sampling_time_ratio/{p}"] = ratio(fig[f"sampling_s/{p}"], fig[f"sampling_s/{base}"])
        fig[f"training_time_ratio/{p}"] = ratio(fig[f"training_s/{p}"], fig[f"training_s/{base}"])
        fig[f"nfe_sampling_ratio/{p}"] = ratio(fig[f"nfe_sampling/{p}"], fig[f"nfe_sampling/{base}"])
        fig[f"nfe_training_ratio/{p}"] = ratio(fig[f"nfe_training/{p}"], fig[f"nfe_training/{base}"])
    fig["time_budget_s"] = res["budget_s"]
    for mode, runs_by in (("equal_iterations", iters), ("equal_time", timed)):
        for p, runs in runs_by.items():
            for split in SPLITS:
                k = f"{split}/total"
                vals = [r["final"].get(k, math.nan) for r in runs.values()]
                gains = [r["gains"].get(k, math.nan) for r in runs.values()]
                fig[f"final/{mode}/{split}/{p}"] = fmean(vals)
                fig[f"final_std/{mode}/{split}/{p}"] = fstd(vals)
                fig[f"gain/{mode}/{split}/{p}"] = fmean(gains)
                fig[f"gain_std/{mode}/{split}/{p}"] = fstd(gains)
            fig[f"iterations/{mode}/{p}"] = fmean(r["iterations"] for r in runs.values())
            fig[f"train_s/{mode}/{p}"] = fmean(r["train_s"] for r in runs.values())
            fig[f"train_cpu_s/{mode}/{p}"] = fmean(r["train_cpu_s"] for r in runs.values())
    return fig


# ------------------------------------------------------------------------------------------------------ probes
def _probe(what: str, flags: list[str], out_json: Path, *, reps: int = 1, profile: Path | None = None,
           log=print) -> dict:
    """One :mod:`benchmarks.probe` measurement in a fresh Python process (memory ones with the malloc settings)."""
    from benchmarks.probe import MALLOC_ENV

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if what.startswith("memory"):
        env.update(MALLOC_ENV)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.probe", "--what", what, "--json", str(out_json), "--reps", str(reps)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    cmd += flags
    t0 = time.time()
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.probe {what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(out_json.read_text())
    res["process_s"] = time.time() - t0
    log(f"probe {what}: done in {res['process_s']:.1f} s")
    return res


def _base_flags(args, st: dict, extra: list[str]) -> list[str]:
    """The overhead / memory / scaling config: the embedded default (``flowrl train`` with no arguments)."""
    return ["--pretrained_model_name_or_path", args.model, "--num_inference_steps", str(args.num_inference_steps),
            *extra, *shlex.split(st["overhead_args"])]


def run_overhead(args, st, extra, out: Path, log) -> dict:
    flags = _base_flags(args, st, extra)
    prof = None if args.no_profile else out / "profile_iteration.txt"
    log(f"overhead: {st['overhead_reps']} (iteration, bare) pairs")
    res = _probe("time", flags, out / "probes" / "time.json", reps=st["overhead_reps"], profile=prof, log=log)
    res["flags"] = flags
    return res


def run_memory(args, st, extra, out: Path, log) -> dict:
    flags = _base_flags(args, st, extra)
    log("memory: iteration and bare work, one fresh process each")
    it = _probe("memory-iteration", flags, out / "probes" / "memory_iteration.json", log=log)
    bare = _probe("memory-bare", flags, out / "probes" / "memory_bare.json", log=log)
    return {"iteration": it, "bare": bare, "flags": flags}


def run_scaling(args, st, extra, out: Path, log, overhead: dict | None, memory: dict | None) -> dict:
    """One axis at a time around the base config: time (in this process) and peak memory (fresh process)."""
    from benchmarks.probe import _close, build_trainer, measure_time

    base_flags = _base_flags(args, st, extra)
    from flowrl.policies.sd3 import read_model_defaults
    from flowrl.trainer import resolve_model_path

    cfg = make_config([*base_flags, "--output_dir", str(out / "runs" / "check")])
    P, G0, bs = cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.grpo.sample_batch_size
    model_dir = resolve_model_path(cfg.model.pretrained_model_name_or_path)
    res0 = cfg.model.resolution or (read_model_defaults(model_dir) if Path(model_dir).is_dir() else {}).get("resolution")
    base_point = {"T": cfg.sampling.num_inference_steps, "G": G0, "resolution": res0}
    axes = {"T": [int(v) for v in split_list(st["sweep_T"])], "G": [int(v) for v in split_list(st["sweep_G"])],
            "resolution": [int(v) for v in split_list(st["sweep_resolution"])]}
    points: dict[str, dict] = {}
    results: dict[str, list[dict]] = {a: [] for a in axes}
    for axis, values in axes.items():
        for v in values:
            key = f"{axis}={v}"
            is_base = v == base_point[axis]
            if is_base and "base" in points:
                results[axis].append({**points["base"], "axis": axis, "value": v})
                continue
            if axis == "T":
                flags = [*base_flags, "--num_inference_steps", str(v)]
            elif axis == "G":
                flags = [*base_flags, "--group_size", str(v), "--sample_batch_size", str(math.gcd(bs, P * v))]
            else:
                flags = [*base_flags, "--resolution", str(v)]
            log(f"scaling: {key}")
            pt: dict = {"flags": flags}
            if is_base and overhead is not None:
                tm = overhead
            else:
                with tempfile.TemporaryDirectory(prefix="flowrl-sweep-") as work:
                    tr = build_trainer(flags, work)
                    try:
                        tm = measure_time(tr, st["sweep_reps"])
                    finally:
                        _close(tr)
                        del tr
                        gc.collect()
            pt.update({"iteration_s": tm["iteration_s"], "bare_s": tm["bare_s"], "overhead_ratio": tm["overhead_ratio"],
                       "iteration_sampling_s": tm["iteration_sampling_s"],
                       "iteration_training_s": tm["iteration_training_s"],
                       "nfe_sampling": tm["trainer_nfe_sampling"], "nfe_training": tm["trainer_nfe_training"]})
            if is_base and memory is not None:
                mem = memory["iteration"]
            else:
                mem = _probe("memory-iteration", flags, out / "probes" / f"memory_{axis}{v}.json", log=log)
            pt["peak_mb"] = mem["peak_bytes"] / 2**20
            pt["peak_mb_sampling"] = mem["peak_bytes_sampling"] / 2**20
            pt["peak_mb_training"] = mem["peak_bytes_training"] / 2**20
            if is_base:
                points["base"] = pt
            results[axis].append({**pt, "axis": axis, "value": v})
    return {"base_point": base_point, "prompts_per_step": P, "sample_batch_size": bs, "axes": results}


# ------------------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    set_threads_default()
    args, extra = _parser().parse_known_args(argv)
    sections = split_list(args.sections)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
    st = _settings(args)
    if st["max_train_steps"] < 1:
        raise SystemExit("--max_train_steps must be >= 1")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    presets = split_list(args.presets)
    if not presets:
        raise SystemExit("--presets: give at least one")
    from flowrl.presets import get_preset

    for p in presets:
        try:
            get_preset(p)
        except ValueError as e:
            raise SystemExit(f"--presets: {e}") from None
    own = parse_preset_args(args.preset_args, presets)
    out = Path(args.output_dir)
    if {"overhead", "memory", "scaling"} & set(sections):  # fail before any heavy work on a bad probe config
        from flowrl.config import ConfigError

        try:
            make_config([*_base_flags(args, st, extra), "--output_dir", str(out / "runs" / "check")])
        except ConfigError as e:
            raise SystemExit(f"benchmarks: overhead/memory/scaling config: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[benchmarks {time.time() - t_start:7.1f}s] {msg}", flush=True)

    machine = machine_info()
    results: dict = {}
    details: dict = {}
    settings = {**st, "quick": args.quick, "sections": sections, "presets": presets, "baseline": args.baseline,
                "model": args.model, "num_inference_steps": args.num_inference_steps, "extra_flags": extra,
                "preset_flags": own, "time_budget_s": args.time_budget_s, "budget_clock": args.budget_clock,
                "jobs": args.jobs}

    def write(final: bool) -> None:
        """results.json + report.md + plots with what is done so far (after every section)."""
        from benchmarks.report import write_report

        machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        doc = {**results, "machine": machine, "settings": settings, "complete": final,
               "suite_s": time.time() - t_start, "details": details}
        write_report(doc, out)  # adds doc["plots"]
        write_json(out / "results.json", doc)

    if "presets" in sections and args.jobs > 1 and args.budget_clock == "wall" and not machine.get("cuda"):
        log("note: parallel runs on a CPU disturb each other's wall-clock; --budget_clock cpu compares compute")
    if "presets" in sections:
        details["presets"] = run_presets(args, st, presets, extra, own, out, log)
        results.update(preset_figures(details["presets"]))
        write(False)
    if "overhead" in sections:
        o = details["overhead"] = run_overhead(args, st, extra, out, log)
        results["overhead_ratio"] = o["overhead_ratio"]
        results["overhead_ratio/sampling"] = o["overhead_ratio_sampling"]
        results["overhead_ratio/training"] = o["overhead_ratio_training"]
        results["overhead_ratio/cpu"] = o["overhead_ratio_cpu"]
        results["overhead_ratio/median_pair"] = o["overhead_ratio_median_pair"]
        results["iteration_s"] = o["iteration_s"]
        results["bare_s"] = o["bare_s"]
        write(False)
    if "memory" in sections:
        m = details["memory"] = run_memory(args, st, extra, out, log)
        it, bare = m["iteration"], m["bare"]
        results["memory_ratio"] = ratio(it["peak_bytes"], bare["peak_bytes"])
        results["memory_ratio/sampling"] = ratio(it["peak_bytes_sampling"], bare["peak_bytes_sampling"])
        results["memory_ratio/training"] = ratio(it["peak_bytes_training"], bare["peak_bytes_training"])
        results["memory_peak_mb/iteration"] = it["peak_bytes"] / 2**20
        results["memory_peak_mb/bare"] = bare["peak_bytes"] / 2**20
        write(False)
    if "scaling" in sections:
        sc = details["scaling"] = run_scaling(args, st, extra, out, log, details.get("overhead"), details.get("memory"))
        for axis, pts in sc["axes"].items():
            for pt in pts:
                for k in ("iteration_s", "bare_s", "overhead_ratio", "peak_mb"):
                    results[f"scaling/{axis}={pt['value']}/{k}"] = pt[k]
    write(True)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")
    return 0
