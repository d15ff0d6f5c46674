"""Session: state handling against the numpy reference of the fixture model."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_fixture as rf  # noqa: E402

from qcn.runtime.backends import create_backend  # noqa: E402
from qcn.artifact import LOGITS_MODES  # noqa: E402
from qcn.runtime.errors import CapacityError, ContextLengthError, SlotError  # noqa: E402
from qcn.runtime.manifest import load_manifest  # noqa: E402
from qcn.runtime.session import SeqHandle, Session  # noqa: E402
from qcn.runtime.state import HostStateStore, StateSnapshot  # noqa: E402

ATOL = 2e-4


@pytest.fixture(scope="module", params=LOGITS_MODES)
def logits(request):  # the conftest's `art` is written with each mode
    return request.param


@pytest.fixture(scope="module")
def backend(art):
    return create_backend(load_manifest(art.path))


def new_session(art, backend, **kw):
    return Session(backend.manifest, backend, **kw)


def prompt(seed, n, vocab):
    return [int(x) for x in np.random.default_rng(seed).integers(2, vocab, n)]


def test_fixture_depends_on_every_state(art):
    """Guard against vacuous tests: dropping any state's history changes the reference logits."""
    ids = prompt(0, 12, art.vocab_size)
    full = art.model.logits(ids)
    for kind in ("conv", "recurrent", "kv"):
        ablated = art.model.logits(ids, frozenset([kind]))
        assert np.abs(ablated[-1] - full[-1]).max() > 0.5, kind


def test_prefill_matches_reference(art, backend):
    s = new_session(art, backend)
    h = s.allocate()
    ids = prompt(1, 11, art.vocab_size)
    logits = s.prefill(h, ids)
    assert logits.shape == (art.vocab_size,)
    np.testing.assert_allclose(logits, art.model.logits(ids)[-1], atol=ATOL)
    assert s.past_len(h) == 11


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_prefill_equals_one_shot(art, backend, chunk):
    ids = prompt(2, 14, art.vocab_size)
    one = new_session(art, backend)
    one.prefill_chunk = 64
    h1 = one.allocate()
    ref_logits = one.prefill(h1, ids)
    s = new_session(art, backend)
    s.prefill_chunk = chunk
    h = s.allocate()
    logits = s.prefill(h, ids)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL)
    np.testing.assert_allclose(logits, art.model.logits(ids)[-1], atol=ATOL)
    # every state agrees too
    a, b = one.snapshot(h1), s.snapshot(h)
    assert a.tokens == b.tokens == len(ids) and set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_allclose(a.arrays[name], b.arrays[name], atol=ATOL, err_msg=name)
    # and decoding continues identically
    toks = []
    for _ in range(5):
        t = int(np.argmax(logits))
        toks.append(t)
        logits = s.decode([h], [t])[0]
    ref = art.model.greedy(ids, 6)
    assert toks == ref[:5]


def test_batched_decode_with_different_past_lengths(art, backend):
    s = new_session(art, backend)
    prompts = [prompt(10 + i, n, art.vocab_size) for i, n in enumerate((3, 9, 17))]
    slots = [s.allocate() for _ in prompts]
    seqs = [list(p) for p in prompts]
    last = []
    for slot, p in zip(slots, prompts):
        last.append(int(np.argmax(s.prefill(slot, p))))
    for step in range(6):
        for q, t in zip(seqs, last):
            q.append(t)
        logits = s.decode(slots, last)
        assert logits.shape == (3, art.vocab_size)
        for j, q in enumerate(seqs):
            np.testing.assert_allclose(logits[j], art.model.logits(q)[-1], atol=ATOL, err_msg=f"seq {j} step {step}")
        last = [int(np.argmax(r)) for r in logits]
    assert [s.past_len(x) for x in slots] == [len(q) for q in seqs]


