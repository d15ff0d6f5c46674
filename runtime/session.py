"""Sequences, slots and positions over a backend's state store (docs/CONTRACT.md, "Graph I/O").

A :class:`Session` has ``max_batch`` sequence slots. It keeps only who owns each slot and each
slot's ``past_len``; the state itself (carried ``conv_state`` / ``recurrent_state``, KV caches)
lives in the backend's state store (:mod:`qcn.runtime.state`), created by
``backend.create_state``. Each graph call passes the store the slots, the new token ids and
their ``past_len``; the store binds the slots' state, runs the graph, replaces the carried
states and appends the new tokens' K/V.

Sequences are addressed by :class:`SeqHandle` (from :meth:`Session.allocate` or
:meth:`Session.restore`): a slot index plus an owner token unique to that allocation. A
handle whose sequence was released is refused (:class:`SlotError`) by every method, so it can
never read or advance the sequence that reuses its slot.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import BackendError, CapacityError, ContextLengthError, SlotError
from .manifest import Manifest
from .state import SpeculativeStateStore, StateSnapshot, StateStore, check_arrays, state_layout, _Layout

__all__ = ["Session", "SeqHandle", "StateSnapshot"]

log = logging.getLogger(__name__)

_owners = itertools.count(1)  # owner tokens, unique across all sessions of the process


@dataclass(frozen=True)
class SeqHandle:
    """One allocated sequence of a Session: its slot and the owner token of that allocation."""

    slot: int
    owner: int

    def __repr__(self) -> str:
        return f"SeqHandle(slot={self.slot}, owner={self.owner})"


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
        self.store: StateStore = backend.create_state(slots=self.max_batch, max_context=self.max_context)
        self._layout = _Layout(manifest)
        self._layout_key = state_layout(manifest)
        self._past_len = np.zeros(self.max_batch, dtype=np.int64)
        self._owner: list[int | None] = [None] * self.max_batch
        self._drafter = None  # the MTP head's caches (qcn.runtime.speculative), made on first use

    @staticmethod
    def _limit(name: str, value: int | None, manifest_value: int) -> int:
        if value is None:
            return manifest_value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= manifest_value:
            raise CapacityError(f"{name} must be an integer in 1..{manifest_value} (the manifest's value), got {value!r}")
        return value

    # -- sequences -----------------------------------------------------------------------
    def allocate(self) -> SeqHandle:
        """Reserve a free slot for a new sequence (past_len 0, carried states zero)."""
        for i, owner in enumerate(self._owner):
            if owner is None:
                handle = SeqHandle(i, next(_owners))
                self._owner[i] = handle.owner
                self._past_len[i] = 0
                self.store.reset(i)
                return handle
        raise CapacityError(f"all {self.max_batch} sequence slots are in use (runtime.max_batch = {self.max_batch})")

    def release(self, handle: SeqHandle) -> None:
        """End the sequence; its handle is refused from now on and its slot can be reused."""
        slot = self._check(handle)
        self._owner[slot] = None
        self._past_len[slot] = 0
        self.store.reset(slot)

    def reset(self, handle: SeqHandle) -> None:
        """Start the sequence over: past_len 0, carried states zero (the KV cache needs no
        clearing: positions >= past_len are ignored by the graphs)."""
        slot = self._check(handle)
        self._past_len[slot] = 0
        self.store.reset(slot)

    def past_len(self, handle: SeqHandle) -> int:
        return int(self._past_len[self._check(handle)])

    @property
    def free_slots(self) -> int:
        return self._owner.count(None)

    def _check(self, handle) -> int:
        """The slot of a live handle; SlotError for anything else."""
        if not isinstance(handle, SeqHandle):
            raise SlotError(f"expected a SeqHandle from Session.allocate() or Session.restore(), got {handle!r}")
        slot = handle.slot
        if not 0 <= slot < self.max_batch or self._owner[slot] != handle.owner:
            raise SlotError(f"{handle!r} is not a live sequence of this session (released, or from another session)")
        return slot

    # -- snapshots -----------------------------------------------------------------------
    def snapshot(self, handle: SeqHandle) -> StateSnapshot:
        """Host copies of the sequence's carried states and KV prefix ``[:past_len]``."""
        slot = self._check(handle)
        p = int(self._past_len[slot])
        return StateSnapshot.freeze(p, self.store.read(slot, p), self._layout_key)

    def restore(self, snapshot: StateSnapshot) -> SeqHandle:
        """A new sequence holding ``snapshot``'s state: continuing it is bit-identical to
        continuing the sequence the snapshot was taken from."""
        if not isinstance(snapshot, StateSnapshot):
            raise SlotError(f"expected a StateSnapshot from Session.snapshot(), got {type(snapshot).__name__}")
        if snapshot.layout != self._layout_key:
            raise SlotError("the snapshot was taken from another model (state layout or artifact files differ)")
        check_arrays(self._layout, snapshot.arrays, snapshot.tokens, self.max_context)
        handle = self.allocate()
        try:
            self.store.write(handle.slot, snapshot.arrays)
        except BaseException:
            self.release(handle)
            raise
        self._past_len[handle.slot] = snapshot.tokens
        return handle

    # -- graph calls ---------------------------------------------------------------------
    def prefill(self, handle: SeqHandle, token_ids: Sequence[int]) -> np.ndarray:
        """Consume ``token_ids`` (continuing from the sequence's past_len) with the prefill graph
        in chunks of ``runtime.prefill_chunk``; return the last token's logits [V]."""
        slot = self._check(handle)
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

    def decode(self, handles: Sequence[SeqHandle], tokens: Sequence[int]) -> np.ndarray:
        """One decode step for several sequences at once (each at its own past_len).
        Returns logits [len(handles), V]."""
        if isinstance(handles, SeqHandle):
            raise SlotError("decode takes a list of handles (and one token per handle)")
        slots = [self._check(h) for h in handles]
        if not slots:
            raise SlotError("decode needs at least one sequence")
        if len(set(slots)) != len(slots):
            raise SlotError(f"the same sequence twice in one decode call: slots {slots}")
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size != len(slots):
            raise SlotError(f"decode got {toks.size} tokens for {len(slots)} sequences (one token per sequence)")
        self._check_ids(toks)
        full = [s for s in slots if self._past_len[s] + 1 > self.max_context]
        if full:
            raise ContextLengthError(f"slot(s) {full} are at max_context {self.max_context}; cannot decode further")
        return self._step("decode", slots, toks[:, None])

    # -- speculative decoding (docs/MTP.md; qcn.runtime.speculative drives these) ---------------
    def _speculative(self):
        spec = self.manifest.speculative
        if spec is None:
            raise SlotError("this artifact has no MTP head (compile it with runtime.speculative in the recipe)")
        if not isinstance(self.store, SpeculativeStateStore):
            raise BackendError(f"the {type(self.store).__name__} state store cannot run speculative decoding; "
                               "use the onnxruntime backend, or --speculative 0 to decode without it")
        return spec

    def prefill_hidden(self, handle: SeqHandle, token_ids: Sequence[int]):
        """``prefill`` that yields, chunk by chunk, (last token's logits [V], the chunk's
        post-norm hidden states [chunk, H]) for the MTP head; the state advances as in prefill."""
        spec = self._speculative()
        slot = self._check(handle)
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ContextLengthError("prefill needs at least one token")
        self._check_ids(ids)
        start = int(self._past_len[slot])
        if start + ids.size > self.max_context:
            raise ContextLengthError(
                f"slot {slot}: {start} cached + {ids.size} new tokens = {start + ids.size} exceeds max_context {self.max_context}"
            )
        for c0 in range(0, ids.size, self.prefill_chunk):
            chunk = ids[c0 : c0 + self.prefill_chunk][None, :]
            past_len = self._past_len[[slot]].copy()
            logits, out = self.store.step_with("prefill", [slot], chunk, past_len, outputs=(spec.hidden,))
            self._past_len[slot] = past_len[0] + chunk.shape[1]
            yield self._layout.last_logits("prefill", logits)[0], out[spec.hidden][0]

    def verify(self, handles: Sequence[SeqHandle], tokens: np.ndarray):
        """Score ``tokens`` [B, T] (each sequence's last token + T-1 drafts) with the verify graph
        in one call, without advancing: returns (logits [B, T, V], hidden [B, T, H], per-token
        carried states {state input: [B, T, *shape]}). Follow with :meth:`commit`."""
        spec = self._speculative()
        slots = [self._check(h) for h in handles]
        if len(set(slots)) != len(slots):
            raise SlotError(f"the same sequence twice in one verify call: slots {slots}")
        toks = np.asarray(tokens, dtype=np.int64)
        if toks.ndim != 2 or toks.shape[0] != len(slots):
            raise SlotError(f"verify takes [sequences, tokens] token ids, got shape {toks.shape} for {len(slots)} sequences")
        self._check_ids(toks.reshape(-1))
        full = [s for s in slots if self._past_len[s] + toks.shape[1] > self.max_context]
        if full:
            raise ContextLengthError(f"slot(s) {full}: {toks.shape[1]} verify tokens exceed max_context {self.max_context}")
        outputs = (spec.hidden, *spec.per_token.values())
        logits, out = self.store.step_with("verify", slots, toks, self._past_len[slots].copy(), outputs=outputs)
        per_token = {name: out[o] for name, o in spec.per_token.items()}
        return logits, out[spec.hidden], per_token

    def commit(self, handle: SeqHandle, per_token: dict, index: int) -> None:
        """Keep tokens ``0..index`` of the last :meth:`verify` call of this sequence: its carried
        states become the verify graph's states after token ``index`` (``per_token`` rows
        ``{state input: [T, *shape]}``) and past_len advances by ``index + 1``; the K/V the call
        wrote past that is ignored (positions >= past_len) and overwritten later."""
        slot = self._check(handle)
        self.store.set_carried(slot, {name: a[index] for name, a in per_token.items()})
        self._past_len[slot] += index + 1

    def _check_ids(self, ids: np.ndarray) -> None:
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise SlotError(f"token id {int(bad[0])} is outside the vocabulary 0..{self.vocab_size - 1}")

    def _step(self, graph: str, slots: list[int], input_ids: np.ndarray) -> np.ndarray:
        """One graph call for ``slots`` with ``input_ids`` [B, T]; returns the last position's
        logits [B, V] and advances the slots' past_len by T."""
        past_len = self._past_len[slots].copy()
        logits = self.store.step(graph, slots, input_ids, past_len)
        self._past_len[slots] = past_len + input_ids.shape[1]
        return logits

    def drafter(self):
        """The MTP draft head's state over this session's slots (speculative decoding)."""
        if self._drafter is None:
            from .speculative import MtpDrafter

            self._drafter = MtpDrafter(self)
        return self._drafter

    def close(self) -> None:
        """Free the state store's buffers (the backend stays open)."""
        if self._drafter is not None:
            self._drafter.close()
        self.store.close()
