"""Branching samplers benchmark: TempFlow-GRPO, G²RPO and Dynamic-TreeRPO vs Flow-GRPO at equal wall-clock.

    python -m benchmarks.branching --steps 100 --out outputs/bench-branching [any flowrl train flag ...]

The baseline (``--baseline``, default ``flow_grpo``) trains ``--steps`` iterations; its training wall-clock (the
training loop's time, evaluations and model loading excluded) is the budget every other preset (``--presets``,
default ``tempflow_grpo g2rpo dynamic_treerpo``) then trains for (``max_time_minutes``; a run stops after the first
iteration that crosses the budget, so it may overshoot by at most one iteration: the actual time is reported). Every
run uses the same model (default ``embedded``), seed, prompts and settings and is evaluated before training and after
its last iteration (ODE sampling, fixed seeds: ``eval`` and ``heldout`` sets). Writes ``branching.json`` and
``branching.md`` to ``--out`` (each run's own outputs are in ``--out/<preset>``):

* iterations done, training wall-clock, time per iteration (mean over iterations 2..N; N = 1: the only one), and
  the exact NFE per iteration (sampling / training, CFG included) and in total;
* final ``eval`` / ``heldout`` reward of every configured reward (and the weighted total), the gain over the initial
  evaluation, and each final score's difference to the baseline's.

Flags not listed here go to every run unchanged (e.g. ``--prompts_per_step 2``); ``--preset_args "NAME: FLAGS"``
(repeatable) adds flags to one preset only (e.g. ``--preset_args "g2rpo: --branch_factor 4"``). Reruns overwrite
``--out/<preset>``. CPU note: at the presets' paper settings a branching iteration costs many Flow-GRPO iterations
(TempFlow at T = 10, K = 6, N = 4 seeds: 4 x (9 + 6 x 45) = 1116 NFE per prompt vs 8 x 10 = 80), which is exactly what
an equal-wall-clock comparison charges them for.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import time
from pathlib import Path

DEFAULT_PRESETS = ("tempflow_grpo", "g2rpo", "dynamic_treerpo")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.branching", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, required=True, help="baseline training iterations (sets the time budget)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets to compare")
    ap.add_argument("--baseline", default="flow_grpo", help="preset that runs --steps iterations and sets the budget")
    ap.add_argument("--model", default="embedded", help="--pretrained_model_name_or_path of every run")
    ap.add_argument("--num_inference_steps", type=int, default=10, help="T")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_iterations", type=int, default=100_000, help="iteration cap of the budgeted runs")
    ap.add_argument("--preset_args", action="append", default=[], metavar="'NAME: FLAGS'",
                    help="extra flags for one preset (repeatable)")
    return ap


def _budget_trainer_class():
    from flowrl.trainer import Trainer

    class BudgetTrainer(Trainer):
        """A Trainer whose time budget excludes evaluation: each evaluation extends ``max_time_minutes`` by its own
        duration. Records setup and evaluation time."""

        setup_s = 0.0
        eval_s = 0.0

        def setup(self) -> None:
            t0 = time.time()
            super().setup()
            self.setup_s = time.time() - t0

        def evaluate(self, step: int) -> dict:
            t0 = time.time()
            out = super().evaluate(step)
            dt = time.time() - t0
            self.eval_s += dt
            if self.cfg.max_time_minutes is not None:
                self.cfg.max_time_minutes += dt / 60
            return out

    return BudgetTrainer


def _config(name: str, args: argparse.Namespace, extra: list[str], own: list[str], budget_s: float | None):
    """The validated, preflighted config of one run."""
    from flowrl.cli import build_config, preflight

    steps = args.steps if budget_s is None else args.max_iterations
    argv = [
        "--algorithm", name, "--pretrained_model_name_or_path", args.model,
        "--output_dir", str(Path(args.out) / name), "--max_train_steps", str(steps),
        "--num_inference_steps", str(args.num_inference_steps), "--seed", str(args.seed),
        "--eval_steps", str(steps if budget_s is None else 10**9), "--checkpointing_steps", "0",
        "--report_to", "none", *extra, *own,
    ]
    if budget_s is not None:
        argv += ["--max_time_minutes", repr(budget_s / 60)]
    cfg = build_config(argv)
    preflight(cfg)
    return cfg, argv


def _run(cfg, argv: list[str]) -> tuple[list[dict], dict]:
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    trainer = _budget_trainer_class()(cfg)
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_s = wall - trainer.setup_s - trainer.eval_s
    return recs, {"argv": argv, "train_wall_s": train_s, "eval_s": trainer.eval_s, "rewards": dict(cfg.rewards)}


def _summarize(recs: list[dict], info: dict) -> dict:
    its = [r for r in recs if r["step"] >= 1 and "time/sampling_s" in r]
    timed = its[1:] if len(its) > 1 else its
    mean = lambda key: statistics.fmean(r[key] for r in timed) if timed else math.nan  # noqa: E731
    first = next(r for r in recs if r["step"] == 0)
    last = recs[-1]
    final: dict[str, float] = {}
    gains: dict[str, float] = {}
    for split in ("eval", "heldout"):
        total0 = total1 = 0.0
        have = False
        for rname, w in info["rewards"].items():
            k = f"{split}/reward/{rname}"
            if k in first and k in last:
                final[f"{split}/{rname}"] = last[k]
                gains[f"{split}/{rname}"] = last[k] - first[k]
                total0, total1, have = total0 + w * first[k], total1 + w * last[k], True
        if have:
            final[f"{split}/total"] = total1
            gains[f"{split}/total"] = total1 - total0
    return {
        "iterations": len(its),
        "train_wall_s": info["train_wall_s"],
        "eval_s": info["eval_s"],
        "time_per_iter_s": mean("time/sampling_s") + mean("time/training_s"),
        "sampling_s": mean("time/sampling_s"),
        "training_s": mean("time/training_s"),
        "nfe_sampling_per_iter": mean("nfe/sampling"),
        "nfe_training_per_iter": mean("nfe/training"),
        "nfe_total": sum(r["nfe/sampling"] + r["nfe/training"] for r in its),
        "train_reward_first": its[0]["reward/mean"] if its else math.nan,
        "train_reward_last": its[-1]["reward/mean"] if its else math.nan,
        "reward_initial": {k: v for k, v in first.items() if "/reward/" in k},
        "reward_final": {k: v for k, v in last.items() if "/reward/" in k},
        "final": final,
        "gains": gains,
        "argv": info["argv"],
    }


def _markdown(result: dict) -> str:
    base = result["baseline"]
    keys = result["score_keys"]
    lines = [
        f"# Branching samplers benchmark (equal wall-clock: {result['budget_s']:.1f} s of training, set by "
        f"`{base}` at {result['steps']} iterations; T = {result['num_inference_steps']}, model `{result['model']}`)",
        "",
        "Time per iteration = sampling + training (evaluation excluded), mean over iterations 2..N. NFE include CFG. "
        "Scores: final evaluation (gain over the initial one; difference of the final score to the baseline's).",
        "",
        "| preset | iterations | train s | s/iter | NFE/iter sampling | NFE/iter training | NFE total | "
        + " | ".join(f"{k} final (gain; vs base)" for k in keys) + " |",
        "|---" * (7 + len(keys)) + "|",
    ]
    for name, s in result["presets"].items():
        cells = [f"`{name}`", str(s["iterations"]), f"{s['train_wall_s']:.1f}", f"{s['time_per_iter_s']:.3f}",
                 f"{s['nfe_sampling_per_iter']:.0f}", f"{s['nfe_training_per_iter']:.0f}", f"{s['nfe_total']:.0f}"]
        for k in keys:
            v, g, d = s["final"].get(k, math.nan), s["gains"].get(k, math.nan), s["final_vs_baseline"].get(k, math.nan)
            cells.append(f"{v:.4f} ({g:+.4f}; {d:+.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Extra training flags: " + (" ".join(result["extra_flags"]) or "none")]
    if result["preset_flags"]:
        lines += ["", "Per-preset flags:", ""]
        lines += [f"- `{name}`: " + " ".join(flags) for name, flags in result["preset_flags"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args, extra = _parser().parse_known_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    presets = [p for p in args.presets.split(",") if p and p != args.baseline]
    own: dict[str, list[str]] = {}
    for spec in args.preset_args:
        name, sep, flags = spec.partition(":")
        if not sep or name.strip() not in presets + [args.baseline]:
            raise SystemExit(f"--preset_args {spec!r}: expected 'NAME: FLAGS' with NAME one of "
                             f"{presets + [args.baseline]}")
        own.setdefault(name.strip(), []).extend(shlex.split(flags))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flowrl.config import ConfigError

    try:  # every config is checked before anything trains (budgeted ones with a placeholder budget)
        base_cfg = _config(args.baseline, args, extra, own.get(args.baseline, []), None)
        for name in presets:
            _config(name, args, extra, own.get(name, []), 1.0)
    except ConfigError as e:
        raise SystemExit(f"benchmarks.branching: {e}") from None
    print(f"[benchmarks.branching] baseline {args.baseline}: {args.steps} iterations", flush=True)
    rows = {args.baseline: _summarize(*_run(*base_cfg))}
    budget = rows[args.baseline]["train_wall_s"]
    for name in presets:
        print(f"[benchmarks.branching] {name}: {budget:.1f} s budget", flush=True)
        rows[name] = _summarize(*_run(*_config(name, args, extra, own.get(name, []), budget)))
    b = rows[args.baseline]
    for s in rows.values():
        s["final_vs_baseline"] = {k: v - b["final"].get(k, math.nan) for k, v in s["final"].items()}
        s["time_per_iter_ratio"] = s["time_per_iter_s"] / b["time_per_iter_s"] if b["time_per_iter_s"] else math.nan
    score_keys = sorted({k for s in rows.values() for k in s["final"] if k.endswith("/total")})
    result = {
        "steps": args.steps, "budget_s": budget, "num_inference_steps": args.num_inference_steps, "model": args.model,
        "seed": args.seed, "baseline": args.baseline, "extra_flags": extra, "preset_flags": own,
        "score_keys": score_keys, "presets": rows,
    }
    (out / "branching.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "branching.md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
