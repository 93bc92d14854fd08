"""Evaluation: ODE sampling with fixed seeds per prompt index, scoring, results tables and captioned grids."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from rewards import evaluate_reward
from samplers.plans import Plan, PlannedStep
from samplers.rollout import sample

from .seeding import gaussian


def ode_plan(sigmas: Tensor) -> Plan:
    s = [float(x) for x in sigmas]
    return Plan(tuple(PlannedStep(i, s[i], s[i + 1], "ode", None, False) for i in range(len(s) - 1)))


@torch.no_grad()
def generate(
    policy,
    prompts: Sequence[str],
    *,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    seed: int,
    images_per_prompt: int = 1,
    batch_size: int = 32,
) -> tuple[Tensor, list[str], list[tuple[int, int]]]:
    """ODE samples: image k of prompt i starts from noise seeded by (seed, i, k), whatever the batching.

    Returns images [N, 3, H, W] in [0, 1] (N = len(prompts) * images_per_prompt, prompt-major), the prompt of each
    row, and its (prompt index, image index).
    """
    keys = [(i, k) for i in range(len(prompts)) for k in range(images_per_prompt)]
    shape = policy.latent_shape(resolution)
    plan = ode_plan(policy.sigmas(num_steps, resolution))
    out = []
    for b in range(0, len(keys), batch_size):
        chunk = keys[b : b + batch_size]
        texts = [prompts[i] for i, _ in chunk]
        cond = policy.encode(texts)
        x = torch.stack([gaussian(shape, seed, i, k) for i, k in chunk]).to(policy.device)
        r = sample(lambda x_, s_: policy.velocity(x_, s_, cond, guidance_scale), x, plan, lambda j: None)
        out.append(policy.decode(r.final).cpu())
    return torch.cat(out), [prompts[i] for i, _ in keys], keys


def score_all(rewards: dict[str, Callable], images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """Every reward (and its extra metrics, as ``name/metric``) on the images: name -> [N] float32."""
    out: dict[str, Tensor] = {}
    for name, fn in rewards.items():
        scores, info = evaluate_reward(fn, images, prompts)
        out[name] = scores
        for k, v in info.items():
            out[f"{name}/{k}"] = v.float()
    return out


def summarize(scores: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """name -> {mean, std, n} over non-NaN values."""
    res = {}
    for name, s in scores.items():
        s = s[~torch.isnan(s)]
        res[name] = {
            "mean": float(s.mean()) if len(s) else float("nan"),
            "std": float(s.std(unbiased=False)) if len(s) else float("nan"),
            "n": int(len(s)),
        }
    return res


def make_grid(images: Tensor, captions: Sequence[str], ncol: int = 8, cell: int = 128):
    """A PIL image: each image upscaled to ``cell`` px with its caption (wrapped) underneath."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n = len(images)
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    text_h = 44
    grid = Image.new("RGB", (ncol * cell, nrow * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for idx in range(n):
        r, c = divmod(idx, ncol)
        tile = Image.fromarray(arr[idx]).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (c * cell, r * (cell + text_h)))
        words, lines, cur = captions[idx].split(), [], ""
        for w in words:
            if len(cur) + len(w) + 1 > 21:
                lines.append(cur)
                cur = w
            else:
                cur = (cur + " " + w).strip()
        lines.append(cur)
        for li, line in enumerate(lines[:4]):
            draw.text((c * cell + 2, r * (cell + text_h) + cell + 1 + li * 10), line, fill="black", font=font)
    return grid


def _public_mode(path: str) -> None:
    """mkstemp creates 0600 files; give the result the usual 0666 & ~umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image_atomic(img, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp)
        _public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def results_markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per (set or model, reward): mean ± std (n)."""
    lines = ["| set | reward | mean | std | n |", "|---|---|---|---|---|"]
    for set_name, res in results.items():
        for name, r in res.items():
            lines.append(f"| {set_name} | {name} | {r['mean']:.4f} | {r['std']:.4f} | {r['n']} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, payload: dict, markdown: str) -> None:
    atomic_write_text(Path(out_dir) / "results.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(Path(out_dir) / "results.md", markdown)
