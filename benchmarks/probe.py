"""Framework overhead and peak memory of one training iteration, against the bare model work inside it.

    python -m benchmarks.probe --what time --reps 3 --json OUT.json [--profile PROFILE.txt] [flowrl train flags ...]
    python -m benchmarks.probe --what memory-iteration --json OUT.json [flowrl train flags ...]
    python -m benchmarks.probe --what memory-bare --json OUT.json [flowrl train flags ...]

The suite (``python -m benchmarks``) runs each of these in a fresh subprocess; they are a module of their own so that
one can be rerun by hand.

**The iteration** is exactly what :class:`flowrl.trainer.Trainer` does per step, minus evaluation, logging to disk
and checkpoints: ``sample_and_score`` (prompt encoding, noise, the plan's velocity evaluations, step functions,
decoding, rewards, advantages), ``update`` (log-prob rescoring, the clipped surrogate, backward, per-step gradient
diagnostics, optimizer step, EMA) and ``step_metrics``. It runs on a set-up trainer (the real config, model, LoRA and
optimizer), after one warm-up iteration.

**The bare work** is the model work that iteration cannot do without, replayed on the same model: during the warm-up
iteration a forward pre-hook on the transformer records every call's inputs (so the CFG-doubled batches, the chunking
of a branching plan, DPM-Solver tails, the KL reference pass - replayed with the adapters disabled, or on a full
fine-tune's frozen copy - are all whatever the iteration really did), and the VAE decoder's inputs are recorded
likewise. The replay calls the transformer directly on those tensors - sampling calls
under ``no_grad``, training calls with gradients followed by one ``backward`` of the output (the same backward through
the transformer and its LoRA as the loss's, without the log-prob and surrogate math) - and ``vae.decode`` on the
recorded latents, inside the trainer's autocast context. Gradients are cleared (untimed) before the training replay,
as the optimizer step does before an iteration's first backward.

**Time** (``--what time``): ``--reps`` pairs (iteration, bare replay), the order alternating from pair to pair so that
a drifting machine load biases neither side. Wall-clock (``perf_counter``) and process CPU time (``process_time``,
all threads: the reward worker's scoring counts) are both taken, overall and per phase (sampling =
``sample_and_score`` against the sampling forwards + decodes; training = ``update`` + ``step_metrics`` against the
training forwards + backwards). The headline ``overhead_ratio`` is best-of-reps iteration time / best-of-reps bare
time (wall-clock; interference from other processes only ever adds time, so the minimum is the least disturbed
sample, as in ``timeit``); the median of the per-pair ratios and the CPU-time ratios are reported next to it.

**Memory** (``--what memory-iteration`` / ``memory-bare``, one fresh process each): resident-set high-water mark
above the process's resident size right before the measured work. Linux lets a process reset its high-water mark
(``echo 5 > /proc/self/clear_refs``), so the procedure is: warm-up iteration (and recording), ``gc.collect()``,
``malloc_trim(0)``, reset, read VmRSS (= the base: weights, optimizer state, EMA, recorded inputs), run the sampling
phase, read VmHWM, reset, run the training phase, read VmHWM; peak = max over the phases of VmHWM - base. The suite
starts these processes with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every tensor over 64 KiB with its
own mapping and returns it to the kernel when freed: the resident size then follows live tensor memory instead of
allocator caches (the fixed threshold also disables glibc's sliding threshold, which would otherwise move tensors
into the never-shrinking heap after the first free). Without ``/proc/self/clear_refs`` (not Linux) the figure falls
back to ``ru_maxrss`` growth, reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
"""Environment of the memory processes (see the module docstring)."""


# ------------------------------------------------------------------------------------------------------ recording
@dataclasses.dataclass
class Call:
    phase: str  # "sampling" | "training"
    kind: str  # "transformer" | "decode"
    args: tuple
    kwargs: dict
    grad: bool
    rows: int  # batch rows of the call (NFE accounting: one row = one transformer pass of one sample)
    module: Any = None  # the transformer called (the policy's, or a full fine-tune's frozen reference copy)
    reference: bool = False  # called with the LoRA adapters disabled (the KL term's reference pass)
    grad_out: Any = None  # training calls: the output gradient of the replayed backward (made on first replay)


@dataclasses.dataclass
class Workload:
    calls: list[Call]

    def rows(self, phase: str, kind: str = "transformer") -> int:
        return sum(c.rows for c in self.calls if c.phase == phase and c.kind == kind)

    def count(self, phase: str, kind: str = "transformer") -> int:
        return sum(1 for c in self.calls if c.phase == phase and c.kind == kind)

    def describe(self) -> dict:
        out = {}
        for phase in ("sampling", "training"):
            for kind in ("transformer", "decode"):
                out[f"{phase}/{kind}_calls"] = self.count(phase, kind)
                out[f"{phase}/{kind}_rows"] = self.rows(phase, kind)
        shapes = sorted({tuple(_first_tensor(c).shape) for c in self.calls if c.kind == "transformer"})
        out["transformer_input_shapes"] = [list(s) for s in shapes]
        return out


def _first_tensor(c: Call):
    import torch

    for v in list(c.args) + list(c.kwargs.values()):
        if torch.is_tensor(v):
            return v
    raise ValueError("call without tensor inputs")


def _clone(v):
    import torch

    return v.detach().clone() if torch.is_tensor(v) else v


class Phase:
    name = "sampling"


def device_sync(device) -> None:
    """Wait until ``device`` has run every queued kernel (CUDA), so that host clocks read around a piece of work time
    that work and not just its launch; a no-op on the CPU, where every op is synchronous."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_iteration(tr, step: int, phase: Phase | None = None, between=None) -> dict:
    """One trainer iteration (sample_and_score -> update -> step_metrics); seconds per phase and the metrics.

    ``between(name)`` is called before each phase (untimed): the memory probe resets its high-water mark there.
    """
    phase = phase or Phase()
    tr.step = step
    sync = lambda: device_sync(tr.device)  # noqa: E731
    sync()
    if between:
        between("sampling")
    phase.name = "sampling"
    t0, c0 = time.perf_counter(), time.process_time()
    batch, _ = tr.sample_and_score(step)
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    if between:
        between("training")
    phase.name = "training"
    t2, c2 = time.perf_counter(), time.process_time()
    stats = tr.update(batch)
    metrics = tr.step_metrics(batch, stats, t1 - t0, time.perf_counter() - t2)
    sync()
    t3, c3 = time.perf_counter(), time.process_time()
    return {"sampling": t1 - t0, "training": t3 - t2, "total": (t1 - t0) + (t3 - t2),
            "cpu_sampling": c1 - c0, "cpu_training": c3 - c2, "cpu_total": (c1 - c0) + (c3 - c2), "metrics": metrics}


