"""TensorRT backend: runs a build-stage artifact (`manifest.json` stage "build", one engine for
both graphs) with `tensorrt` or `tensorrt_rtx`, whichever built it (manifest `build.module`).

NEEDS A GPU. Nothing here can run without a CUDA GPU and the TensorRT module; CI has neither
a GPU nor full TensorRT. What CI tests are the pure parts, which take no GPU:
  - `EngineInfo.from_manifest` / `verify_engine`: the engine file against the manifest
    (size, sha256, TensorRT-RTX header: size, version, compute capabilities) and the installed
    module's version -- refuses truncated engines and engines of another TensorRT version;
  - `select_profile`, `check_profile`: which optimization profile a call uses, and whether its
    shapes are inside it;
  - `binding_plan`, `buffer_sizes`: what is bound to which tensor, and the device buffers
    allocated once at load (state, KV cache, staging, logits).
The classes `TensorRTBackend` (the `run(graph, feeds)` protocol of the onnxruntime backend,
so `Session`/`generate` work unchanged) and `DeviceState` (state + KV resident on the GPU,
ping-pong carried state, only new K/V written by the device-side scatter `append_kv`, CUDA-graph
capture of decode) are written against the TensorRT 10 / TensorRT-RTX 1.x Python API and have
NOT been executed (no GPU): neither captured decode nor append_kv on a GPU has ever run;
append_kv's scatter logic is tested on CPU tensors.

Never imports qcn.compile (the engine-header parser is duplicated from compile/build).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ArtifactError, BackendError
from ..manifest import Manifest, numpy_dtype

__all__ = ["EngineInfo", "verify_engine", "select_profile", "check_profile", "binding_plan", "buffer_sizes",
           "TensorRTBackend", "DeviceState", "append_kv", "parse_engine_header"]

log = logging.getLogger(__name__)

_MAGIC = b"vtrt"
_CC_BITS = {"7.5": 1, "8.0": 2, "8.6": 4, "8.9": 8, "12.0": 16, "12.1": 32}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


def parse_engine_header(data: bytes) -> dict | None:
    """TensorRT-RTX engine header (layout read off 1.7.1 engines; see compile/build/engine_header.py)."""
    if len(data) < 64 or data[:4] != _MAGIC:
        return None
    mask = struct.unpack_from("<I", data, 32)[0]
    return {"size": struct.unpack_from("<Q", data, 16)[0], "version": f"{data[24]}.{data[25]}.{data[26]}",
            "compute_capabilities": [cc for cc, bit in _CC_BITS.items() if mask & bit]}


@dataclass(frozen=True)
class Profile:
    name: str
    index: int
    graphs: tuple[str, ...]
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class EngineInfo:
    """The manifest's `build` section, checked."""

    module: str
    module_version: str
    engine: str
    engine_bytes: int
    engine_sha256: str | None
    header: Mapping[str, Any] | None
    profiles: tuple[Profile, ...]
    graph_profile: Mapping[str, int]
    runtime_cache: str | None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "EngineInfo":
        where = manifest.artifact_dir / "manifest.json"
        b = manifest.raw.get("build")
        if manifest.stage != "build" or not isinstance(b, Mapping):
            raise ArtifactError(f"{where}: stage {manifest.stage!r} has no TensorRT engine; the tensorrt backend runs "
                                "build-stage artifacts (qcn-compile RECIPE with a GPU target)")
        try:
            profiles = tuple(Profile(p["name"], int(p["index"]), tuple(p["graphs"]),
                                     {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in p["shapes"].items()})
                             for p in b["profiles"])
            info = cls(module=b["module"], module_version=b["module_version"], engine=b["engine"],
                       engine_bytes=int(b["engine_bytes"]), engine_sha256=b.get("engine_sha256"),
                       header=b.get("engine_header"), profiles=profiles, graph_profile=dict(b["graph_profile"]),
                       runtime_cache=b.get("runtime_cache"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: key 'build' is malformed ({type(e).__name__}: {e})") from None
        if info.module not in ("tensorrt", "tensorrt_rtx"):
            raise ArtifactError(f"{where}: build.module {info.module!r} is not tensorrt or tensorrt_rtx")
        for g in manifest.graphs:
            if g not in info.graph_profile:
                raise ArtifactError(f"{where}: build.graph_profile has no profile for graph {g!r}")
            if manifest.graphs[g].file != info.engine:
                raise ArtifactError(f"{where}: graphs.{g}.file {manifest.graphs[g].file!r} is not the engine {info.engine!r}")
        return info


def verify_engine(manifest: Manifest, installed_version: str | None, data: bytes | None = None) -> EngineInfo:
    """Refuse an engine that is missing, truncated, modified, or from another TensorRT version
    than `installed_version` (the importable module's __version__; None = not checked)."""
    info = EngineInfo.from_manifest(manifest)
    path = manifest.artifact_dir / info.engine
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read the engine: {e.strerror or e}") from None
    if len(data) != info.engine_bytes:
        raise ArtifactError(f"{path}: {len(data)} bytes, the manifest says {info.engine_bytes} "
                            f"({'truncated' if len(data) < info.engine_bytes else 'changed'}); rebuild it")
    if info.engine_sha256 and hashlib.sha256(data).hexdigest() != info.engine_sha256:
        raise ArtifactError(f"{path}: sha256 differs from manifest build.engine_sha256; rebuild it")
    if info.module == "tensorrt_rtx":
        header = parse_engine_header(data)
        if header is None:
            raise ArtifactError(f"{path}: not a TensorRT-RTX engine (no 'vtrt' header)")
        if header["size"] != len(data):
            raise ArtifactError(f"{path}: header says {header['size']} bytes, file has {len(data)} (truncated)")
        if info.header and dict(info.header) != header:
            raise ArtifactError(f"{path}: header {header} does not match manifest build.engine_header {dict(info.header)}")
        if not info.module_version.startswith(header["version"]):
            raise ArtifactError(f"{path}: built by TensorRT-RTX {header['version']}, manifest says {info.module_version}")
    if installed_version is not None and installed_version != info.module_version:
        raise ArtifactError(f"{path}: built with {info.module} {info.module_version}, installed is {installed_version}; "
                            f"engines load only in the version that built them: rebuild (qcn-compile) or install "
                            f"{info.module}=={info.module_version}")
    return info


def select_profile(info: EngineInfo, graph: str) -> Profile:
    try:
        index = info.graph_profile[graph]
    except KeyError:
        raise BackendError(f"no optimization profile for graph {graph!r}; profiles: {dict(info.graph_profile)}") from None
    return info.profiles[index]


def check_profile(profile: Profile, shapes: Mapping[str, Sequence[int]]) -> None:
    """Every bound input shape must lie inside the profile's [min, max]."""
    for name, shape in shapes.items():
        if name not in profile.shapes:
            continue  # static input
        lo, _, hi = profile.shapes[name]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise BackendError(f"{name!r} shape {list(shape)} is outside optimization profile {profile.name!r} "
                               f"(min {list(lo)}, max {list(hi)}); rebuild with a larger runtime.prefill_chunk / "
                               "max_batch / max_context or send smaller calls")


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
        item = _ITEMSIZE[s.dtype]
        if s.carried:
            n = slots * math.prod(s.shape) * item
            sizes[f"{s.input}.a"] = sizes[f"{s.input}.b"] = n
        else:
            kvh, _, d = s.shape
            sizes[s.input] = slots * kvh * ctx * d * item
            sizes[f"{s.output}.staging"] = slots * kvh * chunk * d * item
    return sizes


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


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int64": "int64", "int32": "int32",
                 "bool": "bool"}


class TensorRTBackend:
    """`run(graph, feeds) -> outputs` over the engine (NEEDS A GPU; not executed in CI).

    Device input/output buffers are allocated once at their profile's max shape; each call
    copies the host feeds into views of them, sets shapes and addresses, and runs
    `execute_async_v3` on one stream. The host Session owns state and KV in this mode, so
    each call moves the past window across PCIe: use `DeviceState` to keep it on the GPU.
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
        self._buffers: dict[str, Any] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = self._max_shape(name)
            dtype = getattr(torch, _TORCH_DTYPES[self._dtype(name)])
            self._buffers[name] = torch.empty(math.prod(shape), dtype=dtype, device=self.device)

    def _dtype(self, name: str) -> str:
        return {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "BOOL": "bool"}[self.engine.get_tensor_dtype(name).name]

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
        with torch.cuda.stream(self.stream):
            if self._active_profile != profile.index:
                self.context.set_optimization_profile_async(profile.index, self.stream.cuda_stream)
                self._active_profile = profile.index
            for name, value in feeds.items():
                buf = self._buffers[name][: int(np.prod(value.shape))].view(value.shape)
                buf.copy_(torch.from_numpy(np.ascontiguousarray(value)), non_blocking=True)
                self.context.set_input_shape(name, value.shape)
                self.context.set_tensor_address(name, buf.data_ptr())
            names = list(outputs) if outputs is not None else list(self.manifest.graph(graph_name).output_names)
            out_views = {}
            for name in self.manifest.graph(graph_name).output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out_views[name] = self._buffers[name][: math.prod(shape)].view(shape)
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


def append_kv(cache, new, first_slot: int, past_len) -> None:
    """Write the new tokens' K/V into the cache, on the device: cache[first_slot + j, :, past_len[j] + t]
    = new[j, :, t] for cache [slots, KVH, max_ctx, D], new [B, KVH, T, D], past_len [B] int64 on
    cache's device. Only tensor ops (one scatter_ into the B slots' view; indices from past_len and
    an arange): no host sync, no per-sequence loop, no whole-cache copy, so it can be captured in a
    CUDA graph. The caller guarantees past_len[j] + T <= max_ctx (DeviceState.step checks it on the
    host). Tested on CPU tensors (tests/test_trt_device_state.py); its GPU path has NOT been executed."""
    import torch

    b, h, t, d = new.shape
    pos = past_len.view(b, 1) + torch.arange(t, device=past_len.device, dtype=past_len.dtype)  # [B, T]
    cache[first_slot: first_slot + b].scatter_(2, pos.view(b, 1, t, 1).expand(b, h, t, d), new)


@dataclass
class DeviceState:
    """State and KV cache resident on the GPU (NEEDS A GPU; NOT executed: no GPU here).

    Allocated once (`buffer_sizes`): carried states twice (ping-pong: the graph reads one copy
    and writes the other, the roles swap after each call: no copy), KV caches
    [slots, KVH, max_context, D], a staging buffer for the new tokens' K/V that `append_kv`
    scatters into the cache at past_len on the device (only new tokens are written),
    input_ids/past_len/logits. Slots of a call must be contiguous (`slots[0] .. slots[0]+B-1`)
    so every binding is a view. The host Session owns past_len and passes it to every step.

    CUDA graphs (`cuda_graphs=True`): a decode step (T = 1) is captured once per (batch,
    first_slot, ping-pong parity) -- the three things that change its bindings' addresses --
    right after the eager call that computes that step with the same bindings (TensorRT: enqueue
    once after setting shapes, then capture), on the backend's non-default stream:
    execute_async_v3 + append_kv.
    A replay copies the host input_ids/past_len into the static buffers the graph is bound to and
    calls graph.replay(). TensorRT-RTX contexts are asked `is_stream_capturable` first (an engine
    built without kREQUIRE_USER_ALLOCATION is not); a refused or failed capture logs a warning and
    turns graphs off for this DeviceState (eager from then on). The captured graph assumes the
    context's device memory does not move (default STATIC allocation strategy).
    NOT EXECUTED: captured decode and append_kv's GPU path have never run (no GPU); append_kv's
    logic is tested on CPU tensors, the capture/replay control flow is not tested.
    """

    backend: TensorRTBackend
    cuda_graphs: bool = True
    buffers: dict = field(default_factory=dict)
    _parity: bool = False  # False: carried states read '.a', write '.b'; True: the reverse
    _graphs: dict = field(default_factory=dict)

    def __post_init__(self):
        torch, m = self.backend.torch, self.backend.manifest
        for name, nbytes in buffer_sizes(m).items():
            self.buffers[name] = torch.zeros(nbytes, dtype=torch.uint8, device=self.backend.device)

    def _view(self, buffer: str, shape, dtype: str):
        torch = self.backend.torch
        t = self.buffers[buffer].view(getattr(torch, _TORCH_DTYPES[dtype]))
        return t[: math.prod(shape)].view(shape)

    def step(self, graph: str, first_slot: int, input_ids: np.ndarray, past_len: np.ndarray):
        be, m, torch = self.backend, self.backend.manifest, self.backend.torch
        batch, tokens = input_ids.shape
        ctx = m.model.max_context
        if first_slot < 0 or first_slot + batch > m.runtime.max_batch:
            raise BackendError(f"slots {first_slot}..{first_slot + batch - 1} outside 0..{m.runtime.max_batch - 1}")
        if len(past_len) != batch or (np.asarray(past_len) + tokens > ctx).any() or (np.asarray(past_len) < 0).any():
            raise BackendError(f"past_len {list(past_len)} + {tokens} tokens must lie in 0..{ctx} (max_context)")
        key = (batch, first_slot, self._parity)
        graphable = self.cuda_graphs and tokens == 1
        with torch.cuda.stream(be.stream):
            ids_dev = self._view("input_ids", (batch, tokens), "int64")
            past_dev = self._view("past_len", (batch,), "int64")
            ids_dev.copy_(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)), non_blocking=True)
            past_dev.copy_(torch.from_numpy(np.ascontiguousarray(past_len, dtype=np.int64)), non_blocking=True)
            logits = self._view("logits", (batch, m.model.vocab_size), "float32")
            if graphable and key in self._graphs:
                self._graphs[key].replay()
            else:
                self._bind(graph, first_slot, batch, tokens)
                self._launch(graph, first_slot, batch, tokens, past_dev)  # also the warm-up before a capture
                if graphable:
                    # A capture records and runs nothing; re-running this step would be harmless anyway
                    # (reads '.a'/cache < past_len, rewrites '.b'/the same K/V positions).
                    self._capture(key, graph, first_slot, past_dev)
        self._parity = not self._parity
        return logits

    def _bind(self, graph: str, first_slot: int, batch: int, tokens: int) -> None:
        """Profile, input shapes and every tensor address, all views of the buffers allocated once."""
        be, m = self.backend, self.backend.manifest
        plan = binding_plan(m, graph, batch=batch, tokens=tokens, past=m.model.max_context)
        profile = select_profile(be.info, graph)
        check_profile(profile, {b.name: b.shape for b in plan if b.role not in ("logits", "state_out", "cache_new")})
        if be._active_profile != profile.index:
            be.context.set_optimization_profile_async(profile.index, be.stream.cuda_stream)
            be._active_profile = profile.index
        sl = slice(first_slot, first_slot + batch)
        for b in plan:
            if b.role in ("state_in", "state_out"):
                base = b.buffer.rsplit(".", 1)[0]
                swap = self._parity ^ (b.role == "state_out")
                t = self._view(f"{base}.{'b' if swap else 'a'}", (m.runtime.max_batch, *b.shape[1:]), b.dtype)[sl]
            elif b.role == "cache_in":
                t = self._view(b.buffer, (m.runtime.max_batch, *b.shape[1:]), b.dtype)[sl]
            else:
                t = self._view(b.buffer, b.shape, b.dtype)
            if b.role in ("input_ids", "past_len", "state_in", "cache_in"):
                be.context.set_input_shape(b.name, b.shape)
            be.context.set_tensor_address(b.name, t.data_ptr())

    def _launch(self, graph: str, first_slot: int, batch: int, tokens: int, past_dev) -> None:
        """The step's device work on the current stream: the engine, then the new K/V into the cache."""
        be, m = self.backend, self.backend.manifest
        if not be.context.execute_async_v3(be.stream.cuda_stream):
            raise BackendError(f"execute_async_v3 failed for {graph}")
        for s in m.cache_states:
            kvh, _, d = s.shape
            new = self._view(f"{s.output}.staging", (batch, kvh, tokens, d), s.dtype)
            cache = self._view(s.input, (m.runtime.max_batch, kvh, m.model.max_context, d), s.dtype)
            append_kv(cache, new, first_slot, past_dev)

    def _capture(self, key, graph: str, first_slot: int, past_dev) -> bool:
        """Capture the bound decode step into a CUDA graph; False (and graphs off) when it cannot be."""
        be, torch = self.backend, self.backend.torch
        batch, _, _ = key
        if be.info.module == "tensorrt_rtx" and not be.context.is_stream_capturable(be.stream.cuda_stream):
            return self._no_graphs("the TensorRT-RTX context is not stream capturable (engine built without "
                                   "kREQUIRE_USER_ALLOCATION, or data-dependent shapes)")
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=be.stream):
                self._launch(graph, first_slot, batch, 1, past_dev)
        except (RuntimeError, BackendError) as e:  # CUDA capture errors are RuntimeError (torch.AcceleratorError)
            return self._no_graphs(f"capture failed ({type(e).__name__}: {e})")
        self._graphs[key] = g
        return True

    def _no_graphs(self, why: str) -> bool:
        log.warning("tensorrt: CUDA-graph capture of decode disabled, running eagerly: %s", why)
        self.cuda_graphs = False
        self._graphs.clear()
        return False
