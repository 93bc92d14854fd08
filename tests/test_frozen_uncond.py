"""``--frozen_uncond``: training reuses the unconditional CFG velocity kept at sampling time and backpropagates
through the conditional pass only (half the training passes), still exactly on-policy on the first pass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flowrl.cli import build_config, main
from flowrl.config import ConfigError
from flowrl.trainer import Trainer
from tests.helpers import save_tiny_sd3

FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--learning_rate", "1e-2", "--clip_range", "0.2",
    "--rank", "4", "--same_noise_per_group", "false",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3", guidance_scale=3.0)


@pytest.mark.parametrize("plan, nfe", [
    ([], (24, 8)),  # full plan: steps 0-1 trained, step 2 ODE
    # a window at step 2 of 5 after an ODE stretch, the tail by DPM-Solver++ 2M on a coarser schedule: the kept
    # unconditional velocity must be the trained step's, not the first call's
    (["--num_inference_steps", "5", "--plan", "window", "--window_size", "1", "--window_start", "2",
      "--window_schedule", "fixed", "--ode_solver", "dpm2m", "--flash_ratio", "0.5"], (32, 4)),
])
def test_cli_run_is_on_policy_and_trains_with_one_pass_per_step(tiny_model, tmp_path, plan, nfe):
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
               "--max_train_steps", "2", "--eval_steps", "0", "--checkpointing_steps", "0", "--frozen_uncond", "true",
               *FAST, *plan])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = recs[0]
    # the conditional pass of training repeats sampling's pass on the same rows: exactly on-policy
    assert first["train/ratio_min"] == 1.0 and first["train/ratio_max"] == 1.0
    # full plan: sampling 4 samples x 3 steps x 2 passes, training 4 samples x 2 trained steps x 1 pass
    assert (first["nfe/sampling"], first["nfe/training"]) == nfe
    assert first["train/grad_norm"] > 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_sd3_cfg_parts_recombine_to_the_guided_velocity(tiny_model):
    from flowrl.policies.base import combine_cfg
    from flowrl.policies import load_policy

    policy = load_policy(str(tiny_model), lora_rank=2)
    cond = policy.encode(["two red circles", "a blue square"])
    x, sigma = torch.randn(2, *policy.latent_shape(16)), torch.tensor(0.8)
    with torch.no_grad():
        v_c, v_u, scale = policy.cfg_parts(x, sigma, cond, 3.0)
        assert scale == 3.0 and v_u is not None
        torch.testing.assert_close(combine_cfg(v_c, v_u, scale), policy.velocity(x, sigma, cond, 3.0))
        assert policy.cfg_parts(x, sigma, cond, 3.0, with_uncond=False)[1] is None
        v1, none, one = policy.cfg_parts(x, sigma, cond, 1.0)  # no CFG: one pass, the conditional velocity
        assert none is None and one == 1.0
        torch.testing.assert_close(v1, policy.velocity(x, sigma, cond, 1.0), rtol=0, atol=0)


def _gradient(trainer: Trainer, batch, frozen: bool) -> torch.Tensor:
    trainer.optimizer.zero_grad(set_to_none=True)
    bs = trainer.cfg.grpo.sample_batch_size
    for b, r in enumerate(batch.rollouts):
        sl = slice(b * bs, (b + 1) * bs)
        trainer.micro_batch_loss(r, trainer._conds[b], batch.advantages[sl], batch.valid[sl], scale=1.0,
                                 uncond=trainer._uncond[b] if frozen else None)
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad.clone()


def test_gradient_is_the_conditional_branch_share_of_the_cfg_gradient(tiny_model, tmp_path):
    """With the negative prompt equal to the prompt, v_u = v_c and the guided velocity is v_c whatever g is. The full
    CFG gradient is then J^T dL/dv ((1 - g) + g) = J^T dL/dv, while the frozen-uncond one keeps only the conditional
    branch's g J^T dL/dv: exactly g times the full gradient."""
    cfg = build_config(["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "g"),
                        "--max_train_steps", "1", "--eval_steps", "0", "--frozen_uncond", "true", *FAST])
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.guidance == 3.0
    encode = trainer.policy.encode

    def same_negative(prompts):
        c = encode(prompts)
        return dataclasses.replace(c, neg_embeds=c.embeds.clone(), neg_pooled=c.pooled.clone())

    trainer.policy.encode = same_negative
    batch, _ = trainer.sample_and_score(1)
    assert all(u is not None and u.shape == r.latents.shape for u, r in zip(trainer._uncond, batch.rollouts))
    assert batch.advantages.abs().sum() > 0
    frozen = _gradient(trainer, batch, frozen=True)
    full = _gradient(trainer, batch, frozen=False)
    assert full.norm() > 0
    torch.testing.assert_close(frozen, 3.0 * full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))


@pytest.mark.parametrize("flags, message", [
    (["--plan", "tempflow"], "plan full or window only"),
    (["--train_cfg", "false"], "needs train_cfg true"),
])
def test_invalid_combinations_are_clear_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(["--frozen_uncond", "true", *flags])
