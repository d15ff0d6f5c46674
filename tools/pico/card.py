"""The model card (models/qcn-pico/README.md), rendered from eval.json's report."""

from __future__ import annotations

import dataclasses

from .config import PicoConfig


def _fence(text: str) -> str:
    return "```python\n" + text.replace("```", "`\u200b``") + "\n```"


def render_card(r: dict, cfg: PicoConfig) -> str:
    c, h, u, t = r["corpus"], r["heldout"], r["unigram"], r["training"]
    spec = dataclasses.asdict(cfg.model)
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in spec.items() if v is not None)
    samples = "\n\n".join(f"**Prompt** `{s['prompt']!r}` ({s['new_tokens']} new tokens, greedy)\n\n"
                          + _fence(s["prompt"] + s["completion"]) for s in r["samples"])
    tc = cfg.train
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [qwen3_next, code, tiny, qcn]
---
# qcn-pico

A {r['parameters']['total_main'] / 1e6:.1f}M-parameter `Qwen3NextForCausalLM` (plus a
{r['parameters']['mtp'] / 1e6:.2f}M-parameter MTP head) trained from scratch on the Python
standard library by `tools/train_pico.py`. It keeps every architectural feature of
Qwen3-Coder-Next at a miniature size, so that the qcn compiler's accuracy checks, quantization
error and speculative-decoding acceptance are measured on a model that has learned something.
It is a test fixture, not a useful code model: it has seen {t['base_tokens'] / 1e6:.1f}M tokens.

## Architecture
2 x (3 Gated DeltaNet + 1 gated full attention) layers, each followed by a sparse MoE (top-4 of
16 routed experts, normalised, plus a sigmoid-gated shared expert); zero-centred RMSNorms
(`x_hat * (1 + w)`); Hv = 2 Hk in the DeltaNet, GQA 2:1 and an output gate in attention, RoPE
on a quarter of the head dimension; untied lm_head. config.json has the Hub's key names:

| key | value |
|---|---|
{rows}

## MTP head
`mtp.*` tensors in the layout vLLM's `Qwen3NextMTP` and SGLang's `Qwen3NextForCausalLMMTP`
(both `qwen3_next_mtp.py`) load, checked against their source: `mtp.fc.weight` [H, 2H],
`mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, one full-attention + MoE decoder layer
`mtp.layers.0.*` (per-expert `gate_proj`/`up_proj`/`down_proj`), `mtp.norm`; the embedding and
lm_head are shared with the main model. For position t it computes
`lm_head(norm(layer(fc(cat[norm_e(embed(x[t+1])), norm_h(h[t])]))))` with h the main model's
final (post-norm) hidden state at t, embedding first in the concatenation as both engines do,
and predicts x[t+2]. RoPE position t, as vLLM's proposer passes the target positions. It was trained for {tc.mtp_steps} steps
({t['mtp_tokens'] / 1e6:.1f}M tokens) on the frozen main model, starting from a copy of the main
model's last attention layer.

## Corpus and tokenizer
- Every `.py` file of CPython {c['stdlib'].rsplit('python', 1)[-1]}'s standard library that is UTF-8
  (site-packages excluded), in sorted path order, each followed by `<|endoftext|>`.
  Corpus digest (paths + contents): `{c['corpus_sha256'][:16]}`.
- Split by file with a fixed hash rule: held out when
  `int.from_bytes(sha256(relative_posix_path)[:4], "big") % {c['heldout_modulus']} == 0`.
  Train: {c['train']['files']} files, {c['train']['bytes'] / 1e6:.1f} MB, {c['train']['tokens']:,} tokens.
  Held out: {c['heldout']['files']} files, {c['heldout']['bytes'] / 1e6:.2f} MB, {c['heldout']['tokens']:,} tokens.
- Tokenizer: byte-level BPE ({cfg.model.vocab_size - 22} merges + bytes, Qwen2 pre-tokenizer regex)
  trained with `tokenizers` on the train split, then Qwen3's 22 special tokens at ids
  {cfg.model.vocab_size - 22}..{cfg.model.vocab_size - 1}; vocabulary {cfg.model.vocab_size}. `tokenizer_config.json` carries a
  Qwen-style ChatML template (`<|im_start|>role ... <|im_end|>`); EOS is `<|im_end|>`.

## Training
AdamW (beta 0.9/0.95, weight decay {tc.weight_decay} on matrices), peak lr {tc.lr}, {tc.warmup_steps} warm-up
steps, cosine to {tc.min_lr_ratio:g}x over {tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens
(random windows of the train stream, seeded per step), router load-balancing loss
{tc.router_aux_loss_coef}, bf16 autocast with fp32 master weights, gradient clip {tc.grad_clip}, seed {tc.seed}.
{t['base_tokens']:,} tokens in {t['base_wall_s'] / 60:.0f} min for the main model and
{t['mtp_wall_s'] / 60:.0f} min for the MTP head, on 2 CPU cores (AMD EPYC). Final training
loss {t['final_train_lm_loss']}. Weights are stored in bf16.

## Held-out results (the bf16 weights as stored, computed in fp32)
{h['tokens']:,} held-out tokens, non-overlapping {tc.seq_len}-token windows:

| metric | qcn-pico | unigram baseline (same tokenizer, add-one) |
|---|---|---|
| perplexity | **{h['perplexity']:.2f}** | {u['perplexity']:.1f} |
| next-token top-1 accuracy | {h['top1_accuracy']:.1%} | {u['top1_accuracy']:.1%} |
| MTP top-1 accuracy for token t+2 | **{h['mtp_t2_top1_accuracy']:.1%}** | {u['top1_accuracy']:.1%} (most frequent token) |

## Greedy samples
Computed with transformers from the stored weights; `tests/test_pico.py` checks that qcn's
runtime produces the same text. Prompting note: the Qwen2 pre-tokenizer attaches newlines to
the punctuation before them (`"):\\n"` is one token), so a prompt that ends at `):` asks the
model to continue a token it never saw followed by a newline; it answers `pass` (last sample).
End prompts with the newline, or heal the last token.

{samples}

## Reproduce
```bash
python tools/train_pico.py          # prepare -> base -> mtp -> export; resumable (--max-minutes)
```
Numbers are in `eval.json`. A different CPython version has a different standard library, so a
rerun elsewhere trains on a slightly different corpus (the digest above names this one).
"""
