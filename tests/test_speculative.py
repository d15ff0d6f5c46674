"""MTP speculative decoding (docs/MTP.md): the exported head against a PyTorch implementation,
greedy output identical to plain decoding (qcn-pico and two random tiny configs, odd prompt
lengths, 200+ tokens, batches whose sequences accept different counts), and rejection sampling
that follows the target distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.pipeline import compile_recipe
from qcn.compile.recipe import ExportOptions, Recipe, RecipeError, RuntimeOptions, SpeculativeOptions
from qcn.runtime import speculative as spec_mod
from qcn.runtime.errors import RequestError
from qcn.runtime.generate import load
from qcn.runtime.sampling import SamplingParams, distribution
from qcn.runtime.speculative import accept_drafts

PICO = Path(__file__).resolve().parent.parent / "models" / "qcn-pico"


def _compile(ckpt: Path, out: Path, max_context: int = 1024) -> Path:
    recipe = Recipe(name="test-mtp", checkpoint=ckpt, output=out, export=ExportOptions(),
                    runtime=RuntimeOptions(prefill_chunk=16, max_batch=4, max_context=max_context,
                                           speculative=SpeculativeOptions(method="mtp", draft_tokens=2)))
    return compile_recipe(recipe)


@pytest.fixture(scope="module")
def pico_artifact(tmp_path_factory) -> Path:
    return _compile(PICO, tmp_path_factory.mktemp("pico-mtp") / "artifact")


@pytest.fixture(scope="module")
def pico(pico_artifact):
    g = load(pico_artifact, threads=2)
    yield g
    g.close()


# -- the MTP graph alone ------------------------------------------------------------------

def test_mtp_graph_matches_the_pytorch_head_on_pico(pico):
    """mtp.onnx (ONNX Runtime) vs tools/pico's MTPHead (transformers' decoder layer) on the
    shipped weights: every position's logits within 1e-4, fed transformers' post-norm hidden."""
    from pico.export import load_mtp_from_checkpoint
    from pico.model import mtp_logits
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(PICO, dtype=torch.float32).eval()
    head = load_mtp_from_checkpoint(PICO, model)
    ids = torch.tensor([pico.tokenizer.encode("import os\n\n\ndef walk(root):\n    for name in os.listdir(root):\n")])
    T = ids.shape[1] - 1
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # post final norm
        ref = mtp_logits(model, head, ids, hidden)[0].numpy()  # [T, V]: position t predicts ids[t+2]
    m = pico.manifest
    kv = m.speculative.state[0].shape
    rows = T  # row r takes its logits at last_index r: every position in one call
    feeds = {"input_ids": np.repeat(ids[:, 1:].numpy(), rows, 0), "hidden": np.repeat(hidden[:, :T].numpy(), rows, 0),
             "last_index": np.arange(rows, dtype=np.int64), "past_len": np.zeros(rows, dtype=np.int64),
             "mtp.past_key": np.zeros((rows, kv[0], 1, kv[2]), np.float32),
             "mtp.past_value": np.zeros((rows, kv[0], 1, kv[2]), np.float32)}
    out = pico.backend.run("mtp", feeds)
    err = np.abs(out["logits"] - ref).max()
    assert err < 1e-4, err
    assert out["mtp.new_key"].shape == (rows, kv[0], T, kv[2])
    # the main graphs' new `hidden` output is transformers' post-norm hidden state
    lg, h = next(pico.session.prefill_hidden(h0 := pico.session.allocate(), ids[0].tolist()))
    pico.session.release(h0)
    assert np.abs(h - hidden[0].numpy()).max() < 1e-4


# -- greedy identity ----------------------------------------------------------------------

PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n        self.items = []\n",
           "import os\n\n\n", "for i in range(10):\n    print(i, i * i)\n    if i % 3 == 0:\n"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_speculation_is_token_identical_on_pico(pico, n):
    params = pico.params(max_new_tokens=210, temperature=0)
    lens = [len(pico.tokenizer.encode(p)) for p in PROMPTS]
    assert len({x % 2 for x in lens}) == 2, lens  # odd and even prompt lengths
    plain = pico.generate(PROMPTS, params, speculative=0)
    spec = pico.generate(PROMPTS, params, speculative=n)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
    st = spec[0].speculative
    assert st.draft_tokens == n and st.generated > 0
    assert 0.2 < st.acceptance_rate < 1.0, st.summary()  # the trained head drafts useful tokens
    assert st.mixed_calls > 0, st.summary()  # sequences of one call accepted different counts
    assert set(st.accept_counts) == set(range(n + 1)), st.accept_counts  # every count 0..N happened


def test_single_sequence_and_restarted_sessions_agree(pico):
    params = pico.params(max_new_tokens=40, temperature=0)
    (alone,) = pico.generate([PROMPTS[1]], params, speculative=3)
    batch = pico.generate(PROMPTS, params, speculative=3)
    assert alone.token_ids == batch[1].token_ids


def test_host_state_store_speculates_identically(pico):
    """The plain HostStateStore (backend.run by value) implements step_with/set_carried too:
    speculation over it gives the ORT store's tokens."""
    from qcn.runtime.generate import generate
    from qcn.runtime.session import Session
    from qcn.runtime.state import HostStateStore

    class HostBackend:
        def __init__(self, inner):
            self.inner, self.manifest = inner, inner.manifest

        def run(self, graph, feeds):
            return self.inner.run(graph, feeds)

        def create_state(self, *, slots, max_context, manifest=None):
            return HostStateStore(self, slots=slots, max_context=max_context, manifest=manifest)

    session = Session(pico.manifest, HostBackend(pico.backend), tokenizer=pico.tokenizer, max_context=512)
    params = pico.params(max_new_tokens=30, temperature=0)
    try:
        host = generate(session, PROMPTS[:3], params, speculative=2)
    finally:
        session.close()
    ort = pico.generate(PROMPTS[:3], params, speculative=0)
    assert [r.token_ids for r in host] == [r.token_ids for r in ort]
    assert host[0].speculative.generated > 0