@contextlib.contextmanager
def recording(tr):
    """Record every transformer call and VAE decode (inputs cloned) while the block runs: yields (Workload, Phase)."""
    import torch

    calls: list[Call] = []
    phase = Phase()
    models = [m for m in (tr.policy.transformer, getattr(tr.policy, "_ref_model", None)) if m is not None]
    vae = getattr(tr.policy.pipe, "vae", None)
    lora = next((m for m in tr.policy.transformer.modules() if isinstance(getattr(m, "disable_adapters", None), bool)),
                None)  # a peft LoRA layer: tells whether the adapters are disabled (the reference pass)

    def hook(module, args, kwargs):
        c = Call(phase.name, "transformer", tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()},
                 torch.is_grad_enabled(), 0, module=module,
                 reference=bool(lora is not None and module is tr.policy.transformer and lora.disable_adapters))
        c.rows = int(_first_tensor(c).shape[0])
        calls.append(c)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in models]
    orig_decode = vae.decode if vae is not None else None
    if vae is not None:
        def decode(*args, **kwargs):
            c = Call(phase.name, "decode", tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()},
                     False, 0)
            c.rows = int(_first_tensor(c).shape[0])
            calls.append(c)
            return orig_decode(*args, **kwargs)

        vae.decode = decode  # instance attribute: shadows the class method for this block only
    try:
        yield Workload(calls), phase
    finally:
        for h in handles:
            h.remove()
        if vae is not None:
            del vae.decode


