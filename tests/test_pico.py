"""The shipped models/qcn-pico checkpoint: it loads in transformers and in our pipeline, our
runtime's greedy tokens equal transformers' on it, and its model card's numbers hold up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3NextForCausalLM

from qcn.compile.export.checkpoint import open_checkpoint
from qcn.compile.export.config import load_model_config
from qcn.compile.export.tiny import mtp_tensors
from qcn.compile.pipeline import run_pipeline
from qcn.compile.recipe import ExportOptions, Recipe, RuntimeOptions
from qcn.runtime.generate import load

PICO = Path(__file__).resolve().parent.parent / "models" / "qcn-pico"
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef list_python_files(root):"]
STEPS = 48
ATOL = 1e-3  # both sides compute the bf16-stored weights in fp32; observed differences ~1e-5


@pytest.fixture(scope="module")
def hf():
    model, info = Qwen3NextForCausalLM.from_pretrained(PICO, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    recipe = Recipe(name="test-pico", checkpoint=PICO, output=tmp_path_factory.mktemp("pico") / "artifact",
                    export=ExportOptions(), runtime=RuntimeOptions(prefill_chunk=64, max_batch=4, max_context=512))
    return run_pipeline(recipe).output  # what qcn-compile ships for the cpu target: export + passes


@pytest.fixture(scope="module")
def gen(artifact):
    g = load(artifact, threads=2)
    yield g
    g.close()


@pytest.fixture(scope="module")
def report():
    return json.loads((PICO / "eval.json").read_text())


def test_checkpoint_is_complete_and_has_the_mtp_layout_engines_load(hf):
    _, info = hf
    assert not info["missing_keys"] and not info["mismatched_keys"]
    config = load_model_config(PICO)
    ckpt = open_checkpoint(PICO)
    ckpt.validate(config)
    want = mtp_tensors(config)  # vLLM / SGLang qwen3_next_mtp names and shapes
    got = {n: tuple(ckpt.shape(n)) for n in ckpt.mtp_names}
    assert got == {n: tuple(s) for n, s in want.items()}
    tok = json.loads((PICO / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok["chat_template"]
    assert 8192 <= config.vocab_size <= 16384


def test_runtime_greedy_tokens_equal_transformers(hf, gen):
    model, _ = hf
    session = gen.session
    eos = list(model.generation_config.eos_token_id)
    for prompt in PROMPTS:
        ids = gen.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=eos[-1],
                                 top_k=None, top_p=None, temperature=None)
        ref_tokens = ref.sequences[0, len(ids):].tolist()
        slot = session.allocate()
        try:
            logits, ours = session.prefill(slot, ids), []
            for step in range(STEPS):
                err = np.abs(logits - ref.logits[step][0].numpy()).max()
                assert err <= ATOL, f"{prompt!r} step {step}: logits max abs error {err}"
                masked = logits.copy()
                masked[eos] = -np.inf  # min_new_tokens masks EOS in transformers
                ours.append(int(np.argmax(masked)))
                logits = session.decode([slot], [ref_tokens[step]])[0]
        finally:
            session.release(slot)
        assert ours == ref_tokens, f"{prompt!r}: greedy tokens differ"


def test_generate_text_equals_transformers_greedy_text(hf, gen):
    model, _ = hf
    results = gen.generate(PROMPTS, gen.params(max_new_tokens=32, temperature=0))
    for prompt, res in zip(PROMPTS, results):
        ids = gen.tokenizer.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, top_k=None, top_p=None,
                                 temperature=None, pad_token_id=model.generation_config.pad_token_id)
        assert res.token_ids == out[0, len(ids):].tolist()


def test_heldout_numbers_of_the_card_hold_and_beat_unigram(hf, report):
    """Recompute perplexity and MTP t+2 accuracy on the first held-out files (4 windows, 2048 tokens)."""
    from pico import corpus
    from pico.evaluate import heldout
    from pico.export import load_mtp_from_checkpoint
    from tokenizers import Tokenizer

    model, _ = hf
    tok = Tokenizer.from_file(str(PICO / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for f in corpus.split(corpus.stdlib_files())["heldout"]:
        stream += tok.encode(f.text).ids + [eot]
        if len(stream) > 4 * 514:
            break
    res = heldout(model, load_mtp_from_checkpoint(PICO, model), np.asarray(stream), seq_len=512, batch=4,
                  max_windows=4)
    uni = report["unigram"]
    assert res["perplexity"] < uni["perplexity"] / 5, (res, uni)
    assert res["mtp_t2_top1_accuracy"] > 3 * uni["top1_accuracy"], (res, uni)
    # a 2K-token slice, not the whole held-out split: the card's number within a factor 1.5
    assert report["heldout"]["perplexity"] / 1.5 < res["perplexity"] < report["heldout"]["perplexity"] * 1.5


def test_card_samples_are_what_the_runtime_generates(gen, report):
    """The model card's greedy samples (made with transformers at export) come out of our runtime."""
    prompts = [s["prompt"] for s in report["samples"]]
    assert len(prompts) >= 3 and prompts[0].startswith("def fibonacci(n):")
    results = gen.generate(prompts, gen.params(max_new_tokens=64, temperature=0))
    for s, res in zip(report["samples"], results):
        assert gen.tokenizer.decode(res.token_ids, skip_special_tokens=True) == s["completion"], s["prompt"]


def test_accuracy_benchmark_runs_and_agrees(artifact, tmp_path):
    import importlib.util
    import sys

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("accuracy_bench", bench_dir / "accuracy.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "acc.json"
        assert bench.main(["--artifact", str(artifact), "--windows", "1", "--window-len", "48", "--prompts", "2",
                           "--new-tokens", "6", "--json", str(out)]) == 0
    finally:
        sys.path.remove(str(bench_dir))
    r = json.loads(out.read_text())
    assert r["scored_tokens"] == 48 and abs(r["perplexity_ratio"] - 1) < 1e-4
    assert r["max_abs_logit_diff"] < 1e-3 and r["greedy_identical_continuations"] == "2/2"
