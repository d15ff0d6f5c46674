"""The accuracy gate (contract 5): every quantized compile measures itself against the
unquantized model and fails when the recipe's thresholds are missed.

Held-out text: the ``quantization.gate.tokens`` tokens of the calibration source that follow
the calibration tokens (never the same tokens), in windows of ``gate.seq_len``, teacher-forced
(one prefill call per batch of windows, from empty state; or, with ``gate.chunk`` -- 32 by
default for an FP8 KV cache -- calls of that many tokens carrying every state from call to call,
the KV cache growing as the runtime's does, so later tokens attend to earlier ones through the
cache: :func:`chunked_logits`) through the export's unquantized prefill graph and the passes
stage's quantized one, both in ONNX Runtime. The graphs return
the last token's logits only (``export.logits: last``); for the gate both are evaluated on a
copy whose last-token Gather is bypassed (:func:`every_token_logits`), so every position's
next-token distribution is compared. Per predicted token (position t predicts token t+1):

- ``top1_agreement``: fraction where the two argmaxes are equal;
- ``kl_mean``: mean KL(reference || quantized) in nats;
- ``ppl_reference`` / ``ppl_quantized``: exp(mean NLL of the true next token); ``ppl_ratio`` =
  quantized / reference.

``accuracy.json`` (in the passes directory, and copied into a built artifact) holds these, the
thresholds, and what was measured. A missed threshold raises :class:`AccuracyGateError` naming
metric, value and threshold; the stage runs inside ``atomic_dir``, so no directory is left.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import onnx

from ...recipe import QuantizationOptions, RecipeError
from .calibrate import GraphRunner, batches, token_windows, zero_feeds

log = logging.getLogger(__name__)

ACCURACY_FILE = "accuracy.json"
LOGITS = "logits"


class AccuracyGateError(RecipeError):
    """The quantized graphs missed a threshold of ``quantization.gate``."""


def every_token_logits(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a prefill graph whose ``logits`` output has every position ([B, T, V]): the
    Gather that picks the last token (axis 1, scalar index) on the path to ``logits`` is
    bypassed; the ops after it (final norm, lm_head) act on the last axis and take [B, T, H] as
    they are. A graph whose logits already have a tokens axis is returned unchanged."""
    out = next((o for o in proto.graph.output if o.name == LOGITS), None)
    if out is None:
        raise RecipeError(f"accuracy gate: the prefill graph has no {LOGITS!r} output")
    if len(out.type.tensor_type.shape.dim) == 3:
        return proto
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    out = next(o for o in m.graph.output if o.name == LOGITS)
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    todo, seen, gather = [LOGITS], set(), None
    while todo and gather is None:
        name = todo.pop()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        idx = node.input[1] if node.op_type == "Gather" and len(node.input) > 1 else None
        scalar = (idx in inits and len(inits[idx].dims) == 0) or (idx in consts)
        if node.op_type == "Gather" and axis == 1 and scalar:
            gather = node
        else:
            todo += [i for i in node.input if i]
    if gather is None:
        raise RecipeError("accuracy gate: cannot find the last-token Gather before 'logits' in the prefill graph; "
                          "export with export.logits: all")
    src, dst = gather.input[0], gather.output[0]
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name == dst:
                n.input[i] = src
    m.graph.node.remove(gather)
    after, frontier = set(), [src]  # every tensor downstream of the Gather gains the tokens axis
    while frontier:
        name = frontier.pop()
        for n in m.graph.node:
            if name in n.input:
                new = [o for o in n.output if o not in after]
                after.update(new)
                frontier += new
    keep = [v for v in m.graph.value_info if v.name not in after]
    del m.graph.value_info[:]
    m.graph.value_info.extend(keep)  # inferred again for the rest
    del out.type.tensor_type.shape.dim[:]
    out.type.tensor_type.shape.dim.add().dim_param = "batch"
    out.type.tensor_type.shape.dim.add().dim_param = "tokens"
    out.type.tensor_type.shape.dim.add().dim_param = "vocab"
    return m


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Metrics:
    """Running sums of the gate's metrics over batches."""

    def __init__(self):
        self.tokens = 0
        self.agree = 0
        self.kl = 0.0
        self.nll_ref = 0.0
        self.nll_q = 0.0

    def update(self, ids: np.ndarray, ref: np.ndarray, q: np.ndarray) -> None:
        """ids [B, T]; ref, q logits [B, T, V]: position t predicts ids[:, t + 1]."""
        target = ids[:, 1:]
        lr, lq = _log_softmax(ref[:, :-1]), _log_softmax(q[:, :-1])
        self.tokens += target.size
        self.agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        self.kl += float((np.exp(lr) * (lr - lq)).sum())
        pick = lambda lp: float(np.take_along_axis(lp, target[..., None], axis=-1).sum())  # noqa: E731
        self.nll_ref -= pick(lr)
        self.nll_q -= pick(lq)

    def result(self) -> dict:
        n = max(self.tokens, 1)
        ppl_ref, ppl_q = math.exp(self.nll_ref / n), math.exp(self.nll_q / n)
        return {"tokens": self.tokens, "top1_agreement": self.agree / n, "kl_mean": self.kl / n,
                "ppl_ratio": ppl_q / ppl_ref, "ppl_quantized": ppl_q, "ppl_reference": ppl_ref}


CHECKS = (("top1_agreement", "top1_min", "<"), ("ppl_ratio", "ppl_ratio_max", ">"), ("kl_mean", "kl_mean_max", ">"))


def failures(metrics: dict, quant: QuantizationOptions) -> list[str]:
    """One line per missed threshold: metric, value, threshold."""
    out = []
    for metric, key, bad in CHECKS:
        limit = getattr(quant.gate, key)
        if limit is None:
            continue
        v = metrics[metric]
        if (v < limit) if bad == "<" else (v > limit):
            out.append(f"{metric} {v:.6g} {'<' if bad == '<' else '>'} quantization.gate.{key} {limit:g}")
    return out


