"""What the device state binds to which engine tensor (`binding_plan`) and the device buffers it
allocates once (`buffer_sizes`). Pure Python: tested without a GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qcn.artifact import DTYPES

from ...manifest import Manifest

__all__ = ["Binding", "binding_plan", "buffer_sizes"]


@dataclass(frozen=True)
class Binding:
    name: str
    role: str  # input_ids | past_len | state_in | state_out | cache_in | cache_new | logits
    shape: tuple[int, ...]
    dtype: str
    buffer: str  # the device buffer it is bound to (see buffer_sizes)


def binding_plan(manifest: Manifest, graph: str, *, batch: int, tokens: int, past: int) -> list[Binding]:
    """What DeviceState binds for one call: inputs, then outputs, with concrete shapes.
    Carried state is bound ping-pong (state_in reads buffer 'X.a', state_out writes 'X.b', or the
    reverse, swapped after the call); the KV cache is bound as the full [slots, KVH, past, D]
    window (the graph ignores positions >= past_len) and the graph writes only the new tokens'
    K/V into a staging buffer that is then scattered into the cache."""
    g = manifest.graph(graph)
    out: list[Binding] = [Binding("input_ids", "input_ids", (batch, tokens), g.input("input_ids").dtype, "input_ids"),
                          Binding("past_len", "past_len", (batch,), g.input("past_len").dtype, "past_len")]
    for s in manifest.state:
        if s.carried:
            out.append(Binding(s.input, "state_in", (batch, *s.shape), s.dtype, f"{s.input}.a"))
        else:
            kvh, _, d = s.shape
            out.append(Binding(s.input, "cache_in", (batch, kvh, past, d), s.dtype, s.input))
    lg = g.output("logits")
    vocab = manifest.model.vocab_size
    out.append(Binding("logits", "logits", (batch, vocab) if g.logits == "last" else (batch, tokens, vocab), lg.dtype, "logits"))
    for s in manifest.state:
        if s.carried:
            out.append(Binding(s.output, "state_out", (batch, *s.shape), s.dtype, f"{s.input}.b"))
        else:
            kvh, _, d = s.shape
            out.append(Binding(s.output, "cache_new", (batch, kvh, tokens, d), s.dtype, f"{s.output}.staging"))
    return out


def buffer_sizes(manifest: Manifest, *, max_batch: int | None = None, max_context: int | None = None) -> dict[str, int]:
    """Bytes of every device buffer DeviceState allocates once at load."""
    slots = max_batch or manifest.runtime.max_batch
    ctx = max_context or manifest.model.max_context
    chunk = manifest.runtime.prefill_chunk
    sizes: dict[str, int] = {"input_ids": slots * chunk * 8, "past_len": slots * 8}
    logits_tokens = 1 if manifest.graph("prefill").logits == "last" else chunk
    sizes["logits"] = slots * logits_tokens * manifest.model.vocab_size * 4
    for s in manifest.state:
        item = DTYPES[s.dtype].itemsize
        if s.carried:
            n = slots * math.prod(s.shape) * item
            sizes[f"{s.input}.a"] = sizes[f"{s.input}.b"] = n
        else:
            kvh, _, d = s.shape
            sizes[s.input] = slots * kvh * ctx * d * item
            sizes[f"{s.output}.staging"] = slots * kvh * chunk * d * item
    return sizes
