"""How much of one GRPO step's gradient is signal: the policy gradient's signal-to-noise ratio, per configuration.

    python -m benchmarks.grad_snr --batches 8 --out outputs/grad-snr \\
        --variant "default=" --variant "noise_1.0=--noise_level 1.0" --variant "anti=--antithetic_noise true"

For each ``--variant NAME=FLAGS`` (``flowrl train`` flags on top of the embedded default, or of ``--config``): the
trainer is set up once, ``--batches`` K independent batches are sampled and scored at the *same* weights (iterations
1000 ... 1000 + K - 1 of the seeded prompt and noise streams, so every variant sees the same prompts), and each
batch's policy gradient -- the trainer's own ``micro_batch_loss`` backward over all micro-batches, i.e. what one
optimizer step would receive -- is flattened into a vector ``g_k``. With ``g_k = mu + n_k`` (``mu`` the expected
gradient, ``n_k`` independent noise), :func:`gradient_snr` reports

* ``snr`` = ``|mu|^2 / E|n|^2``, from the unbiased estimates ``|g_bar|^2 - s^2 / K`` and
  ``s^2 = sum_k |g_k - g_bar|^2 / (K - 1)`` (may come out negative when the signal is below the estimate's noise);
* ``pair_cos`` = the mean cosine between two batches' gradients, ``~ snr / (1 + snr)``: 0 for pure noise, 1 for a
  noiseless gradient;
* ``reward`` = the mean training reward of the K batches;
* with ``--fixed_prompts``, every batch draws the prompts of the first one and only the noise differs: the signal is
  then the expected gradient for those prompts, and the noise is the estimator's own, without the spread between
  prompt sets;
* with ``--by_module``, the same per module kind (every block's ``attn.to_q`` together, ...) and per transformer
  block, with each group's share of the squared gradient norm: is the signal concentrated anywhere?

A step whose gradient has ``snr = 0.01`` needs about 100 such steps before the accumulated signal matches the
accumulated noise: that is what bounds how fast a short CPU run can learn (README, "Results of the default run").
Writes ``grad_snr.json`` to ``--out``; flags not listed here go to every variant.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


def gradient_snr(grads: Tensor) -> dict[str, float]:
    """Signal-to-noise statistics of K independent gradient draws ``grads`` [K, P] (float; K >= 2).

    Returns ``snr`` (``|mu|^2 / E|g - mu|^2``, unbiased numerator and denominator), ``pair_cos`` (mean cosine over
    the K (K - 1) / 2 pairs), ``signal_norm2`` and ``noise_norm2`` (the two estimates) and ``k``.
    """
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"gradient_snr needs [K >= 2, P] gradients, got shape {tuple(grads.shape)}")
    g = grads.double()
    k = g.shape[0]
    mean = g.mean(0)
    noise = float((g - mean).pow(2).sum(1).sum() / (k - 1))  # E|n|^2, unbiased
    signal = float(mean.pow(2).sum()) - noise / k  # |mu|^2, unbiased
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = [float(unit[i] @ unit[j]) for i, j in itertools.combinations(range(k), 2)]
    return {"snr": signal / noise if noise > 0 else math.inf, "pair_cos": sum(cos) / len(cos),
            "signal_norm2": signal, "noise_norm2": noise, "k": k}


def module_groups(names: Sequence[str], sizes: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    """Spans ``[start, end)`` of the flattened gradient per module kind, in first-seen order: a parameter's name
    with ``.weight`` / ``.bias`` dropped and ``transformer_blocks.<i>.`` (any ``*blocks.<i>.``) collapsed to
    ``<blocks>.``, so e.g. every block's ``attn.to_q`` is one group; and one group per block (``<name>.<i>``)."""
    groups: dict[str, list[tuple[int, int]]] = {}
    off = 0
    for name, n in zip(names, sizes):
        base = re.sub(r"\.(weight|bias)$", "", name)
        kind = re.sub(r"(\w*blocks)\.\d+\.", r"<\1>.", base)
        groups.setdefault(kind, []).append((off, off + n))
        block = re.match(r"(.*?\w*blocks\.\d+)\.", base)
        if block:
            groups.setdefault(block.group(1), []).append((off, off + n))
        off += n
    return groups


def grouped_snr(grads: Tensor, groups: dict[str, list[tuple[int, int]]]) -> dict[str, dict[str, float]]:
    """:func:`gradient_snr` of each group's columns of ``grads`` [K, P], plus its ``params`` and its share of the
    gradients' total squared norm (``norm2_share``)."""
    total = float(grads.double().pow(2).sum())
    out = {}
    for name, spans in groups.items():
        sub = torch.cat([grads[:, a:b] for a, b in spans], 1)
        out[name] = {**gradient_snr(sub), "params": sub.shape[1],
                     "norm2_share": float(sub.double().pow(2).sum()) / total if total > 0 else math.nan}
    return out


