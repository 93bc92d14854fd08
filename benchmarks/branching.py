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
``--out/<preset>``. The run setup is shared with the suite (``benchmarks.common``), which runs this comparison for
every preset and several seeds (``python -m benchmarks``). CPU note: at the presets' paper settings a branching
iteration costs many Flow-GRPO iterations (TempFlow at T = 10, K = 6, N = 4 seeds: 4 x (9 + 6 x 45) = 1116 NFE per
prompt vs 8 x 10 = 80), which is exactly what an equal-wall-clock comparison charges them for.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks.common import (
    add_run_args, make_config, parse_preset_args, run_argv, set_threads_default, split_list, summarize, train_run,
    write_json,
)

DEFAULT_PRESETS = ("tempflow_grpo", "g2rpo", "dynamic_treerpo")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.branching", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, required=True, help="baseline training iterations (sets the time budget)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets to compare")
    ap.add_argument("--baseline", default="flow_grpo", help="preset that runs --steps iterations and sets the budget")
    ap.add_argument("--max_iterations", type=int, default=100_000, help="iteration cap of the budgeted runs")
    return add_run_args(ap)


def _argv(name: str, args: argparse.Namespace, extra: list[str], own: list[str], budget_s: float | None) -> list[str]:
    steps = args.steps if budget_s is None else args.max_iterations
    return run_argv(name, Path(args.out) / name, steps=steps, model=args.model,
                    num_inference_steps=args.num_inference_steps, seed=args.seed,
                    eval_steps=steps if budget_s is None else None, budget_s=budget_s, extra=[*extra, *own])


def _summarize(recs: list[dict], info: dict) -> dict:
    s = summarize(recs, info)
    s["nfe_sampling_per_iter"], s["nfe_training_per_iter"] = s["nfe_sampling"], s["nfe_training"]
    return s


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
        cells = [f"`{name}`", str(s["iterations"]), f"{s['train_s']:.1f}", f"{s['time_per_iter_s']:.3f}",
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
    set_threads_default()
    args, extra = _parser().parse_known_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    presets = [p for p in split_list(args.presets) if p != args.baseline]
    own = parse_preset_args(args.preset_args, presets + [args.baseline])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flowrl.config import ConfigError

    try:  # every config is checked before anything trains (budgeted ones with a placeholder budget)
        base_argv = _argv(args.baseline, args, extra, own.get(args.baseline, []), None)
        base_cfg = make_config(base_argv)
        for name in presets:
            make_config(_argv(name, args, extra, own.get(name, []), 1.0))
    except ConfigError as e:
        raise SystemExit(f"benchmarks.branching: {e}") from None
    print(f"[benchmarks.branching] baseline {args.baseline}: {args.steps} iterations", flush=True)
    rows = {args.baseline: _summarize(*train_run(base_argv, cfg=base_cfg))}
    budget = rows[args.baseline]["train_s"]  # the baseline's training loop (final checkpoint and export excluded)
    for name in presets:
        print(f"[benchmarks.branching] {name}: {budget:.1f} s budget", flush=True)
        rows[name] = _summarize(*train_run(_argv(name, args, extra, own.get(name, []), budget)))
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
    write_json(out / "branching.json", result)
    (out / "branching.md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
