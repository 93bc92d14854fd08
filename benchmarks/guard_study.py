"""Over-optimisation study: Flow-GRPO vs GRPO-Guard on a gameable proxy reward, watched by gold metrics.

    python -m benchmarks.guard_study --steps 200 --seeds 0,1 --out outputs/guard-study [any flowrl train flag ...]

Trains each method (default ``flow_grpo`` and ``flow_grpo+grpo_guard``: the same plan, GRPO-Guard's regulated clipping
on or off) on the same model (default ``embedded``), prompts and settings, for ``--steps`` iterations per seed, with
one reward only: the proxy ``--proxy`` (default ``jpeg_compressibility``, DDPO's negative JPEG size: maximised by flat,
detail-free images, i.e. easy to game). Every ``--eval_every`` iterations (and before training and at the end) the
trainer's own evaluation (ODE samples, fixed seeds, EMA weights) of the ``--gold_set`` prompts (default ``heldout``,
the compositional split) is scored by the proxy and by gold metrics that training never sees:

* ``gold`` = the ``scenes`` verifier's mean soft score (clauses met) and ``gold/strict`` its strict accuracy: the
  alignment metrics (GenEval's role);
* image-quality sanity checks, chosen because the cheap way to shrink a JPEG of these scenes is to erase, shrink or
  wash out the coloured objects: ``gold/objects_ratio`` (objects the verifier detects / objects the prompt asks for,
  per image, averaged; 1 for faithful images, towards 0 as objects vanish; > 1 for clutter), ``gold/blank`` (share of
  images with no object detected) and ``gold/saturation`` (mean per-pixel chroma max(rgb) - min(rgb): the objects are
  saturated colours on a near-grey background). ``gold/edge_energy`` (mean absolute luminance difference between
  neighbouring pixels) is what JPEG size tracks; it is expected to fall with the proxy and is reported to show how
  much detail a method gives away per unit of proxy gain.

Comparison at equal proxy gain: a method that optimises the proxy faster also degrades the gold metrics earlier, so
comparing at equal iterations mixes speed with over-optimisation. For every run the proxy gain is
``proxy(t) - proxy(0)``; the common target G* is the smallest of the runs' best gains; each run's gold metrics are
read at the first evaluation where its gain reaches G* (linearly interpolated from the evaluation before), and at
G*/2. Gold deltas are relative to the run's own step-0 evaluation.

Writes to ``--out``: ``guard_study.json`` (settings, every run's evaluation curve, the summary), ``guard_study.md``
(the table, mean over seeds), ``guard_study.png`` (gold metrics against proxy gain over training, one line per run);
each run's own outputs (metrics.jsonl, grids, LoRA) in ``--out/<method>/seed<k>``. Flags not listed here go to every
training run unchanged; the runs differ only in ``--algorithm`` and ``--seed``. Reruns overwrite.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_METHODS = ("flow_grpo", "flow_grpo+grpo_guard")
GOLD = "gold"
GOLD_KEYS = ("gold", "gold/strict", "gold/objects_ratio", "gold/blank", "gold/saturation", "gold/edge_energy")
"""Metrics read from every evaluation (after ``<label>/reward/``); ``gold`` is the verifier's soft score."""


# ------------------------------------------------------------------------------------------------------ gold metrics
class GoldMetrics:
    """A reward-protocol callable (never trained on): verifier soft score, plus quality checks in ``info``."""

    def __init__(self) -> None:
        from rewards import SceneVerifier

        self.verifier = SceneVerifier()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any):
        from rewards import evaluate_reward
        from rewards.scenes import parse_prompt

        soft, info = evaluate_reward(self.verifier, images, list(prompts))
        asked = []
        for p in prompts:
            try:
                asked.append(float(sum(o.count for o in parse_prompt(p).objects)))
            except ValueError:
                asked.append(math.nan)
        asked_t = torch.tensor(asked, dtype=torch.float32, device=soft.device)
        n_obj = info["n_objects"].to(soft.device)
        x = images.detach().float().clamp(0, 1)
        lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        edge = 0.5 * ((lum[:, 1:, :] - lum[:, :-1, :]).abs().mean(dim=(1, 2))
                      + (lum[:, :, 1:] - lum[:, :, :-1]).abs().mean(dim=(1, 2)))
        return soft, {
            "strict": info["strict"],
            "objects_ratio": n_obj / asked_t,
            "blank": (n_obj == 0).float(),
            "saturation": (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2)).to(soft.device),
            "edge_energy": edge.to(soft.device),
        }


def _gold_trainer_class():
    """A :class:`~flowrl.trainer.Trainer` whose evaluations also score the gold metrics (training does not)."""
    from flowrl.trainer import Trainer

    class GoldTrainer(Trainer):
        def evaluate(self, step: int) -> dict:
            trained_on = self.rewards
            self.rewards = {**trained_on, GOLD: GoldMetrics()}  # evaluation only; restored before the next update
            try:
                return super().evaluate(step)
            finally:
                self.rewards = trained_on

    return GoldTrainer