def chunked_logits(runner: GraphRunner, states, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Every position's logits [B, T, V] of ``ids`` [B, T] fed ``chunk`` tokens per call from
    empty state: carried states replaced by the graph's ``present.*``, KV caches grown by its
    ``new_key``/``new_value`` (FP8 caches as their bytes), ``past_len`` = tokens fed so far.
    ``states``: the manifest's state specs (names; the graph's own input types are used)."""
    import onnxruntime as ort

    types = {i.name: i.type for i in runner.session.get_inputs()}
    B, T = ids.shape
    feeds = zero_feeds(runner.graph_inputs, ids[:, :chunk])  # caches of one ignored row (past_len 0)
    names = [LOGITS] + [s.output for s in states]
    caches: dict[str, np.ndarray] = {}
    out = []
    for lo in range(0, T, chunk):
        feeds["input_ids"] = np.ascontiguousarray(ids[:, lo:lo + chunk])
        feeds["past_len"] = np.full(B, lo, dtype=np.int64)
        run = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v).view(np.uint8)
                                                                   if v.dtype == np.uint8 else
                                                                   np.zeros(v.shape, np.uint8),
                                                                   onnx.TensorProto.FLOAT8E4M3FN)
               if types[k] == "tensor(float8e4m3fn)" else v for k, v in feeds.items()}
        got = dict(zip(names, runner.session.run(names, run)))
        out.append(got[LOGITS])
        for s in states:
            if s.carried:
                feeds[s.input] = got[s.output]
            else:
                new = got[s.output]
                caches[s.input] = new if s.input not in caches else np.concatenate([caches[s.input], new], axis=2)
                feeds[s.input] = caches[s.input]
    return np.concatenate(out, axis=1)


def measure(reference: onnx.ModelProto, quantized: onnx.ModelProto, model_dir: Path, graph_inputs,
            windows: np.ndarray, batch: int, *, progress: bool = False, chunk: int | None = None,
            states=(), reference_dir: Path | None = None) -> dict:
    """The gate's metrics of two prefill graphs whose external data is in ``model_dir`` (the
    reference's in ``reference_dir`` when given: the export's, after the passes compacted theirs;
    ``chunk``: tokens per call with the state carried, see :func:`chunked_logits`)."""
    from tqdm import tqdm

    runners = [GraphRunner(every_token_logits(g), d, graph_inputs, [LOGITS])
               for g, d in ((reference, reference_dir or model_dir), (quantized, model_dir))]
    m = Metrics()
    with tqdm(total=windows.size, unit="tok", desc="accuracy gate", disable=not progress, leave=False) as bar:
        for ids in batches(windows, batch):
            if chunk is None:
                ref, q = (r.run(ids)[LOGITS] for r in runners)
            else:
                ref, q = (chunked_logits(r, states, ids, chunk) for r in runners)
            m.update(ids, ref, q)
            bar.update(ids.size)
    return m.result()


def run_gate(export_dir: Path, out: Path, src_manifest, quant: QuantizationOptions, *, progress: bool = False) -> dict:
    """Measure the passes directory ``out`` against the export, write ``out/accuracy.json``, and
    raise :class:`AccuracyGateError` when a threshold of the recipe is missed."""
    export_dir, out = Path(export_dir), Path(out)
    cal, g = quant.calibration, quant.gate
    windows = token_windows(cal.source, export_dir / "tokenizer.json", tokens=g.tokens, seq_len=g.seq_len,
                            skip=cal.tokens, what="gate")
    gfile = src_manifest.graphs["prefill"].file
    reference = onnx.load(str(export_dir / gfile), load_external_data=False)
    quantized = onnx.load(str(out / gfile), load_external_data=False)
    # the reference reads the export's weights; the quantized graph its passes directory's
    chunk = g.chunk_for(quant.kv_cache)
    metrics = measure(reference, quantized, out, src_manifest.graphs["prefill"].inputs, windows, cal.batch,
                      progress=progress, chunk=chunk, states=src_manifest.state, reference_dir=export_dir)
    failed = failures(metrics, quant)
    report = {**metrics, "passed": not failed, "failures": failed,
              "thresholds": {"top1_min": g.top1_min, "ppl_ratio_max": g.ppl_ratio_max, "kl_mean_max": g.kl_mean_max},
              "measured_on": {"source": str(cal.source), "first_token": cal.tokens, "windows": int(windows.shape[0]),
                              "seq_len": int(windows.shape[1]), "graph": gfile, "runtime": "onnxruntime CPU",
                              "tokens_per_call": chunk or int(windows.shape[1])},
              "quantization": {"weights": quant.weights, "experts": quant.experts, "kv_cache": quant.kv_cache,
                               "fp8_granularity": quant.fp8_granularity, "ranges": cal.ranges}}
    (out / ACCURACY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s", report_text(report))
    if failed:
        raise AccuracyGateError("accuracy gate failed: " + "; ".join(failed) + f" (measured on {metrics['tokens']} held-out "
                                "tokens against the unquantized graph; loosen quantization.gate or quantize less)")
    return report


def report_text(report: dict) -> str:
    """What qcn-compile prints."""
    return (f"accuracy vs unquantized ({report['tokens']} held-out tokens): top1_agreement {report['top1_agreement']:.4f}, "
            f"ppl_ratio {report['ppl_ratio']:.4f} ({report['ppl_quantized']:.3f} / {report['ppl_reference']:.3f}), "
            f"kl_mean {report['kl_mean']:.5f}" + ("" if report["passed"] else " -- FAILED: " + "; ".join(report["failures"])))