def test_decode_subset_and_noncontiguous_slots(art, backend):
    s = new_session(art, backend)
    hs = [s.allocate() for _ in range(4)]
    a, b = prompt(20, 5, art.vocab_size), prompt(21, 8, art.vocab_size)
    s.prefill(hs[3], a)
    s.prefill(hs[1], b)
    s.prefill(hs[0], [5, 6])
    before = s.snapshot(hs[0])
    out = s.decode([hs[3], hs[1]], [7, 9])
    np.testing.assert_allclose(out[0], art.model.logits(a + [7])[-1], atol=ATOL)
    np.testing.assert_allclose(out[1], art.model.logits(b + [9])[-1], atol=ATOL)
    out = s.decode([hs[1]], [4])  # slot 3 sits this step out
    np.testing.assert_allclose(out[0], art.model.logits(b + [9, 4])[-1], atol=ATOL)
    out = s.decode([hs[3], hs[0]], [2, 8])  # slots 0 and 3: not consecutive, slot 1 and 2 untouched
    np.testing.assert_allclose(out[0], art.model.logits(a + [7, 2])[-1], atol=ATOL)
    np.testing.assert_allclose(out[1], art.model.logits([5, 6, 8])[-1], atol=ATOL)
    np.testing.assert_allclose(s.decode([hs[1]], [3])[0], art.model.logits(b + [9, 4, 3])[-1], atol=ATOL)
    assert [s.past_len(h) for h in hs] == [3, 11, 0, 7]
    s.reset(hs[0])
    s.prefill(hs[0], [5, 6])
    again = s.snapshot(hs[0])
    for name in before.arrays:
        np.testing.assert_array_equal(before.arrays[name], again.arrays[name], err_msg=name)


def test_decode_from_empty_slot(art, backend):
    s = new_session(art, backend)
    out = s.decode([s.allocate()], [42])
    np.testing.assert_allclose(out[0], art.model.logits([42])[-1], atol=ATOL)


def test_slot_reuse_ignores_stale_cache(art, backend):
    s = new_session(art, backend)
    h = s.allocate()
    s.prefill(h, prompt(30, 40, art.vocab_size))  # fills cache positions 0..39 and the states
    s.reset(h)
    short = prompt(31, 4, art.vocab_size)
    np.testing.assert_allclose(s.prefill(h, short), art.model.logits(short)[-1], atol=ATOL)
    np.testing.assert_allclose(s.decode([h], [5])[0], art.model.logits(short + [5])[-1], atol=ATOL)
    s.release(h)
    h2 = s.allocate()  # the same slot, a new sequence: nothing of the old one is visible
    assert h2.slot == h.slot
    np.testing.assert_allclose(s.prefill(h2, short[:2]), art.model.logits(short[:2])[-1], atol=ATOL)


def test_slot_errors(art, backend):
    s = new_session(art, backend)
    for bad in (-1, 0, 4, "0", None, True, SeqHandle(0, 0), SeqHandle(9, 1)):
        with pytest.raises(SlotError, match="SeqHandle|not a live sequence"):
            s.prefill(bad, [3])
    h = s.allocate()
    with pytest.raises(SlotError, match="the same sequence twice"):
        s.decode([h, h], [3, 3])
    with pytest.raises(SlotError, match="2 tokens for 1 sequences"):
        s.decode([h], [3, 4])
    with pytest.raises(SlotError, match="list of handles"):
        s.decode(h, [3])
    with pytest.raises(SlotError, match="outside the vocabulary"):
        s.prefill(h, [art.vocab_size])
    hs = [h] + [s.allocate() for _ in range(3)]
    with pytest.raises(CapacityError, match="all 4 sequence slots are in use"):
        s.allocate()
    s.release(hs[2])
    again = s.allocate()
    assert again.slot == 2 and again != hs[2]
    with pytest.raises(SlotError, match="not a live sequence"):
        s.release(hs[2])
    other = new_session(art, backend)
    with pytest.raises(SlotError, match="not a live sequence"):
        other.prefill(hs[0], [3])  # a handle of another session
    with pytest.raises(CapacityError, match="max_batch must be an integer in 1..4"):
        new_session(art, backend, max_batch=5)


def test_context_limits(art, backend):
    s = new_session(art, backend)
    h = s.allocate()
    with pytest.raises(ContextLengthError, match="0 cached \\+ 65 new tokens = 65 exceeds max_context 64"):
        s.prefill(h, [3] * 65)
    assert s.past_len(h) == 0
    s.prefill(h, [3] * 64)
    with pytest.raises(ContextLengthError, match="at max_context 64"):
        s.decode([h], [3])
    small = new_session(art, backend, max_context=10, max_batch=2)
    assert small.store.slots == 2 and small.store.max_context == 10 and small.store.capacity <= 10
    h = small.allocate()
    with pytest.raises(ContextLengthError, match="exceeds max_context 10"):
        small.prefill(h, [3] * 11)
    with pytest.raises(ContextLengthError, match="at least one token"):
        small.prefill(h, [])