def _gold_trainer(cfg):
    return _gold_trainer_class()(cfg)


# ------------------------------------------------------------------------------------------------------ analysis
def at_proxy_gain(curve: list[dict], gain: float, key: str) -> float:
    """``key`` at the first point where ``proxy - curve[0]["proxy"]`` reaches ``gain``, linearly interpolated from the
    point before; NaN if the curve never gets there."""
    if not curve:
        return math.nan
    p0 = curve[0]["proxy"]
    prev = None
    for pt in curve:
        g = pt["proxy"] - p0
        if g >= gain:
            if prev is None or g == prev[0]:
                return pt[key]
            a = (gain - prev[0]) / (g - prev[0])
            return prev[1][key] + a * (pt[key] - prev[1][key])
        prev = (g, pt)
    return math.nan


def _curve(recs: list[dict], label: str, proxy: str) -> list[dict]:
    out = []
    for r in recs:
        k = f"{label}/reward/{proxy}"
        if k in r:
            pt = {"step": r["step"], "proxy": r[k]}
            pt.update({g: r.get(f"{label}/reward/{g}", math.nan) for g in GOLD_KEYS})
            out.append(pt)
    return out


def _summarize_run(curve: list[dict], target: float) -> dict:
    first, last = curve[0], curve[-1]
    row: dict[str, Any] = {
        "proxy_initial": first["proxy"], "proxy_final": last["proxy"], "proxy_gain_final": last["proxy"] - first["proxy"],
        "best_proxy_gain": max(p["proxy"] for p in curve) - first["proxy"],
    }
    for g in GOLD_KEYS:
        row[f"{g}@0"] = first[g]
        row[f"{g}@final"] = last[g]
        for tag, frac in (("G*", 1.0), ("G*/2", 0.5)):
            row[f"{g}@{tag}"] = at_proxy_gain(curve, frac * target, g) if target > 0 else math.nan
    row["step@G*"] = at_proxy_gain(curve, target, "step") if target > 0 else math.nan
    return row


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.fmean(xs) if xs else math.nan


def _fmt(x: float, spec: str = "+.4f") -> str:
    return "n/a" if x != x else format(x, spec)


