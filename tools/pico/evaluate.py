"""Held-out metrics of a qcn-pico checkpoint: perplexity vs a unigram baseline, MTP t+2 accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .model import MTPHead, mtp_logits


def unigram(train_stream: np.ndarray, heldout_stream: np.ndarray, vocab_size: int) -> dict:
    """Add-one unigram model of the train split, scored on the held-out split."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nll = -logp[heldout_stream].mean()
    top = int(np.argmax(counts))
    return {"perplexity": float(math.exp(nll)), "nll": float(nll), "most_frequent_token": top,
            "top1_accuracy": float((heldout_stream == top).mean())}


def _windows(stream: np.ndarray, length: int, limit: int | None) -> list[np.ndarray]:
    n = (stream.size - 1) // length
    if limit is not None:
        n = min(n, limit)
    return [stream[i * length: i * length + length + 2] for i in range(n)]


@torch.no_grad()
def heldout(model, mtp: MTPHead | None, stream: np.ndarray, *, seq_len: int = 512, batch: int = 8,
            max_windows: int | None = None, progress=None) -> dict:
    """Non-overlapping seq_len windows of the held-out stream, each scored from its own start.

    Reports next-token perplexity and top-1 accuracy of the model, and the MTP head's top-1
    accuracy for token t+2 (given x[..t+1]) on the same positions.
    """
    model.eval()
    nll = hits1 = n1 = hits2 = n2 = 0.0
    wins = [w for w in _windows(stream, seq_len, max_windows) if w.size == seq_len + 2]
    it = range(0, len(wins), batch)
    for s in (progress(it) if progress else it):
        x = torch.from_numpy(np.stack(wins[s:s + batch]).astype(np.int64))  # [b, T+2]
        out = model.model(input_ids=x[:, :seq_len + 1])
        hidden = out.last_hidden_state  # [b, T+1, H]
        logits = model.lm_head(hidden[:, :seq_len]).float()  # predicts x[1..T]
        target = x[:, 1:seq_len + 1]
        nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        hits1 += (logits.argmax(-1) == target).sum().item()
        n1 += target.numel()
        if mtp is not None:
            lg2 = mtp_logits(model, mtp, x[:, :seq_len + 1], hidden)  # [b, T, V] for x[2..T+1]
            hits2 += (lg2.argmax(-1) == x[:, 2:seq_len + 2]).sum().item()
            n2 += x[:, 2:].numel()
    res = {"tokens": int(n1), "nll": nll / n1, "perplexity": math.exp(nll / n1), "top1_accuracy": hits1 / n1}
    if mtp is not None:
        res["mtp_t2_top1_accuracy"] = hits2 / n2
    return res
