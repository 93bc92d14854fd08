"""``report.md`` and the PNG plots of the suite, from the ``results.json`` document (:mod:`benchmarks.suite`).

``python -m benchmarks.report DIR`` rewrites them from ``DIR/results.json`` (e.g. after editing the report code).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import (SPLITS, fmean, fmt, fstd, machine_line, md_table, save_figure,
                               write_text_atomic)

PLOTS = ("curves_iterations.png", "curves_time.png", "cost.png", "overhead.png", "scaling.png")


def _pm(mean: float, std: float, spec: str = ".3f") -> str:
    if mean != mean:
        return "n/a"
    return f"{mean:{spec}} ± {std:{spec.lstrip('+')}}" if std == std else f"{mean:{spec}}"  # a std has no sign


def _mb(b: float) -> str:
    return fmt(b / 2**20, ".1f")


# ------------------------------------------------------------------------------------------------------ markdown
def markdown(doc: dict) -> str:
    m, st, det = doc["machine"], doc["settings"], doc["details"]
    load0, load1 = m.get("load_average"), m.get("load_average_end")
    lines = [
        f"# flowrl benchmark suite ({'quick' if st['quick'] else 'full'})",
        "",
        f"Machine: {machine_line(m)}.",
        f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; the suite took {doc['suite_s'] / 60:.1f} min. "
        f"Model `{st['model']}`, T = {st['num_inference_steps']}.",
    ]
    if load0 and load1 and max(load0[0], load1[0]) > 0.5 * (m.get("cores") or 1):
        lines += ["", f"**Shared machine**: load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end on "
                  f"{m.get('cores')} cores. Wall-clock figures are noisy (a starved process can take many times its "
                  "CPU time); trust the CPU-time columns, the best-of-reps overhead figures and the per-pair spread."]
    lines += ["", "## Headline figures", ""]
    rows = []
    for key, what in (("overhead_ratio", "iteration time / bare model work (goal <= 1.10)"),
                      ("overhead_ratio/sampling", "sampling phase"), ("overhead_ratio/training", "training phase"),
                      ("overhead_ratio/cpu", "the same in process CPU time"),
                      ("memory_ratio", "iteration peak memory / bare work's peak"),
                      ("memory_ratio/sampling", "sampling phase"), ("memory_ratio/training", "training phase")):
        if key in doc:
            rows.append([f"`{key}`", fmt(doc[key]), what])
    for k in sorted(k for k in doc if k.startswith("time_ratio/")):
        p = k.split("/", 1)[1]
        rows.append([f"`{k}`", fmt(doc[k]), f"time per iteration / the baseline's (CPU time: "
                     f"{fmt(doc.get(f'cpu_time_ratio/{p}', math.nan))}; NFE sampling "
                     f"{fmt(doc.get(f'nfe_sampling_ratio/{p}', math.nan), '.2f')}, training "
                     f"{fmt(doc.get(f'nfe_training_ratio/{p}', math.nan), '.2f')})"])
    lines += md_table(["figure", "value", "meaning"], rows) if rows else ["(no section ran)"]
    if "presets" in det:
        lines += _presets_md(doc, det["presets"])
    if "overhead" in det:
        lines += _overhead_md(det["overhead"])
    if "memory" in det:
        lines += _memory_md(det["memory"])
    if "scaling" in det:
        lines += _scaling_md(det["scaling"])
    extra = st.get("extra_flags") or []
    lines += ["", "## Settings", "", "```", json.dumps({k: v for k, v in st.items()}, indent=1), "```",
              "", "Extra flags of every run: " + (" ".join(extra) or "none"), ""]
    return "\n".join(lines)


def _presets_md(doc: dict, res: dict) -> list[str]:
    base, presets = res["baseline"], list(res["equal_iterations"])
    cpu = res.get("budget_clock") == "cpu"
    clock = "CPU time" if cpu else "wall-clock"
    lines = [
        "", "## Presets", "",
        f"Every preset trains {res['iterations']} iterations per seed (seeds {res['seeds']}), evaluated every "
        f"{res['eval_every']} iterations and at the end (equal iterations); then each trains again for the baseline's "
        f"(`{base}`) training time, {res['budget_s']:.1f} s of {clock} (equal time; evaluations and setup excluded; "
        "max_train_steps = the iterations its own pace fits in the budget, and a run stops after the iteration that "
        "crosses the budget, so it may overshoot by one iteration: its actual time is shown; a preset whose "
        "equal-iteration run already matched the budget within 10% is not rerun). Scores: the weighted reward total "
        "on the evaluation sets (ODE sampling, fixed seeds, EMA weights), mean ± sample std over seeds; gain = final "
        "- initial.",
        "",
        (f"Runs went {res['jobs']} at a time, each in its own process" + (
            "; their wall-clock times disturb each other, CPU times much less." if not cpu else ".")
         if res.get("jobs", 1) > 1 else "Runs went one at a time."),
        "",
        "Evaluation flags: `" + " ".join(res["eval_flags"]) + "`.",
        "",
    ]
    per_flags = {p: f for p, f in res["flags"].items() if f[len(res["eval_flags"]):]}
    if per_flags:
        lines += ["Per-preset flags: " + "; ".join(f"`{p}`: `{' '.join(f[len(res['eval_flags']):])}`"
                                                    for p, f in per_flags.items()), ""]
    for mode, title in (("equal_iterations", "Equal iterations"), ("equal_time", f"Equal time ({clock})")):
        lines += [f"### {title}", ""]
        rows = []
        for p in presets if mode in res else []:
            cells = [f"`{p}`", fmt(doc.get(f"iterations/{mode}/{p}"), ".1f"), fmt(doc.get(f"train_s/{mode}/{p}"), ".1f"),
                     fmt(doc.get(f"train_cpu_s/{mode}/{p}"), ".1f")]
            for split in SPLITS:
                cells.append(_pm(doc.get(f"final/{mode}/{split}/{p}", math.nan),
                                 doc.get(f"final_std/{mode}/{split}/{p}", math.nan)))
                cells.append(_pm(doc.get(f"gain/{mode}/{split}/{p}", math.nan),
                                 doc.get(f"gain_std/{mode}/{split}/{p}", math.nan), "+.3f"))
            rows.append(cells)
        lines += md_table(["preset", "iterations", "train s (wall)", "train s (CPU)", "eval final", "eval gain", "heldout final",
                           "heldout gain"], rows)
        lines += [""]
    lines += [
        "### Cost per iteration", "",
        f"From the equal-iteration runs: mean over iterations 2..N (the first pays for warm-up; N = 1: the only one) "
        f"and seeds; ratios to `{base}` (wall-clock; the CPU-time ratio uses the process CPU time of the same "
        "iterations, which other processes on a shared machine disturb far less). NFE = transformer passes per "
        "iteration (CFG doubling included), exact, from the trainer's accounting.", "",
    ]
    rows = []
    for p in presets:
        rows.append([f"`{p}`", fmt(doc[f"time_per_iter_s/{p}"]), fmt(doc[f"time_ratio/{p}"]),
                     fmt(doc.get(f"cpu_time_ratio/{p}", math.nan)),
                     f"{fmt(doc[f'sampling_s/{p}'])} ({fmt(doc[f'sampling_time_ratio/{p}'], '.2f')})",
                     f"{fmt(doc[f'training_s/{p}'])} ({fmt(doc[f'training_time_ratio/{p}'], '.2f')})",
                     f"{fmt(doc[f'nfe_sampling/{p}'], '.0f')} ({fmt(doc[f'nfe_sampling_ratio/{p}'], '.2f')})",
                     f"{fmt(doc[f'nfe_training/{p}'], '.0f')} ({fmt(doc[f'nfe_training_ratio/{p}'], '.2f')})"])
    lines += md_table(["preset", "s / iteration", "time ratio", "CPU-time ratio", "sampling s (ratio)", "training s (ratio)",
                       "NFE sampling (ratio)", "NFE training (ratio)"], rows)
    lines += ["", "![eval curves by iteration](curves_iterations.png)", "",
              "![eval curves by training time](curves_time.png)", "", "![cost per iteration](cost.png)"]
    return lines


def _overhead_md(o: dict) -> list[str]:
    wl = o["workload"]
    lines = [
        "", "## Framework overhead", "",
        "One training iteration of the real trainer (`sample_and_score` + `update` + `step_metrics`: prompt encoding, "
        "noise, plan, step functions, decoding, rewards, advantages, log-prob rescoring, loss, backward, gradient "
        "diagnostics, optimizer step, EMA) against the bare model work it contains, in the same process "
        "(`benchmarks.probe`): every transformer call and VAE decode of a recorded iteration replayed on the same "
        "model (LoRA included) and the same input tensors - sampling calls without gradients, training calls with "
        "one backward of the output. Pairs (iteration, bare) alternate their order; the ratio is best-of-"
        f"{o['reps']} over best-of-{o['reps']} (wall-clock), with the CPU-time ratio and the median of per-pair "
        "ratios as cross-checks.", "",
        f"Config: `flowrl train {' '.join(o['flags'])}` (the embedded default plus these flags). Workload per "
        f"iteration: sampling {wl['sampling/transformer_calls']} transformer calls ({wl['sampling/transformer_rows']} "
        f"rows, a row repeated within a call run once; the trainer counts NFE per sample: "
        f"{o['trainer_nfe_sampling']}), {wl['sampling/decode_calls']} decodes "
        f"({wl['sampling/decode_rows']} images); training {wl['training/transformer_calls']} forward+backward calls "
        f"({wl['training/transformer_rows']} rows; trainer NFE {o['trainer_nfe_training']}); input shapes "
        f"{wl['transformer_input_shapes']}.", "",
    ]
    rows = [
        ["sampling", fmt(o["iteration_sampling_s"]), f"{fmt(o['bare_sampling_forward_s'])} + decode {fmt(o['bare_decode_s'])}",
         fmt(o["overhead_ratio_sampling"]), fmt(o["overhead_ratio_cpu_sampling"])],
        ["training", fmt(o["iteration_training_s"]), fmt(o["bare_training_s"]), fmt(o["overhead_ratio_training"]),
         fmt(o["overhead_ratio_cpu_training"])],
        ["**iteration**", fmt(o["iteration_s"]), fmt(o["bare_s"]), f"**{fmt(o['overhead_ratio'])}**",
         fmt(o["overhead_ratio_cpu"])],
    ]
    lines += md_table(["phase", "iteration s (best)", "bare s (best)", "ratio (wall)", "ratio (CPU)"], rows)
    lines += ["", "Per pair (wall-clock iteration / bare, ratio; CPU ratio): " + "; ".join(
        f"{p['iteration']['total']:.3f} / {p['bare']['total']:.3f} = {p['ratio']:.3f} ({p['cpu_ratio']:.3f})"
        for p in o["pairs"]) + f". Median of per-pair ratios {fmt(o['overhead_ratio_median_pair'])}."]
    if o.get("profile"):
        lines += ["", f"cProfile of one more iteration (main thread): `{Path(o['profile']).name}`."]
    lines += ["", "![overhead and memory](overhead.png)"]
    return lines


def _memory_md(m: dict) -> list[str]:
    it, bare = m["iteration"], m["bare"]
    where = "device memory" if it.get("device", "cpu").startswith("cuda") else "resident memory"
    lines = [
        "", "## Memory", "",
        f"Peak {where} above the process's base during one iteration vs during the bare replay, each in a "
        f"fresh process after a warm-up iteration ({it['method']}"
        + ("" if where == "device memory" else
           f"; glibc set to give every allocation over 64 KiB its own mapping, "
           f"`{' '.join(f'{k}={v}' for k, v in it['malloc_env'].items())}`, so the resident size follows live tensors "
           "rather than allocator caches")
        + "). Base = weights, optimizer state, EMA, libraries: "
        f"{_mb(it['base_rss_bytes'])} MB (iteration process), {_mb(bare['base_rss_bytes'])} MB (bare process, which "
        "also holds the recorded inputs).", "",
    ]
    rows = [["sampling", _mb(it["peak_bytes_sampling"]), _mb(bare["peak_bytes_sampling"]),
             fmt(it["peak_bytes_sampling"] / bare["peak_bytes_sampling"] if bare["peak_bytes_sampling"] else math.nan)],
            ["training", _mb(it["peak_bytes_training"]), _mb(bare["peak_bytes_training"]),
             fmt(it["peak_bytes_training"] / bare["peak_bytes_training"] if bare["peak_bytes_training"] else math.nan)],
            ["**iteration**", _mb(it["peak_bytes"]), _mb(bare["peak_bytes"]),
             f"**{fmt(it['peak_bytes'] / bare['peak_bytes'] if bare['peak_bytes'] else math.nan)}**"]]
    lines += md_table(["phase", "iteration peak MB", "bare peak MB", "ratio"], rows)
    return lines


def _scaling_md(sc: dict) -> list[str]:
    bp = sc["base_point"]
    lines = [
        "", "## Scaling", "",
        f"One axis at a time around T = {bp['T']}, G = {bp['G']}, resolution {bp['resolution']} "
        f"({sc['prompts_per_step']} prompts per iteration, sampling batch {sc['sample_batch_size']}, reduced to divide "
        "prompts x G where needed). Time: best-of iteration and bare replay in one process; memory: peak of one "
        "iteration above the base, fresh process.", "",
    ]
    for axis, pts in sc["axes"].items():
        if not pts:
            continue
        rows = [[pt["value"], fmt(pt["iteration_s"]), fmt(pt["bare_s"]), fmt(pt["overhead_ratio"]),
                 f"{pt['nfe_sampling']:.0f} / {pt['nfe_training']:.0f}", fmt(pt["peak_mb"], ".1f"),
                 f"{fmt(pt['peak_mb_sampling'], '.1f')} / {fmt(pt['peak_mb_training'], '.1f')}"] for pt in pts]
        lines += [f"**{axis}**", ""] + md_table(
            [axis, "s / iteration", "bare s", "overhead ratio", "NFE sampling / training", "peak MB",
             "peak MB sampling / training"], rows) + [""]
    lines += ["![scaling](scaling.png)"]
    return lines


# ------------------------------------------------------------------------------------------------------ plots
def plots(doc: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    det = doc["details"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if "presets" in det:
        res = det["presets"]
        cpu = res.get("budget_clock") == "cpu"
        for mode, xkey, xlabel, fname in (
                ("equal_iterations", "step", "iteration", "curves_iterations.png"),
                ("equal_time", "train_cpu_s" if cpu else "train_s",
                 f"training seconds ({'CPU' if cpu else 'wall-clock'})", "curves_time.png")):
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
            for i, (p, runs) in enumerate(res.get(mode, {}).items()):
                c = colors[i % len(colors)]
                ls = "-" if i < len(colors) else "--"
                for ax, split in zip(axes, SPLITS):
                    curves = [r["curve"] for r in runs.values() if r["curve"]]
                    n = min(len(cv) for cv in curves) if curves else 0
                    if n == 0:
                        continue
                    xs = [fmean(cv[j][xkey] for cv in curves) for j in range(n)]
                    ys = [fmean(cv[j].get(f"{split}/total", math.nan) for cv in curves) for j in range(n)]
                    sd = [fstd(cv[j].get(f"{split}/total", math.nan) for cv in curves) for j in range(n)]
                    ax.plot(xs, ys, ls, marker="o", ms=3, color=c, label=p)
                    if len(curves) > 1:
                        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                        color=c, alpha=0.12)
            for ax, split in zip(axes, SPLITS):
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{split} reward (total)")
                ax.set_title(f"{split} ({'mean ± std over seeds' if len(res['seeds']) > 1 else 'one seed'})")
                ax.grid(alpha=0.3)
            axes[0].legend(fontsize=7)
            save_figure(fig, out / fname)
            plt.close(fig)
            written.append(fname)
        presets = list(res["equal_iterations"])
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(presets) + 3), 4.5), constrained_layout=True)
        w = 0.27
        for j, (key, label) in enumerate((("time_ratio", "time / iteration"), ("nfe_sampling_ratio", "NFE sampling"),
                                          ("nfe_training_ratio", "NFE training"))):
            vals = [doc.get(f"{key}/{p}", math.nan) for p in presets]
            ax.bar([i + (j - 1) * w for i in range(len(presets))], vals, w, label=label, color=colors[j])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"ratio to {res['baseline']}")
        ax.set_title("Cost per iteration")
        ax.legend(fontsize=8)
        save_figure(fig, out / "cost.png")
        plt.close(fig)
        written.append("cost.png")
    if "overhead" in det or "memory" in det:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        if "overhead" in det:
            o = det["overhead"]
            ax = axes[0]
            for j, (label, s_it, s_bare) in enumerate((("sampling", o["iteration_sampling_s"], o["bare_sampling_forward_s"] + o["bare_decode_s"]),
                                                       ("training", o["iteration_training_s"], o["bare_training_s"]))):
                ax.bar([0, 1], [s_it, s_bare], 0.5, bottom=[0, 0] if j == 0 else
                       [o["iteration_sampling_s"], o["bare_sampling_forward_s"] + o["bare_decode_s"]],
                       color=colors[j], label=label)
            ax.set_xticks([0, 1], ["iteration", "bare work"])
            ax.set_ylabel("seconds (best of reps)")
            ax.set_title(f"Time: overhead ratio {o['overhead_ratio']:.3f}")
            ax.legend(fontsize=8)
        if "memory" in det:
            m = det["memory"]
            ax = axes[1]
            x = range(2)
            for j, phase in enumerate(("sampling", "training")):
                ax.bar([i + (j - 0.5) * 0.35 for i in x],
                       [m["iteration"][f"peak_bytes_{phase}"] / 2**20, m["bare"][f"peak_bytes_{phase}"] / 2**20],
                       0.35, color=colors[j], label=phase)
            ax.set_xticks(list(x), ["iteration", "bare work"])
            ax.set_ylabel("peak MB above base")
            r = m["iteration"]["peak_bytes"] / m["bare"]["peak_bytes"] if m["bare"]["peak_bytes"] else math.nan
            ax.set_title(f"Memory: ratio {r:.3f}")
            ax.legend(fontsize=8)
        save_figure(fig, out / "overhead.png")
        plt.close(fig)
        written.append("overhead.png")
    if "scaling" in det and any(det["scaling"]["axes"].values()):
        axes_d = {a: p for a, p in det["scaling"]["axes"].items() if p}
        fig, axes = plt.subplots(2, len(axes_d), figsize=(4.2 * len(axes_d), 7), constrained_layout=True, squeeze=False)
        for j, (axis, pts) in enumerate(axes_d.items()):
            pts = sorted(pts, key=lambda p: p["value"])
            xs = [p["value"] for p in pts]
            ax = axes[0][j]
            ax.plot(xs, [p["iteration_s"] for p in pts], "o-", label="iteration")
            ax.plot(xs, [p["bare_s"] for p in pts], "s--", label="bare work")
            ax.set_xlabel(axis)
            ax.set_ylabel("seconds per iteration")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax = axes[1][j]
            ax.plot(xs, [p["peak_mb"] for p in pts], "o-", label="iteration peak")
            ax.plot(xs, [p["peak_mb_sampling"] for p in pts], ":", label="sampling phase")
            ax.plot(xs, [p["peak_mb_training"] for p in pts], "--", label="training phase")
            ax.set_xlabel(axis)
            ax.set_ylabel("peak MB above base")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Time and memory against T, G, resolution (one axis at a time)")
        save_figure(fig, out / "scaling.png")
        plt.close(fig)
        written.append("scaling.png")
    return written


def write_report(doc: dict, out: str | Path) -> None:
    out = Path(out)
    doc.setdefault("plots", plots(doc, out))
    write_text_atomic(out / "report.md", markdown(doc))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.report DIR  (DIR holds results.json)")
    out = Path(argv[0])
    doc = json.loads((out / "results.json").read_text())
    doc.pop("plots", None)
    write_report(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
