"""The tensorrt backend's device-side KV scatter (`append_kv`), checked on CPU tensors against a
naive per-sequence loop. No GPU here: the same code on CUDA tensors, and the CUDA-graph capture of
decode that uses it, have NOT been executed."""

from __future__ import annotations

import itertools

import pytest
import torch

from qcn.runtime.backends.tensorrt import append_kv

SLOTS, KVH, CTX, D = 5, 3, 13, 7  # odd sizes on purpose


def _naive(cache, new, first_slot, past_len):
    out = cache.clone()
    for j in range(new.shape[0]):
        p = int(past_len[j])
        out[first_slot + j, :, p:p + new.shape[2]] = new[j]
    return out


@pytest.mark.parametrize("batch,tokens,dtype", list(itertools.product((1, 2, 3), (1, 5), (torch.float32, torch.bfloat16))))
def test_append_kv_matches_a_loop_and_leaves_the_rest_untouched(batch, tokens, dtype):
    g = torch.Generator().manual_seed(batch * 10 + tokens)
    choices = [0, CTX - tokens, 1, (CTX - tokens) // 2, CTX - tokens - 1]
    for trial in range(6):
        cache = torch.randn(SLOTS, KVH, CTX, D, generator=g).to(dtype)
        new = torch.randn(batch, KVH, tokens, D, generator=g).to(dtype)
        first_slot = trial % (SLOTS - batch + 1)
        past = torch.tensor([choices[(trial + j) % len(choices)] for j in range(batch)], dtype=torch.int64)
        expect = _naive(cache, new, first_slot, past)
        before = cache.clone()
        append_kv(cache, new, first_slot, past)
        assert torch.equal(cache.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           expect.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # bit-identical
        written = torch.zeros(SLOTS, KVH, CTX, D, dtype=torch.bool)
        for j in range(batch):
            written[first_slot + j, :, int(past[j]):int(past[j]) + tokens] = True
        assert torch.equal(cache[~written], before[~written])
        assert written.sum() == batch * KVH * tokens * D


def test_append_kv_writes_in_place_into_the_cache_storage():
    cache = torch.zeros(SLOTS, KVH, CTX, D)
    ptr = cache.data_ptr()
    append_kv(cache, torch.ones(2, KVH, 1, D), 3, torch.tensor([0, CTX - 1]))
    assert cache.data_ptr() == ptr
    assert cache[3, :, 0].eq(1).all() and cache[4, :, CTX - 1].eq(1).all() and cache.sum() == 2 * KVH * D


def test_append_kv_refuses_positions_past_the_cache():
    cache = torch.zeros(SLOTS, KVH, CTX, D)
    with pytest.raises(RuntimeError):
        append_kv(cache, torch.ones(1, KVH, 5, D), 0, torch.tensor([CTX - 4]))


# -- DeviceState's host-side bookkeeping, on CPU tensors (its device paths NEED A GPU) ----------


class _CpuBackend:
    """Just what DeviceState touches outside a graph call: manifest, torch, device, stream."""

    class _Stream:
        def synchronize(self):
            pass

    def __init__(self, manifest):
        self.manifest, self.torch, self.device, self.stream = manifest, torch, torch.device("cpu"), self._Stream()


@pytest.fixture(scope="module")
def manifest(art):  # the conftest's fixture artifact
    from qcn.runtime.manifest import load_manifest

    return load_manifest(art.path)


def test_device_state_write_read_reset_and_parity(manifest):
    import numpy as np

    from qcn.runtime.backends.tensorrt import DeviceState, buffer_sizes
    from qcn.runtime.state import StateStore

    ds = DeviceState(_CpuBackend(manifest), slots=3, max_context=20)
    assert isinstance(ds, StateStore)
    assert {k: v.numel() for k, v in ds.buffers.items()} == buffer_sizes(manifest, max_batch=3, max_context=20)
    rng = np.random.default_rng(0)
    arrays = {}
    for s in manifest.state:
        shape = tuple(s.shape) if s.carried else (s.shape[0], 7, s.shape[2])
        arrays[s.input] = rng.standard_normal(shape).astype(np.float32)
    ds.write(1, arrays)
    back = ds.read(1, 7)
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    ds._parity[:] = [True, False, True]  # slots 0 and 2 hold their states in '.b', slot 1 in '.a'
    assert ds._align([0, 1, 2]) is True  # the majority's copy; slot 1's states move there
    assert ds._parity.tolist() == [True, True, True]
    back = ds.read(1, 7)
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a, err_msg=name)
    ds.reset(1)
    after = ds.read(1, 7)
    for s in manifest.state:
        if s.carried:
            assert not after[s.input].any(), s.input
        else:  # KV needs no clearing: positions >= past_len are ignored
            np.testing.assert_array_equal(after[s.input], arrays[s.input])
    ds.close()


def test_device_state_is_no_speculative_store(manifest):
    """The TensorRT store has no verify / mtp engines to run: it is a StateStore but not a
    SpeculativeStateStore, so a Session over it refuses speculation with one line (no stub methods)."""
    from qcn.runtime.backends.tensorrt import DeviceState
    from qcn.runtime.state import HostStateStore, SpeculativeStateStore

    ds = DeviceState(_CpuBackend(manifest), slots=1, max_context=8)
    assert not isinstance(ds, SpeculativeStateStore)
    assert {"step_with", "set_carried"} <= set(dir(HostStateStore))
