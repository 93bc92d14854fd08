"""Memory options for real model families (issue 4): xformers attention (validated before any heavy work), text
encoders offloaded to the CPU with a per-prompt embedding cache, and precomputed prompt embeddings with the text
encoders freed — on tiny SD3 and Flux replicas."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from flowrl.cli import build_config, main
from flowrl.config import ConfigError
from flowrl.embedded import MAX_SEQUENCE_LENGTH
from flowrl.policies import load_policy
from flowrl.policies.text_encoding import EmbeddingCache, PromptEncoder, PromptNotPrecomputedError
from rewards import scenes
from tests.helpers import save_tiny_sd3
from tests.test_flux import MAX_SEQ as FLUX_MAX_SEQ
from tests.test_flux import save_tiny_flux

PROMPTS = scenes.prompt_set("train")[:5]
XFLAG = "--enable_xformers_memory_efficient_attention"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("model") / "tiny-flux", guidance_embeds=True)


def _stock_sd3_rows(path: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock pipeline's encode_prompt of ``prompt`` alone (batch of one): embeds [1, L, D], pooled [1, P]."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    with torch.no_grad():  # as in the pipeline's __call__ (grad mode can change T5's last bits)
        pe, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=[prompt], prompt_3=[prompt], device="cpu",
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=MAX_SEQUENCE_LENGTH)
    return pe, pooled


def _sd3(path: Path, **kw):
    return load_policy(str(path), lora_rank=2, max_sequence_length=MAX_SEQUENCE_LENGTH, **kw)


# ================================================================================================ cache (unit)
def test_lru_cache_is_bounded_and_keeps_precomputed_entries():
    c = EmbeddingCache(2)
    row = lambda v: (torch.full((1, 2), float(v)),)  # noqa: E731
    c.put("a", row(1))
    c.put("b", row(2))
    assert c.get("a") is not None  # "a" is now the most recent
    c.put("c", row(3))  # evicts "b", the least recently used
    assert "b" not in c and "a" in c and "c" in c and len(c) == 2
    c.put_precomputed("p", row(4))
    c.put("d", row(5))
    assert "p" in c and c.is_precomputed("p") and len(c) == 3  # precomputed entries neither evicted nor counted
    assert c.nbytes() == 3 * 2 * 4
    none = EmbeddingCache(0)
    none.put("a", row(1))
    assert "a" not in none
    with pytest.raises(ValueError, match="prompt_embeds_cache_size must be >= 0"):
        EmbeddingCache(-1)


class _FakeEncoder(torch.nn.Module):
    """Records where it is when asked to encode (to check the offload moves without a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.where = "cpu"
        self.seen: list[str] = []

    def to(self, *args, **kwargs):
        self.where = str(torch.device(args[0] if args else kwargs["device"]))
        return self


def test_offload_moves_encoders_to_the_device_only_while_encoding():
    enc = _FakeEncoder()
    pipe = types.SimpleNamespace(text_encoder=enc, text_encoder_2=None)
    calls: list[list[str]] = []

    def encode_fn(prompts: list[str]) -> tuple[torch.Tensor, ...]:
        calls.append(list(prompts))
        enc.seen.append(enc.where)
        if prompts == ["boom"]:
            raise RuntimeError("encoder failed")
        return (torch.tensor([[float(len(p))] for p in prompts]),)

    # "meta" stands in for the accelerator: any non-CPU device triggers the moves
    pe = PromptEncoder(pipe, encode_fn, "meta", offload=True, cache_size=8)
    (out,) = pe.encode(["ab", "abc", "ab"])
    assert out.device.type == "meta" and out.shape == (3, 1)
    assert calls == [["ab"], ["abc"]]  # each distinct prompt alone, once
    assert enc.seen == ["meta", "meta"] and enc.where == "cpu"  # on the device while encoding, back after
    assert [float(pe.cache.get(p)[0]) for p in ("ab", "abc")] == [2.0, 3.0]  # rows kept on the CPU
    pe.encode(["abc", "ab"])
    assert len(calls) == 2  # served from the cache: no encoder call
    with pytest.raises(RuntimeError, match="encoder failed"):
        pe.encode(["boom"])
    assert enc.where == "cpu"  # moved back even when encoding fails


# ================================================================================================ SD3
def test_sd3_cache_rows_equal_direct_encoding_bitwise_and_repeats_are_not_reencoded(tiny_sd3):
    policy = _sd3(tiny_sd3, text_encoder_offload=True, prompt_embeds_cache_size=16)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    cond = policy.encode(prompts)
    assert policy.text.encode_calls == 3  # two distinct prompts + the negative prompt, each encoded alone
    for i, p in enumerate(prompts):
        pe, pooled = _stock_sd3_rows(tiny_sd3, p)
        assert torch.equal(cond.embeds[i : i + 1], pe) and torch.equal(cond.pooled[i : i + 1], pooled)
    ne, npooled = _stock_sd3_rows(tiny_sd3, "")
    assert torch.equal(cond.neg_embeds[:1], ne) and torch.equal(cond.neg_pooled[:1], npooled)
    again = policy.encode([PROMPTS[1], PROMPTS[0]])
    assert policy.text.encode_calls == 3  # repeated prompts come from the cache
    assert torch.equal(again.embeds, cond.embeds[[1, 0]]) and torch.equal(again.pooled, cond.pooled[[1, 0]])
    # the default (direct, batched) path agrees to float rounding: batching may change the last bits, which is why
    # the cache encodes each prompt alone
    direct = _sd3(tiny_sd3).encode(prompts)
    torch.testing.assert_close(direct.embeds, cond.embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(direct.pooled, cond.pooled, rtol=0, atol=1e-5)


def test_sd3_precompute_frees_encoders_and_unknown_prompt_is_a_clear_error(tiny_sd3):
    policy = _sd3(tiny_sd3, text_encoder_offload=True)
    assert policy.precompute_prompt_embeds(PROMPTS + PROMPTS[:2]) == len(PROMPTS) + 1  # + the negative prompt
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(policy.pipe, name) is None, name
    calls = policy.text.encode_calls
    cond = policy.encode([PROMPTS[3], PROMPTS[2]])
    assert policy.text.encode_calls == calls
    for i, p in enumerate([PROMPTS[3], PROMPTS[2]]):
        pe, pooled = _stock_sd3_rows(tiny_sd3, p)
        assert torch.equal(cond.embeds[i : i + 1], pe) and torch.equal(cond.pooled[i : i + 1], pooled)
    x = torch.randn(2, *policy.latent_shape(16))
    assert torch.isfinite(policy.velocity(x, torch.tensor(0.5), cond, 2.0)).all()
    unknown = "seven purple hexagons"
    with pytest.raises(PromptNotPrecomputedError, match="precompute_prompt_embeds") as e:
        policy.encode([PROMPTS[0], unknown])
    assert repr(unknown) in str(e.value) and repr(PROMPTS[0]) not in str(e.value)
    assert "--prompts or --eval_sets" in str(e.value)


def test_precompute_on_the_default_path_keeps_encoders_until_freed(tiny_sd3):
    """Without offload the encoders sit on the device; precompute still stores per-prompt rows, then frees them."""
    policy = _sd3(tiny_sd3)
    batched = policy.encode(PROMPTS[:2])
    assert policy.text.encode_calls == 2  # direct mode: one batched call + the negative prompt
    policy.precompute_prompt_embeds(PROMPTS[:2])
    assert policy.pipe.text_encoder is None
    cond = policy.encode(PROMPTS[:2])
    torch.testing.assert_close(cond.embeds, batched.embeds, rtol=0, atol=1e-5)


def _spy_policies(monkeypatch) -> list:
    from flowrl.policies.sd3 import SD3Policy

    seen: list = []
    init = SD3Policy.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(SD3Policy, "__init__", spy)
    return seen


FAST = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "3",
    "--train_fraction", "0.67", "--report_to", "none", "--learning_rate", "1e-2", "--clip_range", "0.2",
    "--rank", "4", "--eval_steps", "2", "--eval_images_per_prompt", "1", "--eval_sets", "scenes:eval",
]


@pytest.mark.parametrize("flag", ["--precompute_prompt_embeds", "--text_encoder_offload"])
def test_train_cli_two_steps_with_precomputed_or_offloaded_embeddings(flag, tiny_sd3, tmp_path, monkeypatch):
    seen = _spy_policies(monkeypatch)
    out = tmp_path / "run"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_sd3), "--output_dir", str(out),
               "--max_train_steps", "2", flag, *FAST])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[1]["train/ratio_min"] == 1.0 and recs[1]["train/ratio_max"] == 1.0
    assert "eval/reward/scenes" in recs[0] and "eval/reward/scenes" in recs[2]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    (policy,) = seen
    distinct = set(scenes.prompt_set("train")) | set(scenes.prompt_set("eval")) | {""}
    if flag == "--precompute_prompt_embeds":
        assert all(getattr(policy.pipe, n) is None for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        assert policy.text.encode_calls == len(distinct)  # everything encoded once at setup, nothing after
    else:
        assert policy.pipe.text_encoder is not None
        # each prompt at most once over 2 steps + 2 evaluations (36 eval prompts, 2 x 2 training prompts, negative)
        assert len(policy.text.cache) == policy.text.encode_calls <= 36 + 4 + 1


def test_prompt_embeds_cache_size_is_validated():
    with pytest.raises(ConfigError, match="prompt_embeds_cache_size must be >= 0"):
        build_config(["--prompt_embeds_cache_size", "-1"])


# ================================================================================================ Flux
def test_flux_cache_precompute_and_negative_prompt(tiny_flux):
    from diffusers import FluxPipeline

    kw = dict(lora_rank=2, max_sequence_length=FLUX_MAX_SEQ, true_cfg_scale=2.0, negative_prompt="blurry")
    policy = load_policy(str(tiny_flux), text_encoder_offload=True, **kw)
    pipe = FluxPipeline.from_pretrained(tiny_flux)

    @torch.no_grad()  # as in the pipeline's __call__ (grad mode can change T5's last bits)
    def stock(p: str):
        pe, pooled, _ = pipe.encode_prompt(prompt=[p], prompt_2=[p], device="cpu", max_sequence_length=FLUX_MAX_SEQ)
        return pe, pooled

    cond = policy.encode(PROMPTS[:2])
    assert policy.text.encode_calls == 3  # 2 prompts + the negative (true CFG on)
    for i, p in enumerate(PROMPTS[:2]):
        pe, pooled = stock(p)
        assert torch.equal(cond.embeds[i : i + 1], pe) and torch.equal(cond.pooled[i : i + 1], pooled)
    ne, npooled = stock("blurry")
    assert torch.equal(cond.neg_embeds[:1], ne) and torch.equal(cond.neg_pooled[:1], npooled)

    fresh = load_policy(str(tiny_flux), text_encoder_offload=True, **kw)
    fresh.precompute_prompt_embeds(PROMPTS[:2])
    assert fresh.pipe.text_encoder is None and fresh.pipe.text_encoder_2 is None
    pre = fresh.encode(PROMPTS[:2])
    for a, b in zip((pre.embeds, pre.pooled, pre.neg_embeds, pre.neg_pooled),
                    (cond.embeds, cond.pooled, cond.neg_embeds, cond.neg_pooled)):
        assert torch.equal(a, b)
    x = torch.randn(2, *fresh.latent_shape(16))
    assert torch.isfinite(fresh.velocity(x, torch.tensor(0.5), pre, 3.5)).all()
    with pytest.raises(PromptNotPrecomputedError, match="no precomputed embedding"):
        fresh.encode(["an unseen prompt"])


# ================================================================================================ xformers
def _fake_xformers(monkeypatch) -> None:
    """Make ``import xformers.ops`` succeed (xformers is not installed here)."""
    pkg = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_not_installed_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "xformers", None)  # not importable, whatever this machine has
    with pytest.raises(ConfigError) as e:
        build_config([XFLAG])
    msg = str(e.value)
    assert XFLAG in msg and "not installed" in msg and "scaled_dot_product_attention (SDPA)" in msg
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), XFLAG]) == 2
    assert "xformers is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_xformers_installed_but_no_cuda_is_a_clear_error(monkeypatch):
    _fake_xformers(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available") as e:
        build_config(["--enable_xformers_memory_efficient_attention", "true"])
    assert XFLAG in str(e.value) and "SDPA" in str(e.value)


def test_xformers_on_a_cpu_device_fails_before_loading_the_pipeline(tiny_sd3, monkeypatch):
    import diffusers

    _fake_xformers(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, but the run is on the CPU
    build_config([XFLAG])  # the config check passes: CUDA exists

    def no_load(*a, **k):
        raise AssertionError("the pipeline was loaded before the xformers check")

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", no_load)
    with pytest.raises(ValueError, match=r"runs on device 'cpu', not a CUDA device") as e:
        load_policy(str(tiny_sd3), device="cpu", enable_xformers_memory_efficient_attention=True)
    assert XFLAG in str(e.value)


@pytest.mark.parametrize("family", ["sd3", "sd3-full-ft", "flux"])
def test_xformers_flag_enables_it_on_the_transformer(family, tiny_sd3, tiny_flux, monkeypatch):
    from diffusers import ModelMixin

    import flowrl.policies.sd3 as sd3

    monkeypatch.setattr(sd3, "require_xformers", lambda device=None: None)  # pretend CUDA + xformers
    enabled: list = []
    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention",
                        lambda self, attention_op=None: enabled.append(self))
    if family == "flux":
        policy = load_policy(str(tiny_flux), lora_rank=2, max_sequence_length=FLUX_MAX_SEQ,
                             enable_xformers_memory_efficient_attention=True)
        assert enabled == [policy.transformer]
    elif family == "sd3":
        policy = _sd3(tiny_sd3, enable_xformers_memory_efficient_attention=True)
        assert enabled == [policy.transformer]
    else:  # full fine-tuning with a frozen reference copy: both use xformers
        policy = load_policy(str(tiny_sd3), lora_rank=None, need_reference=True,
                             max_sequence_length=MAX_SEQUENCE_LENGTH, enable_xformers_memory_efficient_attention=True)
        assert enabled == [policy.transformer, policy._ref_model]
    enabled.clear()
    _sd3(tiny_sd3)  # off by default
    assert enabled == []
