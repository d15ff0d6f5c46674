"""Tokenizer training and the token streams of the train / held-out splits."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from qcn.compile.export.tiny import train_bpe_tokenizer

from . import corpus

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"


def prepare(work: Path, vocab_size: int) -> dict:
    """Train the BPE on the train split, tokenize both splits into work/{train,heldout}.u16.

    Idempotent: returns the saved summary when work/data.json exists for the same vocab size.
    """
    summary_path = work / "data.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["vocab_size"] == vocab_size:
            return summary
    from tokenizers import Tokenizer

    files = corpus.stdlib_files()
    parts = corpus.split(files)
    logger.info("corpus: %d files (%d train, %d held out)", len(files), len(parts["train"]), len(parts["heldout"]))
    tok_json = train_bpe_tokenizer([f.text for f in parts["train"]], vocab_size)
    tok = Tokenizer.from_str(tok_json)
    eot = tok.token_to_id(EOT)
    summary = {"vocab_size": vocab_size, "stdlib": str(corpus.stdlib_root()),
               "corpus_sha256": corpus.manifest_digest(files), "heldout_modulus": corpus.HELDOUT_MODULUS}
    for name, fs in parts.items():
        ids: list[int] = []
        for enc, _f in zip(tok.encode_batch([f.text for f in fs], add_special_tokens=False), fs):
            ids.extend(enc.ids)
            ids.append(eot)
        arr = np.asarray(ids, dtype=np.uint16)
        _atomic_write_bytes(work / f"{name}.u16", arr.tobytes())
        summary[name] = {"files": len(fs), "bytes": sum(len(f.text.encode()) for f in fs), "tokens": int(arr.size)}
    _atomic_write_bytes(work / "tokenizer.json", tok_json.encode())
    _atomic_write_bytes(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def tokens(work: Path, split: str) -> np.ndarray:
    return np.fromfile(work / f"{split}.u16", dtype=np.uint16)


def batch(stream: np.ndarray, rng: np.random.Generator, batch_size: int, length: int) -> np.ndarray:
    """[batch_size, length] int64 windows at uniform random offsets of `stream`."""
    starts = rng.integers(0, stream.size - length, size=batch_size)
    return np.stack([stream[s:s + length] for s in starts]).astype(np.int64)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
