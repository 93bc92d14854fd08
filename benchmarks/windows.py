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
differ only in ``--algorithm`` (and ``--preset_args "NAME: FLAGS"``, repeatable, which adds flags to one preset).
Reruns overwrite ``--out/<preset>``. The run setup is shared with the suite (``benchmarks.common``); the suite
(``python -m benchmarks``) runs this comparison for every preset and several seeds.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks.common import (
    add_run_args, make_config, parse_preset_args, ratio, run_argv, set_threads_default, split_list, summarize,
    train_run, write_json,
)

DEFAULT_PRESETS = ("flow_grpo", "mixgrpo", "mixgrpo_flash")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.windows", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, required=True, help="training iterations per preset")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets; first = fallback baseline")
    ap.add_argument("--baseline", default="flow_grpo", help="preset the ratios and gains are relative to")
    ap.add_argument("--window_size", type=int, default=4, help="w")
    return add_run_args(ap)


def _argv(name: str, args: argparse.Namespace, extra: list[str], own: list[str]) -> list[str]:
    return run_argv(name, Path(args.out) / name, steps=args.steps, model=args.model,
                    num_inference_steps=args.num_inference_steps, seed=args.seed, eval_steps=args.steps,
                    extra=["--window_size", str(args.window_size), *extra, *own])


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
    set_threads_default()
    args, extra = _parser().parse_known_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    presets = split_list(args.presets)
    baseline = args.baseline if args.baseline in presets else presets[0]
    own = parse_preset_args(args.preset_args, presets)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from flowrl.config import ConfigError

    try:  # every config is checked before anything trains
        configs = {name: (make_config(a), a) for name in presets for a in [_argv(name, args, extra, own.get(name, []))]}
    except ConfigError as e:
        raise SystemExit(f"benchmarks.windows: {e}") from None
    rows: dict[str, dict] = {}
    for name, (cfg, run_argv_) in configs.items():
        print(f"[benchmarks.windows] training {name} for {args.steps} iterations", flush=True)
        rows[name] = summarize(*train_run(run_argv_, cfg=cfg))
    b = rows[baseline]
    for s in rows.values():
        s["time_ratio"] = ratio(s["time_per_iter_s"], b["time_per_iter_s"])
        s["sampling_ratio"] = ratio(s["sampling_s"], b["sampling_s"])
        s["training_ratio"] = ratio(s["training_s"], b["training_s"])
        s["nfe_sampling_ratio"] = ratio(s["nfe_sampling"], b["nfe_sampling"])
        s["gain_vs_baseline"] = {k: v - b["gains"].get(k, math.nan) for k, v in s["gains"].items()}
    gain_keys = sorted({k for s in rows.values() for k in s["gains"] if k.endswith("/total")})
    result = {
        "steps": args.steps, "num_inference_steps": args.num_inference_steps, "window_size": args.window_size,
        "model": args.model, "seed": args.seed, "baseline": baseline, "extra_flags": extra, "preset_flags": own,
        "gain_keys": gain_keys, "presets": rows,
    }
    out = Path(args.out)
    write_json(out / "windows.json", result)
    (out / "windows.md").write_text(_markdown(result), encoding="utf-8")
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
