"""The Flux adapter on a tiny random FluxPipeline: CLI training, on-policy ratio, LoRA export into a stock pipeline
(same ODE samples), guidance embedding on and off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.cli import build_config, main
from flowrl.policies import load_policy
from flowrl.trainer import Trainer

RES = 16
MAX_SEQ = 8
FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--learning_rate", "1e-2", "--clip_range", "0.2",
    "--rank", "4", "--resolution", str(RES), "--max_sequence_length", str(MAX_SEQ), "--eval_steps", "0",
]


def build_tiny_flux(guidance_embeds: bool, seed: int = 0):
    """A random tiny FluxPipeline: 1 double + 1 single block, CLIP + T5 with 16-wide hidden states, a 1-block VAE
    (scale factor 1, 3 latent channels -> 12 packed channels) with Flux-like scaling/shift, dynamic shifting on."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flowrl.embedded import build_identity_vae, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(16)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=1, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    vae = build_identity_vae()
    vae.register_to_config(scaling_factor=2.0, shift_factor=0.1)
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=16, max_image_seq_len=256,
    )
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=build_tokenizer(16), transformer=transformer)


def save_tiny_flux(path: Path, guidance_embeds: bool = True) -> Path:
    build_tiny_flux(guidance_embeds).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("model") / "tiny-flux-dev", guidance_embeds=True)


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("model") / "tiny-flux-schnell", guidance_embeds=False)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_policy_shapes_sigmas_and_lora_targets(flux_dev):
    from diffusers import FluxPipeline

    from flowrl.policies.flux import FLUX_LORA_TARGETS_WITH_FF, FluxPolicy

    policy = load_policy(str(flux_dev), lora_rank=2, lora_targets=FLUX_LORA_TARGETS_WITH_FF,
                         max_sequence_length=MAX_SEQ)
    assert isinstance(policy, FluxPolicy)
    assert policy.latent_shape(RES) == (64, 12)  # 16x16 latent -> 8x8 packed 2x2 patches of 3 channels
    # the stock pipeline's schedule at this resolution (dynamic shift from the 64-token sequence)
    pipe = FluxPipeline.from_pretrained(flux_dev)
    pipe.set_progress_bar_config(disable=True)
    pipe(["x"], num_inference_steps=4, height=RES, width=RES, max_sequence_length=MAX_SEQ, output_type="latent")
    s = policy.sigmas(4, RES)
    assert s.shape == (5,) and float(s[0]) == 1.0 and float(s[-1]) == 0.0
    torch.testing.assert_close(s, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.transformer.named_parameters() if ".lora_A" in n}
    assert "single_transformer_blocks.0.proj_out" in names and "single_transformer_blocks.0.proj_mlp" in names
    assert "transformer_blocks.0.ff_context.net.2" in names and "transformer_blocks.0.attn.to_add_out" in names
    assert "proj_out" not in names  # the final output projection is not adapted
    cond = policy.encode(["two red circles"])
    x = torch.randn(1, *policy.latent_shape(RES))
    assert policy.velocity(x, torch.tensor(0.5), cond, 3.5).shape == x.shape
    assert policy.decode(x).shape == (1, 3, RES, RES)


def test_train_cli_two_steps_ratio_is_one(flux_dev, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(flux_dev), "--output_dir", str(out),
               "--max_train_steps", "2", "--guidance_scale", "3.5", *FAST])
    assert rc == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    first = recs[0]
    assert first["train/ratio_min"] == 1.0 and first["train/ratio_max"] == 1.0
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in recs)
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sd and all(k.startswith("transformer.") for k in sd)
    assert any("ff.net.0.proj" in k for k in sd) and any("single_transformer_blocks.0.proj_out" in k for k in sd)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev-guidance", "schnell-no-guidance"])
def test_lora_loads_into_stock_pipeline_and_reproduces_policy(guidance_embeds, flux_dev, flux_schnell, tmp_path):
    from diffusers import FluxPipeline

    from flowrl.evaluate import generate, ode_plan
    from flowrl.seeding import gaussian
    from samplers.rollout import sample

    model = flux_dev if guidance_embeds else flux_schnell
    out = tmp_path / "run"
    trainer = Trainer(build_config(["--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
                                    "--max_train_steps", "2", "--use_ema", "false", "--guidance_scale", "3.5", *FAST]))
    trainer.train()
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sd and all(k.startswith("transformer.") for k in sd)
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if "lora_B" in k)  # training moved the LoRA
    policy = trainer.policy

    prompts = ["two red circles", "a blue square to the left of a green triangle"]
    latents = torch.stack([gaussian(policy.latent_shape(RES), 7, i, 0) for i in range(2)])

    def ours(g: float) -> tuple[torch.Tensor, torch.Tensor]:
        cond = policy.encode(prompts)
        r = sample(lambda x_, s_: policy.velocity(x_, s_, cond, g), latents, ode_plan(policy.sigmas(4, RES)),
                   lambda j: None)
        images, _, _ = generate(policy, prompts, num_steps=4, guidance_scale=g, resolution=RES, seed=7)
        return r.final, images

    pipe = FluxPipeline.from_pretrained(model)
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)

    def stock(g: float, output_type: str) -> torch.Tensor:
        return pipe(prompts, num_inference_steps=4, guidance_scale=g, max_sequence_length=MAX_SEQ, height=RES,
                    width=RES, latents=latents, output_type=output_type).images.float()

    lat, img = ours(3.5)
    torch.testing.assert_close(stock(3.5, "latent"), lat, rtol=0, atol=1e-4)
    torch.testing.assert_close(stock(3.5, "pt"), img, rtol=0, atol=1e-4)
    lat_other, _ = ours(1.5)
    if guidance_embeds:  # the guidance embedding changes the function, the same way in both
        assert float((lat_other - lat).abs().max()) > 1e-4
        torch.testing.assert_close(stock(1.5, "latent"), lat_other, rtol=0, atol=1e-4)
    else:  # no guidance embedding: the scale is ignored, as in the pipeline
        torch.testing.assert_close(lat_other, lat, rtol=0, atol=0)
    pipe.unload_lora_weights()  # and the LoRA matters
    assert float((stock(3.5, "latent") - lat).abs().max()) > 1e-4


