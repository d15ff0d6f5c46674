"""manifest.json as typed, versioned data: the one definition compile writes and runtime reads.

Reading: :func:`read_manifest` (a directory) or :func:`manifest_from_json` (a parsed dict).
Writing: :func:`write_manifest` (validates by reading back what it would write) or
:func:`manifest_to_json`. Every section is a frozen dataclass below; docs/CONTRACT.md shows the
JSON. Unknown keys are errors, so a key exists only when a field here says so: to add one,
add a field (with a default, if older manifests lack it); to change the meaning or shape of
one, bump ``FORMAT_VERSION`` and add ``UPGRADES[old]``, a function from the old dict to the
next version's.

Stage sections: ``passes`` (the passes stage; None before it) and ``build`` (the build stage's
:class:`BuildSection`: engine, profiles, header; None before it). A backend reads them typed,
e.g. ``m.build.profiles[m.build.graph_profile["decode"]].shapes["input_ids"].max`` or
``m.build.engine_header.version``; ``m.raw`` is the JSON as read (read-only), kept for code
that still reads dicts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..errors import ArtifactError
from ..support import token_id_problems
from .dtypes import DTYPES
from .engine_header import EngineHeader
from .hashing import is_sha256, sha256_file
from .schema import LOCAL, Frozen, checked, from_json, to_json

__all__ = [
    "MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "SUPPORTED_FORMAT_VERSIONS", "UPGRADES",
    "STAGES", "GRAPH_NAMES", "LOGITS_MODES", "STATE_KINDS", "CARRIED_KINDS", "CACHE_KINDS",
    "TensorSpec", "GraphSpec", "StateSpec", "TokenizerSpec", "GenerationDefaults", "ModelSpec",
    "RuntimeSpec", "CheckpointInfo", "ShapeRange", "ProfileSpec", "NetworkIO", "OnnxSource",
    "PassesSection", "BuildSection", "Manifest", "read_manifest", "write_manifest", "manifest_from_json",
    "manifest_to_json",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "qcn-artifact"
FORMAT_VERSION = 1  # what this qcn writes; it reads FORMAT_VERSION and every version UPGRADES reaches it from
UPGRADES: dict[int, Callable[[dict], dict]] = {}  # n -> function: version-n dict -> version-(n+1) dict

STAGES = ("export", "passes", "build")
GRAPH_NAMES = ("prefill", "decode")
LOGITS_MODES = ("last", "all")  # "last": logits [batch, V] of the last token; "all": [batch, tokens, V]
CARRIED_KINDS = ("conv_state", "recurrent_state")  # output replaces input
CACHE_KINDS = ("key", "value")  # output is the new tokens' slice, appended by the runtime
STATE_KINDS = CARRIED_KINDS + CACHE_KINDS
_STATE_RANK = {"conv_state": 2, "recurrent_state": 3, "key": 3, "value": 3}


def supported_versions() -> tuple[int, ...]:
    """FORMAT_VERSION and every older version an unbroken chain of UPGRADES leads from."""
    v = FORMAT_VERSION
    while v - 1 in UPGRADES:
        v -= 1
    return tuple(range(v, FORMAT_VERSION + 1))


SUPPORTED_FORMAT_VERSIONS = supported_versions()


# -- field checks (message or None) -------------------------------------------------------

def _one_of(choices: tuple[str, ...]):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def _positive(v: int) -> str | None:
    return None if v >= 1 else f"must be a positive integer, got {v}"


def _known_dtype(v: str) -> str | None:
    return None if v in DTYPES else f"unknown dtype {v!r}; known: {', '.join(DTYPES)}"


def _relpath(v: str) -> str | None:
    p = PurePosixPath(v)
    if not v or p.is_absolute() or ".." in p.parts or "\\" in v:
        return f"{v!r} must be a relative path inside the artifact directory"
    return None


def _relpaths(v) -> str | None:
    return next(filter(None, map(_relpath, v)), None)


def _sha256(v: str) -> str | None:
    return None if is_sha256(v) else f"must be a sha256 hex digest (64 hex chars), got {v!r}"


# -- sections -----------------------------------------------------------------------------

_EMPTY: Mapping = MappingProxyType({})

Dim = int | str


@dataclass(frozen=True)
class TensorSpec(Frozen):
    """One graph input or output. Dims are ints or symbol names ("batch", "tokens", "past")."""

    name: str
    dtype: str = checked(_known_dtype, "a dtype name")
    shape: tuple[Dim, ...] = checked(lambda v: None, "a list of ints and symbol names")


@dataclass(frozen=True)
class GraphSpec(Frozen):
    file: str = checked(_relpath, "an ONNX (or engine) file name")  # relative to the artifact directory
    logits: str = checked(_one_of(LOGITS_MODES), f"one of {LOGITS_MODES}")
    inputs: tuple[TensorSpec, ...] = checked(lambda v: None, "a list of {name, dtype, shape}")
    outputs: tuple[TensorSpec, ...] = checked(lambda v: None, "a list of {name, dtype, shape}")
    name: str = field(default="", metadata=LOCAL)  # "prefill" | "decode": its key in graphs

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
class StateSpec(Frozen):
    """A per-sequence-slot state tensor. ``shape`` has no batch dim; for key/value it is
    [KVH, max_context, D]. In JSON dim 1 of key/value is the symbol "max_context"; a read
    manifest holds it resolved to ``model.max_context`` (the writer writes the symbol back)."""

    layer: int
    kind: str = checked(_one_of(STATE_KINDS), f"one of {STATE_KINDS}")
    input: str = checked(lambda v: None, "a graph input name")
    output: str = checked(lambda v: None, "a graph output name")
    shape: tuple[Dim, ...] = checked(lambda v: None, "a list of dims (no batch dim)")
    dtype: str = checked(_known_dtype, "a dtype name")

    @property
    def carried(self) -> bool:
        return self.kind in CARRIED_KINDS


@dataclass(frozen=True)
class TokenizerSpec(Frozen):
    files: tuple[str, ...] = checked(_relpaths, "a list of file names")
    eos_token_ids: tuple[int, ...] = checked(
        lambda v: None if v and all(e >= 0 for e in v) else f"must be a non-empty list of token ids, got {list(v)!r}",
        "a list of token ids")
    bos_token_id: int | None = None  # informational: the runtime never prepends it
    pad_token_id: int | None = None
    chat_template: bool = False
    special_tokens: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class GenerationDefaults(Frozen):
    """The checkpoint's recommended sampling settings (model card: 1.0 / 0.95 / 40)."""

    temperature: float = checked(lambda v: None if v >= 0 else f"must be >= 0, got {v}", "a number >= 0")
    top_p: float = checked(lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}", "a number in (0, 1]")
    top_k: int = checked(lambda v: None if v >= 0 else f"must be >= 0 (0 = off), got {v}", "an integer >= 0 (0 = off)")


