"""The TensorRT backend proper: load and check the engine, allocate I/O buffers, run a graph
(`run(graph, feeds)`), and create the device-resident state store (`create_state`).

NEEDS A GPU: nothing here has run in CI (no GPU, no full TensorRT).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qcn.artifact import DTYPES, from_trt

from ...errors import ArtifactError, BackendError
from ...manifest import Manifest
from .engine import EngineInfo, verify_engine
from .profiles import check_profile, select_profile

__all__ = ["TensorRTBackend"]

log = logging.getLogger(__name__)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = "pip install tensorrt-rtx" if module == "tensorrt_rtx" else "full TensorRT >= 10.9 from NVIDIA (pip install tensorrt)"
        raise BackendError(f"the engine was built with {module}, which cannot be imported ({e}); install: {hint}") from None


def _torch_cuda():
    try:
        import torch
    except ImportError:
        raise BackendError("the tensorrt backend needs torch (CUDA build) for device buffers") from None
    if not torch.cuda.is_available():
        raise BackendError("the tensorrt backend needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "run the export artifact with the onnxruntime backend instead")
    return torch




class TensorRTBackend:
    """The engine, its execution context and stream (NEEDS A GPU; not executed in CI).

    A Session keeps its sequences in `create_state()`: a `DeviceState`, state and KV resident
    on the GPU. `run(graph, feeds)` is the plain host path (each call copies the feeds, the
    KV window included, to the device and the outputs back): its device buffers are allocated
    at the profiles' max shapes on its first call only, so a Session's DeviceState does not
    pay for them.
    """

    name = "tensorrt"

    def __init__(self, manifest: Manifest, artifact_dir: str | os.PathLike | None = None, threads: int | None = None,
                 *, device: int = 0):
        self.manifest = manifest
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else manifest.artifact_dir
        info = EngineInfo.from_manifest(manifest)
        trt = _import(info.module)
        self.info = verify_engine(manifest, trt.__version__)
        manifest.verify_files()
        torch = _torch_cuda()
        self.torch, self.trt = torch, trt
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = (self.artifact_dir / info.engine).read_bytes()
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError(f"{self.artifact_dir / info.engine}: {info.module} could not deserialize the engine "
                                "(built for another GPU / compute capability?)")
        self._check_engine_io()
        self._runtime_cache = None
        if info.module == "tensorrt_rtx" and info.runtime_cache:
            cfg = self.engine.create_runtime_config()
            cache = cfg.create_runtime_cache()
            path = self.artifact_dir / info.runtime_cache
            if path.is_file():
                cache.deserialize(path.read_bytes())
            cfg.set_runtime_cache(cache)
            self._runtime_cache = (cache, path)
            self.context = self.engine.create_execution_context(cfg)
        else:
            self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self._active_profile = None
        self._buffers: dict[str, Any] = {}  # run()'s I/O buffers, allocated by its first call

    def create_state(self, *, slots: int, max_context: int):
        """State and KV cache on the GPU for a Session (`DeviceState`; NOT executed: no GPU here)."""
        from .device_state import DeviceState

        return DeviceState(self, slots=slots, max_context=max_context)

    def use_profile(self, index: int) -> None:
        """Switch the context to optimization profile ``index`` (on the backend's stream)."""
        if self._active_profile != index:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self._active_profile = index

    def _io_buffers(self) -> dict[str, Any]:
        if not self._buffers:
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                dtype = getattr(self.torch, DTYPES[self._dtype(name)].torch)
                self._buffers[name] = self.torch.empty(math.prod(self._max_shape(name)), dtype=dtype, device=self.device)
        return self._buffers

    def _dtype(self, name: str) -> str:
        return from_trt(self.engine.get_tensor_dtype(name).name)

    def _check_engine_io(self) -> None:
        """The deserialized engine must have the manifest's tensors with its dtypes."""
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for g in self.manifest.graphs.values():
            for t in (*g.inputs, *g.outputs):
                if t.name not in names:
                    raise ArtifactError(f"engine has no tensor {t.name!r} (manifest graphs.{g.name}); rebuild")
                if self._dtype(t.name) != t.dtype:
                    raise ArtifactError(f"engine tensor {t.name!r} is {self._dtype(t.name)}, manifest says {t.dtype}")

    def _max_shape(self, name: str) -> tuple[int, ...]:
        shapes = [p.shapes[name][2] for p in self.info.profiles if name in p.shapes]
        if shapes:
            return tuple(max(d) for d in zip(*shapes))
        # outputs: from the manifest graph dims with the largest symbol values
        rt, ctx = self.manifest.runtime, self.manifest.model.max_context
        sym = {"batch": rt.max_batch, "tokens": rt.prefill_chunk, "past": ctx}
        for g in self.manifest.graphs.values():
            for t in g.outputs:
                if t.name == name:
                    return tuple(d if isinstance(d, int) else sym[d] for d in t.shape)
        return tuple(self.engine.get_tensor_shape(name))

    def run(self, graph_name: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        torch = self.torch
        profile = select_profile(self.info, graph_name)
        shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
        check_profile(profile, shapes)
        buffers = self._io_buffers()
        with torch.cuda.stream(self.stream):
            self.use_profile(profile.index)
            for name, value in feeds.items():
                buf = buffers[name][: int(np.prod(value.shape))].view(value.shape)
                buf.copy_(torch.from_numpy(np.ascontiguousarray(value)), non_blocking=True)
                self.context.set_input_shape(name, value.shape)
                self.context.set_tensor_address(name, buf.data_ptr())
            names = list(outputs) if outputs is not None else list(self.manifest.graph(graph_name).output_names)
            out_views = {}
            for name in self.manifest.graph(graph_name).output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out_views[name] = buffers[name][: math.prod(shape)].view(shape)
                self.context.set_tensor_address(name, out_views[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError(f"execute_async_v3 failed for the {graph_name} graph (shapes {shapes})")
            result = {n: out_views[n].cpu().numpy() for n in names}
        return result

    def close(self) -> None:
        if self._runtime_cache is not None:
            cache, path = self._runtime_cache
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(bytes(cache.serialize()))
            tmp.replace(path)
            self._runtime_cache = None
        self._buffers.clear()
