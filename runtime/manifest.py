"""manifest.json: the only thing the runtime knows about a compiled model (docs/CONTRACT.md).

``load_manifest(artifact_dir)`` parses and validates the manifest into frozen dataclasses.
It checks structure, keys, graph I/O versus the ``state`` list and that every listed file
exists. The sha256 of the listed files is checked lazily by :meth:`Manifest.verify_files`
(weights are large); every backend calls it before it opens its first session, and
``verify_hashes=False`` opts out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from ..support import token_id_problems
from .errors import ArtifactError

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_FORMAT",
    "SUPPORTED_FORMAT_VERSIONS",
    "STATE_KINDS",
    "CARRIED_KINDS",
    "CACHE_KINDS",
    "TensorSpec",
    "GraphSpec",
    "StateSpec",
    "TokenizerSpec",
    "GenerationDefaults",
    "ModelSpec",
    "RuntimeSpec",
    "Manifest",
    "load_manifest",
    "numpy_dtype",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT = "qcn-artifact"
SUPPORTED_FORMAT_VERSIONS = (1,)

CARRIED_KINDS = ("conv_state", "recurrent_state")  # output replaces input
CACHE_KINDS = ("key", "value")  # output is the new tokens' slice, appended by the runtime
STATE_KINDS = CARRIED_KINDS + CACHE_KINDS
GRAPH_NAMES = ("prefill", "decode")
LOGITS_MODES = ("last", "all")

# dtype names the manifest may use -> numpy dtype. bfloat16 is a valid manifest dtype but has
# no plain numpy type; a backend that cannot feed it refuses it when it opens the artifact.
_NUMPY_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}
KNOWN_DTYPES = tuple(_NUMPY_DTYPES) + ("bfloat16",)


def numpy_dtype(name: str, where: str = "dtype") -> np.dtype:
    """numpy dtype for a manifest dtype name; ArtifactError for names numpy cannot hold."""
    try:
        return np.dtype(_NUMPY_DTYPES[name])
    except KeyError:
        raise ArtifactError(
            f"{where}: dtype {name!r} has no numpy equivalent in this runtime; "
            f"supported: {', '.join(_NUMPY_DTYPES)}"
        ) from None


Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Dims are ints or symbol names ("batch", "tokens", "past")."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str  # "prefill" | "decode"
    file: str  # relative to the artifact directory
    logits: str  # "last" ([batch, V]) | "all" ([batch, tokens, V])
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class StateSpec:
    """A per-sequence-slot state tensor. ``shape`` has no batch dim; for key/value it is
    [KVH, max_context, D] with the symbol "max_context" resolved to ``model.max_context``."""

    layer: int
    kind: str  # one of STATE_KINDS
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def carried(self) -> bool:
        return self.kind in CARRIED_KINDS


@dataclass(frozen=True)
class TokenizerSpec:
    files: tuple[str, ...]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    chat_template: bool


@dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's recommended sampling settings (model card: 1.0 / 0.95 / 40)."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 40


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    activation_dtype: str
    max_context: int


@dataclass(frozen=True)
class RuntimeSpec:
    backend: str
    prefill_chunk: int
    max_batch: int


@dataclass(frozen=True)
class Manifest:
    artifact_dir: Path
    format: str
    format_version: int
    stage: str
    model: ModelSpec
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    runtime: RuntimeSpec
    graphs: Mapping[str, GraphSpec]
    state: tuple[StateSpec, ...]
    files: Mapping[str, str]  # relative path -> sha256 (lowercase hex)
    verify_hashes: bool = True
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _verified: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- convenience -------------------------------------------------------------------
    def path(self, relpath: str) -> Path:
        return self.artifact_dir / relpath

    def graph(self, name: str) -> GraphSpec:
        try:
            return self.graphs[name]
        except KeyError:
            raise ArtifactError(
                f"{self.artifact_dir / MANIFEST_NAME}: no graph {name!r}; graphs: {', '.join(self.graphs)}"
            ) from None

    @property
    def carried_states(self) -> tuple[StateSpec, ...]:
        return tuple(s for s in self.state if s.carried)

    @property
    def cache_states(self) -> tuple[StateSpec, ...]:
        return tuple(s for s in self.state if not s.carried)

    # -- integrity -----------------------------------------------------------------------
    def verify_files(self) -> None:
        """Check the sha256 of every file in ``files`` (once; later calls return at once).

        Raises ArtifactError naming the first file whose hash differs. A no-op when the
        manifest was loaded with ``verify_hashes=False``.
        """
        if not self.verify_hashes:
            return
        lock = self._verified.setdefault("lock", threading.Lock())
        with lock:
            if self._verified.get("done"):
                return
            items = sorted(self.files.items())
            workers = max(1, min(4, os.cpu_count() or 1, len(items)))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                digests = list(pool.map(lambda kv: _sha256(self.path(kv[0])), items))
            for (rel, expected), actual in zip(items, digests):
                if actual != expected:
                    raise ArtifactError(
                        f"{self.path(rel)}: sha256 mismatch: manifest.json lists {expected}, "
                        f"the file has {actual} (the artifact is corrupt or was modified; "
                        "re-export it, or pass verify_hashes=False to skip this check)"
                    )
            self._verified["done"] = True
            log.debug("verified sha256 of %d files in %s", len(items), self.artifact_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read listed file: {e.strerror or e}") from None
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# parsing helpers: every failure names the manifest path and the key


class _Ctx:
    def __init__(self, manifest_path: Path):
        self.path = manifest_path

    def fail(self, key: str, msg: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: key {key!r}: {msg}")

    def get(self, obj: Mapping, key: str, prefix: str, kind: type | tuple, what: str):
        full = f"{prefix}.{key}" if prefix else key
        if not isinstance(obj, Mapping):
            raise self.fail(prefix or "<root>", f"must be an object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(full, f"missing (expected {what})")
        val = obj[key]
        if not _isinstance(val, kind):
            raise self.fail(full, f"must be {what}, got {val!r}")
        return val

    def opt(self, obj: Mapping, key: str, prefix: str, kind: type | tuple, what: str, default=None):
        if key not in obj or obj[key] is None:
            return default
        return self.get(obj, key, prefix, kind, what)

    def pos_int(self, obj: Mapping, key: str, prefix: str) -> int:
        val = self.get(obj, key, prefix, int, "a positive integer")
        if val < 1:
            raise self.fail(f"{prefix}.{key}", f"must be a positive integer, got {val}")
        return val


def _isinstance(val: Any, kind: type | tuple) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(val, bool) and bool not in kinds:
        return False  # JSON true is not an int
    if float in kinds and isinstance(val, int) and not isinstance(val, bool):
        return True
    return isinstance(val, kinds)


def _safe_relpath(ctx: _Ctx, key: str, rel: str) -> str:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise ctx.fail(key, f"{rel!r} must be a relative path inside the artifact directory")
    return rel


def _parse_tensor(ctx: _Ctx, obj: Any, key: str) -> TensorSpec:
    name = ctx.get(obj, "name", key, str, "a tensor name")
    dtype = ctx.get(obj, "dtype", key, str, "a dtype name")
    if dtype not in KNOWN_DTYPES:
        raise ctx.fail(f"{key}.dtype", f"unknown dtype {dtype!r}; known: {', '.join(KNOWN_DTYPES)}")
    shape = ctx.get(obj, "shape", key, list, "a list of ints and symbol names")
    for d in shape:
        if not _isinstance(d, (int, str)):
            raise ctx.fail(f"{key}.shape", f"dims must be ints or symbol names, got {d!r}")
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))


def _parse_graph(ctx: _Ctx, graphs: Mapping, gname: str) -> GraphSpec:
    key = f"graphs.{gname}"
    g = ctx.get(graphs, gname, "graphs", dict, f"the {gname} graph's description")
    file = _safe_relpath(ctx, f"{key}.file", ctx.get(g, "file", key, str, "an ONNX file name"))
    logits = ctx.get(g, "logits", key, str, f"one of {LOGITS_MODES}")
    if logits not in LOGITS_MODES:
        raise ctx.fail(f"{key}.logits", f"must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
    inputs = ctx.get(g, "inputs", key, list, "a list of {name, dtype, shape}")
    outputs = ctx.get(g, "outputs", key, list, "a list of {name, dtype, shape}")
    ins = tuple(_parse_tensor(ctx, t, f"{key}.inputs[{i}]") for i, t in enumerate(inputs))
    outs = tuple(_parse_tensor(ctx, t, f"{key}.outputs[{i}]") for i, t in enumerate(outputs))
    for what, specs in (("inputs", ins), ("outputs", outs)):
        names = [t.name for t in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ctx.fail(f"{key}.{what}", f"duplicate names {dup}")
    spec = GraphSpec(name=gname, file=file, logits=logits, inputs=ins, outputs=outs)
    for req in ("input_ids", "past_len"):
        if req not in spec.input_names:
            raise ctx.fail(f"{key}.inputs", f"missing required input {req!r}")
        dt = spec.input(req).dtype
        if dt not in ("int64", "int32"):
            raise ctx.fail(f"{key}.inputs", f"{req!r} must be int64 (or int32), got {dt}")
    if "logits" not in spec.output_names:
        raise ctx.fail(f"{key}.outputs", "missing required output 'logits'")
    lg = spec.output("logits")
    want_rank = 2 if logits == "last" else 3
    if len(lg.shape) != want_rank:
        raise ctx.fail(
            f"{key}.outputs",
            f"'logits' has shape {list(lg.shape)} but logits: {logits!r} means rank {want_rank} "
            f"({'[batch, V]' if logits == 'last' else '[batch, tokens, V]'})",
        )
    return spec


def _parse_state(ctx: _Ctx, obj: Any, i: int, max_context: int) -> StateSpec:
    key = f"state[{i}]"
    layer = ctx.get(obj, "layer", key, int, "a layer index")
    kind = ctx.get(obj, "kind", key, str, f"one of {STATE_KINDS}")
    if kind not in STATE_KINDS:
        raise ctx.fail(f"{key}.kind", f"must be one of {', '.join(STATE_KINDS)}, got {kind!r}")
    inp = ctx.get(obj, "input", key, str, "a graph input name")
    out = ctx.get(obj, "output", key, str, "a graph output name")
    dtype = ctx.get(obj, "dtype", key, str, "a dtype name")
    if dtype not in KNOWN_DTYPES:
        raise ctx.fail(f"{key}.dtype", f"unknown dtype {dtype!r}; known: {', '.join(KNOWN_DTYPES)}")
    raw_shape = ctx.get(obj, "shape", key, list, "a list of dims (no batch dim)")
    shape: list[int] = []
    for j, d in enumerate(raw_shape):
        if d == "max_context" and kind in CACHE_KINDS and j == 1:
            shape.append(max_context)
        elif _isinstance(d, int) and d >= 1:
            shape.append(d)
        else:
            raise ctx.fail(
                f"{key}.shape",
                f"dim {j} is {d!r}; dims must be positive ints, and 'max_context' is allowed only "
                "as dim 1 of a key/value state ([KVH, 'max_context', D])",
            )
    want_rank = {"conv_state": 2, "recurrent_state": 3, "key": 3, "value": 3}[kind]
    if len(shape) != want_rank:
        raise ctx.fail(f"{key}.shape", f"a {kind} state has rank {want_rank} (no batch dim), got {raw_shape}")
    if kind in CACHE_KINDS and shape[1] != max_context:
        raise ctx.fail(f"{key}.shape", f"dim 1 of a {kind} cache must be model.max_context ({max_context}), got {raw_shape[1]!r}")
    return StateSpec(layer=layer, kind=kind, input=inp, output=out, shape=tuple(shape), dtype=dtype)


def _check_graph_vs_state(ctx: _Ctx, g: GraphSpec, states: tuple[StateSpec, ...]) -> None:
    key = f"graphs.{g.name}"
    known_inputs = {"input_ids", "past_len"} | {s.input for s in states}
    for name in g.input_names:
        if name not in known_inputs:
            raise ctx.fail(
                f"{key}.inputs",
                f"input {name!r} is neither input_ids, past_len nor a state input listed in 'state'; "
                "the runtime would not know what to feed",
            )
    for s in states:
        if s.input not in g.input_names:
            raise ctx.fail(f"{key}.inputs", f"state input {s.input!r} (layer {s.layer} {s.kind}) is not a graph input")
        if s.output not in g.output_names:
            raise ctx.fail(f"{key}.outputs", f"state output {s.output!r} (layer {s.layer} {s.kind}) is not a graph output")
        gi = g.input(s.input)
        if gi.dtype != s.dtype:
            raise ctx.fail(f"{key}.inputs", f"{s.input!r} has dtype {gi.dtype} but state lists {s.dtype}")
        if len(gi.shape) != len(s.shape) + 1:
            raise ctx.fail(
                f"{key}.inputs",
                f"{s.input!r} has shape {list(gi.shape)}, expected [batch] + state shape {list(s.shape)}",
            )
    if g.name == "decode":
        dims = g.input("input_ids").shape
        if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != 1):
            raise ctx.fail(f"{key}.inputs", f"decode input_ids must be [batch, 1], got {list(dims)}")


def load_manifest(artifact_dir: str | os.PathLike, *, verify_hashes: bool = True) -> Manifest:
    """Parse and validate ``<artifact_dir>/manifest.json``.

    Checks format/format_version, every key the runtime relies on, graph I/O versus the
    ``state`` list, and that every file in ``files`` (and every graph and tokenizer file)
    exists. Hashes are checked later, once, by :meth:`Manifest.verify_files` (backends call it
    before opening a session); ``verify_hashes=False`` turns that into a no-op.
    Raises :class:`ArtifactError`.
    """
    adir = Path(artifact_dir)
    mpath = adir / MANIFEST_NAME
    if not adir.is_dir():
        raise ArtifactError(f"{adir}: not an artifact directory (no such directory)")
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{mpath}: missing; an artifact directory holds manifest.json (stage 'export' writes it)") from None
    except OSError as e:
        raise ArtifactError(f"{mpath}: cannot read: {e.strerror or e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON: {e}") from None
    ctx = _Ctx(mpath)
    if not isinstance(raw, dict):
        raise ctx.fail("<root>", "manifest.json must hold a JSON object")

    fmt = ctx.get(raw, "format", "", str, f"{SUPPORTED_FORMAT!r}")
    if fmt != SUPPORTED_FORMAT:
        raise ctx.fail("format", f"unknown format {fmt!r}; this runtime reads format {SUPPORTED_FORMAT!r}")
    ver = raw.get("format_version")
    if not _isinstance(ver, int) or ver not in SUPPORTED_FORMAT_VERSIONS:
        raise ctx.fail(
            "format_version",
            f"unsupported format_version {ver!r}; this runtime (qcn.runtime) supports "
            f"format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}",
        )
    stage = ctx.get(raw, "stage", "", str, "the producing stage name, e.g. 'export'")

    m = ctx.get(raw, "model", "", dict, "an object")
    layer_types = ctx.get(m, "layer_types", "model", list, "a list of layer type names")
    model = ModelSpec(
        architecture=ctx.get(m, "architecture", "model", str, "an architecture name"),
        vocab_size=ctx.pos_int(m, "vocab_size", "model"),
        hidden_size=ctx.pos_int(m, "hidden_size", "model"),
        num_layers=ctx.pos_int(m, "num_layers", "model"),
        layer_types=tuple(str(t) for t in layer_types),
        activation_dtype=ctx.get(m, "activation_dtype", "model", str, "a dtype name"),
        max_context=ctx.pos_int(m, "max_context", "model"),
    )
    if len(model.layer_types) != model.num_layers:
        raise ctx.fail("model.layer_types", f"has {len(model.layer_types)} entries, model.num_layers is {model.num_layers}")

    t = ctx.get(raw, "tokenizer", "", dict, "an object")
    tfiles = ctx.get(t, "files", "tokenizer", list, "a list of file names")
    eos = ctx.get(t, "eos_token_ids", "tokenizer", list, "a list of token ids")
    if not eos or not all(_isinstance(e, int) and 0 <= e for e in eos):
        raise ctx.fail("tokenizer.eos_token_ids", f"must be a non-empty list of token ids, got {eos!r}")
    tok = TokenizerSpec(
        files=tuple(_safe_relpath(ctx, "tokenizer.files", str(f)) for f in tfiles),
        eos_token_ids=tuple(eos),
        bos_token_id=ctx.opt(t, "bos_token_id", "tokenizer", int, "a token id or null"),
        pad_token_id=ctx.opt(t, "pad_token_id", "tokenizer", int, "a token id or null"),
        chat_template=bool(t.get("chat_template", False)),
    )
    if "tokenizer.json" not in tok.files:
        raise ctx.fail("tokenizer.files", f"must include 'tokenizer.json', got {list(tok.files)}")
    for key, msg in token_id_problems(model.vocab_size, tok.eos_token_ids, tok.bos_token_id, tok.pad_token_id):
        raise ctx.fail(key, msg)  # the same rule qcn-compile applies before it exports

    gd = ctx.get(raw, "generation", "", dict, "an object with temperature, top_p, top_k")
    gen = GenerationDefaults(
        temperature=float(ctx.get(gd, "temperature", "generation", float, "a number >= 0")),
        top_p=float(ctx.get(gd, "top_p", "generation", float, "a number in (0, 1]")),
        top_k=ctx.get(gd, "top_k", "generation", int, "an integer >= 0 (0 = off)"),
    )
    if not gen.temperature >= 0:
        raise ctx.fail("generation.temperature", f"must be >= 0, got {gen.temperature}")
    if not 0 < gen.top_p <= 1:
        raise ctx.fail("generation.top_p", f"must be in (0, 1], got {gen.top_p}")
    if gen.top_k < 0:
        raise ctx.fail("generation.top_k", f"must be >= 0 (0 = off), got {gen.top_k}")

    r = ctx.get(raw, "runtime", "", dict, "an object with backend, prefill_chunk, max_batch")
    rt = RuntimeSpec(
        backend=ctx.get(r, "backend", "runtime", str, "a backend name, e.g. 'onnxruntime'"),
        prefill_chunk=ctx.pos_int(r, "prefill_chunk", "runtime"),
        max_batch=ctx.pos_int(r, "max_batch", "runtime"),
    )

    graphs_raw = ctx.get(raw, "graphs", "", dict, "an object with prefill and decode")
    graphs = {name: _parse_graph(ctx, graphs_raw, name) for name in GRAPH_NAMES}

    states_raw = ctx.get(raw, "state", "", list, "a list of state tensors")
    states = tuple(_parse_state(ctx, s, i, model.max_context) for i, s in enumerate(states_raw))
    for attr in ("input", "output"):
        names = [getattr(s, attr) for s in states]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ctx.fail("state", f"duplicate {attr} names {dup}")
    for s in states:
        if not 0 <= s.layer < model.num_layers:
            raise ctx.fail("state", f"{s.input!r}: layer {s.layer} is outside 0..{model.num_layers - 1}")
    for g in graphs.values():
        _check_graph_vs_state(ctx, g, states)

    files_raw = ctx.get(raw, "files", "", dict, "an object mapping file name -> sha256")
    files: dict[str, str] = {}
    for rel, digest in files_raw.items():
        _safe_relpath(ctx, "files", rel)
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ctx.fail(f"files.{rel}", f"must be a sha256 hex digest (64 hex chars), got {digest!r}")
        files[rel] = digest.lower()
    needed = [(f"graphs.{g.name}.file", g.file) for g in graphs.values()] + [("tokenizer.files", "tokenizer.json")]
    for key, rel in needed:
        if rel not in files:
            raise ctx.fail(key, f"{rel!r} is not listed in 'files'; every file the runtime loads must carry a sha256")
    for rel in list(files) + list(tok.files):
        p = adir / rel
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in {mpath.name} but missing; the artifact is incomplete (re-export it)")

    return Manifest(
        artifact_dir=adir,
        format=fmt,
        format_version=ver,
        stage=stage,
        model=model,
        tokenizer=tok,
        generation=gen,
        runtime=rt,
        graphs=MappingProxyType(graphs),
        state=states,
        files=MappingProxyType(files),
        verify_hashes=verify_hashes,
        raw=MappingProxyType(raw),
    )