@dataclass(frozen=True)
class ModelSpec(Frozen):
    architecture: str
    vocab_size: int = checked(_positive, "a positive integer")
    hidden_size: int = checked(_positive, "a positive integer")
    num_layers: int = checked(_positive, "a positive integer")
    layer_types: tuple[str, ...] = checked(lambda v: None, "a list of layer type names")
    activation_dtype: str = checked(_known_dtype, "a dtype name")
    max_context: int = checked(_positive, "a positive integer")


@dataclass(frozen=True)
class RuntimeSpec(Frozen):
    backend: str = checked(lambda v: None, "a backend name, e.g. 'onnxruntime'")
    prefill_chunk: int = checked(_positive, "a positive integer")
    max_batch: int = checked(_positive, "a positive integer")


@dataclass(frozen=True)
class CheckpointInfo(Frozen):
    path: str
    config_sha256: str | None = None
    files_sha256: Mapping[str, str] | None = None  # every checkpoint file the export read, by name
    mtp_tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShapeRange(Frozen):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class ProfileSpec(Frozen):
    """One TensorRT optimization profile: the graphs it serves and each dynamic input's range."""

    name: str
    graphs: tuple[str, ...]
    shapes: Mapping[str, ShapeRange]
    index: int


@dataclass(frozen=True)
class NetworkIO(Frozen):
    """The parsed network's inputs and outputs (-1 for dynamic dims)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class OnnxSource(Frozen):
    """The ONNX the engine was built from."""

    graph: str
    sha256: str = checked(_sha256, "a sha256 hex digest")
    weights_sha256: str | None = checked(_sha256, "a sha256 hex digest or null", default=None)
    stage: str = checked(_one_of(("export", "passes")), "'export' or 'passes'", default="export")


@dataclass(frozen=True)
class PassesSection(Frozen):
    """What the passes stage ran (stage passes, and copied into build). ``report`` names the
    per-pass report file (listed in ``files``); ``counts``: pass -> graph -> {matched,
    rewritten, refused, ...}; ``plugins``: per-pass plugin configs (JSON)."""

    run: tuple[str, ...]  # the passes run, in order
    module: str | None = None  # the build module the plan was made for
    report: str | None = checked(_relpath, "a file name or null", default=None)
    not_run: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # pass -> why it did not run
    counts: Mapping[str, Mapping[str, Mapping[str, int]]] = field(default_factory=lambda: _EMPTY)
    plugins: Any = None


@dataclass(frozen=True)
class BuildSection(Frozen):
    """What the build stage made (docs/BUILD.md). Reports (plugin_lowering, budget) are JSON."""

    target: str
    module: str = checked(_one_of(("tensorrt", "tensorrt_rtx")), "tensorrt or tensorrt_rtx")
    module_version: str = checked(lambda v: None, "the TensorRT module's version")
    engine: str = checked(_relpath, "the engine's file name")
    engine_bytes: int = checked(_positive, "a positive integer")
    profiles: tuple[ProfileSpec, ...] = checked(lambda v: None, "a list of optimization profiles")
    graph_profile: Mapping[str, int] = checked(lambda v: None, "an object: graph name -> profile index")
    engine_sha256: str | None = checked(_sha256, "a sha256 hex digest or null", default=None)
    engine_header: EngineHeader | None = None  # TensorRT-RTX engines only
    compute_capability: str | None = None
    compute_capabilities: tuple[str, ...] = ()
    hardware_compatibility: str | None = None
    optimization_level: int | None = None
    workspace_gib: float | None = None
    profile_mode: str | None = None
    io: NetworkIO | None = None
    io_source: str | None = None
    plugins: tuple[str, ...] = ()
    plugin_lowering: Any = None
    onnx: OnnxSource | None = None
    timing_cache: str | None = checked(_relpath, "a file name or null", default=None)
    runtime_cache: str | None = checked(_relpath, "a file name or null", default=None)
    build_seconds: float | None = None
    budget: Any = None
    # the engine's layers from the builder's report: {file, count, types, gemms: {precision: n}}
    layers: Any = None


@dataclass(frozen=True)
class Manifest(Frozen):
    """An artifact directory's manifest.json. Runtime code uses model, tokenizer, generation,
    runtime, graph(name), state, files; compile code also the provenance and stage sections."""

    format: str = checked(lambda v: None if v == FORMAT else f"unknown format {v!r}; this qcn reads format {FORMAT!r}",
                          repr(FORMAT))
    format_version: int
    stage: str = checked(_one_of(STAGES), "the producing stage: " + ", ".join(STAGES))
    model: ModelSpec
    tokenizer: TokenizerSpec
    generation: GenerationDefaults = checked(lambda v: None, "an object with temperature, top_p, top_k")
    runtime: RuntimeSpec = checked(lambda v: None, "an object with backend, prefill_chunk, max_batch")
    graphs: Mapping[str, GraphSpec] = checked(lambda v: None, "an object with prefill and decode")
    state: tuple[StateSpec, ...] = checked(lambda v: None, "a list of state tensors")
    files: Mapping[str, str] = checked(lambda v: None, "an object mapping file name -> sha256")
    # provenance (compile writes it; the runtime does not need it)
    created_utc: str | None = None
    qcn_version: str | None = None
    tools: Mapping[str, str | None] = field(default_factory=lambda: _EMPTY)
    recipe: Any = None  # the recipe as compile read it (compile's own schema)
    recipe_sha256: str | None = None
    checkpoint: CheckpointInfo | None = None
    inputs_sha256: str | None = None  # the stage's staleness key (compile.pipeline)
    # stage sections
    passes: PassesSection | None = None  # stage passes (and build after it)
    build: BuildSection | None = None  # stage build
    # where it was read from (not part of the JSON)
    artifact_dir: Path | None = field(default=None, compare=False, metadata=LOCAL)
    verify_hashes: bool = field(default=True, compare=False, metadata=LOCAL)
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False, compare=False, metadata=LOCAL)
    _verified: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- convenience -------------------------------------------------------------------
    def path(self, relpath: str) -> Path:
        return Path(self.artifact_dir) / relpath

    def graph(self, name: str) -> GraphSpec:
        try:
            return self.graphs[name]
        except KeyError:
            raise ArtifactError(f"{self._source}: no graph {name!r}; graphs: {', '.join(self.graphs)}") from None

    @property
    def carried_states(self) -> tuple[StateSpec, ...]:
        return tuple(s for s in self.state if s.carried)

    @property
    def cache_states(self) -> tuple[StateSpec, ...]:
        return tuple(s for s in self.state if not s.carried)

    @property
    def _source(self) -> str:
        return str(Path(self.artifact_dir) / MANIFEST_NAME) if self.artifact_dir is not None else MANIFEST_NAME

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
                digests = list(pool.map(lambda kv: _digest(self.path(kv[0])), items))
            for (rel, expected), actual in zip(items, digests):
                if actual != expected:
                    raise ArtifactError(
                        f"{self.path(rel)}: sha256 mismatch: manifest.json lists {expected}, "
                        f"the file has {actual} (the artifact is corrupt or was modified; "
                        "re-export it, or pass verify_hashes=False to skip this check)"
                    )
            self._verified["done"] = True
            log.debug("verified sha256 of %d files in %s", len(items), self.artifact_dir)


def _digest(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read listed file: {e.strerror or e}") from None


# -- the reader -----------------------------------------------------------------------------

def _version_gate(raw: dict, source: str) -> dict:
    """Refuse a version this qcn cannot read; upgrade an older one it can, step by step."""
    ver = raw.get("format_version")
    supported = supported_versions()
    words = f"format_version {supported[0]}" + (f" to {supported[-1]}" if len(supported) > 1 else "")
    fail = lambda msg: ArtifactError(f"{source}: key 'format_version': {msg}")  # noqa: E731
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise fail(f"must be an integer, got {ver!r}; this qcn supports {words}")
    if ver > FORMAT_VERSION:
        raise fail(f"the artifact has format_version {ver}, newer than this qcn, which supports {words}: "
                   "upgrade qcn, or compile the artifact with this version")
    if ver < supported[0]:
        raise fail(f"the artifact has format_version {ver}, older than this qcn, which supports {words}: "
                   "compile the artifact again")
    while ver < FORMAT_VERSION:
        raw = dict(UPGRADES[ver](dict(raw)), format_version=ver + 1)
        ver += 1
    return raw


def manifest_from_json(raw: Any, source: str = MANIFEST_NAME) -> Manifest:
    """The one reader: parsed manifest JSON -> a validated :class:`Manifest` (state shapes
    resolved, graph names set). ArtifactError naming ``source`` and the key otherwise."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{source}: key '<root>': manifest.json must hold a JSON object")
    if "format" in raw and raw["format"] != FORMAT:
        raise ArtifactError(f"{source}: key 'format': unknown format {raw['format']!r}; this qcn reads format {FORMAT!r}")
    raw = _version_gate(raw, source)
    if isinstance(raw.get("passes"), list):  # format_version 1 before the passes stage had a section:
        raw = dict(raw, passes={"run": raw["passes"]})  # the list of passes run (always empty then)
    m = from_json(Manifest, raw, source)
    return _validate(m, source)


