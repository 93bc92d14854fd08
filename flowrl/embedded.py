"""The embedded default model: a tiny Stable Diffusion 3 pipeline built from stock diffusers/transformers classes.

Pieces (all saved in diffusers format, loadable by ``StableDiffusion3Pipeline.from_pretrained(path)`` offline):

- ``tokenizer`` / ``tokenizer_2``: ``CLIPTokenizer`` over the scenes vocabulary. The BPE vocabulary and merges are
  generated in code (:func:`build_tokenizer`) so that every word of the grammar is exactly one token.
- ``text_encoder`` / ``text_encoder_2``: two small ``CLIPTextModelWithProjection`` (trained jointly with the
  transformer); ``text_encoder_3`` is a stand-in T5 whose output is exactly zero
  (:func:`build_null_t5`), equivalent to omitting T5 as SD3 allows: the T5 slot is ``max_sequence_length`` zero
  vectors. The embedded model is trained with :data:`MAX_SEQUENCE_LENGTH` of them; pass the same value to the
  pipeline (``pipe(prompt, max_sequence_length=4)``). ``flowrl_defaults.json`` in the model directory records it.
- ``transformer``: ``SD3Transformer2DModel`` working directly on pixels (3 channels).
- ``vae``: an ``AutoencoderKL`` with a single block whose weights are set analytically so that encode and decode
  are the identity to < 1e-5 (:func:`build_identity_vae`): the latent space *is* pixel space scaled to [-1, 1].
  The SD3 pipeline always decodes through its VAE; this keeps that code path exact and costs ~nothing.
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (shift 1: 32x32 pixels have little redundancy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import tempfile
from pathlib import Path

import torch

from rewards.scenes import iter_vocabulary

MAX_SEQUENCE_LENGTH = 4
"""Number of (zero) T5 tokens the embedded model was trained with; pass it to the SD3 pipeline."""

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-sd3-scenes"
"""Where the shipped embedded model lives (inside the installed package)."""


@dataclasses.dataclass
class TinySD3Config:
    """Architecture of the embedded SD3 pipeline."""

    resolution: int = 32
    """Image side in pixels (the latent side too: the VAE is the identity)."""
    patch_size: int = 2
    """Transformer patch size; tokens = (resolution / patch_size)^2."""
    num_layers: int = 6
    """Number of joint transformer blocks."""
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    text_hidden_size: int = 64
    """Hidden size of each CLIP text encoder (the joint attention dim is twice this)."""
    text_layers: int = 2
    text_projection_dim: int = 32
    max_text_tokens: int = 16
    """Tokenizer max length (the longest scenes prompt is 12 tokens with BOS/EOS)."""
    shift: float = 1.0
    """Scheduler shift (SD3.5 uses 3.0 at 1024 px; tiny pixel models do best near 1)."""


def _bpe_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-style BPE vocabulary and merges under which every word in ``words`` is a single token.

    Merges are added by simulating BPE on each word and appending the merge of its first remaining pair until the
    word is whole, so earlier merges (which win in BPE) never split a later word differently.
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for c in string.ascii_lowercase:
        add(c)
        add(c + "</w>")

    def bpe(word: str) -> list[str]:
        toks = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = {m: i for i, m in enumerate(merges)}
        while len(toks) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(toks, toks[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            toks[i : i + 2] = [toks[i] + toks[i + 1]]
        return toks

    changed = True
    while changed:
        changed = False
        for w in words:
            toks = bpe(w)
            if len(toks) > 1:
                merges.append((toks[0], toks[1]))
                add(toks[0] + toks[1])
                changed = True
    return vocab, [f"{a} {b}" for a, b in merges]


def build_tokenizer(max_length: int = 16):
    """A ``CLIPTokenizer`` whose vocabulary covers the scenes grammar word for word (plus letters for anything else)."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_merges(sorted(set(iter_vocabulary())))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            str(Path(d) / "vocab.json"),
            str(Path(d) / "merges.txt"),
            model_max_length=max_length,
            pad_token="<|endoftext|>",
        )


