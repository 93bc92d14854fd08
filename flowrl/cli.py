"""The ``flowrl`` command: ``train``, ``eval``, ``sample``, ``pretrain``.

``flowrl train`` with no arguments runs the embedded default (tiny SD3 model, ``scenes`` reward, Flow-GRPO) on CPU.
Every config leaf is a flag (diffusers names: ``--pretrained_model_name_or_path``, ``--learning_rate``, ``--rank``,
...); ``--config FILE.yaml`` loads a preset; ``--algorithm NAME`` a method; ``--reward NAME[:WEIGHT]`` (repeatable).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig, apply_mapping, leaf_index, load_yaml, set_value, validate


def _parse_scalar(text: str):
    """Flag text -> python value: ints, floats (also ``1e-4``), booleans, null, YAML lists/maps, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    if "," in text:
        return [_parse_scalar(t) for t in text.split(",") if t]
    return text


def _registry_help() -> str:
    from rewards import available_rewards

    from .presets import describe_presets

    return (
        "registered rewards: " + ", ".join(available_rewards()) + " (or module:attr)\n"
        "algorithms:\n" + describe_presets()
    )


def _train_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flowrl train",
        description="GRPO fine-tuning of a flow-matching text-to-image model (default: the embedded tiny SD3).",
        epilog=_registry_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML preset (see configs/)")
    ap.add_argument("--reward", action="append", metavar="NAME[:WEIGHT]", help="reward and weight (repeatable)")
    for flag, (section, field, tp) in leaf_index().items():
        if flag == "rewards":
            continue
        where = f"{section}.{field}" if section else field
        ap.add_argument(f"--{flag}", default=argparse.SUPPRESS, nargs="?", const="true", metavar="V",
                        help=f"[{where}] {str(tp).replace('typing.', '')}")
    return ap


def build_config(argv: list[str]) -> TrainConfig:
    """Defaults -> algorithm preset -> YAML -> flags, validated; ConfigError on bad input (SystemExit: --help)."""
    from rewards import available_rewards, parse_reward_spec

    from .presets import get_preset

    parser = _train_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(_unknown_flags_message(parser, unknown))
    args = vars(ns)
    config_file = args.pop("config", None)
    yaml_data = load_yaml(config_file) if config_file else {}
    reward_specs = args.pop("reward", None)
    cfg = TrainConfig()
    algorithm = args.get("algorithm") or (yaml_data.get("algorithm") if isinstance(yaml_data, dict) else None)
    if algorithm:
        try:
            apply_mapping(cfg, get_preset(str(algorithm)), f"algorithm preset {algorithm!r}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if yaml_data:
        apply_mapping(cfg, yaml_data, f"config file {config_file!r}")
    for k, v in args.items():
        set_value(cfg, k, _parse_scalar(v) if isinstance(v, str) else v, f"--{k}")
    if reward_specs:
        rewards = {}
        for spec in reward_specs:
            try:
                name, weight = parse_reward_spec(spec)
            except ValueError as e:
                raise ConfigError(f"--reward {spec!r}: {e}") from None
            head, _, tail = name.partition(":")
            if tail and head in available_rewards():  # "scenes:abc": a registered name with a non-numeric weight
                raise ConfigError(f"--reward {spec!r}: weight {tail!r} is not a number; expected NAME[:WEIGHT] "
                                  f"(NAME one of {', '.join(available_rewards())}) or module:attr[:WEIGHT]")
            rewards[name] = weight
        cfg.rewards = rewards
    return validate(cfg)


def _unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    import difflib

    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    parts = []
    for i, u in enumerate(unknown):
        if not u.startswith("-"):
            if i == 0 or not unknown[i - 1].startswith("-"):  # not the value of an unknown flag
                parts.append(f"unexpected value {u!r} (flags take one value each: --flag VALUE)")
            continue
        flag = u.split("=", 1)[0]
        close = difflib.get_close_matches(flag, flags, n=3, cutoff=0.6)
        parts.append(f"unknown flag {flag!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return "; ".join(parts) + "; `flowrl train --help` lists every flag"


def preflight(cfg: TrainConfig) -> None:
    """Cheap checks that must pass before any heavy work: model dir, prompts, rewards, output dir writable."""
    import os

    from rewards import get_reward

    from .policies.base import SUPPORTED_PIPELINES, pipeline_class_name
    from .prompts import load_prompts
    from .trainer import resolve_model_path

    path = resolve_model_path(cfg.model.pretrained_model_name_or_path)
    if Path(path).exists() or path.startswith((".", "/", "~")):
        try:
            cls = pipeline_class_name(path)
        except FileNotFoundError as e:
            raise ConfigError(f"--pretrained_model_name_or_path: {e}") from None
        if cls not in SUPPORTED_PIPELINES:
            raise ConfigError(f"pipeline class {cls!r} in {path!r} is not supported; supported: {SUPPORTED_PIPELINES}")
    for spec in [cfg.prompts, *cfg.eval.eval_sets]:
        try:
            load_prompts(spec)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
    for name in cfg.rewards:
        try:
            get_reward(name)
        except (ValueError, ImportError, AttributeError) as e:
            raise ConfigError(f"reward {name!r}: {e}") from None
    out = Path(cfg.output_dir)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} cannot be created: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"output_dir {str(out)!r} is not writable ({str(probe)!r} denies writing)")
    ck = cfg.resume_from_checkpoint
    if ck not in (None, "latest") and not Path(ck).is_dir():
        raise ConfigError(f"resume_from_checkpoint {ck!r} does not exist (use 'latest' or a path)")
    if ck not in (None, "latest") and not (Path(ck) / "flowrl_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint {ck!r} is not a complete flowrl checkpoint "
                          "(no flowrl_state.json; use 'latest' or a checkpoint-N directory)")
    if ck is not None:
        from .checkpoint import list_checkpoints

        latest = list_checkpoints(out)[-1:] if ck == "latest" else [Path(ck)]
        for path in latest:
            _check_checkpoint_matches(cfg, path)