def _validate(m: Manifest, source: str) -> Manifest:
    """Cross-field checks; returns ``m`` with state shapes resolved and graph names set."""
    def fail(key: str, msg: str) -> ArtifactError:
        return ArtifactError(f"{source}: key {key!r}: {msg}")

    model, tok = m.model, m.tokenizer
    if len(model.layer_types) != model.num_layers:
        raise fail("model.layer_types", f"has {len(model.layer_types)} entries, model.num_layers is {model.num_layers}")
    if "tokenizer.json" not in tok.files:
        raise fail("tokenizer.files", f"must include 'tokenizer.json', got {list(tok.files)}")
    for key, msg in token_id_problems(model.vocab_size, tok.eos_token_ids, tok.bos_token_id, tok.pad_token_id):
        raise fail(key, msg)  # the same rule qcn-compile applies before it exports

    graphs = {}
    for name in GRAPH_NAMES:
        if name not in m.graphs:
            raise fail(f"graphs.{name}", f"missing (expected the {name} graph's description)")
        graphs[name] = _check_graph(dataclasses.replace(m.graphs[name], name=name), fail)
    extra = [g for g in m.graphs if g not in GRAPH_NAMES]
    if extra:
        raise fail(f"graphs.{extra[0]}", f"unknown graph; graphs are {', '.join(GRAPH_NAMES)}")

    states = tuple(_resolve_state(s, i, model.max_context, fail) for i, s in enumerate(m.state))
    for attr in ("input", "output"):
        names = [getattr(s, attr) for s in states]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise fail("state", f"duplicate {attr} names {dup}")
    for s in states:
        if not 0 <= s.layer < model.num_layers:
            raise fail("state", f"{s.input!r}: layer {s.layer} is outside 0..{model.num_layers - 1}")
    for g in graphs.values():
        _check_graph_vs_state(g, states, fail)

    files: dict[str, str] = {}
    for rel, digest in m.files.items():
        if msg := _relpath(rel):
            raise fail("files", msg)
        if msg := _sha256(digest):
            raise fail(f"files.{rel}", msg)
        files[rel] = digest.lower()
    needed = [(f"graphs.{g.name}.file", g.file) for g in graphs.values()] + [("tokenizer.files", "tokenizer.json")]
    for key, rel in needed:
        if rel not in files:
            raise fail(key, f"{rel!r} is not listed in 'files'; every file the runtime loads must carry a sha256")
    if m.stage == "passes" and m.passes is None:
        raise fail("passes", "missing (a passes-stage manifest says what ran in 'passes')")
    if m.passes is not None and m.passes.report is not None and m.passes.report not in files:
        raise fail("passes.report", f"{m.passes.report!r} is not listed in 'files'")
    if m.stage == "build":
        _check_build(m, graphs, fail)
    return dataclasses.replace(m, graphs=MappingProxyType(graphs), state=states, files=MappingProxyType(files))


