"""End to end against transformers' Qwen3NextForCausalLM in fp32: tiny checkpoints of several
shapes -> qcn-compile -> qcn.runtime (ONNX Runtime) -> the same logits and greedy tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import Qwen3NextForCausalLM

from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.pipeline import run_pipeline
from qcn.compile.recipe import ExportOptions, Recipe, RuntimeOptions
from qcn.runtime.generate import load
from qcn.runtime.sampling import SamplingParams

SPECS = ["default", "odd", "sparse_step2", "mlp_only", "seven", "bias"]
PROMPT_LENGTHS = [1, 7, 63, 65, 200]
DECODE_STEPS = 64
ATOL = 1e-4


def compile_tiny(tmp_dir, spec: str, *, logits: str = "last", chunk: int = 64, max_batch: int = 3):
    ckpt = write_tiny_checkpoint(tmp_dir / f"ckpt-{spec}", TINY_SPECS[spec], seed=0)
    recipe = Recipe(name=f"test-{spec}", checkpoint=ckpt, output=tmp_dir / f"artifact-{spec}-{logits}",
                    export=ExportOptions(logits=logits),
                    runtime=RuntimeOptions(prefill_chunk=chunk, max_batch=max_batch, max_context=320))
    return ckpt, run_pipeline(recipe).output  # what a user loads: the cpu target's passes directory


@pytest.fixture(scope="module", params=SPECS)
def model_pair(request, tmp_path_factory):
    ckpt, artifact = compile_tiny(tmp_path_factory.mktemp(request.param), request.param)
    hf = Qwen3NextForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    gen = load(artifact, threads=1)
    yield request.param, hf, gen
    gen.close()


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_logits_and_greedy_tokens_match_transformers(model_pair):
    spec, hf, gen = model_pair
    session = gen.session
    vocab = gen.manifest.model.vocab_size
    for n in PROMPT_LENGTHS:
        ids = _prompt(vocab, n, seed=n)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=DECODE_STEPS,
                              min_new_tokens=DECODE_STEPS, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0, top_k=None, top_p=None, temperature=None)
        ref_tokens = ref.sequences[0, n:].tolist()
        # min_new_tokens makes transformers mask EOS before its argmax: do the same
        eos = hf.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        slot = session.allocate()
        try:
            logits = session.prefill(slot, ids)
            ours = []
            for step in range(DECODE_STEPS):
                err = np.abs(logits - ref.logits[step][0].numpy()).max()
                assert err <= ATOL, f"{spec}: prompt {n}, step {step}: logits max abs error {err}"
                masked = logits.copy()
                masked[eos] = -np.inf
                ours.append(int(np.argmax(masked)))
                # feed transformers' token so one early flip cannot hide later errors
                logits = session.decode([slot], [ref_tokens[step]])[0]
        finally:
            session.release(slot)
        assert ours == ref_tokens, f"{spec}: prompt {n}: greedy tokens differ"


def test_chunked_prefill_equals_one_shot(model_pair):
    spec, _, gen = model_pair
    session = gen.session
    ids = _prompt(gen.manifest.model.vocab_size, 200, seed=1)
    results = []
    for chunk in (16, 200):
        session.prefill_chunk = chunk
        slot = session.allocate()
        try:
            first = session.prefill(slot, ids)
            second = session.decode([slot], [int(np.argmax(first))])[0]
            results.append((first, second))
        finally:
            session.release(slot)
    session.prefill_chunk = gen.manifest.runtime.prefill_chunk
    for a, b in zip(*results):
        assert np.abs(a - b).max() <= 1e-5, spec


def test_batch_of_different_lengths_equals_each_alone(model_pair):
    spec, _, gen = model_pair
    vocab = gen.manifest.model.vocab_size
    prompts = [_prompt(vocab, n, seed=100 + n) for n in (5, 33, 70)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=())
    together = gen.generate(prompts, greedy)
    alone = [gen.generate([p], greedy)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone], spec
    sampled = dataclasses.replace(greedy, temperature=1.0, top_p=0.95, top_k=40, seed=7)
    together = gen.generate(prompts, sampled)
    alone = [gen.generate([p], sampled)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone], spec


def test_every_prompt_position_with_logits_all(tmp_path):
    """A graph exported with `logits: all` returns every position; all of them match."""
    ckpt, artifact = compile_tiny(tmp_path, "odd", logits="all")
    hf = Qwen3NextForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    gen = load(artifact, threads=1)
    ids = _prompt(gen.manifest.model.vocab_size, 65, seed=3)
    feeds = {"input_ids": np.array([ids]), "past_len": np.zeros(1, np.int64)}
    for s in gen.manifest.state:
        shape = [0 if s.kind in ("key", "value") and i == 1 else d for i, d in enumerate(s.shape)]
        feeds[s.input] = np.zeros([1, *shape], np.float32)
    logits = gen.backend.run("prefill", feeds)["logits"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() <= ATOL
