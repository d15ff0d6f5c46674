"""generate(): greedy vs reference, batching, sampling, stops, streaming."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_fixture as rf  # noqa: E402

from qcn.artifact import LOGITS_MODES  # noqa: E402
from qcn.runtime.errors import CapacityError, ContextLengthError, TokenizerError  # noqa: E402
from qcn.runtime.generate import generate, load  # noqa: E402
from qcn.runtime.sampling import SamplingParams  # noqa: E402

PROMPTS = ["def fibonacci(n):", "x", "The quick brown fox. class Stack:"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


@pytest.fixture(scope="module", params=LOGITS_MODES)
def logits(request):  # the conftest's `art` is written with each mode
    return request.param


@pytest.fixture(scope="module")
def gen(art):
    return load(art.path)


def test_greedy_matches_reference(art, gen):
    for text in PROMPTS:
        ids = gen.tokenizer.encode(text)
        ref = art.model.greedy(ids, 20, art.eos_token_ids)
        (r,) = gen.generate([text], GREEDY)
        assert r.token_ids == ref
        assert r.prompt_token_ids == ids
        assert r.finish_reason == "length" and len(r.token_ids) == 20
        assert r.text == gen.tokenizer.decode(ref)
    # token-id prompts give the same result
    (r2,) = gen.generate([gen.tokenizer.encode(PROMPTS[0])], GREEDY)
    assert r2.token_ids == art.model.greedy(gen.tokenizer.encode(PROMPTS[0]), 20)


def test_batch_equals_alone_greedy(gen):
    alone = [gen.generate([p], GREEDY)[0] for p in PROMPTS]
    batch = gen.generate(PROMPTS, GREEDY)
    assert len({len(gen.tokenizer.encode(p)) for p in PROMPTS}) == 3  # three different lengths
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]


def test_batch_equals_alone_seeded_sampling(gen):
    params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=s, max_new_tokens=24) for s in (11, 12, 13)]
    alone = [gen.generate([p], [q])[0] for p, q in zip(PROMPTS, params)]
    batch = gen.generate(PROMPTS, params)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    again = gen.generate(PROMPTS, params)
    assert [r.token_ids for r in again] == [r.token_ids for r in batch]
    # non-vacuous: sampling is not greedy, and another seed gives other tokens
    greedy = gen.generate(PROMPTS, GREEDY.replace(max_new_tokens=24))
    assert any(a.token_ids != g.token_ids for a, g in zip(batch, greedy))
    other = gen.generate([PROMPTS[0]], [params[0].replace(seed=99)])[0]
    assert other.token_ids != batch[0].token_ids
    # one params object for all: each sequence seeded with the same seed -> same as alone
    shared = params[0]
    b2 = gen.generate(PROMPTS, shared)
    assert b2[0].token_ids == batch[0].token_ids
    assert b2[1].token_ids == gen.generate([PROMPTS[1]], shared)[0].token_ids


def test_different_lengths_finish_independently(art, gen):
    params = [GREEDY.replace(max_new_tokens=n) for n in (3, 12, 7)]
    rs = gen.generate(PROMPTS, params)
    assert [len(r.token_ids) for r in rs] == [3, 12, 7]
    for p, r, q in zip(PROMPTS, rs, params):
        assert r.token_ids == art.model.greedy(gen.tokenizer.encode(p), q.max_new_tokens)
    assert gen.session.free_slots == gen.session.max_batch  # slots released


def test_stop_token_ids_and_eos(art, gen, tmp_path):
    ids = gen.tokenizer.encode(PROMPTS[0])
    ref = art.model.greedy(ids, 20)
    k = 6
    tok = ref[k]
    first = ref.index(tok)
    (r,) = gen.generate([PROMPTS[0]], GREEDY.replace(stop_token_ids=(tok,)))
    assert r.finish_reason == "stop" and r.token_ids == ref[: first + 1]
    assert r.text == gen.tokenizer.decode(ref[:first])

    # the same token as a manifest EOS id
    other = rf.write_fixture_artifact(tmp_path / "eos", logits=art.manifest["graphs"]["prefill"]["logits"])
    p = other.path / "manifest.json"
    m = json.loads(p.read_text())
    m["tokenizer"]["eos_token_ids"] = [tok]
    p.write_text(json.dumps(m))
    g2 = load(other.path)
    streamed = []
    (r,) = g2.generate([PROMPTS[0]], GREEDY, on_token=lambda i, d: streamed.append(d))
    assert r.finish_reason == "eos" and r.token_ids == ref[: first + 1]
    assert r.text == g2.tokenizer.decode(ref[:first]) == "".join(streamed)


def _clean_substring(text, start, n=2):
    for i in range(start, len(text) - n):
        s = text[i : i + n]
        if "\ufffd" not in s and s.strip() and text.find(s) == i:
            return i, s
    raise AssertionError("no usable stop string in the reference text")


def test_stop_strings(art, gen):
    (full,) = gen.generate([PROMPTS[2]], GREEDY.replace(max_new_tokens=30))
    pos, stop = _clean_substring(full.text, len(full.text) // 2)
    streamed = []
    (r,) = gen.generate([PROMPTS[2]], GREEDY.replace(max_new_tokens=30, stop=("never-there", stop)), on_token=lambda i, d: streamed.append(d))
    assert r.finish_reason == "stop"
    assert r.text == full.text[:pos]
    assert stop not in "".join(streamed)
    assert "".join(streamed) == r.text
    assert r.token_ids == full.token_ids[: len(r.token_ids)] and len(r.token_ids) < 30
    # the stop string is reached at the last token: generation stopped right there
    assert stop in gen.tokenizer.decode(r.token_ids) and stop not in gen.tokenizer.decode(r.token_ids[:-1])


def test_streaming_deltas_concatenate(gen):
    deltas = {0: [], 1: [], 2: []}
    order = []

    def on_token(i, d):
        assert isinstance(d, str) and d
        deltas[i].append(d)
        order.append(i)

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=5, max_new_tokens=25)
    rs = gen.generate(PROMPTS, params, on_token=on_token)
    assert set(order) == {0, 1, 2} and len(order) > 10
    for i, r in enumerate(rs):
        assert "".join(deltas[i]) == r.text
        assert r.text == gen.tokenizer.decode(r.token_ids)


def test_defaults_come_from_manifest(art, tmp_path):
    other = rf.write_fixture_artifact(tmp_path / "defaults", max_context=300)
    p = other.path / "manifest.json"
    m = json.loads(p.read_text())
    m["generation"] = {"temperature": 0.0, "top_p": 0.5, "top_k": 3}
    p.write_text(json.dumps(m))
    g = load(other.path)
    params = g.params()
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.0, 0.5, 3, 256)
    assert g.params(top_k=7, temperature=None).top_k == 7 and g.params(temperature=None).temperature == 0.0
    (r,) = g.generate(["x"])  # params=None: the manifest's defaults (greedy here)
    assert len(r.token_ids) == 256 and r.finish_reason == "length"
    assert r.token_ids[:12] == other.model.greedy(g.tokenizer.encode("x"), 12)
    (r2,) = g.generate(["x"], SamplingParams(temperature=0, max_new_tokens=256))
    assert r2.token_ids == r.token_ids


def test_request_errors(gen):
    with pytest.raises(ContextLengthError, match=r"prompt 0: \d+ prompt tokens \+ max_new_tokens 60 = \d+ exceeds max_context 64"):
        gen.generate([PROMPTS[2]], GREEDY.replace(max_new_tokens=60))
    with pytest.raises(ContextLengthError, match=r"50 prompt tokens \+ max_new_tokens 20 = 70 exceeds max_context 64"):
        gen.generate([[5] * 50], GREEDY)
    with pytest.raises(CapacityError, match="5 prompts exceed max_batch 4"):
        gen.generate(["a"] * 5, GREEDY)
    assert gen.session.free_slots == 4
    bare = type(gen.session)(gen.manifest, gen.backend)  # a Session without a tokenizer
    with pytest.raises(TokenizerError, match="text prompts need a tokenizer"):
        generate(bare, ["text"], GREEDY)
    (r,) = generate(bare, [[5, 6, 7]], GREEDY.replace(max_new_tokens=4))  # token ids work without one
    assert len(r.token_ids) == 4 and r.text == ""
    assert gen.generate([], GREEDY) == []