def _checkpoint_settings(model: dict, use_ema) -> dict:
    """What a checkpoint's trained weights (and EMA) depend on, with defaults resolved (alpha None = 2 x rank, ...)."""
    from .policies.sd3 import SD3_LORA_TARGETS, SD3_LORA_TARGETS_WITH_FF

    rank = model.get("rank")
    preset = SD3_LORA_TARGETS_WITH_FF if model.get("lora_on_ff") else SD3_LORA_TARGETS
    targets = model.get("lora_target_modules") or preset
    return {"rank": rank, "lora_alpha": model.get("lora_alpha") or (2 * rank if rank else None),
            "lora_target_modules": sorted(targets) if rank else None, "use_ema": use_ema}


def _check_checkpoint_matches(cfg: TrainConfig, path: Path) -> None:
    """A clear error before loading anything when the checkpoint was saved with other LoRA/EMA settings."""
    try:
        saved = json.loads((path / "flowrl_state.json").read_text(encoding="utf-8"))["config"]
        old = _checkpoint_settings(saved["model"], saved["optim"]["use_ema"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt: flowrl_state.json is unreadable ({e!r})") from None
    new = _checkpoint_settings(dataclasses.asdict(cfg.model), cfg.optim.use_ema)
    diffs = [f"{k}={old[k]!r} in the checkpoint, {k}={new[k]!r} now" for k in new if old[k] != new[k]]
    if diffs:
        raise ConfigError(f"checkpoint {str(path)!r} does not match this run: {'; '.join(diffs)} "
                          "(resume with the checkpoint's settings, or start without --resume_from_checkpoint)")


def cmd_train(argv: list[str]) -> int:
    try:
        cfg = build_config(argv)
        if cfg.modality == "text":  # causal-LM GRPO (flowrl.text_trainer)
            from .text_trainer import preflight_text

            preflight_text(cfg)
        else:
            preflight(cfg)
    except ConfigError as e:
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2
    if cfg.modality == "text":
        from .text_trainer import run_text_training

        return run_text_training(cfg)
    from .trainer import Trainer

    class _SetupError(Exception):
        pass

    trainer = Trainer(cfg)
    setup = trainer.setup

    def checked_setup() -> None:  # bad model/checkpoint found while loading: a message, not a traceback
        try:
            setup()
        except (ValueError, FileNotFoundError) as e:
            raise _SetupError(str(e)) from e

    trainer.setup = checked_setup  # errors in training itself still propagate
    try:
        metrics = trainer.train()
    except _SetupError as e:
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.startswith(("eval/", "heldout/"))]
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"LoRA and logs in {cfg.output_dir}")
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flowrl eval",
        description="Score a model (+ optional LoRA) on prompts with fixed seeds per prompt index (ODE sampling).",
        epilog=_registry_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--pretrained_model_name_or_path", default="embedded")
    ap.add_argument("--lora", help="directory holding pytorch_lora_weights.safetensors")
    ap.add_argument("--compare", action="store_true", help="also evaluate the base model; one table side by side")
    ap.add_argument("--reward", action="append", metavar="NAME", help="reward name or module:attr (repeatable)")
    ap.add_argument("--prompts", default="scenes:heldout", help="txt/jsonl file or scenes:{train,eval,heldout}")
    ap.add_argument("--num_images_per_prompt", type=int, default=2)
    ap.add_argument("--num_inference_steps", type=int, default=10)
    ap.add_argument("--guidance_scale", type=float)
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--seed", type=int, default=1_000_000)
    ap.add_argument("--batch_size", type=int, default=32)
    return ap