def _markdown(result: dict) -> str:
    t = result["target_proxy_gain"]
    lines = [
        f"# GRPO-Guard over-optimisation study ({result['steps']} iterations, seeds {result['seeds']}, "
        f"proxy `{result['proxy']}`, gold set `{result['gold_set']}`, model `{result['model']}`)",
        "",
        f"Common proxy gain G* = {_fmt(t)} (the smallest of the runs' best gains). Gold metrics at G* (linear "
        "interpolation at the first crossing); deltas against each run's step-0 evaluation; mean over seeds. "
        "Soft / strict = scenes verifier; objects = detected / asked objects; blank = share with no object; "
        "saturation and edge energy are pixel statistics (see the script's docstring).",
        "",
        "| method | proxy gain (final) | step at G* | Δsoft @G* | Δstrict @G* | objects @G* | blank @G* | "
        "saturation @G* | edge @G* | Δsoft @G*/2 | Δstrict @G*/2 | Δsoft final | Δstrict final |",
        "|---" * 13 + "|",
    ]
    for m, runs in result["methods"].items():
        rows = list(runs.values())
        mean = lambda k: _mean([r[k] for r in rows])  # noqa: E731
        delta = lambda g, at: _mean([r[f"{g}@{at}"] - r[f"{g}@0"] for r in rows])  # noqa: E731
        lines.append("| " + " | ".join([
            f"`{m}`", _fmt(mean("proxy_gain_final")), _fmt(mean("step@G*"), ".1f"),
            _fmt(delta("gold", "G*")), _fmt(delta("gold/strict", "G*")), _fmt(mean("gold/objects_ratio@G*"), ".3f"),
            _fmt(mean("gold/blank@G*"), ".3f"), _fmt(mean("gold/saturation@G*"), ".4f"),
            _fmt(mean("gold/edge_energy@G*"), ".4f"), _fmt(delta("gold", "G*/2")), _fmt(delta("gold/strict", "G*/2")),
            _fmt(delta("gold", "final")), _fmt(delta("gold/strict", "final")),
        ]) + " |")
    lines += ["", "Per run (initial → final):", ""]
    for m, runs in result["methods"].items():
        for seed, r in runs.items():
            lines.append(f"- `{m}` seed {seed}: proxy {_fmt(r['proxy_initial'], '.4f')} → {_fmt(r['proxy_final'], '.4f')}, "
                         f"soft {_fmt(r['gold@0'], '.3f')} → {_fmt(r['gold@final'], '.3f')}, strict "
                         f"{_fmt(r['gold/strict@0'], '.3f')} → {_fmt(r['gold/strict@final'], '.3f')}, objects "
                         f"{_fmt(r['gold/objects_ratio@0'], '.3f')} → {_fmt(r['gold/objects_ratio@final'], '.3f')}")
    lines += ["", "Extra training flags: " + (" ".join(result["extra_flags"]) or "none"), ""]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gold", "verifier soft score (gold)"), ("gold/strict", "strict accuracy (gold)"),
              ("gold/objects_ratio", "detected / asked objects"), ("gold/saturation", "saturation")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes.flat, panels):
        for mi, (m, runs) in enumerate(result["curves"].items()):
            for si, (seed, curve) in enumerate(runs.items()):
                if not curve:
                    continue
                p0 = curve[0]["proxy"]
                ax.plot([p["proxy"] - p0 for p in curve], [p[key] for p in curve], styles[si % len(styles)],
                        marker="o", ms=3, color=colors[mi % len(colors)], label=f"{m} (seed {seed})")
        if result["target_proxy_gain"] > 0:
            ax.axvline(result["target_proxy_gain"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"proxy gain ({result['proxy']})")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Proxy vs gold over training ({result['gold_set']} prompts; dashed: G*)")
    from benchmarks.common import save_figure

    save_figure(fig, path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ driver
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.guard_study", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, required=True, help="training iterations per run")
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated --algorithm values")
    ap.add_argument("--model", default="embedded", help="--pretrained_model_name_or_path of every run")
    ap.add_argument("--proxy", default="jpeg_compressibility", help="the only training reward")
    ap.add_argument("--gold_set", default="heldout", help="prompt set of the evaluations (gold and proxy)")
    ap.add_argument("--eval_every", type=int, default=None, help="iterations between evaluations (default steps/10)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a run whose <out>/<method>/seed<k>/run_record.json records the same training flags "
                         "(a finished run) instead of training it again; lets the runs go in parallel processes "
                         "(one --methods/--seeds pair each, same --out) and a last --reuse call summarise them all")
    return ap


def _label(name: str) -> str:  # the trainer's metric prefix of an eval set
    return "eval" if name in ("eval", "scenes:eval") else ("heldout" if "heldout" in name else Path(name).stem)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import (finished_run, make_config, read_metrics, record_run, run_argv, set_threads_default,
                                   split_list, train_run, write_json, write_text_atomic)

    set_threads_default()
    args, extra = _parser().parse_known_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    seeds = [int(s) for s in split_list(args.seeds)]
    methods = split_list(args.methods)
    every = args.eval_every or max(1, args.steps // 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flowrl.config import ConfigError

    runs = {}
    try:
        for m in methods:
            for seed in seeds:
                argv_ = run_argv(m, out / m / f"seed{seed}", steps=args.steps, model=args.model,
                                 num_inference_steps=None, seed=seed, eval_steps=every,
                                 extra=["--eval_sets", args.gold_set, "--reward", args.proxy, *extra])
                runs[(m, seed)] = (make_config(argv_), argv_)
    except ConfigError as e:
        raise SystemExit(f"benchmarks.guard_study: {e}") from None
    label = _label(args.gold_set)
    curves: dict[str, dict[str, list[dict]]] = {m: {} for m in methods}
    walls: dict[str, dict[str, float]] = {m: {} for m in methods}
    for (m, seed), (cfg, argv_) in runs.items():
        info = finished_run(cfg.output_dir, {"argv": argv_}) if args.reuse else None
        if info is not None:
            print(f"[benchmarks.guard_study] reusing {m} seed {seed} from {cfg.output_dir}", flush=True)
            recs = read_metrics(cfg.output_dir)
        else:
            print(f"[benchmarks.guard_study] training {m} seed {seed} for {args.steps} iterations", flush=True)
            recs, info = train_run(argv_, cfg=cfg, trainer_base=_gold_trainer_class())
            record_run(cfg.output_dir, {"argv": argv_}, {"wall_s": info["wall_s"]})
        walls[m][str(seed)] = info["wall_s"]
        curves[m][str(seed)] = _curve(recs, label, args.proxy)
    all_curves = [c for per in curves.values() for c in per.values() if c]
    target = min(max(p["proxy"] for p in c) - c[0]["proxy"] for c in all_curves) if all_curves else math.nan
    target = target if target > 0 else 0.0
    result = {
        "steps": args.steps, "seeds": seeds, "proxy": args.proxy, "gold_set": args.gold_set, "model": args.model,
        "eval_every": every, "extra_flags": extra, "target_proxy_gain": target,
        "methods": {m: {s: {**_summarize_run(c, target), "wall_s": walls[m][s]} for s, c in per.items() if c}
                    for m, per in curves.items()},
        "curves": curves,
    }
    write_json(out / "guard_study.json", result)
    write_text_atomic(out / "guard_study.md", _markdown(result))
    _plot(result, out / "guard_study.png")
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
