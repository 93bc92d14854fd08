"""The embedded default: tokenizer, identity VAE, the tiny pipeline builder, and the shipped model."""

import numpy as np
import pytest
import torch

from flowrl.embedded import EMBEDDED_MODEL_DIR, MAX_SEQUENCE_LENGTH, build_identity_vae, build_tokenizer
from rewards import scenes


def test_tokenizer_one_token_per_word():
    tok = build_tokenizer()
    for word in set(scenes.iter_vocabulary()):
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # BOS, word, EOS
    longest = max(scenes.prompt_set("train") + scenes.prompt_set("heldout"), key=lambda p: len(p.split()))
    assert len(tok(longest).input_ids) == len(longest.split()) + 2 <= tok.model_max_length


def test_identity_vae_round_trip():
    vae = build_identity_vae()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        assert torch.allclose(dist.mean, x, atol=1e-5)
        assert float(dist.std.max()) < 1e-5
        assert torch.allclose(vae.decode(x).sample, x, atol=1e-5)


def test_tiny_pipeline_saves_and_loads_offline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from tests.helpers import save_tiny_sd3

    path = save_tiny_sd3(tmp_path / "tiny")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pe, _, pooled, _ = pipe.encode_prompt("two red circles", "two red circles", None,
                                          do_classifier_free_guidance=False, max_sequence_length=4)
    assert float(pe[0, -MAX_SEQUENCE_LENGTH:].detach().abs().max()) == 0.0  # the null T5 slot is exactly zero
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, max_sequence_length=4,
               output_type="np", height=16, width=16).images
    assert out.shape == (1, 16, 16, 3)


@pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="embedded model not built")
def test_shipped_model_loads_and_samples():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    img = pipe(["two red circles", "a blue square to the left of a green triangle"], num_inference_steps=10,
               guidance_scale=3.0, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np", generator=g).images
    assert img.shape == (2, 32, 32, 3)
    assert img.dtype == np.float32 and 0.0 <= img.min() and img.max() <= 1.0
    assert img.std() > 0.05  # not a blank canvas
