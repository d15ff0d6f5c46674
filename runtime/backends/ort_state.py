"""The ONNX Runtime backend's state store: preallocated host buffers bound with IOBinding, so a
call copies only the new tokens' K/V (into the cache) and never the cache prefix.

Buffers (allocated once, except the KV caches' position axis, see *capacity*):

- carried states ``[slots, *shape]`` and a same-sized staging buffer the graph's ``present.*``
  outputs are bound to (copied back into the called slots after the call: O(1) in context);
- KV caches ``[slots, KVH, capacity, D]``. A call over slots ``s0 .. s0+B-1`` binds the view
  ``cache[s0 : s0+B]``, which is contiguous (the slot axis is outermost), as ``past_key.{i}``
  of length ``past = capacity``: no copy. The graphs ignore positions >= past_len, so the
  unused tail is harmless. The graph's ``new_key.{i}`` / ``new_value.{i}`` are bound to a
  staging buffer and written at ``past_len .. past_len+T-1`` (the only K/V copy);
- input_ids / past_len / logits staging.

*capacity* is the bound window: the graph's attention work is proportional to it, so it
follows the longest sequence in the store instead of being ``max_context`` from the start. It
grows geometrically (x1.25, multiples of 64, at most max_context) when a call needs more: the
rare step that grows it copies every slot's prefix once, O(context) amortized to O(1) per
token. When the longest sequence is reset or released it shrinks back (same copy). The
window's length does not enter the results beyond float rounding; on qcn-pico a restored
sequence continued bit-identically at windows of 256 and 4096 (tests check equal windows).

Calls whose slots are not consecutive: if the slots' span is at most twice their number, one
call covers the span (the rows of uninvolved slots run with past_len 0 and their outputs are
discarded: no state of theirs is read back or changed); otherwise one call per run of
consecutive slots. Either way every binding stays a view.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ..errors import BackendError
from ..state import _Layout, contiguous_runs
from ..manifest import numpy_dtype
from qcn.artifact import DTYPES

__all__ = ["OrtStateStore"]

_GRANULE = 64
_GROWTH = 1.25


class OrtStateStore:
    """StateStore of the onnxruntime backend (``OrtBackend.create_state``)."""

    def __init__(self, backend, *, slots: int, max_context: int, initial_capacity: int = 256):
        self.backend = backend
        self.slots = slots
        self.max_context = max_context
        self._l = lay = _Layout(backend.manifest)
        m = backend.manifest
        self._carried = {s.input: np.zeros((slots, *s.shape), dtype=lay.dtype[s.input]) for s in lay.carried}
        self._carried_out = {s.input: np.empty((slots, *s.shape), dtype=lay.dtype[s.input]) for s in lay.carried}
        self.capacity = self._floor = self._round(min(max_context, initial_capacity))
        self._cache: dict[str, np.ndarray] = {}
        for s in lay.cache:
            kvh, _, d = s.shape
            self._cache[s.input] = np.zeros((slots, kvh, self.capacity, d), dtype=lay.dtype[s.input])
        self._extent = np.zeros(slots, dtype=np.int64)  # positions of each slot's cache that hold K/V
        # what ONNX Runtime is told a buffer holds: its ONNX type where numpy has no such dtype
        # (an FP8 KV cache: uint8 buffers bound as float8e4m3fn), else the numpy type
        self._elem = {s.input: _elem_type(s.dtype, lay.dtype[s.input]) for s in m.state}
        self._io = {}
        self._bound: dict[str, tuple] = {}  # graph -> what its IOBinding holds (rebinding costs ~35 Python calls)
        self._extra_outputs = {g: [n for n in backend.output_names(g) if n not in spec.output_names]
                               for g, spec in lay.graphs.items() if backend.has_graph(g)}
        self._staging(m.runtime.prefill_chunk)

    def _staging(self, tokens: int) -> None:
        """(Re)allocate the per-call buffers for calls of up to ``tokens`` tokens per sequence
        (runtime.prefill_chunk unless a caller raises Session.prefill_chunk)."""
        lay, m, slots = self._l, self.backend.manifest, self.slots
        self._chunk = tokens
        self._bound = {}
        self._new = {}
        for s in lay.cache:
            kvh, _, d = s.shape
            self._new[s.input] = np.empty(slots * kvh * tokens * d, dtype=lay.dtype[s.input])
        self._logits, self._ids, self._lens = {}, {}, {}
        for g, spec in lay.graphs.items():
            per_row = m.model.vocab_size * (tokens if spec.logits == "all" else 1)
            self._logits[g] = np.empty(slots * per_row, dtype=numpy_dtype(spec.output("logits").dtype))
            self._ids[g] = np.empty(slots * tokens, dtype=numpy_dtype(spec.input("input_ids").dtype))
            self._lens[g] = np.empty(slots, dtype=numpy_dtype(spec.input("past_len").dtype))

    # -- capacity --------------------------------------------------------------------------
    def _round(self, n: int) -> int:
        return min(self.max_context, max(1, math.ceil(n / _GRANULE) * _GRANULE))

    def _resize(self, capacity: int) -> None:
        keep = min(int(self._extent.max()), capacity, self.capacity)
        for name, old in self._cache.items():
            new = np.zeros((old.shape[0], old.shape[1], capacity, old.shape[3]), dtype=old.dtype)
            new[:, :, :keep] = old[:, :, :keep]
            self._cache[name] = new
        self.capacity = capacity
        self._bound.clear()

    def _fit(self, need: int) -> None:
        if need > self.capacity:
            self._resize(self._round(max(need, int(self.capacity * _GROWTH))))

    # -- StateStore ------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        for buf in self._carried.values():
            buf[slot] = 0
        self._extent[slot] = 0
        target = max(self._floor, self._round(int(self._extent.max() * _GROWTH)))
        if target * 2 <= self.capacity:
            self._resize(target)

    def step(self, graph: str, slots: Sequence[int], input_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        b, t = input_ids.shape
        past_len = np.asarray(past_len, dtype=np.int64)
        self._fit(int((past_len + t).max()))
        vocab = self.backend.manifest.model.vocab_size
        logits = np.empty((b, vocab), dtype=np.float32)
        lo, hi = min(slots), max(slots)
        if hi - lo + 1 <= 2 * b:
            groups = [(lo, hi - lo + 1, list(range(b)))]
        else:
            groups = [(s0, len(pos), pos) for s0, pos in contiguous_runs(slots)]
        for s0, span, positions in groups:
            rows = [slots[j] - s0 for j in positions]
            ids = np.zeros((span, t), dtype=np.int64)
            lens = np.zeros(span, dtype=np.int64)
            ids[rows] = input_ids[positions]
            lens[rows] = past_len[positions]
            out_logits = self._call(graph, s0, span, ids, lens, rows)
            logits[positions] = out_logits[rows]
        return logits

    def _call(self, graph: str, s0: int, span: int, ids: np.ndarray, lens: np.ndarray, rows: list[int]) -> np.ndarray:
        t = ids.shape[1]
        be, lay = self.backend, self._l
        if t > self._chunk:
            self._staging(t)
        io = self._io.get(graph)
        if io is None:
            io = self._io[graph] = be.io_binding(graph)
        sl = slice(s0, s0 + span)
        ids_buf = self._ids[graph][: span * t].reshape(span, t)
        ids_buf[...] = ids
        lens_buf = self._lens[graph][:span]
        lens_buf[...] = lens
        new_views = {}
        for s in lay.cache:
            kvh, _, d = s.shape
            new_views[s.input] = self._new[s.input][: span * kvh * t * d].reshape(span, kvh, t, d)
        spec = lay.graphs[graph]
        vocab = be.manifest.model.vocab_size
        lg_shape = (span, t, vocab) if spec.logits == "all" else (span, vocab)
        lg = self._logits[graph][: math.prod(lg_shape)].reshape(lg_shape)
        # the same slots, tokens and buffers as this graph's last call: its bindings still hold
        key = (s0, span, t)  # resizing or new staging buffers forget every binding
        if self._bound.get(graph) != key:
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            _bind(io.bind_input, "input_ids", ids_buf)
            _bind(io.bind_input, "past_len", lens_buf)
            for s in lay.carried:
                _bind(io.bind_input, s.input, self._carried[s.input][sl], self._elem[s.input])
                _bind(io.bind_output, s.output, self._carried_out[s.input][:span], self._elem[s.input])
            for s in lay.cache:
                _bind(io.bind_input, s.input, self._cache[s.input][sl], self._elem[s.input])
                _bind(io.bind_output, s.output, new_views[s.input], self._elem[s.input])
            _bind(io.bind_output, "logits", lg)
            for name in self._extra_outputs.get(graph, ()):
                io.bind_output(name, "cpu")
            self._bound[graph] = key
        be.run_binding(graph, io)
        # write back only the called rows: uninvolved slots of a covering call keep their state
        for s in lay.carried:
            self._carried[s.input][s0 + np.asarray(rows)] = self._carried_out[s.input][rows]
        for s in lay.cache:
            cache, new = self._cache[s.input], new_views[s.input]
            for r in rows:
                p = int(lens[r])
                cache[s0 + r, :, p : p + t] = new[r]
        for r in rows:
            self._extent[s0 + r] = max(self._extent[s0 + r], int(lens[r]) + t)
        return lay.last_logits(graph, lg)

    def read(self, slot: int, past_len: int) -> dict[str, np.ndarray]:
        arrays = {name: buf[slot].copy() for name, buf in self._carried.items()}
        arrays.update({name: buf[slot, :, :past_len].copy() for name, buf in self._cache.items()})
        return arrays

    def write(self, slot: int, arrays: Mapping[str, np.ndarray]) -> None:
        tokens = max((arrays[name].shape[1] for name in self._cache), default=0)
        self._fit(tokens)
        for name, buf in self._carried.items():
            buf[slot] = arrays[name]
        for name, buf in self._cache.items():
            buf[slot, :, :tokens] = arrays[name]
        self._extent[slot] = tokens

    def close(self) -> None:
        self._io.clear()
        self._bound.clear()
        self._carried.clear()
        self._carried_out.clear()
        self._cache.clear()
        self._new.clear()


def _elem_type(name: str, host: np.dtype):
    """IOBinding element type of a state of manifest dtype ``name`` held as ``host``: the numpy
    type, or the ONNX elem type (an int) where the host buffer holds raw bits (float8_e4m3fn)."""
    d = DTYPES[name]
    return host.type if d.numpy is not None else d.onnx


def _bind(bind, name: str, a: np.ndarray, elem=None) -> None:
    """Bind a C-contiguous host array by address (ONNX Runtime reads/writes it in place);
    ``elem``: what the bytes are (default: the array's numpy type)."""
    if not a.flags.c_contiguous:
        raise BackendError(f"internal error: {name!r} binding is not contiguous")
    bind(name, "cpu", 0, a.dtype.type if elem is None else elem, list(a.shape), a.ctypes.data)
