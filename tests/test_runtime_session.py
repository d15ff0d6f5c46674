"""Session: state handling against the numpy reference of the fixture model."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_fixture as rf  # noqa: E402

from qcn.runtime.backends import create_backend  # noqa: E402
from qcn.runtime.errors import CapacityError, ContextLengthError, SlotError  # noqa: E402
from qcn.runtime.manifest import load_manifest  # noqa: E402
from qcn.runtime.session import Session  # noqa: E402

ATOL = 2e-4


@pytest.fixture(scope="module", params=["last", "all"])
def art(request, tmp_path_factory):
    return rf.write_fixture_artifact(tmp_path_factory.mktemp("sess_" + request.param), logits=request.param)


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
    ids = prompt(1, 11, art.vocab_size)
    logits = s.prefill(0, ids)
    assert logits.shape == (art.vocab_size,)
    np.testing.assert_allclose(logits, art.model.logits(ids)[-1], atol=ATOL)
    assert s.past_len(0) == 11


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_prefill_equals_one_shot(art, backend, chunk):
    ids = prompt(2, 14, art.vocab_size)
    one = new_session(art, backend)
    one.prefill_chunk = 64
    ref_logits = one.prefill(0, ids)
    s = new_session(art, backend)
    s.prefill_chunk = chunk
    logits = s.prefill(0, ids)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL)
    np.testing.assert_allclose(logits, art.model.logits(ids)[-1], atol=ATOL)
    # every state buffer agrees too
    for (_, a), (_, b) in zip(one._carried + one._cache, s._carried + s._cache):
        if a.ndim == 4 and a.shape[2] == s.max_context:
            a, b = a[:, :, : len(ids)], b[:, :, : len(ids)]
        np.testing.assert_allclose(a[0], b[0], atol=ATOL)
    # and decoding continues identically
    toks = []
    for _ in range(5):
        t = int(np.argmax(logits))
        toks.append(t)
        logits = s.decode([0], [t])[0]
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
    a, b = prompt(20, 5, art.vocab_size), prompt(21, 8, art.vocab_size)
    s.prefill(3, a)
    s.prefill(1, b)
    out = s.decode([3, 1], [7, 9])
    np.testing.assert_allclose(out[0], art.model.logits(a + [7])[-1], atol=ATOL)
    np.testing.assert_allclose(out[1], art.model.logits(b + [9])[-1], atol=ATOL)
    out = s.decode([1], [4])  # slot 3 sits this step out
    np.testing.assert_allclose(out[0], art.model.logits(b + [9, 4])[-1], atol=ATOL)


def test_decode_from_empty_slot(art, backend):
    s = new_session(art, backend)
    out = s.decode([2], [42])
    np.testing.assert_allclose(out[0], art.model.logits([42])[-1], atol=ATOL)


def test_slot_reuse_ignores_stale_cache(art, backend):
    s = new_session(art, backend)
    s.prefill(0, prompt(30, 40, art.vocab_size))  # fills cache positions 0..39 and the states
    s.reset(0)
    short = prompt(31, 4, art.vocab_size)
    np.testing.assert_allclose(s.prefill(0, short), art.model.logits(short)[-1], atol=ATOL)
    np.testing.assert_allclose(s.decode([0], [5])[0], art.model.logits(short + [5])[-1], atol=ATOL)


def test_slot_errors(art, backend):
    s = new_session(art, backend)
    for bad in (-1, 4, "0", None, True):
        with pytest.raises(SlotError, match=r"unknown slot .*slots are 0\.\.3"):
            s.prefill(bad, [3])
    with pytest.raises(SlotError, match="duplicate slots"):
        s.decode([1, 1], [3, 3])
    with pytest.raises(SlotError, match="2 tokens for 1 slots"):
        s.decode([1], [3, 4])
    with pytest.raises(SlotError, match="outside the vocabulary"):
        s.prefill(0, [art.vocab_size])
    for _ in range(4):
        s.allocate()
    with pytest.raises(CapacityError, match="all 4 sequence slots are in use"):
        s.allocate()
    s.release(2)
    assert s.allocate() == 2
    with pytest.raises(CapacityError, match="max_batch must be an integer in 1..4"):
        new_session(art, backend, max_batch=5)


def test_context_limits(art, backend):
    s = new_session(art, backend)
    with pytest.raises(ContextLengthError, match="0 cached \\+ 65 new tokens = 65 exceeds max_context 64"):
        s.prefill(0, [3] * 65)
    assert s.past_len(0) == 0
    s.prefill(0, [3] * 64)
    with pytest.raises(ContextLengthError, match="at max_context 64"):
        s.decode([0], [3])
    small = new_session(art, backend, max_context=10, max_batch=2)
    assert small._cache[0][1].shape == (2, rf.KVH, 10, rf.D)
    with pytest.raises(ContextLengthError, match="exceeds max_context 10"):
        small.prefill(0, [3] * 11)
    with pytest.raises(ContextLengthError, match="at least one token"):
        small.prefill(0, [])