def _check_graph(g: GraphSpec, fail) -> GraphSpec:
    key = f"graphs.{g.name}"
    for what in ("inputs", "outputs"):
        names = [t.name for t in getattr(g, what)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise fail(f"{key}.{what}", f"duplicate names {dup}")
    for req in ("input_ids", "past_len"):
        if req not in g.input_names:
            raise fail(f"{key}.inputs", f"missing required input {req!r}")
        dt = g.input(req).dtype
        if dt not in ("int64", "int32"):
            raise fail(f"{key}.inputs", f"{req!r} must be int64 (or int32), got {dt}")
    if "logits" not in g.output_names:
        raise fail(f"{key}.outputs", "missing required output 'logits'")
    lg = g.output("logits")
    want_rank = 2 if g.logits == "last" else 3
    if len(lg.shape) != want_rank:
        raise fail(f"{key}.outputs", f"'logits' has shape {list(lg.shape)} but logits: {g.logits!r} means rank {want_rank} "
                                     f"({'[batch, V]' if g.logits == 'last' else '[batch, tokens, V]'})")
    return g


def _resolve_state(s: StateSpec, i: int, max_context: int, fail) -> StateSpec:
    key = f"state[{i}]"
    shape: list[int] = []
    for j, d in enumerate(s.shape):
        if d == "max_context" and s.kind in CACHE_KINDS and j == 1:
            shape.append(max_context)
        elif isinstance(d, int) and d >= 1:
            shape.append(d)
        else:
            raise fail(f"{key}.shape", f"dim {j} is {d!r}; dims must be positive ints, and 'max_context' is allowed only "
                                       "as dim 1 of a key/value state ([KVH, 'max_context', D])")
    want_rank = _STATE_RANK[s.kind]
    if len(shape) != want_rank:
        raise fail(f"{key}.shape", f"a {s.kind} state has rank {want_rank} (no batch dim), got {list(s.shape)}")
    if s.kind in CACHE_KINDS and shape[1] != max_context:
        raise fail(f"{key}.shape", f"dim 1 of a {s.kind} cache must be model.max_context ({max_context}), got {s.shape[1]!r}")
    return dataclasses.replace(s, shape=tuple(shape))


def _check_graph_vs_state(g: GraphSpec, states: tuple[StateSpec, ...], fail) -> None:
    key = f"graphs.{g.name}"
    known_inputs = {"input_ids", "past_len"} | {s.input for s in states}
    for name in g.input_names:
        if name not in known_inputs:
            raise fail(f"{key}.inputs", f"input {name!r} is neither input_ids, past_len nor a state input listed in "
                                        "'state'; the runtime would not know what to feed")
    for s in states:
        if s.input not in g.input_names:
            raise fail(f"{key}.inputs", f"state input {s.input!r} (layer {s.layer} {s.kind}) is not a graph input")
        if s.output not in g.output_names:
            raise fail(f"{key}.outputs", f"state output {s.output!r} (layer {s.layer} {s.kind}) is not a graph output")
        gi = g.input(s.input)
        if gi.dtype != s.dtype:
            raise fail(f"{key}.inputs", f"{s.input!r} has dtype {gi.dtype} but state lists {s.dtype}")
        if len(gi.shape) != len(s.shape) + 1:
            raise fail(f"{key}.inputs", f"{s.input!r} has shape {list(gi.shape)}, expected [batch] + state shape {list(s.shape)}")
    if g.name == "decode":
        dims = g.input("input_ids").shape
        if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != 1):
            raise fail(f"{key}.inputs", f"decode input_ids must be [batch, 1], got {list(dims)}")