@torch.no_grad()
def build_identity_vae():
    """An ``AutoencoderKL`` (1 block, 3 latent channels, scaling 1, shift 0) set analytically to the identity.

    The trick: GroupNorm would normalise away the image's statistics, so ``conv_in`` writes each group as
    ``[x, -x, K, -K]`` (group mean exactly 0, variance ~K^2/2 dominated by the constants, K = 1e4: relative error
    ~1e-8), the norm's affine maps back to ``x + 30`` where SiLU is the identity to 1e-12, residual blocks have zero
    ``conv2`` (so they pass through), and ``conv_out`` subtracts the 30 again. The encoder does the same and emits
    mean = x, logvar = -30 (std ~3e-7).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(16,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=2,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=False,
        force_upcast=False,
    )
    K, B = 1e4, 30.0
    for p in vae.parameters():
        p.zero_()
    for coder in (vae.encoder, vae.decoder):
        for m in coder.modules():
            if m.__class__.__name__ == "ResnetBlock2D":  # conv2 = 0 -> block is the identity
                m.norm1.weight.fill_(1.0)
                m.norm2.weight.fill_(1.0)
        w = coder.conv_in.weight  # [16, 3, 3, 3]; group g = channels 8g..8g+7 = [x(3), -x(3), K, -K]
        for g in range(2):
            for c in range(3):
                w[8 * g + c, c, 1, 1] = 1.0
                w[8 * g + 3 + c, c, 1, 1] = -1.0
            coder.conv_in.bias[8 * g + 6] = K
            coder.conv_in.bias[8 * g + 7] = -K
        # GroupNorm output = x / (K / 2); scale back by K/2 and add B so SiLU(y) == y.
        coder.conv_norm_out.weight.fill_(K / 2)
        coder.conv_norm_out.bias.fill_(B)
        coder.conv_out.bias.fill_(-B)
        for c in range(3):
            coder.conv_out.weight[c, c, 1, 1] = 1.0
    vae.encoder.conv_out.bias[3:] = -30.0  # logvar
    vae.encoder.conv_out.weight[3:] = 0.0
    for conv in (vae.quant_conv, vae.post_quant_conv):
        n = conv.weight.shape[0]
        conv.weight[:, :, 0, 0] = torch.eye(n)
    return vae


def build_pipeline(cfg: TinySD3Config | None = None, seed: int = 0):
    """A randomly initialised tiny ``StableDiffusion3Pipeline`` (fp32, CPU) with architecture ``cfg``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = cfg or TinySD3Config()
    torch.manual_seed(seed)
    tok = build_tokenizer(cfg.max_text_tokens)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_hidden_size * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=2,
        max_position_embeddings=cfg.max_text_tokens,
        projection_dim=cfg.text_projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    te1 = CLIPTextModelWithProjection(text_cfg)
    te2 = CLIPTextModelWithProjection(text_cfg)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.resolution,
        patch_size=cfg.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=2 * cfg.text_hidden_size,
        caption_projection_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        pooled_projection_dim=2 * cfg.text_projection_dim,
        pos_embed_max_size=cfg.resolution // cfg.patch_size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=build_identity_vae(),
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=build_tokenizer(cfg.max_text_tokens),
        text_encoder_3=build_null_t5(2 * cfg.text_hidden_size, len(tok)),
        tokenizer_3=build_tokenizer(cfg.max_text_tokens),
    )
    return pipe


@torch.no_grad()
def build_null_t5(d_model: int, vocab_size: int):
    """A one-layer ``T5EncoderModel`` whose final RMSNorm weight is 0, so its output is exactly zero.

    SD3 allows dropping T5 (its slot is then zeros), but ``from_pretrained`` cannot reload a pipeline saved with
    ``text_encoder_3=None`` unless the caller passes ``text_encoder_3=None`` again. This stand-in produces the same
    zeros while keeping ``StableDiffusion3Pipeline.from_pretrained(path)`` argument-free.
    """
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=8, num_layers=1, num_heads=1, pad_token_id=1,
                 eos_token_id=1, decoder_start_token_id=0)
    )
    t5.encoder.final_layer_norm.weight.zero_()
    return t5


def save_pipeline_atomic(pipe, path: str | os.PathLike, defaults: dict | None = None) -> None:
    """``pipe.save_pretrained`` into a temporary sibling directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    if defaults is not None:
        (tmp / "flowrl_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
