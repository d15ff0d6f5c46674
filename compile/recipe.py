"""Recipes: the one place YAML is read. A recipe becomes a frozen `Recipe`; every unknown key
or bad value is a `RecipeError` naming the key and what would be valid.

Relative paths in a recipe are resolved against the current working directory (users run
`qcn-compile recipes/x.yaml` from the repository root); a leading `~` is the home directory.
A key written twice in one mapping is an error (PyYAML would silently keep the last).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcn.artifact import LOGITS_MODES  # the one definition (recipe key export.logits)

from ..errors import QcnError

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
OPSETS = (23,)
WEIGHT_PRECISIONS = ("none", "fp8", "int4", "fp4")  # "none": stored in the activation dtype
KV_PRECISIONS = ("activation", "fp8")  # "activation": the KV cache has the activation dtype
# Compute capabilities tensorrt_rtx 1.7.1 can build for: the GPU table's rows with a header bit.
from .build.targets import RTX_COMPUTE_CAPABILITIES  # noqa: E402
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")  # full TensorRT only
PROFILE_MODES = ("single", "split")
MODULES = ("onnxruntime", "tensorrt", "tensorrt_rtx")


def _cc(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def precisions_for(cc: str | None) -> tuple[str, ...]:
    """Weight / KV precisions a compute capability can run: FP8 needs SM89+, FP4 SM100+
    (FINDINGS: FP4 Q/DQ builds only for SM120 with tensorrt_rtx), INT4 weight-only
    (blockwise DequantizeLinear) builds for SM80 and up."""
    if cc is None:  # CPU: onnxruntime runs Q/DQ of every kind, but there is no pass to make it
        return ("none", "fp8", "int4")
    v = _cc(cc)
    out = ["none"]
    if v >= (8, 9):
        out.append("fp8")
    if v >= (8, 0):
        out.append("int4")
    if v >= (10, 0):
        out.append("fp4")
    return tuple(out)


@dataclass(frozen=True)
class Target:
    """One row of the target table: what a recipe's `target:` names."""

    name: str
    module: str  # onnxruntime | tensorrt (full TensorRT) | tensorrt_rtx
    compute_capability: str | None  # "9.0"; None for cpu
    memory_gib: float | None  # one GPU's memory as the driver reports it (GiB); None for cpu
    reserved_gib: float = 0.0  # memory the GPU cannot give us (unified memory: the OS)
    note: str = ""

    @property
    def backend(self) -> str:
        """The runtime backend name that engines of this target are run with."""
        return "onnxruntime" if self.module == "onnxruntime" else "tensorrt"

    @property
    def precisions(self) -> tuple[str, ...]:
        return precisions_for(self.compute_capability)

    @property
    def is_gpu(self) -> bool:
        return self.module != "onnxruntime"


TARGET_TABLE: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "onnxruntime", None, None, note="ONNX Runtime on any CPU (the export artifact itself)"),
    Target("h100", "tensorrt", "9.0", 79.6, note="H100 SXM/PCIe 80GB (81559 MiB)"),
    Target("h200", "tensorrt", "9.0", 139.8, note="H200 141GB (143771 MiB)"),
    Target("a100", "tensorrt", "8.0", 79.2, note="A100 80GB (81920 MiB less ECC); no FP8 on SM80"),
    Target("l40s", "tensorrt", "8.9", 44.5, note="L40S 48GB (46068 MiB with ECC)"),
    Target("rtx_pro_6000", "tensorrt_rtx", "12.0", 94.97, note="RTX PRO 6000 Blackwell 96GB"),
    Target("dgx_spark", "tensorrt_rtx", "12.1", 119.2, reserved_gib=12.0,
           note="DGX Spark GB10: 128 GB LPDDR5X unified with the CPU; 12 GiB kept for the OS"),
    Target("rtx_sm89", "tensorrt_rtx", "8.9", 23.5, note="Ada RTX (e.g. RTX 4090 24GB)"),
    Target("rtx_sm120", "tensorrt_rtx", "12.0", 31.4, note="Blackwell RTX (e.g. RTX 5090 32GB)"),
)}
TARGETS = tuple(TARGET_TABLE)
BACKENDS = {name: (t.backend,) for name, t in TARGET_TABLE.items()}