def _check_build(m: Manifest, graphs: Mapping[str, GraphSpec], fail) -> None:
    b = m.build
    if b is None:
        raise fail("build", "missing (a build-stage manifest describes its engine in 'build')")
    for g, spec in graphs.items():
        if g not in b.graph_profile:
            raise fail("build", f"build.graph_profile has no profile for graph {g!r}")
        if not 0 <= b.graph_profile[g] < len(b.profiles):
            raise fail(f"build.graph_profile.{g}", f"profile {b.graph_profile[g]} is outside 0..{len(b.profiles) - 1}")
        if spec.file != b.engine:
            raise fail(f"graphs.{g}.file", f"{spec.file!r} is not the engine {b.engine!r}")


def read_manifest(artifact_dir: str | os.PathLike, *, verify_hashes: bool = True, require_files: bool = True) -> Manifest:
    """Parse and validate ``<artifact_dir>/manifest.json``.

    Checks format/format_version, every key (unknown ones are errors), graph I/O versus the
    ``state`` list, and that every file in ``files`` (and every tokenizer file) exists.
    Hashes are checked later, once, by :meth:`Manifest.verify_files` (backends call it before
    opening a session); ``verify_hashes=False`` turns that into a no-op. ``require_files=False``
    skips the existence check (for a caller that reports missing files in its own words).
    Raises ArtifactError.
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
    m = manifest_from_json(raw, str(mpath))
    if require_files:
        _check_present(m, adir)
    return dataclasses.replace(m, artifact_dir=adir, verify_hashes=verify_hashes, raw=MappingProxyType(raw))


def _check_present(m: Manifest, adir: Path) -> None:
    for rel in list(m.files) + [f for f in m.tokenizer.files if f not in m.files]:
        p = adir / rel
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in {MANIFEST_NAME} but missing; the artifact is incomplete (re-export it)")


# -- the writer -----------------------------------------------------------------------------

def manifest_to_json(m: Manifest) -> dict:
    """The one writer: a :class:`Manifest` -> its JSON dict (state caches' dim 1 written as the
    symbol "max_context")."""
    state = tuple(dataclasses.replace(s, shape=(s.shape[0], "max_context", *s.shape[2:])) if s.kind in CACHE_KINDS else s
                  for s in m.state)
    return to_json(dataclasses.replace(m, state=state))


def write_manifest(directory: str | os.PathLike, m: Manifest) -> Path:
    """Write ``<directory>/manifest.json``. It is first read back through the reader and the
    listed files must exist, so compile never writes a manifest the runtime would refuse."""
    d = Path(directory)
    data = manifest_to_json(m)
    path = d / MANIFEST_NAME
    _check_present(manifest_from_json(json.loads(json.dumps(data)), str(path)), d)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