def _oracle(monkeypatch, truth: dict[int, list[int]], n: int, seed: int = 0):
    """Replace the head's drafts by the plain run's true continuation, each draft corrupted
    with probability 0.35 (the MTP calls still run): every accept count 0..N occurs."""
    rng = np.random.default_rng(seed)
    real_chain = spec_mod._chain

    def chain(session, drafter, slots, seqs, logits, g, k):
        rows = real_chain(session, drafter, slots, seqs, logits, g, k)
        out = []
        for s, row in zip(seqs, rows):
            want = truth[s.index][len(s.token_ids):]
            toks = [want[i] if i < len(want) and rng.random() > 0.35 else int(rng.integers(0, 50))
                    for i in range(len(row))]
            out.append([(t, q) for t, (_, q) in zip(toks, row)])
        return out

    monkeypatch.setattr(spec_mod, "_chain", chain)


@pytest.mark.parametrize("name", ["odd", "mlp_only"])
def test_greedy_speculation_is_token_identical_on_random_tiny_configs(tmp_path, monkeypatch, name):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", TINY_SPECS[name], seed=3)
    art = _compile(ckpt, tmp_path / "art", max_context=512)
    with load(art, threads=2) as g:
        rng = np.random.default_rng(1)
        V = g.manifest.model.vocab_size
        prompts = [rng.integers(0, V, size=k).tolist() for k in (5, 12, 1, 33)]  # odd and even lengths
        params = g.params(max_new_tokens=205, temperature=0, stop_token_ids=())
        plain = g.generate(prompts, params, speculative=0)
        truth = {i: r.token_ids for i, r in enumerate(plain)}
        for n in (1, 3):
            _oracle(monkeypatch, truth, n, seed=n)
            spec = g.generate(prompts, params, speculative=n)
            for a, b in zip(plain, spec):
                assert b.token_ids == a.token_ids
            st = spec[0].speculative
            assert set(st.accept_counts) == set(range(n + 1)), st.accept_counts
            assert st.mixed_calls > 0
            monkeypatch.undo()


# -- sampling -----------------------------------------------------------------------------

def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0  # never a token the target gives probability 0
    exp = probs[keep] * counts.sum()
    return float(chisquare(counts[keep], exp).pvalue)


def test_rejection_sampling_follows_the_target_distribution():
    """A context-free target (row i = the distribution of the token at offset i) and a draft
    that disagrees with it: the first token ~ p_0 and the second ~ p_1, whatever the drafts.
    Tolerance: chi-square p-value > 1e-3 per position (40,000 seeded trials)."""
    rng = np.random.default_rng(0)
    V, N, trials = 7, 3, 40_000
    target = rng.normal(size=(N + 1, V)) * 1.5
    draft = rng.normal(size=(N, V)) * 1.5
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.97)
    p = [distribution(row, params) for row in target]
    q = [distribution(row, params) for row in draft]
    first, second = np.zeros(V, np.int64), np.zeros(V, np.int64)
    accepted = np.zeros(N + 1, np.int64)
    for _ in range(trials):
        drafts = [int(rng.choice(V, p=qi)) for qi in q]
        a, nxt = accept_drafts(target, drafts, q, params, rng)
        toks = drafts[:a] + [nxt]
        accepted[a] += 1
        first[toks[0]] += 1
        if len(toks) > 1:
            second[toks[1]] += 1
    assert accepted[0] > 0 and accepted[N] > 0  # both rejection and full acceptance exercised
    assert _chi2_pvalue(first, p[0]) > 1e-3
    assert _chi2_pvalue(second, p[1]) > 1e-3


