"""State stores: where each sequence's carried states and KV cache live (docs/CONTRACT.md,
"Graph I/O").

A backend creates one store per :class:`~qcn.runtime.session.Session`
(``backend.create_state(max_batch=..., max_context=...)``). The store owns the buffers; the
Session owns which slot belongs to which sequence and each slot's ``past_len``, and passes
``past_len`` to every call. Every store implements :class:`StateStore`:

- ``reset(slot)``: carried states of ``slot`` zero (its KV needs no clearing: positions
  >= past_len are ignored by the graphs).
- ``step(graph, slots, input_ids [B, T], past_len [B]) -> logits [B, V]``: bind the slots'
  states for one call of ``graph``, run it, replace their carried states with the graph's
  ``present.*`` outputs and append the new tokens' K/V at ``past_len .. past_len + T - 1``.
- ``read(slot, past_len) -> {state input name: host array}``: copies of the slot's carried
  states ``[*shape]`` and KV prefix ``[KVH, past_len, D]``; ``write(slot, arrays)`` puts such
  copies back (what :meth:`Session.snapshot` / :meth:`Session.restore` use).
- speculative decoding (docs/MTP.md), :class:`SpeculativeStateStore` only: ``step_with(graph, slots, input_ids, past_len, inputs,
  outputs) -> (logits as the graph gives them, {output: [B, ...]})`` feeds extra inputs and
  returns extra outputs (a graph without ``present.*`` outputs, the verify graph, leaves the
  carried states unchanged), and ``set_carried(slot, {input name: [*shape]})`` replaces carried
  states (the verify graph's state after the last accepted token). A store made with
  ``manifest=`` a view whose ``state`` is the mtp graph's caches holds the draft head's KV.

:class:`HostStateStore` is the plain implementation over ``backend.run(graph, feeds)``: numpy
buffers ``[slots, KVH, max_context, D]`` whose ``[:past]`` window is copied into every call's
feeds, O(context) per step. It serves backends that only implement ``run`` and is the
reference the ONNX Runtime backend's zero-copy store is measured and tested against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import BackendError, SlotError
from .manifest import Manifest, StateSpec, numpy_dtype

__all__ = ["StateStore", "SpeculativeStateStore", "StateSnapshot", "HostStateStore", "state_layout", "contiguous_runs", "host_dtype"]


_RAW = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8}  # dtypes numpy lacks -> their bit patterns


def host_dtype(name: str, where: str = "dtype") -> np.dtype:
    """The numpy dtype a state of manifest dtype ``name`` has on the host (in snapshots):
    bfloat16 and float8_e4m3fn (an FP8 KV cache), which numpy lacks, travel as their raw bit
    patterns (uint16, uint8)."""
    return np.dtype(_RAW[name]) if name in _RAW else numpy_dtype(name, where)


@runtime_checkable
class StateStore(Protocol):
    """What a Session needs from the state its backend keeps (see the module docstring)."""

    slots: int
    max_context: int

    def reset(self, slot: int) -> None: ...

    def step(self, graph: str, slots: Sequence[int], input_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray: ...

    def read(self, slot: int, past_len: int) -> dict[str, np.ndarray]: ...

    def write(self, slot: int, arrays: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class SpeculativeStateStore(StateStore, Protocol):
    """A store that can also serve speculative decoding (docs/MTP.md): the ONNX Runtime store and
    :class:`HostStateStore`. The TensorRT store cannot (no verify / mtp engines are built yet)."""

    def step_with(self, graph: str, slots: Sequence[int], input_ids: np.ndarray, past_len: np.ndarray,
                  inputs: Mapping[str, np.ndarray] | None = None, outputs: Sequence[str] = ()): ...

    def set_carried(self, slot: int, arrays: Mapping[str, np.ndarray]) -> None: ...


def state_layout(manifest: Manifest) -> str:
    """Identity of what a snapshot holds: every state's name, shape and dtype plus the
    artifact's file hashes, so a snapshot restores only into a session over the same model."""
    h = hashlib.sha256()
    for s in manifest.state:
        h.update(f"{s.input}|{s.kind}|{list(s.shape)}|{s.dtype};".encode())
    for rel, digest in sorted(manifest.files.items()):
        h.update(f"{rel}={digest};".encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class StateSnapshot:
    """Host copies of one sequence's state after ``tokens`` tokens (:meth:`Session.snapshot`).

    ``arrays``: state input name -> read-only array, carried states ``[*shape]``, KV caches
    ``[KVH, tokens, D]``. Independent of the session's buffers: it stays valid after the
    sequence is released and can be restored any number of times.
    """

    tokens: int
    arrays: Mapping[str, np.ndarray]
    layout: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @classmethod
    def freeze(cls, tokens: int, arrays: Mapping[str, np.ndarray], layout: str) -> "StateSnapshot":
        for a in arrays.values():
            a.flags.writeable = False
        return cls(int(tokens), MappingProxyType(dict(arrays)), layout)

    def __repr__(self) -> str:
        return f"StateSnapshot(tokens={self.tokens}, nbytes={self.nbytes})"


def contiguous_runs(slots: Sequence[int]) -> list[tuple[int, list[int]]]:
    """How to run a call over ``slots`` with every binding a view of the slot axis:
    ``[(first_slot, [positions in slots])]``, one entry per group of consecutive slot
    indices. ``[3, 1, 2]`` -> ``[(1, [1, 2, 0])]``; ``[0, 2]`` -> ``[(0, [0]), (2, [1])]``."""
    order = sorted(range(len(slots)), key=lambda j: slots[j])
    runs: list[tuple[int, list[int]]] = []
    for j in order:
        if runs and slots[j] == runs[-1][0] + len(runs[-1][1]):
            runs[-1][1].append(j)
        else:
            runs.append((slots[j], [j]))
    return runs


class _Layout:
    """The manifest's states split into carried states and KV caches, with numpy dtypes."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.carried: list[StateSpec] = [s for s in manifest.state if s.carried]
        self.cache: list[StateSpec] = [s for s in manifest.state if not s.carried]
        self.dtype = {s.input: host_dtype(s.dtype, f"state {s.input!r}") for s in manifest.state}
        self.graphs = {g: manifest.graph(g) for g in manifest.graphs}

    def last_logits(self, graph: str, logits: np.ndarray) -> np.ndarray:
        if self.graphs[graph].logits == "all":
            logits = logits[:, -1, :]
        return np.asarray(logits, dtype=np.float32)

    def check_new_kv(self, graph: str, s: StateSpec, new: np.ndarray, b: int, t: int) -> None:
        if new.ndim != 4 or new.shape[0] != b or new.shape[2] != t:
            raise BackendError(f"{graph} graph returned {s.output!r} of shape {new.shape}, expected [{b}, KVH, {t}, D]")


class HostStateStore:
    """State in host numpy buffers, fed to ``backend.run(graph, feeds)`` by value.

    Carried states ``[slots, *shape]``; KV caches ``[slots, KVH, max_context, D]`` (``np.zeros``
    is committed lazily by the OS, so untouched positions cost no RAM). Each call copies the
    ``[:past]`` window of its slots into the feeds (``past`` = max past_len of the call, at
    least 1), i.e. O(context) per step.
    """

    def __init__(self, backend, *, slots: int, max_context: int, manifest=None):
        self.backend = backend
        self.slots = slots
        self.max_context = max_context
        self._l = lay = _Layout(manifest if manifest is not None else backend.manifest)
        self._carried = {s.input: np.zeros((slots, *s.shape), dtype=lay.dtype[s.input]) for s in lay.carried}
        self._cache = {}
        for s in lay.cache:
            kvh, _, d = s.shape
            self._cache[s.input] = np.zeros((slots, kvh, max_context, d), dtype=lay.dtype[s.input])
        self._ids = {g: numpy_dtype(spec.input("input_ids").dtype) for g, spec in lay.graphs.items()}
        self._lens = {g: numpy_dtype(spec.input("past_len").dtype) for g, spec in lay.graphs.items()}

    def reset(self, slot: int) -> None:
        for buf in self._carried.values():
            buf[slot] = 0

    def step(self, graph, slots, input_ids, past_len):
        logits, _ = self.step_with(graph, slots, input_ids, past_len)
        return self._l.last_logits(graph, logits)

    def step_with(self, graph, slots, input_ids, past_len, inputs=None, outputs=()):
        b, t = input_ids.shape
        sel = np.asarray(slots)
        past = max(1, int(np.max(past_len)))
        feeds = {"input_ids": input_ids.astype(self._ids[graph], copy=False),
                 "past_len": np.asarray(past_len).astype(self._lens[graph], copy=False), **(inputs or {})}
        for name, buf in self._carried.items():
            feeds[name] = np.ascontiguousarray(buf[sel])
        for name, buf in self._cache.items():
            feeds[name] = np.ascontiguousarray(buf[sel, :, :past])
        out = self.backend.run(graph, feeds)
        for s in self._l.carried:
            if s.output in out:  # the verify graph returns per-token states instead
                self._carried[s.input][sel] = out[s.output]
        for s in self._l.cache:
            new = out[s.output]
            self._l.check_new_kv(graph, s, new, b, t)
            buf = self._cache[s.input]
            for j, slot in enumerate(slots):
                p = int(past_len[j])
                buf[slot, :, p : p + t] = new[j]
        return np.asarray(out["logits"], dtype=np.float32), {name: out[name] for name in outputs}

    def set_carried(self, slot, arrays):
        for name, a in arrays.items():
            self._carried[name][slot] = a

    def read(self, slot, past_len):
        arrays = {name: buf[slot].copy() for name, buf in self._carried.items()}
        arrays.update({name: buf[slot, :, :past_len].copy() for name, buf in self._cache.items()})
        return arrays

    def write(self, slot, arrays):
        for name, buf in self._carried.items():
            buf[slot] = arrays[name]
        for name, buf in self._cache.items():
            a = arrays[name]
            buf[slot, :, : a.shape[1]] = a

    def close(self) -> None:
        self._carried.clear()
        self._cache.clear()


def check_arrays(layout: _Layout, arrays: Mapping[str, np.ndarray], tokens: int, max_context: int) -> None:
    """A snapshot's arrays must match the store's states exactly (names, shapes, dtypes)."""
    want = {s.input for s in layout.manifest.state}
    if set(arrays) != want:
        raise SlotError(f"snapshot holds states {sorted(arrays)}, this session's model has {sorted(want)}")
    if not 0 <= tokens <= max_context:
        raise SlotError(f"snapshot of {tokens} tokens does not fit max_context {max_context}")
    for s in layout.manifest.state:
        a = arrays[s.input]
        shape = tuple(s.shape) if s.carried else (s.shape[0], tokens, s.shape[2])
        if a.shape != shape or a.dtype != layout.dtype[s.input]:
            raise SlotError(f"snapshot state {s.input!r} is {a.dtype}{list(a.shape)}, expected {layout.dtype[s.input]}{list(shape)}")