class RecipeError(QcnError, ValueError):
    """A recipe (or a CLI flag that overrides it) that qcn cannot build as it is."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 23
    activation_dtype: str = "float32"
    logits: str = "last"  # "last": logits of the last token only; "all": every token (tests)
    allow_nonfinite: bool = False  # export weights holding NaN/Inf (refused by default, naming the tensor)


SPECULATIVE_METHODS = ("mtp",)


@dataclass(frozen=True)
class SpeculativeOptions:
    """`runtime.speculative`: export the checkpoint's MTP head (mtp.onnx) and the verify graph
    (docs/MTP.md); `draft_tokens` is the runtime's default N (0 = speculation off unless
    `qcn-run --speculative N` asks for it)."""

    method: str = "mtp"
    draft_tokens: int = 1

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise RecipeError(f"runtime.speculative.method: {self.method!r}; valid: {list(SPECULATIVE_METHODS)}")
        n = self.draft_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 8:
            raise RecipeError(f"runtime.speculative.draft_tokens: must be an integer in 0..8 (0 = off by default), "
                              f"got {n!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    backend: str = "onnxruntime"
    prefill_chunk: int = 64  # tokens per prefill call
    max_batch: int = 4  # sequences decoded together
    max_context: int = 4096  # prompt + generated tokens per sequence
    speculative: SpeculativeOptions | None = None  # MTP speculative decoding (None: not exported)


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling defaults written to the manifest; None = take the checkpoint's generation_config.json
    (and the model card's 1.0 / 0.95 / 40 where that has none)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


FP8_GRANULARITIES = ("channel", "block128")
INT4_METHODS = ("awq", "rtn")
INT4_CPU_ACCURACY_LEVELS = (0, 1, 4)  # per output channel | 1x128 blocks along K (in)
LM_HEAD_PRECISIONS = ("none", "int8")
RANGE_METHODS = ("max", "percentile")


@dataclass(frozen=True)
class CalibrationOptions:
    """Where activation ranges come from (compile/passes/quant/calibrate.py): the first `tokens`
    tokens of `source` (a UTF-8 text file, or a folder whose *.txt / *.py / *.md files are read in
    sorted order), tokenized with the artifact's tokenizer, cut into sequences of `seq_len`, run
    `batch` sequences at a time through the unquantized prefill graph in ONNX Runtime."""

    source: Path | None = None  # required when anything is quantized (preflight says so)
    tokens: int = 8192
    seq_len: int = 256
    batch: int = 4
    ranges: str = "max"  # max: the largest |x| seen; percentile: the `percentile`-th of |x|
    percentile: float = 99.99


@dataclass(frozen=True)
class GateOptions:
    """The accuracy gate (compile/passes/quant/accuracy.py): `tokens` held-out tokens (the ones
    after the calibration tokens of the same source, so the two never overlap), teacher-forced
    through the unquantized and the quantized prefill graphs. A threshold of None is not checked
    (its metric is still reported)."""

    tokens: int = 8192
    seq_len: int = 256
    top1_min: float | None = 0.98  # top-1 agreement of the two models' next-token argmax
    ppl_ratio_max: float | None = 1.01  # perplexity quantized / unquantized
    kl_mean_max: float | None = None  # mean KL(unquantized || quantized) per token, nats
    # tokens per graph call, the state (KV cache included) carried between calls as the runtime
    # does; None: one call per window, except with kv_cache: fp8, where it is 32 (a single call
    # never reads the cache, so it could not see what FP8 K/V cost)
    chunk: int | None = None

    def chunk_for(self, kv_cache: str) -> int | None:
        return self.chunk if self.chunk is not None else (32 if kv_cache == "fp8" else None)


@dataclass(frozen=True)
class QuantizationOptions:
    """Weight and KV-cache precisions, and how they are calibrated and gated. Which precisions
    have a pass on which target module is compile/passes/plan.py's table (preflight asks it)."""

    weights: str = "none"  # dense projections: attention, DeltaNet, shared experts
    experts: str = "none"  # routed experts: ~97% of Qwen3-Coder-Next's parameters
    kv_cache: str = "activation"
    fp8_granularity: str = "channel"  # FP8 weight scales: channel | block128 (docs/QUANTIZATION.md)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    gate: GateOptions = field(default_factory=GateOptions)
    # --- int4 (issue #11; docs/QUANTIZATION.md, INT4) ---
    int4_method: str = "rtn"  # rtn | awq: how INT4 g128 weights are rounded (rtn: the better on qcn-pico, BENCHMARKS.md)
    int4_cpu_accuracy_level: int = 0  # cpu target: MatMulNBits/QMoE accuracy_level (0 fp32 activations, 4 int8)
    keep: tuple[str, ...] = ()  # initializer-name patterns (fnmatch) kept in the activation dtype
    # the logits projection: none (activation dtype) | int8 (cpu target: 8-bit g128 weights, int8
    # activations in MatMulNBits; compile/passes/quant/int8_cpu_lm_head.py)
    lm_head: str = "none"

    @property
    def active(self) -> bool:
        """Anything quantized (then calibration and the accuracy gate run)."""
        return (self.weights != "none" or self.experts != "none" or self.kv_cache != "activation"
                or self.lm_head != "none")


