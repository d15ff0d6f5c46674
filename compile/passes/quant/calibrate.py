"""Calibration (contract 4): token windows from the recipe's calibration source, the
*unquantized* prefill graph run in ONNX Runtime with chosen intermediate tensors as extra
outputs, one batch at a time, and the activation ranges collected from them.

- :func:`token_windows`: ``source`` (a UTF-8 text file, or a folder whose text files are read in
  sorted path order, joined by the tokenizer's ``<|endoftext|>`` where it has one) tokenized
  with the artifact's ``tokenizer.json``; tokens ``skip .. skip + tokens`` cut into
  ``[n, seq_len]`` windows. Tokenizes file by file and stops when it has enough.
- :class:`GraphRunner`: one ORT session over a graph file with extra outputs; ``run(ids)``
  feeds a batch of windows as one prefill call from empty state (``past_len`` 0).
- :class:`ActivationRange`: ``|x|`` statistics of one tensor in bounded memory: the max and a
  histogram of 2048 bins over ``[0, top)``, ``top`` a power of two that doubles (merging bin
  pairs, exact) when a larger value arrives; ``percentile(p)`` is the upper edge of the bin where
  the cumulative count reaches p% (resolution top/2048, never above the max).
- :func:`collect_ranges`: {key: tensor name} -> {key: ActivationRange} over all windows, with a
  progress bar; memory is one batch's outputs.

int4 (AWQ statistics) and fp8x (KV scales: ``new_key.i`` / ``new_value.i`` are graph outputs
already) use :func:`token_windows`, :class:`GraphRunner` and :class:`ActivationRange`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ...recipe import CalibrationOptions, RecipeError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".c", ".h", ".cpp", ".js", ".ts", ".rs", ".go", ".java")
SEPARATOR = "<|endoftext|>"
BINS = 2048


class CalibrationError(RecipeError):
    """The calibration source cannot give what the recipe asks (missing, too short, not text)."""


def source_files(source: Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CalibrationError(f"quantization.calibration.source: folder {source} has no text files "
                                   f"({', '.join(TEXT_SUFFIXES)})")
        return files
    raise CalibrationError(f"quantization.calibration.source: {source} does not exist (a text file or a folder of "
                           "text files)")


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_windows(source: Path, tokenizer_json: Path, *, tokens: int, seq_len: int, skip: int = 0,
                  what: str = "calibration") -> np.ndarray:
    """int64 [tokens // seq_len, seq_len]: tokens ``skip .. skip + tokens`` of the source."""
    n = tokens // seq_len
    if n < 1:
        raise CalibrationError(f"quantization.{what}: tokens {tokens} < seq_len {seq_len}: not one window")
    tk = _tokenizer(Path(tokenizer_json))
    sep = tk.token_to_id(SEPARATOR)
    need, ids = skip + n * seq_len, []
    files = source_files(source)
    for i, f in enumerate(files):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(f"quantization.calibration.source: {f} is not UTF-8 text (byte offset {e.start})") from None
        ids += tk.encode(text, add_special_tokens=False).ids
        if sep is not None and len(files) > 1 and i + 1 < len(files):
            ids.append(sep)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CalibrationError(f"quantization.calibration.source {source}: {len(ids)} tokens, but {what} needs tokens "
                               f"{skip}..{need} ({'after the calibration tokens' if skip else 'from the start'}); "
                               "give more text or lower the token counts")
    return np.asarray(ids[skip:need], dtype=np.int64).reshape(n, seq_len)


@dataclass
class ActivationRange:
    """|x| of one tensor over every calibration batch (see the module docstring)."""

    amax: float = 0.0
    top: float = 0.0  # histogram covers [0, top); 0 until a non-zero value arrives
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))

    def update(self, x: np.ndarray, name: str = "") -> None:
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if not a.size:
            return
        m = float(a.max())
        if not math.isfinite(m):
            raise CalibrationError(f"calibration: tensor {name} holds NaN/Inf on the calibration text")
        self.amax = max(self.amax, m)
        if m > 0 and self.top == 0:
            self.top = 2.0 ** math.ceil(math.log2(m) + 1e-12)
            if self.top <= m:
                self.top *= 2
        while self.top and m >= self.top:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([merged, np.zeros(BINS // 2, dtype=np.int64)])
            self.top *= 2
        if self.top == 0:
            self.counts[0] += a.size
            return
        idx = np.minimum((a * (BINS / self.top)).astype(np.int64), BINS - 1)
        self.counts += np.bincount(idx, minlength=BINS)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def percentile(self, p: float) -> float:
        if self.amax == 0:
            return 0.0
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, cum[-1] * p / 100.0, side="left"))
        return min(self.amax, (i + 1) * self.top / BINS)

    def value(self, cal: CalibrationOptions) -> float:
        """The range the recipe's method picks: ``max`` or the ``percentile``-th of |x|."""
        return self.amax if cal.ranges == "max" else self.percentile(cal.percentile)


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` (shapes inferred) with tensors ``names`` added as graph outputs."""
    from ..base import infer_shapes

    m = infer_shapes(proto, "calibration graph")
    types = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.input)}
    have = {o.name for o in m.graph.output}
    for n in names:
        if n in have:
            continue
        if n not in types:
            raise RecipeError(f"calibration: tensor {n!r} is not in the graph (or has no inferred type)")
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
        have.add(n)
    return m


def zero_feeds(graph_inputs, ids: np.ndarray, past: int = 1) -> dict[str, np.ndarray]:
    """Feeds of one prefill call from empty state: ``input_ids`` = ids [B, T], ``past_len`` 0,
    every state input zeros (symbolic dims: batch B, tokens T, past ``past``)."""
    from qcn.artifact import DTYPES

    B, T = ids.shape
    sym = {"batch": B, "tokens": T, "past": past}
    feeds = {}
    for spec in graph_inputs:
        if spec.name == "input_ids":
            feeds[spec.name] = ids
        elif spec.name == "past_len":
            feeds[spec.name] = np.zeros(B, dtype=np.int64)
        else:
            shape = [sym.get(d, past) if isinstance(d, str) else d for d in spec.shape]
            feeds[spec.name] = np.zeros(shape, dtype=DTYPES[spec.dtype].numpy)
    return feeds


class GraphRunner:
    """ONNX Runtime (CPU) over one graph file with extra outputs; external data is read from the
    file's directory. ``run(ids [B, T])`` -> {output name: array} of those outputs."""

    def __init__(self, proto: onnx.ModelProto, model_dir: Path, graph_inputs, outputs: Sequence[str],
                 threads: int | None = None):
        import onnxruntime as ort

        self.outputs = list(dict.fromkeys(outputs))
        self.graph_inputs = graph_inputs
        m = with_outputs(proto, self.outputs)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # ORT's warnings (unused initializers, ...) are not the user's
        if threads:
            so.intra_op_num_threads = threads
        # the graph from memory; its external data (weights.bin, weights.passes.bin) from model_dir
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
        self.session = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        feeds = zero_feeds(self.graph_inputs, ids)
        for i in self.session.get_inputs():  # an FP8 KV cache (kv_fp8): zeros as float8e4m3fn bytes
            if i.type == "tensor(float8e4m3fn)":
                feeds[i.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.zeros(feeds[i.name].shape, dtype=np.uint8), onnx.TensorProto.FLOAT8E4M3FN)
        got = self.session.run(self.outputs, feeds)
        return dict(zip(self.outputs, got))


def batches(windows: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for i in range(0, len(windows), batch):
        yield windows[i:i + batch]


def collect_ranges(runner: GraphRunner, targets: dict[str, str], windows: np.ndarray, batch: int, *,
                   progress: bool = False, desc: str = "calibrating",
                   observe: Callable[[dict[str, np.ndarray]], None] | None = None) -> dict[str, ActivationRange]:
    """{key: tensor} -> {key: ActivationRange} over ``windows``, ``batch`` windows per ORT call."""
    from tqdm import tqdm

    ranges = {k: ActivationRange() for k in targets}
    with tqdm(total=len(windows) * windows.shape[1], unit="tok", desc=desc, disable=not progress, leave=False) as bar:
        for ids in batches(windows, batch):
            out = runner.run(ids)
            for key, tensor in targets.items():
                ranges[key].update(out[tensor], tensor)
            if observe is not None:
                observe(out)
            del out
            bar.update(ids.size)
    return ranges
