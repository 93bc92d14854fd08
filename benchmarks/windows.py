"""Window plans benchmark: Flow-GRPO vs MixGRPO vs MixGRPO-Flash at equal iterations.

    python -m benchmarks.windows --steps 100 --out outputs/bench-windows [any flowrl train flag ...]

Trains each preset (default ``flow_grpo mixgrpo mixgrpo_flash``) on the same model (default ``embedded``), seed,
prompts and settings, at T = ``--num_inference_steps`` (10) and window w = ``--window_size`` (4), for ``--steps``
iterations, with an evaluation before training and after the last iteration. Writes ``windows.json`` and
``windows.md`` to ``--out`` (each run's own outputs are in ``--out/<preset>``):

* time per iteration (sampling + training, evaluation excluded): the mean over iterations 2..N (the first one pays
  for warm-up; with N = 1 the only one), and its ratio to the baseline preset (``flow_grpo``, else the first listed);
  sampling and training time ratios and the exact NFE per iteration too;
* reward gains: final minus initial ``eval`` and ``heldout`` reward of every configured reward (and the weighted
  total), and each gain's difference to the baseline's.

Flags not listed here go to every training run unchanged (e.g. ``--prompts_per_step 2 --group_size 4``); the runs
differ only in ``--algorithm``. Reruns overwrite ``--out/<preset>``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

DEFAULT_PRESETS = ("flow_grpo", "mixgrpo", "mixgrpo_flash")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.windows", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, required=True, help="training iterations per preset")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets; first = fallback baseline")
    ap.add_argument("--baseline", default="flow_grpo", help="preset the ratios and gains are relative to")
    ap.add_argument("--model", default="embedded", help="--pretrained_model_name_or_path of every run")
    ap.add_argument("--num_inference_steps", type=int, default=10, help="T")
    ap.add_argument("--window_size", type=int, default=4, help="w")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _config(name: str, args: argparse.Namespace, extra: list[str]):
    """The validated, preflighted config of one run (all are built before any training starts)."""
    from flowrl.cli import build_config, preflight

    argv = [
        "--algorithm", name, "--pretrained_model_name_or_path", args.model,
        "--output_dir", str(Path(args.out) / name), "--max_train_steps", str(args.steps),
        "--num_inference_steps", str(args.num_inference_steps), "--window_size", str(args.window_size),
        "--seed", str(args.seed), "--eval_steps", str(args.steps), "--checkpointing_steps", "0",
        "--report_to", "none", *extra,
    ]
    cfg = build_config(argv)
    preflight(cfg)
    return cfg, argv


def _run(cfg, argv: list[str]) -> tuple[list[dict], dict]:
    from flowrl.trainer import Trainer

    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    Trainer(cfg).train()
    wall = time.time() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return recs, {"argv": argv, "wall_s": wall, "rewards": dict(cfg.rewards)}


def _summarize(recs: list[dict], info: dict) -> dict:
    its = [r for r in recs if r["step"] >= 1 and "time/sampling_s" in r]
    timed = its[1:] if len(its) > 1 else its
    mean = lambda key: statistics.fmean(r[key] for r in timed)  # noqa: E731
    first = next(r for r in recs if r["step"] == 0)
    last = recs[-1]
    gains: dict[str, float] = {}
    for split in ("eval", "heldout"):
        total0 = total1 = 0.0
        have = False
        for rname, w in info["rewards"].items():
            k = f"{split}/reward/{rname}"
            if k in first and k in last:
                gains[f"{split}/{rname}"] = last[k] - first[k]
                total0, total1, have = total0 + w * first[k], total1 + w * last[k], True
        if have:
            gains[f"{split}/total"] = total1 - total0
    return {
        "iterations": len(its),
        "timed_iterations": len(timed),
        "time_per_iter_s": mean("time/sampling_s") + mean("time/training_s"),
        "sampling_s": mean("time/sampling_s"),
        "training_s": mean("time/training_s"),
        "nfe_sampling": mean("nfe/sampling"),
        "nfe_training": mean("nfe/training"),
        "train_reward_first": its[0]["reward/mean"] if its else math.nan,
        "train_reward_last": its[-1]["reward/mean"] if its else math.nan,
        "reward_initial": {k: v for k, v in first.items() if "/reward/" in k},
        "reward_final": {k: v for k, v in last.items() if "/reward/" in k},
        "gains": gains,
        "wall_s": info["wall_s"],
        "argv": info["argv"],
    }


def _markdown(result: dict) -> str:
    base = result["baseline"]
    rows = result["presets"]
    lines = [
        f"# Window plans benchmark ({result['steps']} iterations, T = {result['num_inference_steps']}, "
        f"w = {result['window_size']}, model `{result['model']}`)",
        "",
        f"Ratios are relative to `{base}`; time per iteration = sampling + training (evaluation excluded), mean over "
        "iterations 2..N. Gains = final minus initial evaluation reward.",
        "",
        "| preset | s/iter | ratio | sampling ratio | training ratio | NFE sampling | NFE training | "
        + " | ".join(f"{g} gain (vs base)" for g in result["gain_keys"]) + " |",
        "|---" * (7 + len(result["gain_keys"])) + "|",
    ]
    for name, s in rows.items():
        cells = [
            f"`{name}`", f"{s['time_per_iter_s']:.3f}", f"{s['time_ratio']:.3f}", f"{s['sampling_ratio']:.3f}",
            f"{s['training_ratio']:.3f}", f"{s['nfe_sampling']:.0f}", f"{s['nfe_training']:.0f}",
        ]
        for g in result["gain_keys"]:
            v, d = s["gains"].get(g, math.nan), s["gain_vs_baseline"].get(g, math.nan)
            cells.append(f"{v:+.4f} ({d:+.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Extra training flags: " + (" ".join(result["extra_flags"]) or "none"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args, extra = _parser().parse_known_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    presets = [p for p in args.presets.split(",") if p]
    baseline = args.baseline if args.baseline in presets else presets[0]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from flowrl.config import ConfigError

    try:
        configs = {name: _config(name, args, extra) for name in presets}
    except ConfigError as e:
        raise SystemExit(f"benchmarks.windows: {e}") from None
    rows: dict[str, dict] = {}
    for name, (cfg, run_argv) in configs.items():
        print(f"[benchmarks.windows] training {name} for {args.steps} iterations", flush=True)
        rows[name] = _summarize(*_run(cfg, run_argv))
    b = rows[baseline]
    ratio = lambda a, c: a / c if c else math.nan  # noqa: E731
    for s in rows.values():
        s["time_ratio"] = ratio(s["time_per_iter_s"], b["time_per_iter_s"])
        s["sampling_ratio"] = ratio(s["sampling_s"], b["sampling_s"])
        s["training_ratio"] = ratio(s["training_s"], b["training_s"])
        s["nfe_sampling_ratio"] = ratio(s["nfe_sampling"], b["nfe_sampling"])
        s["gain_vs_baseline"] = {k: v - b["gains"].get(k, math.nan) for k, v in s["gains"].items()}
    gain_keys = sorted({k for s in rows.values() for k in s["gains"] if k.endswith("/total")})
    result = {
        "steps": args.steps, "num_inference_steps": args.num_inference_steps, "window_size": args.window_size,
        "model": args.model, "seed": args.seed, "baseline": baseline, "extra_flags": extra, "gain_keys": gain_keys,
        "presets": rows,
    }
    out = Path(args.out)
    (out / "windows.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "windows.md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
