"""LoRA export of a full fine-tune: exact and truncated SVD factors, stock-pipeline round trip, CLI run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from flowrl.cli import policy_with_lora, main
from flowrl.lora_export import extract_lora
from tests.helpers import save_tiny_sd3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, kernel_size=2)
        self.frozen = nn.Linear(3, 3, bias=False)
        self.norm = nn.LayerNorm(5)


def _tuned(seed: int = 0) -> tuple[dict[str, torch.Tensor], _Net]:
    torch.manual_seed(seed)
    net = _Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for mod in (net.lin, net.conv):
            mod.weight.add_(0.1 * torch.randn_like(mod.weight))
            mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return base, net


def test_exact_factors_reconstruct_every_changed_layer():
    base, net = _tuned()
    sd, cfg = extract_lora(base, net)
    assert set(cfg["target_modules"]) == {"lin", "conv"}  # unchanged layers are not exported
    # lin: rank min(5, 6) = 5; conv: [4, 3*2*2] -> rank 4
    assert sd["lin.lora_A.weight"].shape == (5, 6) and sd["lin.lora_B.weight"].shape == (5, 5)
    assert sd["conv.lora_A.weight"].shape == (4, 3, 2, 2) and sd["conv.lora_B.weight"].shape == (4, 4, 1, 1)
    w = base["lin.weight"] + sd["lin.lora_B.weight"] @ sd["lin.lora_A.weight"]
    torch.testing.assert_close(w, net.lin.weight.detach(), rtol=0, atol=1e-6)
    wc = base["conv.weight"] + (sd["conv.lora_B.weight"].flatten(1) @ sd["conv.lora_A.weight"].flatten(1)).view(4, 3, 2, 2)
    torch.testing.assert_close(wc, net.conv.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(base["lin.bias"] + sd["lin.lora_B.bias"], net.lin.bias.detach(), rtol=0, atol=0)
    assert cfg["lora_bias"] is True and cfg["r"] == cfg["lora_alpha"]  # scaling alpha / r = 1
    # per-layer ranks: the less common one is in rank_pattern, anchored to the full module name
    assert set(cfg["rank_pattern"].values()) == {4, 5} - {cfg["r"]} and cfg["rank_pattern"] == cfg["alpha_pattern"]


def test_truncated_rank_is_the_best_low_rank_approximation():
    base, net = _tuned(1)
    sd, _ = extract_lora(base, net, rank=2)
    delta = (net.lin.weight.detach() - base["lin.weight"]).double()
    s = torch.linalg.svdvals(delta)
    approx = (sd["lin.lora_B.weight"] @ sd["lin.lora_A.weight"]).double()
    err = torch.linalg.matrix_norm(delta - approx)
    # Eckart-Young: the Frobenius error of the best rank-2 approximation is the norm of the dropped singular values
    assert float(err) == pytest.approx(float(s[2:].norm()), rel=1e-5)
    assert sd["lin.lora_A.weight"].shape == (2, 6)


def test_low_rank_delta_gets_its_true_rank():
    torch.manual_seed(2)
    net = _Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.lin.weight.add_(torch.randn(5, 1) @ torch.randn(1, 6))  # a rank-1 update
    sd, cfg = extract_lora(base, net)
    assert sd["lin.lora_A.weight"].shape == (1, 6) and cfg["target_modules"] == ["lin"]


def test_changes_a_lora_cannot_carry_are_refused():
    base, net = _tuned()
    with torch.no_grad():
        net.norm.weight.add_(1.0)
    with pytest.raises(ValueError, match="norm.weight"):
        extract_lora(base, net)
    untouched = _Net()
    with pytest.raises(ValueError, match="no delta"):
        extract_lora(untouched.state_dict(), untouched)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        extract_lora(base, net, rank=0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


def test_full_finetune_run_writes_a_lora_that_reproduces_it_in_a_stock_pipeline(tiny_model, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(out),
               "--max_train_steps", "2", "--eval_steps", "0", "--checkpointing_steps", "0", "--rank", "0",
               "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
               "--learning_rate", "1e-2", "--report_to", "none", "--use_ema", "false"])
    assert rc == 0
    tuned = SD3Transformer2DModel.from_pretrained(out / "transformer")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(k.endswith("lora_B.bias") for k in keys)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    c = tuned.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(2, 5, c.joint_attention_dim, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, c.pooled_projection_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700.0, 300.0])

    def run(model) -> torch.Tensor:
        with torch.no_grad():
            return model(x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample

    base_out = run(pipe.transformer)
    want = run(tuned)
    assert float((want - base_out).abs().max()) > 1e-3  # training moved the model
    pipe.load_lora_weights(out)
    torch.testing.assert_close(run(pipe.transformer), want, rtol=0, atol=1e-5)
    # flowrl's own loader builds the adapter from the file's per-layer ranks and bias flag
    policy = policy_with_lora(str(tiny_model), str(out), {"max_sequence_length": 4})
    torch.testing.assert_close(run(policy.transformer), want, rtol=0, atol=1e-5)