def param_names(trainer) -> list[str]:
    """Names of ``trainer.params`` (as in the transformer's ``named_parameters``; ``param<i>`` where not found)."""
    model = getattr(trainer.policy, "transformer", None)
    by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(trainer.params)]


def batch_gradients(trainer, batches: int, first_step: int = 1000,
                    fixed_prompts: bool = False) -> tuple[Tensor, list[float]]:
    """[K, P] flattened policy gradients of K fresh batches at the trainer's current weights, and their rewards.

    ``fixed_prompts``: every batch takes the prompts of ``first_step`` (only the initial and SDE noise differ), so
    the statistics measure the noise of the estimator for one set of prompts, without the spread between prompts.
    """
    vecs, rewards = [], []
    if fixed_prompts:  # shadow the method on this instance; `del` below restores the class's
        draw = trainer.step_prompts
        trainer.step_prompts = lambda step: draw(first_step)
    try:
        for k in range(batches):
            vec, reward = _one_gradient(trainer, first_step + k)
            vecs.append(vec)
            rewards.append(reward)
    finally:
        if fixed_prompts:
            del trainer.step_prompts
    trainer.optimizer.zero_grad(set_to_none=True)
    return torch.stack(vecs), rewards


def _one_gradient(trainer, step: int) -> tuple[Tensor, float]:
    """The flattened policy gradient of the batch of ``step`` (all micro-batches) and its mean training reward."""
    batch, _ = trainer.sample_and_score(step)
    bs = trainer.cfg.grpo.sample_batch_size
    trainer.optimizer.zero_grad(set_to_none=True)
    for b, r in enumerate(batch.rollouts):
        sl = slice(b * bs, (b + 1) * bs)
        trainer.micro_batch_loss(r, trainer._conds[b], batch.advantages[sl].to(trainer.device),
                                 batch.valid[sl].to(trainer.device), scale=1.0 / len(batch.rollouts),
                                 uncond=trainer._uncond[b] if trainer._uncond else None)
    vec = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().detach().cpu()
                     for p in trainer.params])
    total = sum(w * batch.rewards[n].float() for n, w in trainer.cfg.rewards.items())
    return vec, float(total.nanmean())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grad_snr", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--batches", type=int, default=8, help="K independent batches per variant (>= 2)")
    ap.add_argument("--out", required=True, help="output directory (grad_snr.json)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a configuration: name and its flowrl train flags (repeatable; default: 'default=')")
    ap.add_argument("--fixed_prompts", action="store_true",
                    help="every batch draws the same prompts (only the noise differs): the estimator's noise for one "
                         "prompt set, without the spread between prompt sets")
    ap.add_argument("--by_module", action="store_true",
                    help="also report the statistics per module kind and per transformer block (``modules``)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    from benchmarks.common import make_config, set_threads_default, write_json

    set_threads_default()
    args, extra = _parser().parse_known_args(argv)
    if args.batches < 2:
        raise SystemExit(f"--batches must be >= 2 (a variance needs two draws), got {args.batches}")
    variants = []
    for spec in args.variant or ["default="]:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--variant {spec!r}: expected NAME=FLAGS, e.g. 'noise_1.0=--noise_level 1.0'")
        variants.append((name.strip(), shlex.split(flags)))
    from flowrl.config import ConfigError
    from flowrl.trainer import Trainer

    out = Path(args.out)
    results = []
    for name, flags in variants:
        try:
            cfg = make_config(["--output_dir", str(out / name), "--report_to", "none", "--eval_steps", "0",
                               "--checkpointing_steps", "0", *extra, *flags])
        except ConfigError as e:
            raise SystemExit(f"benchmarks.grad_snr: variant {name!r}: {e}") from None
        t0 = time.time()
        trainer = Trainer(cfg)
        trainer.setup()
        grads, rewards = batch_gradients(trainer, args.batches, fixed_prompts=args.fixed_prompts)
        row = {"name": name, "flags": flags, **gradient_snr(grads), "reward": sum(rewards) / len(rewards),
               "params": grads.shape[1], "seconds": time.time() - t0}
        if args.by_module:
            row["modules"] = grouped_snr(grads, module_groups(param_names(trainer), [p.numel() for p in trainer.params]))
            for m, r in sorted(row["modules"].items(), key=lambda kv: -kv[1]["pair_cos"]):
                print(f"    {m:48s} {r['params']:>9d} params, {r['norm2_share']:6.1%} of |g|^2, "
                      f"pair_cos {r['pair_cos']:+.4f}", flush=True)
        results.append(row)
        print(f"[benchmarks.grad_snr] {name}: snr {row['snr']:+.4f}, pair_cos {row['pair_cos']:+.4f}, "
              f"reward {row['reward']:.3f} ({row['seconds']:.0f} s)", flush=True)
    write_json(out / "grad_snr.json", {"batches": args.batches, "fixed_prompts": args.fixed_prompts,
                                       "extra_flags": extra, "variants": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
