"""ONNX Runtime backend: one InferenceSession per graph (prefill, decode), one copy of the
weights for both, and a state store bound with IOBinding (:mod:`.ort_state`).

Weights: every external-data initializer is a view into one read-only memory map of its file
(:class:`.onnx_weights.WeightMaps`), handed to each session with ``add_initializer``, so the
prefill and decode sessions read the same pages. Two ORT passes would copy them per session and
are switched off while sharing: constant folding (it materializes e.g. the MoE function body's
``Transpose(experts)``; ORT's Transpose+MatMul fusion then reads the weight in place instead)
and MLAS pre-packing. ``share_weights=False`` restores ORT's defaults (each session loads the
file itself, folded and pre-packed: about one more weights copy) for comparison.

Pre-packing, per graph (``prepack``): MLAS re-lays a constant MatMul weight into its panel format
once, at session creation, instead of on every call. For a one-token decode step that is the
difference between streaming the weights once and copying them on every step (qcn-pico, 1 thread,
out of cache: 19 vs 12 GB/s per MatMul; a decode step 15-25 % faster, BENCHMARKS.md). The packed
copy lives in that session's memory (the MatMul weights, not the experts MoE reads in place:
about 23 MB on qcn-pico), so by default the decode graph packs; prefill's 64-token fp32 calls
gained ~7 % from it, not worth a second copy. A graph holding ONNX Runtime's block-quantized ops
(:data:`PACKED_OPS`: MatMulNBits, QMoE) packs too: their CPU kernels compute from the packed
form, and unpacked they re-lay the quantized weight on every call (qcn-pico INT4, prefill 128
tokens, 1 thread: 2040 -> 4500 tokens/s packed, peak RSS +4-12 MiB; BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from qcn.artifact import DTYPES

from ..errors import ArtifactError, BackendError
from ...support import state_dtype_problems
from ..manifest import Manifest, numpy_dtype
from ..state import host_dtype
from .onnx_weights import WeightMaps, external_initializers, graph_ops
from .ort_state import OrtStateStore

__all__ = ["OrtBackend"]

log = logging.getLogger(__name__)

#: ops whose CPU kernels run from MLAS's packed weights: a graph holding one is pre-packed by default
PACKED_OPS = frozenset({("com.microsoft", "MatMulNBits"), ("com.microsoft", "QMoE")})



class OrtBackend:
    """Runs the artifact's graphs with onnxruntime.

    ``threads``: intra-op threads per session (None = onnxruntime's default, one per physical
    core). ``spin``: let idle intra-op threads spin-wait for work (onnxruntime's default) instead of
    sleeping; off by default: on a shared 2-core machine (load ~10) spinning took qcn-pico's decode
    at 2 threads from 47 to 13 tokens/s and prefill from 228 to 124 tokens/s (BENCHMARKS.md), and
    with one thread there are no idle threads to spin. ``providers``: execution providers (default
    CPU). ``share_weights``: one memory-mapped
    copy of the weights for all sessions (see the module docstring). ``prepack``: the graphs whose
    session pre-packs its constant MatMul weights (one packed copy each; None, the default: the
    decode graph and every graph holding a :data:`PACKED_OPS` op, see the module docstring; with
    ``share_weights=False`` every session packs). The manifest's
    file hashes are verified before the first session is created.
    """

    name = "onnxruntime"

    def __init__(
        self,
        manifest: Manifest,
        artifact_dir: str | os.PathLike | None = None,
        threads: int | None = None,
        *,
        providers: Sequence[str] | None = None,
        graphs: Sequence[str] = ("prefill", "decode"),
        share_weights: bool = True,
        spin: bool = False,
        prepack: Sequence[str] | None = None,
    ):
        self.manifest = manifest
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else manifest.artifact_dir
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BackendError(f"threads must be a positive integer or None, got {threads!r}")
        for _key, msg in state_dtype_problems(self.name, [(s.input, s.dtype) for s in manifest.state]):
            raise ArtifactError(f"{manifest.artifact_dir / 'manifest.json'}: {msg}")  # qcn-compile checks it too
        for s in manifest.state:
            host_dtype(s.dtype, f"state {s.input!r}")
        manifest.verify_files()

        if not isinstance(spin, bool):
            raise BackendError(f"spin must be True or False, got {spin!r}")
        self.spin = spin
        if prepack is None:
            prepack = [g for g in graphs if g == "decode" or graph_ops(self.artifact_dir / manifest.graph(g).file)
                       & PACKED_OPS]
        if isinstance(prepack, str) or not all(isinstance(g, str) for g in prepack):
            raise BackendError(f"prepack must be a sequence of graph names, got {prepack!r}")
        unknown = [g for g in prepack if g not in manifest.graphs]
        if unknown:
            raise BackendError(f"prepack names graph(s) {unknown} the artifact does not have; its graphs: "
                               f"{', '.join(manifest.graphs)}")
        self.prepack = frozenset(prepack)
        opts = self._options(threads, spin)
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in self._providers if p not in ort.get_available_providers()]
        if unknown:
            raise BackendError(
                f"onnxruntime execution provider(s) {unknown} not available; available: {ort.get_available_providers()}"
            )

        self.share_weights = bool(share_weights)
        self._weights = WeightMaps(self.artifact_dir) if self.share_weights else None
        self._shared_values: dict[int, ort.OrtValue] = {}  # id(view) -> its OrtValue (one per tensor)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._outputs: dict[str, list[str]] = {}
        for gname in graphs:
            spec = manifest.graph(gname)
            path = self.artifact_dir / spec.file
            t0 = time.perf_counter()
            kwargs = {}
            gopts = opts
            if self._weights is not None:
                gopts = self._options(threads, spin)
                self._add_shared_weights(gopts, path)
                if gname not in self.prepack:
                    gopts.add_session_config_entry("session.disable_prepacking", "1")
                kwargs["disabled_optimizers"] = ["ConstantFolding"]
            try:
                sess = ort.InferenceSession(str(path), sess_options=gopts, providers=self._providers, **kwargs)
            except Exception as e:  # onnxruntime raises its own exception types
                raise ArtifactError(f"{path}: onnxruntime cannot load the {gname} graph: {e}") from None
            log.info("loaded %s graph %s in %.2fs", gname, path.name, time.perf_counter() - t0)
            self._check_io(gname, sess)
            self._sessions[gname] = sess
            self._outputs[gname] = [o.name for o in sess.get_outputs()]

    @staticmethod
    def _options(threads: int | None, spin: bool = False) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        # ORT_ENABLE_ALL vs ORT_ENABLE_EXTENDED measured equal within noise on qcn-pico (1 thread,
        # process CPU time: decode 150 vs 163 tok/s, prefill 1539 vs 1459 tok/s); ALL kept
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only; ORT warnings are noise for users
        # ORT fuses DequantizeLinear(int4 blocks) + MatMul into MatMulNBits; its default accuracy_level 4
        # quantizes the activations to int8 (measured max error 0.14 on a 300x200 product vs 1.3e-5):
        # qcn's INT4 graphs are weight-only, so keep fp32 activations (docs/QUANTIZATION.md, INT4)
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return opts

    def _add_shared_weights(self, opts: ort.SessionOptions, model_path: Path) -> None:
        """Give the session every external initializer as an OrtValue over the shared map."""
        for t in external_initializers(model_path):
            view = self._weights.view(model_path, t)
            if view is None:
                continue  # a type numpy cannot hold: ONNX Runtime loads it from the file
            value = self._shared_values.get(id(view))
            if value is None:
                value = self._shared_values[id(view)] = ort.OrtValue.ortvalue_from_numpy(view)
            opts.add_initializer(t.name, value)

    def _check_io(self, gname: str, sess: ort.InferenceSession) -> None:
        spec = self.manifest.graph(gname)
        path = self.artifact_dir / spec.file
        actual_in = {i.name: i for i in sess.get_inputs()}
        actual_out = {o.name: o for o in sess.get_outputs()}
        missing = [n for n in spec.input_names if n not in actual_in]
        extra = [n for n in actual_in if n not in spec.input_names]
        if missing or extra:
            raise ArtifactError(
                f"{path}: graph inputs disagree with manifest graphs.{gname}.inputs "
                f"(in manifest only: {missing}, in graph only: {extra})"
            )
        missing_out = [n for n in spec.output_names if n not in actual_out]
        if missing_out:
            raise ArtifactError(f"{path}: graph lacks outputs listed in manifest graphs.{gname}.outputs: {missing_out}")
        for t in list(spec.inputs) + list(spec.outputs):
            node = actual_in.get(t.name) or actual_out.get(t.name)
            want = DTYPES[t.dtype].ort
            if want and node.type != want:
                raise ArtifactError(f"{path}: {t.name!r} is {node.type} in the graph but {t.dtype} in the manifest")

    def run(self, graph_name: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        sess = self._session(graph_name)
        names = list(outputs) if outputs is not None else self._outputs[graph_name]
        try:
            values = sess.run(names, dict(feeds))
        except Exception as e:
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            raise BackendError(f"onnxruntime failed running the {graph_name} graph: {e} (feed shapes: {shapes})") from e
        return dict(zip(names, values))

    # -- state ------------------------------------------------------------------------------
    def create_state(self, *, slots: int, max_context: int, manifest: Manifest | None = None) -> OrtStateStore:
        """The state store a Session keeps its sequences in (IOBinding, no per-step cache copy);
        ``manifest``: a view of the manifest whose ``state`` the store holds (the mtp graph's caches)."""
        return OrtStateStore(self, slots=slots, max_context=max_context, manifest=manifest)

    def has_graph(self, graph_name: str) -> bool:
        return graph_name in self._sessions

    def output_names(self, graph_name: str) -> list[str]:
        return list(self._outputs[graph_name])

    def io_binding(self, graph_name: str) -> ort.IOBinding:
        return self._session(graph_name).io_binding()

    def run_binding(self, graph_name: str, binding: ort.IOBinding) -> None:
        """Run ``graph_name`` on ``binding``'s inputs/outputs (the outputs are written in place)."""
        sess = self._session(graph_name)
        try:
            sess.run_with_iobinding(binding)
        except Exception as e:
            raise BackendError(f"onnxruntime failed running the {graph_name} graph: {e}") from e

    def _session(self, graph_name: str) -> ort.InferenceSession:
        try:
            return self._sessions[graph_name]
        except KeyError:
            raise BackendError(f"graph {graph_name!r} is not loaded; loaded: {', '.join(self._sessions)}") from None

    def close(self) -> None:
        self._sessions.clear()
        self._shared_values.clear()
        if self._weights is not None:
            self._weights.close()

    def __repr__(self) -> str:
        return f"OrtBackend({str(self.artifact_dir)!r}, providers={self._providers})"