def _tv(a, b) -> float:
    ca, cb = np.bincount(a, minlength=8192) / len(a), np.bincount(b, minlength=8192) / len(b)
    return 0.5 * float(np.abs(ca - cb).sum())


def test_sampled_speculation_matches_plain_sampling_on_pico(pico):
    """The empirical distributions of the 2nd and 3rd generated tokens over 240 seeds, with and
    without speculation (N = 2), are the same distribution: a two-sample permutation test of
    their total-variation distance (2,000 relabelings) must not reject at p < 0.001."""
    prompt = "def fibonacci(n):\n"
    seeds = range(240)
    hist = {}
    for n in (0, 2):
        toks = []
        for chunk in range(0, len(seeds), 4):
            params = [pico.params(max_new_tokens=3, temperature=1.0, top_k=8, top_p=1.0, seed=s)
                      for s in seeds[chunk: chunk + 4]]
            toks += [r.token_ids[1:3] for r in pico.generate([prompt] * len(params), params, speculative=n)]
        hist[n] = np.asarray(toks)
    rng = np.random.default_rng(0)
    for pos in (0, 1):
        a, b = hist[0][:, pos], hist[2][:, pos]
        observed = _tv(a, b)
        pooled = np.concatenate([a, b])
        null = []
        for _ in range(2000):
            rng.shuffle(pooled)
            null.append(_tv(pooled[: len(a)], pooled[len(a):]))
        p_value = (1 + sum(x >= observed for x in null)) / (1 + len(null))
        assert p_value > 1e-3, (pos, observed, p_value)
    same_seed = [pico.params(max_new_tokens=12, temperature=1.0, seed=7)]
    assert (pico.generate([prompt], same_seed, speculative=2)[0].token_ids ==
            pico.generate([prompt], same_seed, speculative=2)[0].token_ids)  # seeded: reproducible


# -- errors -------------------------------------------------------------------------------

def test_an_artifact_without_the_head_refuses_speculation_with_a_reason(art):
    with pytest.raises(RequestError, match="runtime.speculative"):
        load(art.path, speculative=2)
    with load(art.path) as g:
        with pytest.raises(RequestError, match="runtime.speculative"):
            g.generate([[1, 2]], g.params(max_new_tokens=2), speculative=1)


def test_recipe_section_is_typed():
    with pytest.raises(RecipeError, match="draft_tokens"):
        SpeculativeOptions(draft_tokens=-1)
    with pytest.raises(RecipeError, match="method"):
        SpeculativeOptions(method="eagle")
    from qcn.compile.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="unknown key"):
        recipe_from_dict({"name": "x", "checkpoint": "c", "output": "o",
                          "runtime": {"speculative": {"method": "mtp", "draft": 2}}})
    r = recipe_from_dict({"name": "x", "checkpoint": "c", "output": "o",
                          "runtime": {"speculative": {"method": "mtp", "draft_tokens": 3}}})
    assert r.runtime.speculative == SpeculativeOptions("mtp", 3)


def test_cli_speculative_flag_reports_acceptance(pico_artifact, capsys):
    from qcn.runtime.cli import main

    args = [str(pico_artifact), "--prompt", "def fibonacci(n):\n", "--greedy", "--max-new-tokens", "24"]
    assert main(args + ["--speculative", "0"]) == 0
    plain = capsys.readouterr()
    assert main(args + ["--speculative", "3"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "N=3: acceptance" in spec.err and "tokens per target call" in spec.err and "acceptance" not in plain.err
    assert main(args) == 0  # the artifact's default (recipe draft_tokens: 2)
    default = capsys.readouterr()
    assert default.out == plain.out and "N=2: acceptance" in default.err
    assert main([str(pico_artifact), "--prompt", "x", "--speculative", "-1"]) == 2
    assert "--speculative -1" in capsys.readouterr().err