# -- slot ownership (issue 16 item 6) -----------------------------------------------------


def state_of(s, h):
    snap = s.snapshot(h)
    return snap.tokens, {k: v.copy() for k, v in snap.arrays.items()}


def assert_same_state(a, b):
    assert a[0] == b[0]
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name], err_msg=name)


def test_released_handle_cannot_touch_the_next_owner(art, backend):
    s = new_session(art, backend, max_batch=1)
    old = s.allocate()
    s.prefill(old, prompt(40, 6, art.vocab_size))
    s.release(old)
    new = s.allocate()  # the same slot, another sequence
    assert new.slot == old.slot
    ids = prompt(41, 5, art.vocab_size)
    s.prefill(new, ids)
    before = state_of(s, new)
    for use in (lambda: s.decode([old], [3]), lambda: s.prefill(old, [3, 4]), lambda: s.snapshot(old),
                lambda: s.past_len(old), lambda: s.reset(old), lambda: s.release(old)):
        with pytest.raises(SlotError, match="not a live sequence"):
            use()
    assert_same_state(before, state_of(s, new))
    np.testing.assert_allclose(s.decode([new], [7])[0], art.model.logits(ids + [7])[-1], atol=ATOL)


def test_unallocated_slot_cannot_be_prefilled(art, backend):
    s = new_session(art, backend)
    for bad in (0, 3, SeqHandle(0, 1)):
        with pytest.raises(SlotError, match="SeqHandle|not a live sequence"):
            s.prefill(bad, [3, 4])
    assert s.free_slots == 4


# -- snapshots ------------------------------------------------------------------------------


def greedy_continue(s, h, logits, n):
    out = []
    for _ in range(n):
        logits = s.decode([h], [int(np.argmax(logits))])[0]
        out.append(logits)
    return np.stack(out)


def test_snapshot_restore_continues_bit_identically(art, backend):
    s = new_session(art, backend)
    h = s.allocate()
    ids = prompt(50, 13, art.vocab_size)
    first = s.prefill(h, ids)
    snap = s.snapshot(h)
    assert isinstance(snap, StateSnapshot) and snap.tokens == 13 and snap.nbytes > 0
    with pytest.raises(ValueError):
        next(iter(snap.arrays.values()))[...] = 0  # read-only
    original = greedy_continue(s, h, first, 6)
    s.release(h)  # the snapshot outlives its sequence
    for target in (s, new_session(art, backend)):  # this session, and another over the same artifact
        r = target.restore(snap)
        assert target.past_len(r) == 13
        np.testing.assert_array_equal(greedy_continue(target, r, first, 6), original)
        r2 = target.restore(snap)  # restorable any number of times, next to the first copy
        np.testing.assert_array_equal(greedy_continue(target, r2, first, 6), original)
        target.release(r)
        target.release(r2)
    np.testing.assert_allclose(original[-1], art.model.logits(ids + [int(np.argmax(x)) for x in [first, *original[:-1]]])[-1],
                               atol=ATOL)


def test_restore_refuses_another_model(art, backend, tmp_path):
    other = rf.write_fixture_artifact(tmp_path / "other", seed=123)
    ob = create_backend(load_manifest(other.path))
    so = Session(ob.manifest, ob)
    h = so.allocate()
    so.prefill(h, [3, 4, 5])
    snap = so.snapshot(h)
    with pytest.raises(SlotError, match="another model"):
        new_session(art, backend).restore(snap)
    ob.close()


