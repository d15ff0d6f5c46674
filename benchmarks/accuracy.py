"""Accuracy benchmark: a compiled qcn artifact against transformers on the same checkpoint.

Default model: qcn-pico (models/qcn-pico, trained on the Python standard library), compiled
with recipes/pico_cpu.yaml. Measured on its held-out split (stdlib files chosen by the hash rule
in tools/pico/corpus.py), both sides teacher-forced on the same tokens:

- perplexity of the qcn runtime (prefill of the window's first token, then one decode call per
  token) and of transformers (one forward), and their ratio;
- max |logit difference| over every position;
- next-token top-1 agreement between the two, and greedy continuations of held-out prompts:
  the fraction of continuations whose tokens are all identical, of identical tokens up to
  the first difference, and, where they split, transformers' logit margin between its token
  and ours (a margin near the logit error means a tie, not a bug).

This is where quantized artifacts are judged: pass `--artifact` compiled from another recipe.

    python benchmarks/accuracy.py                      # pico, 4 windows x 256 tokens, 8 greedy prompts
    python benchmarks/accuracy.py --json build/bench/accuracy.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "models" / "qcn-pico")
    p.add_argument("--artifact", type=Path, default=REPO / "build" / "artifacts" / "pico_cpu",
                   help="compiled from --recipe with --checkpoint if missing")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "pico_cpu.yaml")
    p.add_argument("--windows", type=int, default=4, help="held-out windows scored")
    p.add_argument("--window-len", type=int, default=256, help="tokens per window")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts continued greedily")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, metavar="OUT")
    a = p.parse_args(argv)
    for n in ("windows", "window_len", "prompts", "prompt_len", "new_tokens", "threads"):
        if getattr(a, n) < 1:
            p.error(f"--{n.replace('_', '-')} must be >= 1")
    return a


def heldout_stream(tokenizer_path: Path, need: int) -> np.ndarray:
    from pico import corpus
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for f in corpus.split(corpus.stdlib_files())["heldout"]:
        ids += tok.encode(f.text).ids + [eot]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"held-out split has only {len(ids)} tokens, {need} needed")
    return np.asarray(ids[:need], dtype=np.int64)


def runtime_logits(session, ids: np.ndarray) -> np.ndarray:
    """[T, V] next-token logits, teacher-forced: prefill ids[0], then decode ids[1..T-1]."""
    slot = session.allocate()
    try:
        out = [session.prefill(slot, [int(ids[0])])]
        for t in ids[1:]:
            out.append(session.decode([slot], [int(t)])[0])
    finally:
        session.release(slot)
    return np.stack(out)


def greedy_runtime(session, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    """n greedy tokens; EOS masked, as transformers' min_new_tokens does on the other side."""
    slot = session.allocate()
    try:
        logits, out = session.prefill(slot, prompt), []
        for _ in range(n):
            logits = logits.copy()
            logits[eos] = -np.inf
            out.append(int(np.argmax(logits)))
            logits = session.decode([slot], [out[-1]])[0]
    finally:
        session.release(slot)
    return out


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    lg = torch.from_numpy(np.ascontiguousarray(logits)).double()
    return torch.nn.functional.cross_entropy(lg, torch.from_numpy(targets), reduction="sum").item()


def main(argv=None) -> int:
    a = parse_args(argv)
    from transformers import Qwen3NextForCausalLM

    from qcn.runtime.generate import load

    from cpu_decode import cpu_model, ensure_artifact  # benchmarks/ is on sys.path when run as a script

    torch.set_num_threads(a.threads)
    ensure_artifact(a.artifact, a.checkpoint, a.recipe)
    hf = Qwen3NextForCausalLM.from_pretrained(a.checkpoint, dtype=torch.float32).eval()
    gen = load(a.artifact, threads=a.threads)
    session = gen.session
    W, L = a.windows, a.window_len
    stream = heldout_stream(a.checkpoint / "tokenizer.json", W * (L + 1) + a.prompts * a.prompt_len)
    t0 = time.perf_counter()
    nll_q = nll_h = 0.0
    max_diff, agree, n = 0.0, 0, 0
    for w in range(W):
        ids = stream[w * (L + 1): (w + 1) * (L + 1)]
        q = runtime_logits(session, ids[:-1])
        with torch.no_grad():
            h = hf(input_ids=torch.from_numpy(ids[None, :-1])).logits[0].numpy()
        nll_q += nll(q, ids[1:])
        nll_h += nll(h, ids[1:])
        max_diff = max(max_diff, float(np.abs(q - h).max()))
        agree += int((q.argmax(-1) == h.argmax(-1)).sum())
        n += L
    prompts_base = W * (L + 1)
    same_seq = same_tok = total_tok = 0
    margins: list[float] = []
    eos = hf.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for i in range(a.prompts):
        prompt = stream[prompts_base + i * a.prompt_len: prompts_base + (i + 1) * a.prompt_len].tolist()
        ours = greedy_runtime(session, prompt, a.new_tokens, eos)
        with torch.no_grad():
            # explicit mask: generate() would otherwise treat <|endoftext|> (the pad id) inside a
            # prompt that spans two files as padding and mask it out
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, top_k=None, top_p=None, temperature=None,
                              pad_token_id=hf.generation_config.pad_token_id, eos_token_id=None,
                              output_logits=True, return_dict_in_generate=True)
        ref = out.sequences[0, len(prompt):].tolist()
        k = next((j for j, (x, y) in enumerate(zip(ours, ref)) if x != y), len(ref))
        if k < len(ref):  # how close transformers' own top two were where the paths split
            lg = out.logits[k][0]
            margins.append(float(lg[ref[k]] - lg[ours[k]]))
        same_seq += int(k == len(ref))
        same_tok += k
        total_tok += len(ref)
    gen.close()
    res = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()} ({os.cpu_count()} logical CPUs), threads {a.threads}", "checkpoint": str(a.checkpoint),
        "artifact": str(a.artifact), "scored_tokens": n,
        "perplexity_qcn": math.exp(nll_q / n), "perplexity_transformers": math.exp(nll_h / n),
        "perplexity_ratio": math.exp((nll_q - nll_h) / n), "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / n, "greedy_identical_continuations": f"{same_seq}/{a.prompts}",
        "greedy_tokens_before_first_difference": same_tok / total_tok,
        "logit_margin_at_first_difference": margins, "seconds": time.perf_counter() - t0,
    }
    w = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{w}}  {v:.9g}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
