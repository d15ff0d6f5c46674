"""What `qcn.runtime` can load, as data and checks on plain values, shared by both sides:
the runtime refuses an artifact that fails them when it loads it, and `qcn-compile` refuses a
recipe + checkpoint that would produce such an artifact before any work starts.

Checks return problems as (manifest key, message) pairs; each side raises its own error type.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["STATE_DTYPES", "state_dtype_problems", "token_id_problems", "tokenizer_vocab_problems"]

# runtime backend -> dtypes its state buffers can hold. The onnxruntime backend binds numpy
# buffers (numpy has no bfloat16; an FP8 KV cache is uint8 bytes bound as float8e4m3fn);
# TensorRT binds device buffers of any engine dtype.
STATE_DTYPES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("float32", "float16", "float8_e4m3fn"),
    "tensorrt": ("float32", "float16", "bfloat16", "float8_e4m3fn"),
}


def state_dtype_problems(backend: str, states: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """`states`: (state input name, dtype). Problems for dtypes `backend` cannot hold."""
    ok = STATE_DTYPES.get(backend)
    if ok is None:
        return [("runtime.backend", f"unknown backend {backend!r}; known: {', '.join(STATE_DTYPES)}")]
    bad = [(name, dtype) for name, dtype in states if dtype not in ok]
    if not bad:
        return []
    name, dtype = bad[0]
    return [("state", f"state {name!r} is {dtype} ({len(bad)} state tensor(s) in all); the {backend} backend "
                      f"supports {'/'.join(ok)} state only")]


def token_id_problems(vocab_size: int, eos_token_ids: Iterable[int], bos_token_id: int | None = None,
                      pad_token_id: int | None = None) -> list[tuple[str, str]]:
    """EOS ids (at least one; generation stops on them), BOS and PAD ids must be in 0..vocab_size-1."""
    eos = list(eos_token_ids)
    out = []
    if not eos or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        out.append(("tokenizer.eos_token_ids", f"must be a non-empty list of token ids, got {eos!r}"))
    for e in eos:
        if isinstance(e, int) and e >= vocab_size:
            out.append(("tokenizer.eos_token_ids", f"id {e} >= model.vocab_size {vocab_size}"))
    for key, tid in (("tokenizer.bos_token_id", bos_token_id), ("tokenizer.pad_token_id", pad_token_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            out.append((key, f"id {tid} is outside the vocabulary 0..{vocab_size - 1}"))
    return out


def tokenizer_vocab_problems(max_token_id: int, vocab_size: int) -> list[tuple[str, str]]:
    """Every id the tokenizer can produce must be a row of the model's embedding."""
    if max_token_id >= vocab_size:
        return [("tokenizer.files", f"tokenizer.json has token id {max_token_id}, but model.vocab_size is "
                                    f"{vocab_size}: its ids must be < vocab_size (tokenizer and config.json "
                                    "are from different models?)")]
    return []
