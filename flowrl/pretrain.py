"""Recipe that trains the embedded default model (``flowrl pretrain``): rectified-flow pretraining of the tiny SD3
pipeline of :mod:`flowrl.embedded` on procedurally drawn, captioned scenes (:mod:`rewards.scenes`).

Reproducible on 2 CPU cores: fixed seeds, a fixed number of steps, data generated from the seed. The loss is SD3's
flow-matching objective: x_t = (1 - t) x0 + t eps, target v = eps - x0, t ~ logit-normal(0, 1) (SD3 paper, Sec. 3.1),
MSE on the velocity. Captions are dropped (empty prompt) with probability ``p_uncond`` so classifier-free guidance
works. Text encoders train jointly with the transformer. An EMA of all trained weights is what gets saved.

    python -m flowrl.pretrain --output_dir flowrl/assets/tiny-sd3-scenes --max_train_steps 3000

``--device cuda`` (or ``cuda:N``, ``mps``) trains on an accelerator. Every random draw (batch indices, caption
dropout, noise, timesteps) still comes from one CPU generator and is then moved to the device, so a run draws the
same data on any device; only float rounding differs. The shipped model was trained on the CPU.

``--pretrained_model_name_or_path DIR`` (or ``embedded``) continues from a saved pipeline's weights instead of a random
initialisation (fresh optimizer and schedule, the pipeline's own architecture), e.g. to pretrain the shipped model
longer on new scenes (``--seed 1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from flowrl.embedded import MAX_SEQUENCE_LENGTH, TinySD3Config, build_pipeline, save_pipeline_atomic
from rewards import scenes


def encode(pipe, prompts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 prompt encoding through the pipeline's own code path (gradients flow into the text encoders)."""
    pe, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=prompts,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        device=torch.device(device),
    )
    return pe, pooled


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="flowrl pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="flowrl/assets/tiny-sd3-scenes")
    ap.add_argument("--max_train_steps", type=int, default=3000)
    ap.add_argument("--train_batch_size", type=int, default=64)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--lr_warmup_steps", type=int, default=200)
    ap.add_argument("--ema_decay", type=float, default=0.999)
    ap.add_argument("--p_uncond", type=float, default=0.1)
    ap.add_argument("--dataset_size", type=int, default=60000)
    ap.add_argument("--checkpointing_steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_layers", type=int, default=TinySD3Config.num_layers)
    ap.add_argument("--patch_size", type=int, default=4)
    ap.add_argument("--num_attention_heads", type=int, default=6)
    ap.add_argument("--pretrained_model_name_or_path", default=None,
                    help="continue from this tiny SD3 pipeline (a directory this recipe wrote, or 'embedded') instead of "
                         "a random initialisation; its architecture replaces --num_layers/--patch_size/"
                         "--num_attention_heads")
    ap.add_argument("--device", default="cpu",
                    help="where to train: cpu (default, the shipped model's recipe), cuda, cuda:N or mps; random draws "
                         "stay on the CPU, so every device sees the same data")
    args = ap.parse_args(argv)
    device = check_args(args)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # the null T5's tokenizer warns about truncation on every call

    torch.manual_seed(args.seed)
    if args.pretrained_model_name_or_path is None:
        cfg = TinySD3Config(patch_size=args.patch_size, num_layers=args.num_layers,
                            num_attention_heads=args.num_attention_heads)
        pipe = build_pipeline(cfg, seed=args.seed)
    else:
        pipe, cfg = load_pipeline(args.pretrained_model_name_or_path)
    pipe.to(device)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    ema = [p.detach().clone() for p in params]
    n_params = {m.__class__.__name__ + str(i): sum(p.numel() for p in m.parameters()) for i, m in enumerate(modules)}
    print(json.dumps({"params": n_params, "config": vars(args)}), flush=True)

    t0 = time.time()
    images, captions = scenes.dataset(args.dataset_size, seed=args.seed, size=cfg.resolution)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [N,3,H,W] in [-1,1]
    print(f"data: {len(captions)} scenes in {time.time() - t0:.0f}s", flush=True)

    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-4, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < args.lr_warmup_steps:
            return (step + 1) / args.lr_warmup_steps
        frac = (step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    out = Path(args.output_dir)
    t0, loss_avg = time.time(), None
    for step in range(1, args.max_train_steps + 1):
        idx = torch.randint(len(captions), (args.train_batch_size,), generator=g)
        x0 = data[idx]
        prompts = [captions[i] if torch.rand((), generator=g) > args.p_uncond else "" for i in idx.tolist()]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal(0, 1)
        x0, eps, t = x0.to(device), eps.to(device), t.to(device)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        pe, pooled = encode(pipe, prompts, device)
        v = pipe.transformer(hidden_states=xt, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t * 1000).sample
        loss = torch.nn.functional.mse_loss(v.float(), (eps - x0).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"step {step} loss {loss_avg:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            save_ema(pipe, params, ema, out if step == args.max_train_steps else out.with_name(f"{out.name}-step{step}"), cfg)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


def check_args(args: argparse.Namespace) -> torch.device:
    """Validate the recipe's flags before any work; return the training device.

    Raises ``SystemExit`` naming the bad flag, its value and what is allowed.
    """
    def bad(flag: str, value: object, allowed: str) -> SystemExit:
        return SystemExit(f"flowrl pretrain: error: --{flag} {value!r}: {allowed}")

    for flag in ("max_train_steps", "train_batch_size", "dataset_size", "checkpointing_steps", "num_layers",
                 "patch_size", "num_attention_heads"):
        if getattr(args, flag) < 1:
            raise bad(flag, getattr(args, flag), "must be >= 1")
    if args.lr_warmup_steps < 0:
        raise bad("lr_warmup_steps", args.lr_warmup_steps, "must be >= 0")
    if not args.learning_rate >= 0:
        raise bad("learning_rate", args.learning_rate, "must be >= 0")
    if not 0 <= args.p_uncond <= 1:
        raise bad("p_uncond", args.p_uncond, "must be in [0, 1]")
    if not 0 <= args.ema_decay < 1:
        raise bad("ema_decay", args.ema_decay, "must be in [0, 1)")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise bad("device", args.device, "not a torch device; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise bad("device", args.device, "use cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise bad("device", args.device, f"{device.type.upper()} is not available on this machine; use cpu")
    return device


def load_pipeline(name_or_path: str):
    """A saved tiny SD3 pipeline (fp32, CPU) to continue pretraining, and its :class:`TinySD3Config`.

    Raises ``SystemExit`` naming the path when it is not a directory holding a ``StableDiffusion3Pipeline``.
    """
    from diffusers import StableDiffusion3Pipeline

    from flowrl.policies.base import pipeline_class_name
    from flowrl.trainer import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        cls = pipeline_class_name(path)
    except FileNotFoundError as e:
        cls = f"none ({e})"
    if cls != "StableDiffusion3Pipeline":
        raise SystemExit(f"flowrl pretrain: error: --pretrained_model_name_or_path {path!r} is not a directory "
                         f"holding a StableDiffusion3Pipeline (found: {cls}); give one this recipe wrote, or 'embedded'")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)  # fp32, as saved
    t, te = pipe.transformer.config, pipe.text_encoder.config
    cfg = TinySD3Config(
        resolution=int(t.sample_size), patch_size=int(t.patch_size), num_layers=int(t.num_layers),
        num_attention_heads=int(t.num_attention_heads), attention_head_dim=int(t.attention_head_dim),
        text_hidden_size=int(te.hidden_size), text_layers=int(te.num_hidden_layers),
        text_projection_dim=int(te.projection_dim), max_text_tokens=int(pipe.tokenizer.model_max_length),
        shift=float(pipe.scheduler.config.shift),
    )
    return pipe, cfg


def save_ema(pipe, params, ema, path: Path, cfg: TinySD3Config) -> None:
    """Save the pipeline with EMA weights swapped in (atomic)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    export = copy.deepcopy(pipe).to("cpu")  # saved as the recipe always saves it: fp32 CPU tensors
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    defaults = {
        "resolution": cfg.resolution,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "num_inference_steps": 10,
        "guidance_scale": 3.0,
    }
    save_pipeline_atomic(export, path, defaults)
    print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