def replay(tr, wl: Workload, between=None) -> dict:
    """The bare work of ``wl``: seconds for the sampling transformer calls, the decodes and the training
    forward+backward calls (see the module docstring)."""
    import torch

    vae = getattr(tr.policy.pipe, "vae", None)
    times = {"sampling_forward": 0.0, "decode": 0.0, "training_forward_backward": 0.0, "cpu_sampling": 0.0,
             "cpu_training": 0.0}
    autocast = tr.accelerator.autocast
    for p in tr.params:  # as after the optimizer's zero_grad(set_to_none=True)
        p.grad = None
    if between:
        between("sampling")
    for phase in ("sampling", "training"):
        if phase == "training" and between:
            between("training")
        for c in wl.calls:
            if c.phase != phase:
                continue
            device_sync(tr.device)
            t0, c0 = time.perf_counter(), time.process_time()
            if c.kind == "decode":
                key = "decode"
                with torch.no_grad():
                    vae.decode(*c.args, **c.kwargs)
            elif not c.grad:
                key = "sampling_forward" if phase == "sampling" else "training_forward_backward"
                with torch.no_grad(), autocast(), (tr.policy.reference() if c.reference else contextlib.nullcontext()):
                    c.module(*c.args, **c.kwargs)
            else:
                key = "training_forward_backward"
                with torch.enable_grad(), autocast():
                    out = c.module(*c.args, **c.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                if c.grad_out is None or c.grad_out.shape != out.shape:
                    c.grad_out = torch.full_like(out, 1e-3)
                out.backward(c.grad_out)
            device_sync(tr.device)  # the call's queued kernels belong to its time
            times[key] += time.perf_counter() - t0
            times[f"cpu_{phase}"] += time.process_time() - c0
    for p in tr.params:
        p.grad = None
    times["sampling"] = times["sampling_forward"] + times["decode"]
    times["training"] = times["training_forward_backward"]
    times["total"] = times["sampling"] + times["training"]
    times["cpu_total"] = times["cpu_sampling"] + times["cpu_training"]
    return times


# ------------------------------------------------------------------------------------------------------ set-up
def build_trainer(flags: list[str], workdir: str):
    from flowrl.cli import build_config
    from flowrl.trainer import Trainer

    argv = [*flags, "--output_dir", str(Path(workdir) / "run"), "--eval_steps", "0", "--checkpointing_steps", "0",
            "--report_to", "none"]
    tr = Trainer(build_config(argv))
    tr.setup()
    return tr


def _close(tr) -> None:
    if getattr(tr, "_scorer", None) is not None:
        tr._scorer.shutdown(wait=True)


def _median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else math.nan


# ------------------------------------------------------------------------------------------------------ time
def measure_time(tr, reps: int) -> dict:
    with recording(tr) as (wl, phase):
        warm = run_iteration(tr, 1, phase)
    replay(tr, wl)  # warm-up of the replay path
    pairs = []
    for i in range(reps):
        step = 2 + i
        if i % 2 == 0:
            it = run_iteration(tr, step)
            bare = replay(tr, wl)
        else:
            bare = replay(tr, wl)
            it = run_iteration(tr, step)
        m = it.pop("metrics")
        pair = {"iteration": it, "bare": bare, "nfe_sampling": m.get("nfe/sampling"),
                "nfe_training": m.get("nfe/training")}
        for clock in ("", "cpu_"):
            for part in ("total", "sampling", "training"):
                key = f"{clock}ratio" + ("" if part == "total" else f"_{part}")
                num, den = it[f"{clock}{part}"], bare[f"{clock}{part}"]
                pair[key] = num / den if den else math.nan
        pairs.append(pair)
    med = lambda f: _median([f(p) for p in pairs])  # noqa: E731
    best = lambda side, key: min(p[side][key] for p in pairs)  # noqa: E731
    div = lambda a, b: a / b if b else math.nan  # noqa: E731
    out = {
        "reps": reps,
        "pairs": pairs,
        "overhead_ratio": div(best("iteration", "total"), best("bare", "total")),
        "overhead_ratio_sampling": div(best("iteration", "sampling"), best("bare", "sampling")),
        "overhead_ratio_training": div(best("iteration", "training"), best("bare", "training")),
        "overhead_ratio_cpu": div(best("iteration", "cpu_total"), best("bare", "cpu_total")),
        "overhead_ratio_cpu_sampling": div(best("iteration", "cpu_sampling"), best("bare", "cpu_sampling")),
        "overhead_ratio_cpu_training": div(best("iteration", "cpu_training"), best("bare", "cpu_training")),
        "overhead_ratio_median_pair": med(lambda p: p["ratio"]),
        "overhead_ratio_median_pair_cpu": med(lambda p: p["cpu_ratio"]),
        "iteration_s": best("iteration", "total"),
        "iteration_sampling_s": best("iteration", "sampling"),
        "iteration_training_s": best("iteration", "training"),
        "bare_s": best("bare", "total"),
        "bare_sampling_forward_s": best("bare", "sampling_forward"),
        "bare_decode_s": best("bare", "decode"),
        "bare_training_s": best("bare", "training"),
        "workload": wl.describe(),
        # NFE cross-check: the replayed transformer rows against the trainer's own NFE accounting
        "bare_nfe_sampling": wl.rows("sampling"),
        "bare_nfe_training": wl.rows("training"),
        "trainer_nfe_sampling": warm["metrics"].get("nfe/sampling"),
        "trainer_nfe_training": warm["metrics"].get("nfe/training"),
    }
    return out


def profile_iteration(tr, step: int, path: str, top: int = 40) -> None:
    """cProfile of one more iteration, written as text (by own time and by cumulative time) plus a .pstats file."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    run_iteration(tr, step)
    pr.disable()
    pr.dump_stats(str(Path(path).with_suffix(".pstats")))
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    buf.write("# one training iteration under cProfile (main thread only; the reward worker thread is not seen)\n")
    buf.write("\n## by own time\n")
    st.sort_stats("tottime").print_stats(top)
    buf.write("\n## by cumulative time\n")
    st.sort_stats("cumulative").print_stats(top)
    Path(path).write_text(buf.getvalue(), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ memory
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """High-water mark of the memory the work lives in, above a base, per phase (see the module docstring).

    On the CPU that is the resident set (VmHWM, reset between phases). On a CUDA device it is the device memory that
    torch's allocator hands out (``torch.cuda.max_memory_allocated``, reset between phases): weights, optimizer state
    and activations live there, and host RSS would miss them.
    """

    def __init__(self, device="cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peaks: dict[str, float] = {}
        self.method = ("torch.cuda.max_memory_allocated above memory_allocated, reset per phase" if self.cuda
                       else "VmHWM reset via /proc/self/clear_refs")
        self._phase: str | None = None
        self.base_kb = 0

    def _reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_hwm()

    def start(self) -> None:
        _trim()
        if self.cuda:
            import torch

            device_sync(self.device)
            torch.cuda.empty_cache()
            self.base_kb = torch.cuda.memory_allocated(self.device) / 1024
            self._reset()
            return
        if not _reset_hwm() or _status_kb("VmRSS") is None:
            self.method = "ru_maxrss growth (no high-water reset on this OS: an upper bound on the first phase only)"
        self.base_kb = _status_kb("VmRSS") or _maxrss_kb()

    def _read(self) -> float:
        if self.cuda:
            import torch

            device_sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 1024
        return _status_kb("VmHWM") or _maxrss_kb()

    def between(self, name: str) -> None:
        """Close the running phase (its peak) and open ``name`` with a fresh high-water mark."""
        if self._phase is not None:
            self.peaks[self._phase] = (self._read() - self.base_kb) * 1024
            self._reset()
        self._phase = name

    def stop(self) -> None:
        self.between("_end")
        self.peaks.pop("_end", None)


def measure_memory(tr, which: str) -> dict:
    with recording(tr) as (wl, phase):
        run_iteration(tr, 1, phase)
    if which == "bare":
        replay(tr, wl)  # warm-up: lazily allocated state exists before the measurement, as in the iteration case
    else:
        run_iteration(tr, 2)
        wl.calls.clear()  # the iteration process keeps no recorded inputs
    meter = PeakMeter(tr.device)
    meter.start()
    if which == "bare":
        replay(tr, wl, between=meter.between)
    else:
        run_iteration(tr, 3, between=meter.between)
    meter.stop()
    return {
        "which": which, "method": meter.method, "device": str(meter.device), "base_rss_bytes": meter.base_kb * 1024,
        "peak_bytes": max(meter.peaks.values()), "peak_bytes_sampling": meter.peaks.get("sampling", math.nan),
        "peak_bytes_training": meter.peaks.get("training", math.nan),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }


# ------------------------------------------------------------------------------------------------------ driver
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--what", required=True, choices=("time", "memory-iteration", "memory-bare"))
    ap.add_argument("--json", required=True, help="where the result goes")
    ap.add_argument("--reps", type=int, default=3, help="time: (iteration, bare) pairs")
    ap.add_argument("--profile", default=None, help="time: also write a cProfile of one more iteration here")
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args, flags = _parser().parse_known_args(argv)
    from flowrl.config import ConfigError

    with tempfile.TemporaryDirectory(prefix="flowrl-probe-") as work:
        try:
            tr = build_trainer(flags, work)
        except ConfigError as e:
            raise SystemExit(f"benchmarks.probe: {e}") from None
        try:
            if args.what == "time":
                res = measure_time(tr, max(1, args.reps))
                if args.profile:
                    profile_iteration(tr, 2 + max(1, args.reps), args.profile)
                    res["profile"] = args.profile
            else:
                res = measure_memory(tr, args.what.split("-", 1)[1])
        finally:
            _close(tr)
    import torch

    res["flags"] = flags
    res["torch_threads"] = torch.get_num_threads()
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
