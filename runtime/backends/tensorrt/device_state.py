"""The TensorRT backend's state store: state and KV cache resident on the GPU.

NEEDS A GPU; NOT EXECUTED: no GPU here. Only `append_kv` (on CPU tensors,
tests/test_trt_device_state.py) and the pure host-side bookkeeping of `DeviceState` (slot
parity, grouping of calls) have run; the device paths, captured decode included, never have.

`DeviceState` implements qcn.runtime.state.StateStore, like the onnxruntime backend's store:
buffers allocated once (`plan.buffer_sizes`), every binding a view of them.
- carried states twice (ping-pong: a call reads one copy and writes the other). Each slot
  remembers which copy holds its state (its parity); a call whose slots disagree first copies
  the minority's states across on the device (O(1) in context), so one view serves the call.
- KV caches [slots, KVH, max_context, D], bound whole as past_key (the attention plugin reads
  positions < past_len only); the engine writes the new tokens' K/V into a staging buffer that
  `append_kv` scatters into the cache at past_len on the device: the only K/V copy.
- input_ids / past_len / logits staging.
Calls need consecutive slots (each binding is one view of the slot axis): slots that are not
are run as one call per run of consecutive slots (`qcn.runtime.state.contiguous_runs`).

CUDA graphs (`cuda_graphs=True`): a decode step (T = 1) is captured once per (batch,
first_slot, parity) -- the things that change its bindings' addresses -- right after the eager
call that computes that step with the same bindings (TensorRT: enqueue once after setting
shapes, then capture), on the backend's non-default stream: execute_async_v3 + append_kv. A
replay copies the host input_ids/past_len into the static buffers the graph is bound to and
calls graph.replay(). TensorRT-RTX contexts are asked `is_stream_capturable` first (an engine
built without kREQUIRE_USER_ALLOCATION is not); a refused or failed capture logs a warning and
turns graphs off for this DeviceState (eager from then on). The captured graph assumes the
context's device memory does not move (default STATIC allocation strategy).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np

from qcn.artifact import DTYPES

from ...errors import BackendError
from ...state import _Layout, contiguous_runs
from .plan import binding_plan, buffer_sizes
from .profiles import check_profile, select_profile

__all__ = ["DeviceState", "append_kv"]

log = logging.getLogger(__name__)


def append_kv(cache, new, first_slot: int, past_len) -> None:
    """Write the new tokens' K/V into the cache, on the device: cache[first_slot + j, :, past_len[j] + t]
    = new[j, :, t] for cache [slots, KVH, max_ctx, D], new [B, KVH, T, D], past_len [B] int64 on
    cache's device. Only tensor ops (one scatter_ into the B slots' view; indices from past_len and
    an arange): no host sync, no per-sequence loop, no whole-cache copy, so it can be captured in a
    CUDA graph. The caller guarantees past_len[j] + T <= max_ctx (DeviceState.step checks it on the
    host). Tested on CPU tensors (tests/test_trt_device_state.py); its GPU path has NOT been executed."""
    import torch

    b, h, t, d = new.shape
    pos = past_len.view(b, 1) + torch.arange(t, device=past_len.device, dtype=past_len.dtype)  # [B, T]
    cache[first_slot: first_slot + b].scatter_(2, pos.view(b, 1, t, 1).expand(b, h, t, d), new)


class DeviceState:
    """StateStore on the GPU for ``slots`` sequences of up to ``max_context`` tokens (see the
    module docstring; NEEDS A GPU, NOT executed)."""

    def __init__(self, backend, *, slots: int, max_context: int, cuda_graphs: bool = True):
        self.backend = backend
        self.slots = slots
        self.max_context = max_context
        self.cuda_graphs = cuda_graphs
        self._l = _Layout(backend.manifest)
        torch = backend.torch
        self.buffers = {name: torch.zeros(n, dtype=torch.uint8, device=backend.device)
                        for name, n in buffer_sizes(backend.manifest, max_batch=slots, max_context=max_context).items()}
        self._parity = np.zeros(slots, dtype=bool)  # False: the slot's carried states are in '.a'
        self._graphs: dict = {}

    # -- views -----------------------------------------------------------------------------
    def _view(self, buffer: str, shape, dtype: str):
        torch = self.backend.torch
        t = self.buffers[buffer].view(getattr(torch, DTYPES[dtype].torch))
        return t[: math.prod(shape)].view(shape)

    def _carried(self, s, parity: bool):
        return self._view(f"{s.input}.{'b' if parity else 'a'}", (self.slots, *s.shape), s.dtype)

    def _cache(self, s):
        kvh, _, d = s.shape
        return self._view(s.input, (self.slots, kvh, self.max_context, d), s.dtype)

    def _align(self, slots: Sequence[int]) -> bool:
        """Make every slot of a call keep its carried states in the same copy; return that parity."""
        par = self._parity[list(slots)]
        target = bool(par.sum() * 2 > len(par))
        movers = [s for s, p in zip(slots, par) if p != target]
        for s in self._l.carried:
            src, dst = self._carried(s, not target), self._carried(s, target)
            for slot in movers:
                dst[slot].copy_(src[slot])
        self._parity[movers] = target
        return target

    # -- StateStore ------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        for s in self._l.carried:
            self._carried(s, bool(self._parity[slot]))[slot].zero_()

    def step(self, graph: str, slots: Sequence[int], input_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        batch, tokens = input_ids.shape
        past_len = np.asarray(past_len, dtype=np.int64)
        if (past_len < 0).any() or (past_len + tokens > self.max_context).any():
            raise BackendError(f"past_len {past_len.tolist()} + {tokens} tokens must lie in 0..{self.max_context} (max_context)")
        logits = np.empty((batch, self.backend.manifest.model.vocab_size), dtype=np.float32)
        for first, positions in contiguous_runs(list(slots)):
            order = sorted(positions, key=lambda j: slots[j])
            out = self._run(graph, first, input_ids[order], past_len[order])
            logits[order] = out
        return logits

    def _run(self, graph: str, first_slot: int, input_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        be, m, torch = self.backend, self.backend.manifest, self.backend.torch
        batch, tokens = input_ids.shape
        parity = self._align(range(first_slot, first_slot + batch))
        key = (batch, first_slot, parity)
        graphable = self.cuda_graphs and tokens == 1
        vocab = m.model.vocab_size
        all_logits = m.graph(graph).logits == "all"
        with torch.cuda.stream(be.stream):
            ids_dev = self._view("input_ids", (batch, tokens), "int64")
            past_dev = self._view("past_len", (batch,), "int64")
            ids_dev.copy_(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)), non_blocking=True)
            past_dev.copy_(torch.from_numpy(np.ascontiguousarray(past_len, dtype=np.int64)), non_blocking=True)
            logits = self._view("logits", (batch, tokens, vocab) if all_logits else (batch, vocab), "float32")
            if graphable and key in self._graphs:
                self._graphs[key].replay()
            else:
                self._bind(graph, first_slot, batch, tokens, parity)
                self._launch(graph, first_slot, batch, tokens, past_dev)  # also the warm-up before a capture
                if graphable:
                    # A capture records and runs nothing; re-running this step would be harmless anyway
                    # (reads one copy/cache < past_len, rewrites the other copy/the same K/V positions).
                    self._capture(key, graph, first_slot, past_dev)
            host = (logits[:, -1] if all_logits else logits).float().cpu().numpy()
        self._parity[first_slot: first_slot + batch] = not parity
        return host

    def _bind(self, graph: str, first_slot: int, batch: int, tokens: int, parity: bool) -> None:
        """Profile, input shapes and every tensor address, all views of the buffers allocated once."""
        be, m = self.backend, self.backend.manifest
        plan = binding_plan(m, graph, batch=batch, tokens=tokens, past=self.max_context)
        profile = select_profile(be.info, graph)
        check_profile(profile, {b.name: b.shape for b in plan if b.role not in ("logits", "state_out", "cache_new")})
        be.use_profile(profile.index)
        sl = slice(first_slot, first_slot + batch)
        states = {s.input: s for s in m.state}
        for b in plan:
            if b.role == "state_in":
                t = self._carried(states[b.name], parity)[sl]
            elif b.role == "state_out":
                t = self._carried(next(s for s in m.state if s.output == b.name), not parity)[sl]
            elif b.role == "cache_in":
                t = self._cache(states[b.name])[sl]
            else:
                t = self._view(b.buffer, b.shape, b.dtype)
            if b.role in ("input_ids", "past_len", "state_in", "cache_in"):
                be.context.set_input_shape(b.name, b.shape)
            be.context.set_tensor_address(b.name, t.data_ptr())

    def _launch(self, graph: str, first_slot: int, batch: int, tokens: int, past_dev) -> None:
        """The step's device work on the current stream: the engine, then the new K/V into the cache."""
        be = self.backend
        if not be.context.execute_async_v3(be.stream.cuda_stream):
            raise BackendError(f"execute_async_v3 failed for {graph}")
        for s in self._l.cache:
            kvh, _, d = s.shape
            new = self._view(f"{s.output}.staging", (batch, kvh, tokens, d), s.dtype)
            append_kv(self._cache(s), new, first_slot, past_dev)

    def _capture(self, key, graph: str, first_slot: int, past_dev) -> bool:
        """Capture the bound decode step into a CUDA graph; False (and graphs off) when it cannot be."""
        be, torch = self.backend, self.backend.torch
        batch, _, _ = key
        if be.info.module == "tensorrt_rtx" and not be.context.is_stream_capturable(be.stream.cuda_stream):
            return self._no_graphs("the TensorRT-RTX context is not stream capturable (engine built without "
                                   "kREQUIRE_USER_ALLOCATION, or data-dependent shapes)")
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=be.stream):
                self._launch(graph, first_slot, batch, 1, past_dev)
        except (RuntimeError, BackendError) as e:  # CUDA capture errors are RuntimeError (torch.AcceleratorError)
            return self._no_graphs(f"capture failed ({type(e).__name__}: {e})")
        self._graphs[key] = g
        return True

    def _no_graphs(self, why: str) -> bool:
        log.warning("tensorrt: CUDA-graph capture of decode disabled, running eagerly: %s", why)
        self.cuda_graphs = False
        self._graphs.clear()
        return False

    def read(self, slot: int, past_len: int) -> dict[str, np.ndarray]:
        """Host copies (bfloat16 as its uint16 bit patterns, see qcn.runtime.state.host_dtype)."""
        torch = self.backend.torch
        self.backend.stream.synchronize()  # the steps queued on the backend's stream have written it
        arrays = {}
        for s in self._l.carried:
            arrays[s.input] = _to_host(self._carried(s, bool(self._parity[slot]))[slot], torch)
        for s in self._l.cache:
            arrays[s.input] = _to_host(self._cache(s)[slot, :, :past_len], torch)
        return arrays

    def write(self, slot: int, arrays: Mapping[str, np.ndarray]) -> None:
        torch = self.backend.torch
        for s in self._l.carried:
            self._carried(s, bool(self._parity[slot]))[slot].copy_(_to_device(arrays[s.input], s.dtype, torch))
        for s in self._l.cache:
            a = arrays[s.input]
            self._cache(s)[slot, :, : a.shape[1]].copy_(_to_device(a, s.dtype, torch))

    def close(self) -> None:
        self._graphs.clear()
        self.buffers.clear()


def _to_host(t, torch) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
    if t.dtype == torch.float8_e4m3fn:  # an FP8 KV cache: its bytes (qcn.runtime.state.host_dtype)
        return t.contiguous().view(torch.uint8).cpu().numpy()
    return t.contiguous().cpu().numpy()


def _to_device(a: np.ndarray, dtype: str, torch):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "float8_e4m3fn":
        return t.view(torch.float8_e4m3fn)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
