"""Prompt encoding that keeps text encoders off the accelerator: offload, a per-prompt embedding cache, precompute.

A text-to-image policy needs its text encoders only to turn prompts into embeddings, and the prompts of an RL run
repeat (every step draws from the same prompt set; evaluation reuses fixed sets). :class:`PromptEncoder` wraps a
family's batch encoding function (``encode_fn(prompts) -> (embeds [N, L, D], pooled [N, P], ...)``) and offers three
modes:

- **direct** (the default): ``encode_fn`` on the whole batch, encoders resident on the device; nothing cached.
- **offload** (``text_encoder_offload``): encoders live on the CPU and are moved to the accelerator only while
  encoding (and back right after); every prompt's embeddings are kept, on the CPU, in an LRU cache keyed by the
  prompt text (``prompt_embeds_cache_size`` entries), so a repeated prompt is never re-encoded.
- **precomputed** (``precompute_prompt_embeds``): :meth:`PromptEncoder.precompute` encodes a fixed prompt list once
  into an unbounded CPU store and :meth:`PromptEncoder.free_encoders` deletes the text encoders from the pipeline
  (``pipe.text_encoder* = None``); a prompt outside the list then raises :class:`PromptNotPrecomputedError`.

In the offload and precomputed modes each prompt is encoded alone (a batch of one), so a prompt's embedding never
depends on which prompts shared its batch: the cached, precomputed and re-encoded (e.g. after a resume) embeddings of
a prompt are the same bits, equal to ``encode_fn([prompt])``. Cached rows keep the encoders' dtype (the run's weight
dtype): SD3.5 with ``max_sequence_length=256`` stores 333 x 4096 bf16 values (2.7 MB) per prompt, Flux with 512 T5
tokens 4.2 MB, in host memory of every process.
"""

from __future__ import annotations

import collections
import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attributes that hold text encoders (SD3: CLIP-L, CLIP-G, T5-XXL; Flux: CLIP-L, T5-XXL)."""

EncodeFn = Callable[[list[str]], tuple[Tensor, ...]]
"""prompts (N) -> tensors with N rows each, e.g. (embeds [N, L, D], pooled [N, P])."""

Rows = tuple[Tensor, ...]
"""One prompt's embeddings: each tensor [1, ...] on the CPU."""


class PromptNotPrecomputedError(LookupError):
    """A prompt has no stored embedding and the text encoders that could encode it were freed."""


