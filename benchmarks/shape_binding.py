"""Does the model draw the shape the prompt asks for? The shape confusion of a scenes model, base or trained.

    python -m benchmarks.shape_binding --out outputs/shape-binding                 # the shipped embedded model
    python -m benchmarks.shape_binding --out outputs/shape-binding --lora outputs/flowrl   # after a run

For every single-object prompt ``"a {colour} {shape}"`` over the (colour, shape) combinations of ``--split``
(``train``: the 12 combinations of the training data; ``all``: all 18), ``--images_per_prompt`` ODE samples (fixed
seeds, the model's own sampling defaults) go through the ``scenes`` verifier's detector, and every detected object
of the requested colour is tallied by its classified shape. Reported, in ``shape_binding.json`` and ``.md``:

* ``confusion[asked][drawn]`` = P(an object of the asked colour is classified ``drawn`` | the prompt asked for
  ``asked``); rows sum to 1;
* ``binding`` = the mean over shapes s of P(s | asked s) - P(s | asked another shape), in ``[-1, 1]``: 1 when every
  object has the asked shape, 0 when the drawn shapes do not depend on the prompt's shape word;
* ``objects_per_image`` (of the asked colour) and ``score`` (the mean ``scenes`` score of these images).

Why it matters (README, "Results of the default run"): the soft ``scenes`` score pays for a shape clause when any
object of the colour has the shape, so a model can gain by drawing more objects without binding shapes at all.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rewards import scenes
from rewards.scene_verifier import SceneVerifier


def shape_confusion(images: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Shape confusion of single-object prompts, from one pass of the ``scenes`` verifier.

    Args:
        images: float ``[N, 3, H, W]`` in ``[0, 1]``.
        prompts: ``N`` prompts, each ``"a {colour} {shape}"`` (one object; raises ``ValueError`` otherwise).

    Returns:
        ``{"confusion": {asked: {drawn: p}}, "tally": {asked: {drawn: count}}, "binding": float,
        "objects_per_image": float, "score": float}`` (``score`` = the mean ``scenes`` score; a row with no
        detected object is all ``NaN``, and ``binding`` then too).
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    asked = []
    for prompt in prompts:
        spec = scenes.parse_prompt(prompt)
        if spec.kind != "count" or spec.objects[0].count != 1:
            raise ValueError(f"prompt {prompt!r} is not a single object ('a <colour> <shape>')")
        asked.append(spec.objects[0])
    verdicts = SceneVerifier().verdicts(images, prompts)
    tally = {s: Counter() for s in scenes.SHAPES}
    n_objects = 0
    for obj, verdict in zip(asked, verdicts):
        found = [d.shape for d in verdict.detections if d.color == obj.color]
        tally[obj.shape].update(found)
        n_objects += len(found)
    confusion = {}
    for shape, row in tally.items():
        total = sum(row.values())
        confusion[shape] = {d: (row[d] / total if total else float("nan")) for d in scenes.SHAPES}
    gaps = [confusion[s][s] - float(np.mean([confusion[o][s] for o in scenes.SHAPES if o != s])) for s in scenes.SHAPES]
    return {"confusion": confusion, "tally": {a: {d: row[d] for d in scenes.SHAPES} for a, row in tally.items()},
            "binding": float(np.mean(gaps)), "objects_per_image": n_objects / max(1, len(prompts)),
            "score": float(np.mean([v.soft for v in verdicts])) if verdicts else float("nan")}


def single_object_prompts(split: str = "train") -> list[str]:
    """``"a {colour} {shape}"`` for every combination of ``split`` (``train`` or ``all``), colour-major."""
    return [f"a {c} {s}" for c, s in scenes.allowed_combos(split)]


def markdown(result: dict) -> str:
    lines = ["| asked \\ drawn | " + " | ".join(scenes.SHAPES) + " |", "|---" * (len(scenes.SHAPES) + 1) + "|"]
    for asked, row in result["confusion"].items():
        lines.append(f"| {asked} | " + " | ".join(f"{row[d]:.2f}" for d in scenes.SHAPES) + " |")
    lines.append("")
    lines.append(f"binding {result['binding']:+.3f}, objects of the asked colour per image "
                 f"{result['objects_per_image']:.2f}, `scenes` score {result['score']:.3f} (n = {result['n_images']})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for shape_binding.json / .md")
    ap.add_argument("--pretrained_model_name_or_path", default="embedded")
    ap.add_argument("--lora", help="a run's output directory (pytorch_lora_weights.safetensors); none = the base")
    ap.add_argument("--split", choices=["train", "all"], default="train")
    ap.add_argument("--images_per_prompt", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.images_per_prompt < 1:
        ap.error(f"--images_per_prompt must be >= 1, got {a.images_per_prompt}")
    from flowrl.cli import sampling_policy
    from flowrl.evaluate import atomic_write_text, generate
    from flowrl.policies.sd3 import read_model_defaults
    from flowrl.trainer import resolve_model_path

    path = resolve_model_path(a.pretrained_model_name_or_path)
    defaults = read_model_defaults(path) if Path(path).is_dir() else {}
    policy = sampling_policy(path, a.lora, defaults)
    prompts = single_object_prompts(a.split)
    images, texts, _ = generate(policy, prompts, num_steps=defaults.get("num_inference_steps", 10),
                                guidance_scale=defaults.get("guidance_scale", 4.5),
                                resolution=defaults.get("resolution", 512), seed=a.seed,
                                images_per_prompt=a.images_per_prompt)
    result = shape_confusion(images, texts)
    result.update(n_images=len(texts), model=a.pretrained_model_name_or_path,
                  lora=a.lora, split=a.split, seed=a.seed)
    out = Path(a.out)
    atomic_write_text(out / "shape_binding.json", json.dumps(result, indent=2))
    atomic_write_text(out / "shape_binding.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