def test_ort_store_matches_the_host_store(art, backend, monkeypatch):
    """The IOBinding store (views, covering calls, runs, capacity changes) computes what the
    plain copy-the-window store computes, on a schedule that exercises every path."""

    class HostBackend:
        manifest = backend.manifest
        run = staticmethod(backend.run)

        def create_state(self, *, slots, max_context):
            return HostStateStore(self, slots=slots, max_context=max_context)

    from qcn.runtime.backends import ort_state

    monkeypatch.setattr(ort_state, "_GRANULE", 4)  # small windows, so that the test grows and shrinks one
    ort_s, host_s = new_session(art, backend), Session(backend.manifest, HostBackend())
    ort_s.store._floor = 4
    ort_s.store._resize(4)
    capacities = []
    real_step = ort_s.store.step
    monkeypatch.setattr(ort_s.store, "step", lambda *a: (real_step(*a), capacities.append(ort_s.store.capacity))[0])
    logs = {}
    for s in (ort_s, host_s):
        out = []
        hs = [s.allocate() for _ in range(4)]
        out.append(s.prefill(hs[0], prompt(60, 30, art.vocab_size)))
        out.append(s.prefill(hs[2], prompt(61, 3, art.vocab_size)))
        out.append(s.prefill(hs[3], prompt(62, 9, art.vocab_size)))
        for step in range(4):
            out.extend(s.decode([hs[3], hs[0]], [step + 2, step + 3]))  # span 4 <= 2 * 2: one covering call
            out.extend(s.decode([hs[2]], [step + 4]))
        s.release(hs[0])  # the longest sequence: the ORT store's window shrinks
        hs[0] = s.allocate()
        out.append(s.prefill(hs[0], [5, 6, 7]))
        out.extend(s.decode([hs[0], hs[2], hs[3]], [1, 2, 3]))
        out.extend(s.decode([hs[0], hs[3]], [4, 5]))
        logs[s is ort_s] = np.stack(out)
        if s is ort_s:
            snaps = [s.snapshot(h) for h in hs]
        else:
            for a, h in zip(snaps, hs):
                b = s.snapshot(h)
                for name in a.arrays:
                    np.testing.assert_allclose(a.arrays[name], b.arrays[name], atol=ATOL, err_msg=name)
    np.testing.assert_allclose(logs[True], logs[False], atol=ATOL)
    peak = capacities.index(max(capacities))
    assert capacities[0] < max(capacities) and min(capacities[peak:]) < max(capacities), capacities  # grew, then shrank


def test_far_apart_slots_run_as_separate_views(tmp_path):
    """Slots 0 and 7 of 8 (span 8 > 2 x 2): one call per run of consecutive slots."""
    from qcn.runtime.state import contiguous_runs

    assert contiguous_runs([3, 1, 2]) == [(1, [1, 2, 0])]
    assert contiguous_runs([7, 0, 5, 6]) == [(0, [1]), (5, [2, 3, 0])]
    art8 = rf.write_fixture_artifact(tmp_path / "a8", max_batch=8)
    be = create_backend(load_manifest(art8.path))
    s = Session(be.manifest, be)
    hs = [s.allocate() for _ in range(8)]
    a, b = prompt(70, 5, art8.vocab_size), prompt(71, 7, art8.vocab_size)
    s.prefill(hs[7], a)
    s.prefill(hs[0], b)
    calls = []
    real = be.run_binding
    be.run_binding = lambda g, io: (calls.append(g), real(g, io))[1]
    out = s.decode([hs[7], hs[0]], [9, 10])
    assert calls == ["decode", "decode"]
    np.testing.assert_allclose(out[0], art8.model.logits(a + [9])[-1], atol=ATOL)
    np.testing.assert_allclose(out[1], art8.model.logits(b + [10])[-1], atol=ATOL)
    be.close()


def test_ort_store_binds_the_cache_in_place(art, backend, monkeypatch):
    """The KV inputs ORT reads are the store's own buffers (bound by address, no copy), and a
    decode step writes only the new token's K/V into them."""
    from qcn.runtime.backends import ort_state

    bound = {}
    real_bind = ort_state._bind
    monkeypatch.setattr(ort_state, "_bind", lambda f, name, a, *elem: (bound.__setitem__(name, a.ctypes.data), real_bind(f, name, a, *elem))[1])
    s = new_session(art, backend)
    hs = [s.allocate() for _ in range(3)]
    for h in hs:
        s.prefill(h, prompt(80 + h.slot, 6, art.vocab_size))
    before = {name: buf.copy() for name, buf in s.store._cache.items()}
    bound.clear()
    s.decode(hs[1:], [3, 4])  # slots 1 and 2
    for name, buf in s.store._cache.items():
        assert bound[name] == buf[1:].ctypes.data, name  # a view of the store's buffer
        changed = np.argwhere((buf != before[name]).any(axis=(1, 3)))  # (slot, position) pairs written
        assert sorted(map(tuple, changed.tolist())) == [(1, 6), (2, 6)], name