class EmbeddingCache:
    """Prompt text -> embedding rows on the CPU: a bounded LRU part plus an unbounded precomputed part.

    Args:
        max_size: LRU entries kept (least recently used evicted first); 0 = the LRU keeps nothing. Precomputed
            entries (:meth:`put_precomputed`) are never evicted and do not count against it.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError(f"prompt_embeds_cache_size must be >= 0 (0 = no cache), got {max_size}")
        self.max_size = int(max_size)
        self._lru: collections.OrderedDict[str, Rows] = collections.OrderedDict()
        self._fixed: dict[str, Rows] = {}

    def get(self, prompt: str) -> Rows | None:
        if prompt in self._fixed:
            return self._fixed[prompt]
        rows = self._lru.get(prompt)
        if rows is not None:
            self._lru.move_to_end(prompt)
        return rows

    def put(self, prompt: str, rows: Rows) -> None:
        if self.max_size == 0 or prompt in self._fixed:
            return
        self._lru[prompt] = rows
        self._lru.move_to_end(prompt)
        while len(self._lru) > self.max_size:
            self._lru.popitem(last=False)

    def put_precomputed(self, prompt: str, rows: Rows) -> None:
        self._lru.pop(prompt, None)
        self._fixed[prompt] = rows

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._fixed or prompt in self._lru

    def __len__(self) -> int:
        return len(self._fixed) + len(self._lru)

    def is_precomputed(self, prompt: str) -> bool:
        return prompt in self._fixed

    @property
    def num_precomputed(self) -> int:
        return len(self._fixed)

    def nbytes(self) -> int:
        """Host memory held by all entries, in bytes."""
        entries = list(self._fixed.values()) + list(self._lru.values())
        return sum(t.numel() * t.element_size() for rows in entries for t in rows)


class PromptEncoder:
    """Encodes prompts for a policy in the direct, offload or precomputed mode (see the module docstring).

    Args:
        pipe: the diffusers pipeline holding the text encoders (attributes in ``encoder_names``).
        encode_fn: the family's batch encoding, called with the encoders on ``device``; returns tensors with one
            row per prompt (e.g. embeds [N, L, D], pooled [N, P]) in the encoders' dtype.
        device: where :meth:`encode` returns its tensors (the accelerator).
        offload: keep the encoders on the CPU, moving them to ``device`` only while encoding, and cache every
            prompt's embeddings (LRU of ``cache_size`` entries).
        cache_size: LRU entries in the offload mode; 0 = encode every call anew (encoders still offloaded).
        encoder_names: pipeline attributes that are text encoders (missing or None ones are skipped).
    """

    def __init__(
        self,
        pipe,
        encode_fn: EncodeFn,
        device: torch.device | str,
        *,
        offload: bool = False,
        cache_size: int = 1024,
        encoder_names: Sequence[str] = TEXT_ENCODER_NAMES,
    ) -> None:
        self.pipe = pipe
        self.encode_fn = encode_fn
        self.device = torch.device(device)
        self.offload = bool(offload)
        self.cache = EmbeddingCache(cache_size)
        self.encoder_names = tuple(encoder_names)
        self.freed: list[str] | None = None
        """Names of the encoders deleted by :meth:`free_encoders`; None while they exist."""
        self.encode_calls = 0
        """Calls of ``encode_fn`` so far (a repeated prompt served from the cache adds none)."""

    # ------------------------------------------------------------------------------------------------ encoders
    def encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders that exist, by attribute name."""
        found = {name: getattr(self.pipe, name, None) for name in self.encoder_names}
        return {name: m for name, m in found.items() if m is not None}

    @property
    def encoders_freed(self) -> bool:
        return self.freed is not None

    @property
    def cached_mode(self) -> bool:
        """Per-prompt encoding through the cache (offload, or once embeddings were precomputed)."""
        return self.offload or self.cache.num_precomputed > 0 or self.encoders_freed

    @contextlib.contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """With offload: the encoders on ``device`` inside the context, back on the CPU after (even on error)."""
        if not self.offload or self.device.type == "cpu":
            yield
            return
        mods = list(self.encoders().values())
        try:
            for m in mods:
                m.to(self.device)
            yield
        finally:
            for m in mods:
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def free_encoders(self) -> list[str]:
        """Delete the text encoders from the pipeline (``pipe.<name> = None``) and release their memory.

        Returns:
            the names of the encoders freed. Afterwards only stored prompts can be encoded.
        """
        names = list(self.encoders())
        for name in names:
            setattr(self.pipe, name, None)
        self.freed = names
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return names

    # ------------------------------------------------------------------------------------------------ encoding
    def _encode_one(self, prompt: str) -> Rows:
        """``encode_fn([prompt])`` moved to the CPU: each tensor [1, ...] (encoders must be on the device)."""
        self.encode_calls += 1
        return tuple(t.detach().to("cpu") for t in self.encode_fn([prompt]))

    def _missing_error(self, missing: list[str]) -> PromptNotPrecomputedError:
        shown = ", ".join(repr(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return PromptNotPrecomputedError(
            f"prompt {shown} has no precomputed embedding, and the text encoders ({', '.join(self.freed or [])}) were "
            f"freed after precompute_prompt_embeds encoded {self.cache.num_precomputed} prompts (the training and "
            "evaluation prompt sets, plus the negative prompt). Add the prompt to --prompts or --eval_sets, or run "
            "without --precompute_prompt_embeds (use --text_encoder_offload to keep the encoders on the CPU instead)"
        )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, ...]:
        """Embeddings of ``prompts``, one row each (duplicates allowed), on ``device``.

        Returns:
            what ``encode_fn`` returns (e.g. embeds [N, L, D], pooled [N, P]) in the encoders' dtype. In the
            cached mode each distinct prompt not stored yet is encoded alone and stored; the rows are the stored bits.

        Raises:
            PromptNotPrecomputedError: a prompt is not stored and the encoders were freed.
        """
        prompts = list(prompts)
        if not self.cached_mode:
            self.encode_calls += 1
            return self.encode_fn(prompts)
        rows: dict[str, Rows] = {}
        missing: list[str] = []
        for p in dict.fromkeys(prompts):
            hit = self.cache.get(p)
            if hit is None:
                missing.append(p)
            else:
                rows[p] = hit
        if missing:
            if self.encoders_freed:
                raise self._missing_error(missing)
            with self.encoders_on_device():
                for p in missing:
                    rows[p] = self._encode_one(p)
                    self.cache.put(p, rows[p])
        n_out = len(next(iter(rows.values())))
        return tuple(torch.cat([rows[p][k] for p in prompts]).to(self.device) for k in range(n_out))

    @torch.no_grad()
    def precompute(self, prompts: Iterable[str]) -> int:
        """Encode every distinct prompt once (encoders on the device meanwhile) into the unbounded store.

        Returns:
            the number of prompts stored by this call (already stored ones are kept, not re-encoded).

        Raises:
            PromptNotPrecomputedError: a prompt is new and the encoders were already freed.
        """
        todo = [p for p in dict.fromkeys(prompts) if not self.cache.is_precomputed(p)]
        new = [p for p in todo if p not in self.cache]  # the rest is in the LRU already: promoted, not re-encoded
        if new and self.encoders_freed:
            raise self._missing_error(new)
        with self.encoders_on_device() if new else contextlib.nullcontext():
            for p in todo:
                rows = self.cache.get(p)
                self.cache.put_precomputed(p, rows if rows is not None else self._encode_one(p))
        return len(todo)
