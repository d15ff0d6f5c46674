"""ONNX Runtime backend: one InferenceSession per graph (prefill, decode)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import ArtifactError, BackendError
from ...support import state_dtype_problems
from ..manifest import Manifest, numpy_dtype

__all__ = ["OrtBackend"]

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "bfloat16": "tensor(bfloat16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "bool": "tensor(bool)",
}


class OrtBackend:
    """Runs the artifact's graphs with onnxruntime.

    ``threads``: intra-op threads per session (None = onnxruntime's default, one per physical
    core). ``providers``: execution providers (default CPU). The manifest's file hashes are
    verified before the first session is created.
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
    ):
        self.manifest = manifest
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else manifest.artifact_dir
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BackendError(f"threads must be a positive integer or None, got {threads!r}")
        for _key, msg in state_dtype_problems(self.name, [(s.input, s.dtype) for s in manifest.state]):
            raise ArtifactError(f"{manifest.artifact_dir / 'manifest.json'}: {msg}")  # qcn-compile checks it too
        for s in manifest.state:
            numpy_dtype(s.dtype, f"state {s.input!r}")
        manifest.verify_files()

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only; ORT warnings are noise for users
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in self._providers if p not in ort.get_available_providers()]
        if unknown:
            raise BackendError(
                f"onnxruntime execution provider(s) {unknown} not available; available: {ort.get_available_providers()}"
            )

        self._sessions: dict[str, ort.InferenceSession] = {}
        self._outputs: dict[str, list[str]] = {}
        for gname in graphs:
            spec = manifest.graph(gname)
            path = self.artifact_dir / spec.file
            t0 = time.perf_counter()
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=self._providers)
            except Exception as e:  # onnxruntime raises its own exception types
                raise ArtifactError(f"{path}: onnxruntime cannot load the {gname} graph: {e}") from None
            log.info("loaded %s graph %s in %.2fs", gname, path.name, time.perf_counter() - t0)
            self._check_io(gname, sess)
            self._sessions[gname] = sess
            self._outputs[gname] = [o.name for o in sess.get_outputs()]

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
            want = _ORT_TYPES.get(t.dtype)
            if want and node.type != want:
                raise ArtifactError(f"{path}: {t.name!r} is {node.type} in the graph but {t.dtype} in the manifest")

    def run(self, graph_name: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        try:
            sess = self._sessions[graph_name]
        except KeyError:
            raise BackendError(f"graph {graph_name!r} is not loaded; loaded: {', '.join(self._sessions)}") from None
        names = list(outputs) if outputs is not None else self._outputs[graph_name]
        try:
            values = sess.run(names, dict(feeds))
        except Exception as e:
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            raise BackendError(f"onnxruntime failed running the {graph_name} graph: {e} (feed shapes: {shapes})") from e
        return dict(zip(names, values))

    def close(self) -> None:
        self._sessions.clear()

    def __repr__(self) -> str:
        return f"OrtBackend({str(self.artifact_dir)!r}, providers={self._providers})"