def cmd_eval(argv: list[str]) -> int:
    from rewards import get_reward, parse_reward_spec

    from .evaluate import generate, make_grid, results_markdown, save_image_atomic, score_all, summarize, write_results
    from .evaluate import atomic_write_text
    from .policies.sd3 import read_model_defaults
    from .prompts import load_prompts
    from .trainer import resolve_model_path

    a = _eval_parser().parse_args(argv)
    try:
        if a.num_images_per_prompt < 1:
            raise ConfigError(f"--num_images_per_prompt must be >= 1, got {a.num_images_per_prompt}")
        prompts = load_prompts(a.prompts)
        names = [parse_reward_spec(s)[0] for s in (a.reward or ["scenes"])]
        rewards = {n: get_reward(n) for n in names}
        for fn in rewards.values():  # load weights now: a missing checkpoint fails before any sampling
            if hasattr(fn, "load"):
                fn.load()
        path = resolve_model_path(a.pretrained_model_name_or_path)
        if Path(path).exists() or path.startswith((".", "/", "~")):
            from .policies.base import pipeline_class_name

            pipeline_class_name(path)  # FileNotFoundError naming the path if it is not a pipeline directory
        if a.lora and not (Path(a.lora) / "pytorch_lora_weights.safetensors").is_file():
            raise ConfigError(f"--lora {a.lora!r} holds no pytorch_lora_weights.safetensors")
    except (ConfigError, ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"flowrl eval: error: {e}", file=sys.stderr)
        return 2
    defaults = read_model_defaults(path) if Path(path).is_dir() else {}
    res = a.resolution or defaults.get("resolution", 512)
    guidance = a.guidance_scale or defaults.get("guidance_scale", 4.5)
    import contextlib

    policy = sampling_policy(path, a.lora, defaults)
    variants = (([("base", True)] if a.compare else []) + [("lora", False)]) if a.lora else [("base", False)]
    out = Path(a.output_dir)
    table, per_image = {}, []
    for label, as_reference in variants:
        with policy.reference() if as_reference else contextlib.nullcontext():
            images, texts, keys = generate(policy, prompts, num_steps=a.num_inference_steps, guidance_scale=guidance,
                                           resolution=res, seed=a.seed, images_per_prompt=a.num_images_per_prompt,
                                           batch_size=a.batch_size)
        scores = score_all(rewards, images, texts)
        table[label] = summarize(scores)
        caps = [f"{t} [{float(s):.2f}]" for t, s in zip(texts, scores[names[0]])]
        save_image_atomic(make_grid(images[:64], caps[:64]), out / "grids" / f"{label}.png")
        for r, ((pi, ki), t) in enumerate(zip(keys, texts)):
            per_image.append({"model": label, "prompt_index": pi, "image_index": ki, "prompt": t,
                              **{k: float(v[r]) for k, v in scores.items()}})
    main_label = variants[-1][0]
    payload = {"rewards": table[main_label], "models": table, "prompts": a.prompts,
               "num_images_per_prompt": a.num_images_per_prompt, "num_inference_steps": a.num_inference_steps,
               "guidance_scale": guidance, "seed": a.seed, "model": a.pretrained_model_name_or_path, "lora": a.lora}
    md = f"# flowrl eval\n\nmodel `{a.pretrained_model_name_or_path}`, LoRA `{a.lora}`, prompts `{a.prompts}`\n\n"
    md += results_markdown(table)
    write_results(out, payload, md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(per_image[0].keys()))
    w.writeheader()
    w.writerows(per_image)
    atomic_write_text(out / "per_image.csv", buf.getvalue())
    print(md)
    return 0