@dataclass(frozen=True)
class BuildOptions:
    """TensorRT build settings (ignored by the cpu target, where they must stay default)."""

    compute_capabilities: tuple[str, ...] = ()  # tensorrt_rtx only; () = the target's own
    hardware_compatibility: str = "none"  # full TensorRT only
    optimization_level: int = 3  # builder optimization level 0..5
    workspace_gib: float = 2.0  # memory pool limit for tactics / activations
    profiles: str | None = None  # single | split; None = split on tensorrt, single on tensorrt_rtx


@dataclass(frozen=True)
class Recipe:
    name: str
    checkpoint: Path
    output: Path
    target: str = "cpu"
    export: ExportOptions = field(default_factory=ExportOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    build: BuildOptions = field(default_factory=BuildOptions)
    model_config: Path | None = None  # dir with config.json for the budget when checkpoint is absent
    source: Path | None = None  # the YAML file it was read from

    @property
    def target_info(self) -> Target:
        return TARGET_TABLE[self.target]

    @property
    def profile_mode(self) -> str:
        if self.build.profiles is not None:
            return self.build.profiles
        return "single" if self.target_info.module == "tensorrt_rtx" else "split"

    @property
    def compute_capabilities(self) -> tuple[str, ...]:
        """The compute capabilities engines are built for (RTX: the list; full TensorRT: the
        target's own, i.e. the GPU the build runs on)."""
        t = self.target_info
        if self.build.compute_capabilities:
            return self.build.compute_capabilities
        return (t.compute_capability,) if t.compute_capability else ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoint"], d["output"] = str(self.checkpoint), str(self.output)
        d["source"] = str(self.source) if self.source else None
        d["model_config"] = str(self.model_config) if self.model_config else None
        d["build"]["compute_capabilities"] = list(self.build.compute_capabilities)
        src = self.quantization.calibration.source
        d["quantization"]["calibration"]["source"] = str(src) if src is not None else None
        return d


def _section(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of {[f.name for f in dataclasses.fields(cls)]}, got {data!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


def _runtime_section(data: Any) -> RuntimeOptions:
    if isinstance(data, dict) and data.get("speculative") is not None:
        data = dict(data, speculative=_section(SpeculativeOptions, data["speculative"], "runtime.speculative"))
    return _section(RuntimeOptions, data, "runtime")


def _build_section(data: Any) -> BuildOptions:
    if isinstance(data, dict) and "compute_capabilities" in data:
        ccs = data["compute_capabilities"]
        if not isinstance(ccs, list) or not ccs:
            raise RecipeError(f"build.compute_capabilities: expected a non-empty list of strings from "
                              f"{list(RTX_COMPUTE_CAPABILITIES)}, got {ccs!r}")
        data = dict(data, compute_capabilities=tuple(str(c) for c in ccs))
    return _section(BuildOptions, data, "build")


def _quantization_section(data: Any) -> QuantizationOptions:
    if not isinstance(data, dict):
        return _section(QuantizationOptions, data, "quantization")
    data = dict(data)
    if "calibration" in data:
        cal = data["calibration"]
        if isinstance(cal, dict) and "source" in cal:
            cal = dict(cal, source=_optional_path(cal["source"], "quantization.calibration.source", "a text file or "
                                                  "a folder of text files"))
        data["calibration"] = _section(CalibrationOptions, cal, "quantization.calibration")
    if "gate" in data:
        data["gate"] = _section(GateOptions, data["gate"], "quantization.gate")
    if "keep" in data:
        keep = data["keep"]
        if keep is None:
            keep = []
        if not isinstance(keep, list):
            raise RecipeError(f"quantization.keep: expected a list of initializer-name patterns, got {keep!r}")
        data["keep"] = tuple(keep)
    return _section(QuantizationOptions, data, "quantization")


def _optional_path(value: Any, where: str, what: str = "a directory path") -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected {what} (string), got {value!r}")
    return user_path(value)


def user_path(value: str | Path) -> Path:
    """A path as a user wrote it: `~` and `~user` expanded (never a literal `./~`)."""
    return Path(value).expanduser()


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping reports it
            if first is not None:
                raise RecipeError(f"key {key!r} appears twice in one mapping (line {first.start_mark.line + 1} and "
                                  f"line {key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _choice(value, valid, where: str):
    if value not in valid:
        raise RecipeError(f"{where}: {value!r} is not valid; choose one of {list(valid)}")


def _number(value, where: str, *, integer: bool, minimum: float, maximum: float | None = None, open_min=False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise RecipeError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (open_min and value == minimum) or (maximum is not None and value > maximum):
        bound = f"{'>' if open_min else '>='} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise RecipeError(f"{where}: {value!r} is out of range; must be {bound}")


def validate(recipe: Recipe) -> Recipe:
    """Schema and target checks that need nothing but the recipe. The checks that need the
    checkpoint's config.json or an import (memory budget, TensorRT module, quantization passes)
    are `qcn.compile.build.preflight`."""
    _choice(recipe.target, TARGETS, "target")
    target = TARGET_TABLE[recipe.target]
    _choice(recipe.runtime.backend, BACKENDS[recipe.target], "runtime.backend")
    _choice(recipe.export.opset, OPSETS, "export.opset")
    _choice(recipe.export.activation_dtype, ACTIVATION_DTYPES, "export.activation_dtype")
    _choice(recipe.export.logits, LOGITS_MODES, "export.logits")
    if not isinstance(recipe.export.allow_nonfinite, bool):
        raise RecipeError(f"export.allow_nonfinite: expected true or false, got {recipe.export.allow_nonfinite!r}")
    _number(recipe.runtime.prefill_chunk, "runtime.prefill_chunk", integer=True, minimum=1)
    _number(recipe.runtime.max_batch, "runtime.max_batch", integer=True, minimum=1)
    _number(recipe.runtime.max_context, "runtime.max_context", integer=True, minimum=2)
    if recipe.runtime.speculative is not None and target.is_gpu:
        raise RecipeError(f"runtime.speculative: MTP speculative decoding runs on the cpu target's onnxruntime "
                          f"artifacts only; the {recipe.target} build stage does not build the verify and mtp "
                          "engines yet (remove runtime.speculative, or use target: cpu)")
    g = recipe.generation
    if g.temperature is not None:
        _number(g.temperature, "generation.temperature", integer=False, minimum=0)
    if g.top_p is not None:
        _number(g.top_p, "generation.top_p", integer=False, minimum=0, maximum=1, open_min=True)
    if g.top_k is not None:
        _number(g.top_k, "generation.top_k", integer=True, minimum=0)
    q = recipe.quantization
    _choice(q.weights, WEIGHT_PRECISIONS, "quantization.weights")
    _choice(q.experts, WEIGHT_PRECISIONS, "quantization.experts")
    _choice(q.kv_cache, KV_PRECISIONS, "quantization.kv_cache")
    _choice(q.fp8_granularity, FP8_GRANULARITIES, "quantization.fp8_granularity")
    _choice(q.int4_method, INT4_METHODS, "quantization.int4_method")
    if q.int4_cpu_accuracy_level not in INT4_CPU_ACCURACY_LEVELS:
        raise RecipeError(f"quantization.int4_cpu_accuracy_level: {q.int4_cpu_accuracy_level!r}; valid: "
                          f"{list(INT4_CPU_ACCURACY_LEVELS)} (0 and 1: fp32 activations, 4: int8 activations)")
    if any(not isinstance(k, str) or not k for k in q.keep):
        raise RecipeError(f"quantization.keep: expected a list of initializer-name patterns (strings, e.g. "
                          f"[lm_head, \"layers.0.*\"]), got {list(q.keep)!r}")
    _choice(q.lm_head, LM_HEAD_PRECISIONS, "quantization.lm_head")
    if q.lm_head != "none":
        kept = [k for k in q.keep if fnmatch.fnmatchcase("lm_head", k)]
        if kept:
            raise RecipeError(f"quantization.lm_head is {q.lm_head!r} but quantization.keep pattern {kept[0]!r} keeps "
                              "lm_head unquantized; drop one of them")
    c, gt = q.calibration, q.gate
    _number(c.tokens, "quantization.calibration.tokens", integer=True, minimum=1)
    _number(c.seq_len, "quantization.calibration.seq_len", integer=True, minimum=2)
    _number(c.batch, "quantization.calibration.batch", integer=True, minimum=1)
    _choice(c.ranges, RANGE_METHODS, "quantization.calibration.ranges")
    _number(c.percentile, "quantization.calibration.percentile", integer=False, minimum=50, maximum=100)
    _number(gt.tokens, "quantization.gate.tokens", integer=True, minimum=2)
    _number(gt.seq_len, "quantization.gate.seq_len", integer=True, minimum=2)
    if gt.top1_min is not None:
        _number(gt.top1_min, "quantization.gate.top1_min", integer=False, minimum=0, maximum=1)
    if gt.ppl_ratio_max is not None:
        _number(gt.ppl_ratio_max, "quantization.gate.ppl_ratio_max", integer=False, minimum=1)
    if gt.kl_mean_max is not None:
        _number(gt.kl_mean_max, "quantization.gate.kl_mean_max", integer=False, minimum=0)
    if gt.chunk is not None:
        _number(gt.chunk, "quantization.gate.chunk", integer=True, minimum=1)
    b = recipe.build
    _choice(b.hardware_compatibility, HARDWARE_COMPATIBILITY, "build.hardware_compatibility")
    _number(b.optimization_level, "build.optimization_level", integer=True, minimum=0, maximum=5)
    _number(b.workspace_gib, "build.workspace_gib", integer=False, minimum=0, open_min=True)
    if b.profiles is not None:
        _choice(b.profiles, PROFILE_MODES, "build.profiles")
    for cc in b.compute_capabilities:
        _choice(cc, RTX_COMPUTE_CAPABILITIES, "build.compute_capabilities")

    if not target.is_gpu:
        if recipe.build != BuildOptions():
            raise RecipeError(f"build: target {target.name!r} runs the ONNX graphs with onnxruntime and has no build "
                              "settings; remove the build section or choose a GPU target "
                              f"({[n for n in TARGETS if n != 'cpu']})")
    elif target.module == "tensorrt":
        if b.compute_capabilities:
            raise RecipeError(f"build.compute_capabilities: only for tensorrt_rtx targets; full TensorRT (target "
                              f"{target.name!r}) builds for the GPU it runs on; use build.hardware_compatibility")
    elif target.module == "tensorrt_rtx":
        if b.hardware_compatibility != "none":
            raise RecipeError(f"build.hardware_compatibility: only for full TensorRT targets; tensorrt_rtx target "
                              f"{target.name!r} uses build.compute_capabilities {list(RTX_COMPUTE_CAPABILITIES)}")
        if b.profiles == "split":
            raise RecipeError("build.profiles: 'split' (separate prefill and decode profiles in one engine) fails to "
                              "build with tensorrt_rtx 1.7.1 (Myelin CHECK(is_const()) whenever two profiles differ); "
                              "use 'single'")
        if b.compute_capabilities and target.compute_capability not in b.compute_capabilities:
            raise RecipeError(f"build.compute_capabilities: {list(b.compute_capabilities)} must include the target's "
                              f"own {target.compute_capability!r} ({target.name})")

    # precisions the target (every compute capability it is built for) can run
    ccs = recipe.compute_capabilities or (None,)
    for key, value in (("quantization.weights", q.weights), ("quantization.experts", q.experts),
                       ("quantization.kv_cache", q.kv_cache)):
        if value in ("none", "activation"):
            continue
        for cc in ccs:
            if value not in precisions_for(cc):
                need = {"fp8": "SM89+ (Ada, Hopper, Blackwell)", "fp4": "SM100+ (Blackwell)",
                        "int4": "SM80+"}[value]
                ok = [n for n, t in TARGET_TABLE.items() if t.is_gpu and value in t.precisions]
                raise RecipeError(f"{key}: {value} needs compute capability {need}, but target {target.name!r} "
                                  f"{'is' if cc == target.compute_capability else 'is also built for'} "
                                  f"SM{cc.replace('.', '')}; targets that can: {ok}")
    if recipe.export.activation_dtype == "bfloat16" and any(c and _cc(c) < (8, 0) for c in ccs):
        raise RecipeError("export.activation_dtype: bfloat16 needs SM80+; SM75 is in build.compute_capabilities")
    return recipe


def recipe_from_dict(data: Any, source: Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source or 'recipe'}: expected a mapping at the top level, got {type(data).__name__}")
    top = {f.name for f in dataclasses.fields(Recipe)} - {"source"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown}; valid keys: {sorted(top)}")
    for key in ("name", "checkpoint", "output"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RecipeError(f"{key}: required, a non-empty string (got {data.get(key)!r})")
    try:
        recipe = Recipe(
            name=data["name"],
            checkpoint=user_path(data["checkpoint"]),
            output=user_path(data["output"]),
            target=data.get("target", "cpu"),
            export=_section(ExportOptions, data.get("export"), "export"),
            runtime=_runtime_section(data.get("runtime")),
            generation=_section(GenerationOptions, data.get("generation"), "generation"),
            quantization=_quantization_section(data.get("quantization")),
            build=_build_section(data.get("build")),
            model_config=_optional_path(data.get("model_config"), "model_config"),
            source=source,
        )
    except TypeError as e:  # pragma: no cover - _section checks keys first
        raise RecipeError(str(e)) from e
    return validate(recipe)


def load_recipe(path: Path | str, *, checkpoint: Path | None = None, output: Path | None = None) -> Recipe:
    """Read a YAML recipe; `checkpoint` / `output` override the recipe's paths (CLI flags)."""
    path = user_path(path)
    if not path.is_file():
        recipes = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise RecipeError(f"recipe {path} does not exist" + (f"; recipes in {path.parent}: {recipes}" if recipes else ""))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    try:
        recipe = recipe_from_dict(data, source=path)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e
    if checkpoint is not None:
        recipe = dataclasses.replace(recipe, checkpoint=user_path(checkpoint))
    if output is not None:
        recipe = dataclasses.replace(recipe, output=user_path(output))
    return recipe


def describe_targets() -> str:
    """The target table as text (qcn-compile --targets)."""
    rows = [f"{'target':<13} {'module':<13} {'SM':<5} {'GiB':>7}  precisions       note"]
    for t in TARGET_TABLE.values():
        sm = t.compute_capability.replace(".", "") if t.compute_capability else "-"
        gib = f"{t.memory_gib:.1f}" if t.memory_gib else "-"
        rows.append(f"{t.name:<13} {t.module:<13} {sm:<5} {gib:>7}  {','.join(t.precisions):<16} {t.note}")
    return "\n".join(rows)
