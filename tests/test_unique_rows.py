"""Repeated rows run through the transformer once (``flowrl.policies.base.unique_rows``): a group that shares its
initial noise repeats every latent of its first SDE step, so sampling and training evaluate that step once per group,
with the same values and gradients as evaluating every copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowrl.policies import load_policy
from flowrl.policies.base import forward_unique_rows, unique_rows
from tests.helpers import save_tiny_sd3


def test_unique_rows_by_hand():
    a, b, c = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    x = torch.stack([b, a, b, c, a])
    first, inverse = unique_rows(x)
    assert first.tolist() == [0, 1, 3]  # first appearances, in order
    assert inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(x[first][inverse], x)


def test_a_row_repeats_only_when_it_repeats_in_every_tensor():
    x = torch.ones(4, 2, 2)
    t = torch.tensor([0.5, 0.5, 0.5, 0.7])
    emb = torch.tensor([[1.0], [1.0], [2.0], [1.0]])
    first, inverse = unique_rows(x, t, None, emb)  # None entries (no guidance tensor, ...) are skipped
    assert first.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2]
    assert unique_rows(x, torch.arange(4.0)) is None  # every row differs in t
    assert unique_rows(x[:1]) is None  # one row: nothing to share
    assert unique_rows(x, emb[:1]) is None  # a broadcast row: not row-aligned, left to the model


def test_rows_with_equal_keys_but_different_elements_are_never_merged():
    # 1000 elements per row: the key samples 256 of them, so rows that differ only at element 1 share their key
    a = torch.randn(1000)
    b = a.clone()
    b[1] += 1.0
    first, inverse = unique_rows(torch.stack([a, b, a, b]))
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 1]
    x = torch.stack([a, b, a])
    t = torch.tensor([0.5, 0.5, 0.5])
    first, inverse = unique_rows(x, t)  # b stays alone, the second a joins the first
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0]
    assert unique_rows(torch.stack([a, b])) is None
    nan = torch.tensor([[float("nan"), 1.0], [float("nan"), 1.0]])
    assert unique_rows(nan) is None  # NaN != NaN: not provably the same row


def test_forward_unique_rows_matches_every_copy_in_value_and_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)[torch.tensor([0, 0, 1, 2, 1, 0])]  # six rows, three distinct
    weights = torch.randn(6, 4)
    seen = []

    def fn(rows, *, scale):
        seen.append(rows.shape[0])
        return lin(rows) * scale

    out = forward_unique_rows(fn, x, scale=2.0)
    (out * weights).sum().backward()
    grad = lin.weight.grad.clone()
    lin.zero_grad()
    full = lin(x) * 2.0
    (full * weights).sum().backward()
    assert seen == [3]
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(grad, lin.weight.grad)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3", guidance_scale=3.0)


def test_sd3_velocity_runs_a_shared_group_once_with_the_same_values_and_gradients(tiny_model):
    policy = load_policy(str(tiny_model), lora_rank=2)
    for p in policy.trainable_parameters():  # LoRA B starts at zero: give the adapter a gradient path of its own
        torch.nn.init.normal_(p, std=0.05)
    rows = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    cond = policy.encode(["two red circles", "a blue square"]).select(torch.tensor([0, 0, 0, 1, 1, 1]))
    x = torch.randn(2, *policy.latent_shape(16))[torch.tensor([0, 0, 0, 1, 1, 1])]  # two groups of three
    sigma = torch.tensor(1.0)
    g = torch.randn_like(x)
    v = policy.velocity(x, sigma, cond, 3.0)
    (v * g).sum().backward()
    grads = [p.grad.clone() for p in policy.trainable_parameters()]
    assert any(gr.abs().sum() > 0 for gr in grads)
    assert rows == [4]  # CFG doubles the batch: 2 groups x (conditional, unconditional)

    policy.transformer.zero_grad()
    rows.clear()
    x2 = torch.cat([x, x])  # the same CFG batch without the dedupe: every copy evaluated
    t = torch.full((12,), 1000.0)
    v_all = policy._forward_rows(x2, t, torch.cat([cond.neg_embeds, cond.embeds]),
                                 torch.cat([cond.neg_pooled, cond.pooled]), model=policy.transformer)
    v_u, v_c = v_all.chunk(2)
    ref = v_u + 3.0 * (v_c - v_u)
    (ref * g).sum().backward()
    assert rows == [12]
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (p.grad for p in policy.trainable_parameters())):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)  # float summation order only

    rows.clear()
    with torch.no_grad():  # distinct rows (the later steps, evaluation): one pass over the whole batch
        policy.velocity(torch.randn(6, *policy.latent_shape(16)), sigma, cond, 3.0)
    assert rows == [12]
    hook.remove()