def sampling_policy(path: str, lora_dir: str | None, defaults: dict):
    """The policy ``flowrl eval`` and ``flowrl sample`` draw from: the model at ``path``, with the LoRA saved in
    ``lora_dir`` loaded when one is given (:func:`policy_with_lora`). ``defaults``: the model's
    ``flowrl_defaults.json`` (its ``max_sequence_length`` is used)."""
    if lora_dir:
        return policy_with_lora(path, lora_dir, defaults)
    from .policies import load_policy

    return load_policy(path, lora_rank=None, max_sequence_length=defaults.get("max_sequence_length", 256))


def policy_with_lora(path: str, lora_dir: str, defaults: dict):
    """A policy whose adapter matches the saved LoRA's rank/alpha/targets, with the weights loaded."""
    import json as _json

    from safetensors import safe_open

    from .policies import load_policy

    f = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), "pt") as sf:
        meta = sf.metadata() or {}
        keys = list(sf.keys())
    # diffusers writes the adapter config as "lora_adapter_metadata", its keys prefixed with the component name
    packed = _json.loads(meta.get("lora_adapter_metadata", "{}") or "{}")
    cfg = {k.removeprefix("transformer."): v for k, v in packed.items() if k.startswith("transformer.")}
    cfg = cfg or _json.loads(meta.get("transformer_lora_adapter_metadata", "{}") or "{}")
    rank = cfg.get("r") or _first_rank(f, keys)
    targets = cfg.get("target_modules") or sorted({k.split(".lora_A")[0].split(".", 3)[-1] for k in keys if "lora_A" in k})
    # per-layer ranks / bias deltas (a LoRA extracted from a full fine-tune): build the adapter from the metadata
    keep = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_bias")
    lora_config = ({k: cfg[k] for k in keep if k in cfg} if cfg.get("rank_pattern") or cfg.get("lora_bias") else None)
    policy = load_policy(path, lora_rank=int(rank), lora_alpha=cfg.get("lora_alpha"), lora_targets=list(targets),
                         lora_config=lora_config, max_sequence_length=defaults.get("max_sequence_length", 256))
    policy.load_lora(lora_dir)
    return policy


def _first_rank(f: Path, keys: list[str]) -> int:
    from safetensors import safe_open

    with safe_open(str(f), "pt") as sf:
        k = next(k for k in keys if "lora_A" in k)
        return int(sf.get_tensor(k).shape[0])


def cmd_sample(argv: list[str]) -> int:
    from .evaluate import generate, make_grid, save_image_atomic
    from .policies.sd3 import read_model_defaults
    from .trainer import resolve_model_path

    ap = argparse.ArgumentParser(prog="flowrl sample", description="Generate images (ODE) with fixed seeds.")
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--pretrained_model_name_or_path", default="embedded")
    ap.add_argument("--lora")
    ap.add_argument("--num_images_per_prompt", type=int, default=4)
    ap.add_argument("--num_inference_steps", type=int, default=10)
    ap.add_argument("--guidance_scale", type=float)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = resolve_model_path(a.pretrained_model_name_or_path)
    defaults = read_model_defaults(path) if Path(path).is_dir() else {}
    policy = sampling_policy(path, a.lora, defaults)
    images, texts, keys = generate(policy, a.prompt, num_steps=a.num_inference_steps,
                                   guidance_scale=a.guidance_scale or defaults.get("guidance_scale", 4.5),
                                   resolution=defaults.get("resolution", 512), seed=a.seed,
                                   images_per_prompt=a.num_images_per_prompt)
    out = Path(a.output_dir)
    from PIL import Image

    for img, (pi, ki) in zip(images, keys):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        save_image_atomic(Image.fromarray(arr), out / f"p{pi:03d}_{ki:02d}.png")
    save_image_atomic(make_grid(images, texts), out / "grid.png")
    print(f"{len(images)} images in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*commands, "pretrain"):
        print("usage: flowrl {train,eval,sample,pretrain} [--help]\n\n" + (__doc__ or ""))
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    if argv[0] == "pretrain":
        from .pretrain import main as pretrain_main

        pretrain_main(argv[1:])
        return 0
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
