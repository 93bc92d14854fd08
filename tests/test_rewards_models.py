"""Model-based rewards on tiny random weights in their real architecture families, saved in the official
checkpoint layouts and loaded through the real loading code (no download: every model is built here).

Formulas are checked against values computed by hand from the loaded models' features (or through an independent
path: ``CLIPModel.forward``'s ``logits_per_image``, a hand-written BLIP ViT forward on the official weight names).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rewards import RewardError, evaluate_reward, get_reward
from rewards._models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_center_crop_normalize

PROMPTS = ["a red circle", "two blue squares", "a green triangle to the left of a red circle"]


def _images(n: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (a low-resolution noise upsampled), so resampling methods agree closely."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=True).clamp(0, 1)


def _pil(images: torch.Tensor):
    from PIL import Image

    arr = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# ====================================================================================================== HPS (open_clip)
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory):
    """A tiny open_clip model config (JSON file) and a random model of it saved as HPS checkpoints: v2 with the
    weights under "state_dict" (as the official file), v2.1 as a bare state dict."""
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("hps")
    cfg = d / "flowrl-test-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("flowrl-test-tiny-clip", pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    torch.save({"state_dict": model.state_dict()}, d / "HPS_v2_compressed.pt")
    torch.manual_seed(1)
    model21 = open_clip.create_model("flowrl-test-tiny-clip", pretrained=None).eval()
    torch.save(model21.state_dict(), d / "HPS_v2.1_compressed.pt")
    return {"dir": d, "config": str(cfg), "v2": model, "v21": model21, "open_clip": open_clip}


def test_hpsv2_loads_official_layout_and_scores_cosine(open_clip_tiny):
    oc = open_clip_tiny
    reward = get_reward("hpsv2", checkpoint=str(oc["dir"]), architecture=oc["config"])
    images = _images()
    scores, info = evaluate_reward(reward, images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and torch.isfinite(scores).all() and info == {}
    assert reward.name == "hpsv2"
    # the weights are the saved ones
    for k, v in oc["v2"].state_dict().items():
        torch.testing.assert_close(reward.model.state_dict()[k], v)
    # by hand: torchvision's tensor transforms (independent of our resize), features of the saved model
    from torchvision.transforms import v2 as T

    x = T.functional.resize(images, 32, interpolation=T.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = T.functional.normalize(T.functional.center_crop(x, 32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    tokens = oc["open_clip"].get_tokenizer("flowrl-test-tiny-clip")(PROMPTS)
    with torch.no_grad():
        img = oc["v2"].encode_image(x)
        txt = oc["v2"].encode_text(tokens)
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(scores, cos, atol=2e-5, rtol=1e-4)
    assert scores.abs().max() <= 1


def test_hpsv21_reads_its_own_file_and_bare_state_dict(open_clip_tiny):
    oc = open_clip_tiny
    v2 = get_reward("hpsv2", checkpoint=str(oc["dir"]), architecture=oc["config"])
    v21 = get_reward("hpsv21", checkpoint=str(oc["dir"] / "HPS_v2.1_compressed.pt"), architecture=oc["config"])
    images = _images(2)
    s2, _ = evaluate_reward(v2, images, PROMPTS[:2])
    s21, _ = evaluate_reward(v21, images, PROMPTS[:2])
    assert not torch.allclose(s2, s21)  # different weights
    torch.testing.assert_close(v21.model.state_dict()["text_projection"], oc["v21"].state_dict()["text_projection"])


def test_open_clip_preprocess_matches_open_clips_own_pil_transform(open_clip_tiny):
    """Our torch preprocessing ~ open_clip's PIL val transform (Resize bicubic, CenterCrop, Normalize)."""
    oc = open_clip_tiny
    reward = get_reward("hpsv2", checkpoint=str(oc["dir"]), architecture=oc["config"]).load()
    images = _images(2, size=48)
    transform = oc["open_clip"].image_transform(32, is_train=False)
    ref = torch.stack([transform(im) for im in _pil(images)])
    ours = reward.preprocess(images)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() < 0.03  # uint8 quantisation + PIL vs torch bicubic (seen: 0.018)