def test_true_cfg_matches_stock_pipeline(flux_schnell):
    """Optional true CFG (``true_cfg_scale`` with a negative prompt): v_neg + s (v_pos - v_neg), as the pipeline."""
    from diffusers import FluxPipeline

    from flowrl.evaluate import ode_plan
    from flowrl.seeding import gaussian
    from samplers.rollout import sample

    policy = load_policy(str(flux_schnell), lora_rank=2, max_sequence_length=MAX_SEQ, true_cfg_scale=2.0,
                         negative_prompt="blurry")
    assert policy.passes_per_velocity(1.0) == 2
    prompts = ["two red circles", "a green triangle"]
    latents = torch.stack([gaussian(policy.latent_shape(RES), 3, i, 0) for i in range(2)])
    cond = policy.encode(prompts)
    r = sample(lambda x_, s_: policy.velocity(x_, s_, cond, 1.0), latents, ode_plan(policy.sigmas(3, RES)),
               lambda j: None)
    pipe = FluxPipeline.from_pretrained(flux_schnell)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompts, negative_prompt=["blurry"] * 2, true_cfg_scale=2.0, num_inference_steps=3,
                 max_sequence_length=MAX_SEQ, height=RES, width=RES, latents=latents, output_type="latent").images
    torch.testing.assert_close(stock.float(), r.final, rtol=0, atol=1e-4)
    # --frozen_uncond's split: the two passes recombine to the same guided velocity; without the negative, one pass
    from flowrl.policies.base import combine_cfg

    sigma = torch.tensor(0.7)
    v_c, v_neg, scale = policy.cfg_parts(latents, sigma, cond, 1.0)
    assert scale == 2.0 and v_neg is not None
    torch.testing.assert_close(combine_cfg(v_c, v_neg, scale), policy.velocity(latents, sigma, cond, 1.0))
    assert policy.cfg_parts(latents, sigma, cond, 1.0, with_uncond=False)[1] is None
    plain = pipe(prompts, num_inference_steps=3, max_sequence_length=MAX_SEQ, height=RES, width=RES, latents=latents,
                 output_type="latent").images
    assert float((plain.float() - r.final).abs().max()) > 1e-4


def test_lora_target_preset_comes_from_the_model_family(flux_dev, tmp_path):
    from flowrl.policies.base import default_lora_targets
    from flowrl.policies.flux import FLUX_LORA_TARGETS, FLUX_LORA_TARGETS_WITH_FF
    from flowrl.policies.sd3 import SD3_LORA_TARGETS, SD3_LORA_TARGETS_WITH_FF

    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert default_lora_targets(str(sd3), True) == SD3_LORA_TARGETS_WITH_FF
    assert default_lora_targets(str(sd3), False) == SD3_LORA_TARGETS
    assert default_lora_targets(str(flux_dev), True) == FLUX_LORA_TARGETS_WITH_FF
    assert default_lora_targets(str(flux_dev), False) == FLUX_LORA_TARGETS


def test_repeated_rows_run_once_with_the_values_of_every_copy(flux_dev):
    """A group that shares its noise repeats its rows (latent, timestep, guidance, prompt): the Flux forward runs the
    distinct ones and gathers them back, with the values of evaluating every copy."""
    policy = load_policy(str(flux_dev), lora_rank=2, max_sequence_length=MAX_SEQ)
    rows = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    pick = torch.tensor([0, 0, 1, 1, 1])
    cond = policy.encode(["two red circles", "a green triangle"]).select(pick)
    x = torch.randn(2, *policy.latent_shape(RES))[pick]
    sigma = torch.tensor(0.9)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond, 3.5)
        assert rows == [2]
        t = torch.full((5,), 0.9).to(policy.weight_dtype)
        every = policy._flux_forward_rows(x, t, torch.full((5,), 3.5), cond.embeds, cond.pooled,
                                          model=policy.transformer)
    assert rows == [2, 5]
    torch.testing.assert_close(v, every, rtol=1e-5, atol=1e-6)
    hook.remove()
