"""Per-sequence-slot state and the graph calls (docs/CONTRACT.md, "Graph I/O").

A :class:`Session` owns ``max_batch`` sequence slots. For every entry of the manifest's
``state`` list it keeps one buffer with a leading slot axis:

- carried states (``conv_state``, ``recurrent_state``): ``[slots, *shape]``, zero when a slot
  is (re)started; the graph's ``present.*`` output replaces the input after every call.
- KV caches (``key``, ``value``): ``[slots, KVH, max_context, D]``. The graph receives
  ``past_key.{i}`` sliced to ``past`` positions, where ``past`` = max past_len over the batch
  (at least 1: a length-1 slice is always safe because the graph ignores positions
  >= past_len, and it spares graphs and kernels a zero-size dim). It returns only the new
  tokens' K/V, which the session writes at ``past_len .. past_len + T - 1``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .errors import BackendError, CapacityError, ContextLengthError, SlotError
from .manifest import Manifest, StateSpec, numpy_dtype

__all__ = ["Session"]

log = logging.getLogger(__name__)


class Session:
    """Sequence slots + state buffers over a backend.

    ``max_batch`` / ``max_context`` may be lowered below the manifest's values to bound memory.
    ``tokenizer`` is optional and only carried for :func:`qcn.runtime.generate.generate`.
    """

    def __init__(self, manifest: Manifest, backend, *, tokenizer=None, max_batch: int | None = None, max_context: int | None = None):
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = self._limit("max_batch", max_batch, manifest.runtime.max_batch)
        self.max_context = self._limit("max_context", max_context, manifest.model.max_context)
        self.prefill_chunk = manifest.runtime.prefill_chunk
        self.vocab_size = manifest.model.vocab_size
        self._prefill = manifest.graph("prefill")
        self._decode = manifest.graph("decode")
        self._id_dtype = {g.name: numpy_dtype(g.input("input_ids").dtype) for g in (self._prefill, self._decode)}
        self._len_dtype = {g.name: numpy_dtype(g.input("past_len").dtype) for g in (self._prefill, self._decode)}
        self._carried: list[tuple[StateSpec, np.ndarray]] = []
        self._cache: list[tuple[StateSpec, np.ndarray]] = []
        for s in manifest.state:
            dt = numpy_dtype(s.dtype, f"state {s.input!r}")
            if s.carried:
                self._carried.append((s, np.zeros((self.max_batch, *s.shape), dtype=dt)))
            else:
                kvh, _, d = s.shape
                # np.zeros is lazily committed by the OS: untouched positions cost no RAM
                self._cache.append((s, np.zeros((self.max_batch, kvh, self.max_context, d), dtype=dt)))
        self._past_len = np.zeros(self.max_batch, dtype=np.int64)
        self._in_use = [False] * self.max_batch

    @staticmethod
    def _limit(name: str, value: int | None, manifest_value: int) -> int:
        if value is None:
            return manifest_value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= manifest_value:
            raise CapacityError(f"{name} must be an integer in 1..{manifest_value} (the manifest's value), got {value!r}")
        return value

    # -- slots ---------------------------------------------------------------------------
    def allocate(self) -> int:
        """Reserve a free slot, reset it and return its index."""
        for i, used in enumerate(self._in_use):
            if not used:
                self._in_use[i] = True
                self.reset(i)
                return i
        raise CapacityError(f"all {self.max_batch} sequence slots are in use (runtime.max_batch = {self.max_batch})")

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self._in_use[slot] = False

    def reset(self, slot: int) -> None:
        """Start the slot over: past_len 0, carried states zero (the KV cache needs no clearing:
        positions >= past_len are ignored by the graph)."""
        self._check_slot(slot)
        self._past_len[slot] = 0
        for _, buf in self._carried:
            buf[slot] = 0

    def past_len(self, slot: int) -> int:
        self._check_slot(slot)
        return int(self._past_len[slot])

    @property
    def free_slots(self) -> int:
        return self._in_use.count(False)

    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.max_batch:
            raise SlotError(f"unknown slot {slot!r}; slots are 0..{self.max_batch - 1} (max_batch = {self.max_batch})")
        return int(slot)

    # -- graph calls ---------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Consume ``token_ids`` in slot ``slot`` (continuing from its past_len) with the prefill
        graph in chunks of ``runtime.prefill_chunk``; return the last token's logits [V]."""
        slot = self._check_slot(slot)
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ContextLengthError("prefill needs at least one token")
        self._check_ids(ids)
        start = int(self._past_len[slot])
        if start + ids.size > self.max_context:
            raise ContextLengthError(
                f"slot {slot}: {start} cached + {ids.size} new tokens = {start + ids.size} exceeds max_context {self.max_context}"
            )
        logits = None
        for c0 in range(0, ids.size, self.prefill_chunk):
            chunk = ids[c0 : c0 + self.prefill_chunk]
            logits = self._step("prefill", [slot], chunk[None, :])
        return logits[0]

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One decode step for several slots at once (each at its own past_len).
        Returns logits [len(slots), V]."""
        slots = [self._check_slot(s) for s in slots]
        if not slots:
            raise SlotError("decode needs at least one slot")
        if len(set(slots)) != len(slots):
            raise SlotError(f"duplicate slots in one decode call: {slots}")
        if len(slots) > self.max_batch:
            raise CapacityError(f"{len(slots)} sequences exceed max_batch {self.max_batch}")
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size != len(slots):
            raise SlotError(f"decode got {toks.size} tokens for {len(slots)} slots (one token per slot)")
        self._check_ids(toks)
        full = [s for s in slots if self._past_len[s] + 1 > self.max_context]
        if full:
            raise ContextLengthError(f"slot(s) {full} are at max_context {self.max_context}; cannot decode further")
        return self._step("decode", slots, toks[:, None])

    def _check_ids(self, ids: np.ndarray) -> None:
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise SlotError(f"token id {int(bad[0])} is outside the vocabulary 0..{self.vocab_size - 1}")

    def _step(self, graph: str, slots: list[int], input_ids: np.ndarray) -> np.ndarray:
        """Run one graph call for ``slots`` with ``input_ids`` [B, T]; update state; return
        the last position's logits [B, V]."""
        b, t = input_ids.shape
        if len(slots) == 1 or slots == list(range(slots[0], slots[0] + b)):
            sel = slice(slots[0], slots[0] + b)  # contiguous slots: views, no gather
        else:
            sel = np.asarray(slots)
        past_len = self._past_len[sel].copy()
        past = max(1, int(past_len.max()))
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(self._id_dtype[graph], copy=False),
            "past_len": past_len.astype(self._len_dtype[graph], copy=False),
        }
        for s, buf in self._carried:
            feeds[s.input] = np.ascontiguousarray(buf[sel])
        for s, buf in self._cache:
            feeds[s.input] = np.ascontiguousarray(buf[sel, :, :past])
        out = self.backend.run(graph, feeds)
        for s, buf in self._carried:
            buf[sel] = out[s.output]
        for s, buf in self._cache:
            new = out[s.output]  # [B, KVH, T, D]
            if new.shape[0] != b or new.shape[2] != t:
                raise BackendError(f"{graph} graph returned {s.output!r} of shape {new.shape}, expected [{b}, KVH, {t}, D]")
            if isinstance(sel, slice) and b == 1:
                p = int(past_len[0])
                buf[slots[0], :, p : p + t] = new[0]
            else:
                for j, slot in enumerate(slots):
                    p = int(past_len[j])
                    buf[slot, :, p : p + t] = new[j]
        self._past_len[sel] = past_len + t
        logits = out["logits"]
        spec = self._prefill if graph == "prefill" else self._decode
        if spec.logits == "all":
            logits = logits[:, -1, :]
        return np.asarray(logits, dtype=np.float32)