def test_open_clip_architecture_mismatch_is_a_clear_error(open_clip_tiny, tmp_path):
    oc = open_clip_tiny
    other = dict(TINY_OPEN_CLIP, embed_dim=8)
    cfg = tmp_path / "flowrl-test-tiny-clip-8.json"
    cfg.write_text(json.dumps(other))
    reward = get_reward("hpsv2", checkpoint=str(oc["dir"]), architecture=str(cfg))
    with pytest.raises(RewardError, match=r"reward 'hpsv2'.*does not fit the architecture.*shape mismatch"):
        evaluate_reward(reward, _images(1), PROMPTS[:1])


def test_missing_checkpoint_names_reward_and_path(tmp_path):
    missing = tmp_path / "nope" / "HPS_v2_compressed.pt"
    reward = get_reward("hpsv2", checkpoint=str(missing))
    with pytest.raises(RewardError, match=r"reward 'hpsv2'.*does not exist") as err:
        evaluate_reward(reward, _images(1), PROMPTS[:1])
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RewardError, match=r"has no 'ImageReward.pt'"):
        evaluate_reward(get_reward("imagereward", checkpoint=str(empty)), _images(1), PROMPTS[:1])


# ================================================================================== transformers CLIP: PickScore etc.
@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny ``CLIPModel`` + CLIP tokenizer + ``CLIPImageProcessor`` saved with save_pretrained (the layout of
    PickScore_v1 / laion CLIP-H / openai CLIP-L on the hub)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from flowrl.embedded import build_tokenizer

    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tok = build_tokenizer(max_length=77)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16, logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def _reference_cos_and_logits(d: Path, pixels: torch.Tensor, prompts: list[str]):
    """``CLIPModel.forward`` on our pixels: (cosine, logits_per_image diagonal) by the model's own code path."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    logits = out.logits_per_image.diagonal()
    return logits / model.logit_scale.exp(), logits


def test_pickscore_is_logit_scale_times_cosine(hf_clip_dir):
    reward = get_reward("pickscore", model_name_or_path=str(hf_clip_dir))
    assert reward.processor_name_or_path == str(hf_clip_dir)
    images = _images()
    scores, info = evaluate_reward(reward, images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and torch.isfinite(scores).all() and info == {}
    pixels = resize_center_crop_normalize(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    cos, logits = _reference_cos_and_logits(hf_clip_dir, pixels, PROMPTS)
    torch.testing.assert_close(scores, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, 100.0 * cos, atol=1e-4, rtol=1e-4)


def test_pickscore_defaults_are_the_official_hub_ids():
    reward = get_reward("pickscore")
    assert reward.model_name_or_path == "yuvalkirstain/PickScore_v1"
    assert reward.processor_name_or_path == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert not reward._loaded  # lazy: nothing read yet


def test_hf_preprocess_matches_clip_image_processor(hf_clip_dir):
    from transformers import CLIPImageProcessor

    reward = get_reward("pickscore", model_name_or_path=str(hf_clip_dir)).load()
    images = _images(2, size=48)
    ref = CLIPImageProcessor.from_pretrained(hf_clip_dir)(images=_pil(images), return_tensors="pt")["pixel_values"]
    ours = reward.preprocess(images)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() < 0.03


def test_scale_offset_normalisation_only_when_asked(hf_clip_dir, caplog):
    images = _images(2)
    raw, info = evaluate_reward(get_reward("pickscore", model_name_or_path=str(hf_clip_dir)), images, PROMPTS[:2])
    assert info == {}
    with caplog.at_level("INFO", logger="rewards"):
        reward = get_reward("pickscore", model_name_or_path=str(hf_clip_dir), scale=1 / 26, offset=0.5)
    assert "normalised" in caplog.text and "pickscore" in caplog.text
    scores, info = evaluate_reward(reward, images, PROMPTS[:2])
    torch.testing.assert_close(info["raw"], raw)
    torch.testing.assert_close(scores, raw / 26 + 0.5)


def test_clipscore_is_w_times_clamped_cosine(hf_clip_dir):
    images = _images()
    pixels = resize_center_crop_normalize(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    cos, _ = _reference_cos_and_logits(hf_clip_dir, pixels, PROMPTS)
    scores, _ = evaluate_reward(get_reward("clipscore", model_name_or_path=str(hf_clip_dir)), images, PROMPTS)
    torch.testing.assert_close(scores, 2.5 * cos.clamp_min(0), atol=1e-5, rtol=1e-4)
    raw, _ = evaluate_reward(get_reward("clipscore", model_name_or_path=str(hf_clip_dir), w=1.0, clamp=False),
                             images, PROMPTS)
    torch.testing.assert_close(raw, cos, atol=1e-5, rtol=1e-4)


def test_aesthetic_mlp_on_normalised_image_embedding(hf_clip_dir, tmp_path):
    from transformers import CLIPModel

    sizes = [16, 24, 12, 8, 4, 1]  # projection_dim 16 in, as 768 -> 1024 -> 128 -> 64 -> 16 -> 1 in the real one
    g = torch.Generator().manual_seed(3)
    state = {}
    for j, idx in enumerate((0, 2, 4, 6, 7)):
        state[f"layers.{idx}.weight"] = torch.randn(sizes[j + 1], sizes[j], generator=g) / math.sqrt(sizes[j])
        state[f"layers.{idx}.bias"] = torch.randn(sizes[j + 1], generator=g)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    reward = get_reward("aesthetic", checkpoint=str(path), model_name_or_path=str(hf_clip_dir))
    images = _images()
    scores, _ = evaluate_reward(reward, images, ["ignored"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # by hand
    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    pixels = resize_center_crop_normalize(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    h = emb / emb.norm(dim=-1, keepdim=True)
    for idx in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(scores, h.squeeze(-1), atol=1e-5, rtol=1e-4)
    # prompts do not matter
    again, _ = evaluate_reward(reward, images, ["something else entirely"] * 3)
    torch.testing.assert_close(again, scores)
    # a head of the wrong width for this CLIP is a clear error
    state["layers.0.weight"] = torch.randn(24, 10)
    torch.save(state, path)
    bad = get_reward("aesthetic", checkpoint=str(path), model_name_or_path=str(hf_clip_dir))
    with pytest.raises(RewardError, match=r"'aesthetic'.*(takes 10-d|outputs)"):
        evaluate_reward(bad, images, PROMPTS)


# ============================================================================================== ImageReward (BLIP)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8)
WORDS = ["a", "two", "red", "blue", "green", "circle", "circles", "square", "squares", "triangle", "and", "to",
         "the", "left", "of"]


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """A BERT tokenizer folder (bert-base-uncased layout: vocab.txt + tokenizer_config.json) and a random tiny
    ImageReward written as ``ImageReward.pt`` in the official key layout (by inverting the documented mapping),
    with the keys the loader drops (position_ids, BLIP's contrastive projections) included."""
    from rewards.imagereward import ImageRewardModel, native_to_official

    d = tmp_path_factory.mktemp("imagereward")
    tok_dir = d / "bert"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                               "do_lower_case": True}))
    text = dict(vocab_size=5 + len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Identity(), torch.nn.Linear(24, 12),
                              torch.nn.Identity(), torch.nn.Linear(12, 8), torch.nn.Identity(),
                              torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
    model = ImageRewardModel(TINY_VISION, text, mlp).eval()
    with torch.no_grad():  # make the vision side non-trivial (BLIP's init leaves LayerNorms at identity)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = {native_to_official(k): v.clone() for k, v in model.state_dict().items()}
    official["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    official["blip.vision_proj.weight"] = torch.randn(8, 32)
    official["blip.vision_proj.bias"] = torch.randn(8)
    official["blip.text_proj.weight"] = torch.randn(8, 32)
    official["blip.text_proj.bias"] = torch.randn(8)
    torch.save(official, d / "ImageReward.pt")
    return {"dir": d, "tokenizer": str(tok_dir), "text": text, "model": model, "official": official}


def _imagereward(files, **kwargs):
    return get_reward("imagereward", checkpoint=str(files["dir"]), tokenizer_name_or_path=files["tokenizer"],
                      vision_config=TINY_VISION, text_config=files["text"], **kwargs)


def test_imagereward_mapping_is_a_bijection_on_model_names(imagereward_files):
    from rewards.imagereward import native_to_official, official_to_native

    names = list(imagereward_files["model"].state_dict())
    assert all(official_to_native(native_to_official(k)) == k for k in names)
    official = {native_to_official(k) for k in names}
    assert {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
            "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.1.attn.qkv.weight",
            "blip.visual_encoder.blocks.0.attn.proj.bias", "blip.visual_encoder.blocks.0.mlp.fc2.weight",
            "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
            "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight", "mlp.layers.0.weight",
            "mlp.layers.7.bias"} <= official
    assert official_to_native("blip.text_encoder.embeddings.position_ids") is None
    assert official_to_native("blip.vision_proj.weight") is None


def _vit_by_hand(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's ViT written out on the official weight names (pre-norm blocks, fused qkv, exact GELU, eps 1e-6)."""
    p = "blip.visual_encoder."
    ln = lambda h, n: F.layer_norm(h, h.shape[-1:], sd[p + n + ".weight"], sd[p + n + ".bias"], eps=1e-6)  # noqa
    lin = lambda h, n: h @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]  # noqa: E731
    h = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=8)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd[p + "cls_token"].expand(h.shape[0], -1, -1), h], 1) + sd[p + "pos_embed"]
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith(p + "blocks.")})
    for i in range(n_blocks):
        b = f"blocks.{i}."
        y = ln(h, b + "norm1")
        B, N, C = y.shape
        qkv = lin(y, b + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        h = h + lin((att @ qkv[2]).transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        h = h + lin(F.gelu(lin(ln(h, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(h, "norm")


def test_imagereward_loads_official_layout_and_standardises(imagereward_files):
    from rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    files = imagereward_files
    reward = _imagereward(files)
    images = _images()
    scores, info = evaluate_reward(reward, images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and torch.isfinite(scores).all() and info == {}
    m = reward.model
    off = files["official"]
    torch.testing.assert_close(m.vision.embeddings.class_embedding, off["blip.visual_encoder.cls_token"])
    torch.testing.assert_close(m.vision.encoder.layers[1].self_attn.projection.weight,
                               off["blip.visual_encoder.blocks.1.attn.proj.weight"])
    torch.testing.assert_close(m.text.encoder.layer[0].crossattention.self.value.weight,
                               off["blip.text_encoder.encoder.layer.0.crossattention.self.value.weight"])
    torch.testing.assert_close(m.mlp[7].bias, off["mlp.layers.7.bias"])
    # the image encoder equals BLIP's ViT written out by hand on the official names
    pixels = resize_center_crop_normalize(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        torch.testing.assert_close(m.vision(pixel_values=pixels).last_hidden_state, _vit_by_hand(off, pixels, 2),
                                   atol=1e-4, rtol=1e-4)
    # by hand: the head's output on the first token, standardised with ImageReward's constants
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35) and (tok["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    with torch.no_grad():
        img = files["model"].vision(pixel_values=pixels).last_hidden_state
        h = files["model"].text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                encoder_hidden_states=img,
                                encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
        head = files["model"].mlp(h[:, 0])[:, 0]
    torch.testing.assert_close(scores, (head - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-5, rtol=1e-4)


def test_imagereward_text_encoder_is_bidirectional_and_sees_the_image(imagereward_files):
    reward = _imagereward(imagereward_files).load()
    images = _images(2)
    same = images[:1].expand(2, -1, -1, -1)
    # the first token's state depends on a *later* word (no causal mask) ...
    a = reward.head_output(same, ["a red circle", "a red square"])
    assert (a[0] - a[1]).abs() > 1e-6
    # ... and on the image (cross-attention)
    b = reward.head_output(images, ["a red circle", "a red circle"])
    assert (b[0] - b[1]).abs() > 1e-6


def test_imagereward_defaults_and_unexpected_keys(imagereward_files, tmp_path):
    reward = get_reward("imagereward")
    assert reward.checkpoint == "THUDM/ImageReward" and reward.tokenizer_name_or_path == "bert-base-uncased"
    assert reward.vision_config["hidden_size"] == 1024 and reward.text_config["vocab_size"] == 30524
    # keys outside the encoders and the head are ignored (the reference loads with strict=False) ...
    extra = dict(imagereward_files["official"], **{"blip.itm_head.weight": torch.zeros(2, 32), "step": torch.ones(1)})
    torch.save(extra, tmp_path / "ImageReward.pt")
    files = dict(imagereward_files, dir=tmp_path)
    scores, _ = evaluate_reward(_imagereward(files), _images(1), PROMPTS[:1])
    reference, _ = evaluate_reward(_imagereward(imagereward_files), _images(1), PROMPTS[:1])
    torch.testing.assert_close(scores, reference)
    # ... but an unknown or missing encoder weight is an error
    bad = dict(imagereward_files["official"], **{"blip.text_encoder.encoder.layer.0.extra.weight": torch.zeros(1)})
    torch.save(bad, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"'imagereward'.*unexpected keys: text.encoder.layer.0.extra.weight"):
        evaluate_reward(_imagereward(files), _images(1), PROMPTS[:1])
    bad = {k: v for k, v in imagereward_files["official"].items() if k != "blip.visual_encoder.norm.bias"}
    torch.save(bad, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"'imagereward'.*missing keys: vision.post_layernorm.bias"):
        evaluate_reward(_imagereward(files), _images(1), PROMPTS[:1])


# ============================================================================================ batching, dtype, device
def test_internal_batching_and_dtype(hf_clip_dir):
    images = _images(5)
    prompts = (PROMPTS * 2)[:5]
    whole, _ = evaluate_reward(get_reward("pickscore", model_name_or_path=str(hf_clip_dir), batch_size=16),
                               images, prompts)
    chunked, _ = evaluate_reward(get_reward("pickscore", model_name_or_path=str(hf_clip_dir), batch_size=2),
                                 images, prompts)
    torch.testing.assert_close(whole, chunked, atol=1e-4, rtol=1e-4)
    half = get_reward("pickscore", model_name_or_path=str(hf_clip_dir), dtype="bfloat16")
    low, _ = evaluate_reward(half, images, prompts)
    assert low.dtype == torch.float32 and next(half.model.parameters()).dtype == torch.bfloat16
    assert (low - whole).abs().max() < 2.0  # scores ~100 * cos: bf16 keeps about 2-3 significant digits
    with pytest.raises(ValueError, match="unknown dtype"):
        get_reward("pickscore", dtype="int8")


def test_device_is_chosen_once_on_first_call_or_pinned(hf_clip_dir, monkeypatch):
    from rewards._models import ModelReward

    reward = get_reward("clipscore", model_name_or_path=str(hf_clip_dir))
    assert reward.auto_device
    scores, _ = evaluate_reward(reward, _images(1), PROMPTS[:1])
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert not reward.auto_device and reward.device == expected and scores.device == torch.device("cpu")
    # CPU images with CUDA present: the current CUDA device (checked without a GPU by faking the query)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ModelReward.default_device(_images(1)) == torch.device("cuda", 3)
    assert ModelReward.default_device(_images(1).to("meta")) == torch.device("meta")
    monkeypatch.undo()
    pinned = get_reward("clipscore", model_name_or_path=str(hf_clip_dir), device="cpu")
    assert not pinned.auto_device and pinned.device == torch.device("cpu")


def test_long_prompts_are_truncated_not_rejected(hf_clip_dir):
    long_prompt = " and ".join(["a red circle"] * 40)  # far beyond 77 tokens
    scores, _ = evaluate_reward(get_reward("pickscore", model_name_or_path=str(hf_clip_dir)), _images(2),
                                [long_prompt, "a red circle"])
    assert torch.isfinite(scores).all()


def test_unreachable_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = get_reward("pickscore", model_name_or_path=str(tmp_path / "not-a-model"))
    with pytest.raises(RewardError, match=r"reward 'pickscore'.*could not load CLIP model .*not-a-model"):
        evaluate_reward(reward, _images(1), PROMPTS[:1])
