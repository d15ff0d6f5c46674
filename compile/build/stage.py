"""The build stage: ONNX directory (export or passes stage) -> TensorRT engine + manifest.

Output directory (written atomically; the runtime loads it by its manifest):
  manifest.json      the export manifest with stage "build", runtime.backend "tensorrt",
                     graphs.*.file -> the engine, and a "build" section (see docs/BUILD.md)
  model.engine       one engine for both graphs (weights stored once), built from prefill.onnx
  model.timing_cache full TensorRT only: reused by the next build of this recipe
  tokenizer files, passes_report.json (what the passes stage lowered, docs/PASSES.md),
  accuracy.json (quantized recipes: the accuracy gate's report), engine_layers.json (the engine's layers)
The RTX runtime cache (`model.runtime_cache`) is JIT state made on the GPU: the runtime
backend writes it beside the engine on first use; the build only names it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil
import tempfile
from pathlib import Path

from qcn.artifact import (ArtifactError, BuildSection, GraphSpec, Manifest, NetworkIO, OnnxSource, ProfileSpec,
                          from_json, hash_files, parse_header, read_manifest, sha256_file, sha256_json, to_json,
                          write_manifest)

from ..artifacts import atomic_dir
from ..recipe import Recipe, RecipeError
from . import layers as layersb
from . import trt as trtb

log = logging.getLogger(__name__)

ENGINE = "model.engine"
TIMING_CACHE = "model.timing_cache"
RUNTIME_CACHE = "model.runtime_cache"
LAYERS = "engine_layers.json"  # the builder's layer report, parsed (compile/build/layers.py)
# reports of the passes stage the built artifact carries too: the accuracy gate's (compile/passes/quant/accuracy.py)
PASSES_REPORTS = ("accuracy.json",)
SOURCE_GRAPH = "prefill"  # T dynamic: serves decode (T = 1) as well


class OnnxMismatchError(RecipeError):
    """The ONNX directory is missing, modified, or was made by a different recipe."""


def export_identity(recipe_dict: dict) -> dict:
    """The parts of a recipe that decide the ONNX graphs."""
    return {"export": recipe_dict.get("export"), "quantization": recipe_dict.get("quantization")}


def load_onnx_dir(onnx_dir: Path, recipe: Recipe) -> Manifest:
    """The manifest of a passes directory, after checking it is whole and this recipe's."""
    mpath = Path(onnx_dir) / "manifest.json"
    if not mpath.is_file():
        raise OnnxMismatchError(f"{onnx_dir}: no manifest.json; run the passes stage first "
                                f"(qcn-compile {recipe.source or 'RECIPE'} --until passes)")
    try:
        m = read_manifest(onnx_dir, verify_hashes=False, require_files=False)
    except ArtifactError as e:
        raise OnnxMismatchError(f"{e}; re-run the passes stage") from None
    if m.stage != "passes" or m.passes is None:
        raise OnnxMismatchError(f"{mpath}: stage {m.stage!r}; the build stage reads a passes directory "
                                f"(qcn-compile {recipe.source or 'RECIPE'} --until passes)")
    if m.passes.module != recipe.target_info.module:
        raise OnnxMismatchError(f"{onnx_dir}: its passes ran for {m.passes.module!r}, target "
                                f"{recipe.target!r} needs {recipe.target_info.module!r}: re-run the passes stage")
    graph = m.graph(SOURCE_GRAPH).file
    for rel, digest in m.files.items():
        p = Path(onnx_dir) / rel
        if not p.is_file():
            raise OnnxMismatchError(f"{p}: missing (listed in {mpath}); re-run the passes stage")
        if (rel == graph or (rel.startswith("weights") and rel.endswith(".bin"))) and sha256_file(p) != digest:
            raise OnnxMismatchError(f"{p}: sha256 differs from {mpath}; the ONNX or its weights were modified, "
                                    "re-run the passes stage")
    recipe_had = m.recipe or {}
    want, have = export_identity(recipe.to_dict()), export_identity(to_json(recipe_had))
    if want != have:
        raise OnnxMismatchError(f"{onnx_dir} was exported by recipe {recipe_had.get('name')!r} with {have}; "
                                f"recipe {recipe.name!r} needs {want}: re-export (qcn-compile --force)")
    return m


def check_io(network_io: dict, graph_spec: GraphSpec, where: str) -> None:
    """The engine's network must have exactly the graph's inputs/outputs, with the same dtypes."""
    for kind in ("inputs", "outputs"):
        net = {t["name"]: t for t in network_io[kind]}
        man = {t.name: t for t in getattr(graph_spec, kind)}
        if list(net) != list(man):
            raise trtb.BuildError(f"{where}: network {kind} {list(net)} differ from the manifest's {list(man)}")
        for name, t in man.items():
            if net[name]["dtype"] != t.dtype:
                raise trtb.BuildError(f"{where}: {name!r} is {net[name]['dtype']} in the network, {t.dtype} in the manifest")
            if len(net[name]["shape"]) != len(t.shape):
                raise trtb.BuildError(f"{where}: {name!r} has rank {len(net[name]['shape'])} in the network, "
                                      f"{len(t.shape)} in the manifest")


def known_failure_hint(recipe: Recipe, error: str) -> str:
    """A measured TensorRT-RTX limitation behind ``error``, with the recipe change that avoids it
    (docs/BUILD.md, "Quantized graphs on TensorRT-RTX"); "" when none is known."""
    q = recipe.quantization
    if (recipe.target_info.module == "tensorrt_rtx" and "CHECK(is_constant())" in error
            and q.weights == "fp8" and q.fp8_granularity == "block128"):
        return ("\n  known TensorRT-RTX 1.7.1 limitation: FP8 1x128 block scales on a MatMul with a rank-3 activation "
                "crash Myelin (docs/BUILD.md); use quantization.fp8_granularity: channel")
    return ""


def build_stage(recipe: Recipe, onnx_dir: Path, out: Path, *, module_version: str | None = None,
                inputs_sha256: str | None = None, budget: dict | None = None, force: bool = False) -> Path:
    target = recipe.target_info
    if not target.is_gpu:
        raise RecipeError(f"target {target.name!r} has no build stage (onnxruntime runs the ONNX directly)")
    src = load_onnx_dir(onnx_dir, recipe)
    trt = trtb.import_module(target.module)
    source_graph = src.graph(SOURCE_GRAPH)
    onnx_path = Path(onnx_dir) / source_graph.file
    rt = recipe.runtime
    profiles = trtb.make_profiles(recipe.profile_mode, to_json(source_graph.inputs),
                                  prefill_chunk=rt.prefill_chunk, max_batch=rt.max_batch, max_context=rt.max_context)
    old_cache = Path(out) / TIMING_CACHE
    config = trtb.create_config(trt, profiles, workspace_gib=recipe.build.workspace_gib,
                                optimization_level=recipe.build.optimization_level,
                                compute_capabilities=recipe.compute_capabilities if target.module == "tensorrt_rtx" else (),
                                hardware_compatibility=recipe.build.hardware_compatibility,
                                timing_cache=old_cache if old_cache.is_file() else None)
    plugins: list[str] = []
    if src.passes.plugins:  # full TensorRT: the passes stage lowered qcn nodes to AOT plugins
        from .plugins import cc_int, register_plugins
        plugins = register_plugins(to_json(src.passes.plugins), cc_int(target.compute_capability))
    network_loader = trtb.NetworkFromOnnxPath(trt, onnx_path)
    io_box: dict = {}

    def network_and_check():
        builder, network, parser, logger = network_loader()
        io_box["io"] = trtb.network_io(trt, network)
        io_box["duplicate_names"] = logger.duplicate_names
        check_io(io_box["io"], source_graph, str(onnx_path))
        trtb.check_profiles(network, profiles)
        return builder, network, parser, logger

    with tempfile.TemporaryDirectory(prefix="qcn-build-") as scratch:
        new_cache = Path(scratch) / TIMING_CACHE if target.module == "tensorrt" else None
        try:
            engine, seconds, report = trtb.engine_bytes(trt, network_and_check, config, save_timing_cache=new_cache)
        except trtb.BuildError as e:
            raise trtb.BuildError(f"{e}{known_failure_hint(recipe, str(e))}") from e
        cache = new_cache.read_bytes() if new_cache is not None and new_cache.is_file() else None
    header = parse_header(engine)
    version = module_version or trt.__version__
    if header is not None:
        if header.size != len(engine):
            raise trtb.BuildError(f"engine header says {header.size} bytes, the build returned {len(engine)}")
        if not version.startswith(header.version):
            raise trtb.BuildError(f"engine header says TensorRT-RTX {header.version}, the module is {version}")
    log.info("built %s for %s in %.1fs (%.1f MB)", ENGINE, recipe.target, seconds, len(engine) / 1e6)
    layers = layersb.parse_layer_report(report) if report is not None else None
    if layers is None:
        log.warning("%s logged no layer report: the engine's layers and GEMM precisions are not recorded", trt.__name__)
    else:
        log.info("engine layers: %s", layersb.summary(layers))

    with atomic_dir(out, force=force, protect=[recipe.checkpoint]) as tmp:
        (tmp / ENGINE).write_bytes(engine)
        if cache:
            (tmp / TIMING_CACHE).write_bytes(cache)
        if layers is not None:
            (tmp / LAYERS).write_text(json.dumps({"source": f"{trt.__name__} {version} builder layer report",
                                                  "layers": layers}, indent=1))
        reports = ((src.passes.report,) if src.passes.report else ()) + tuple(f for f in PASSES_REPORTS if f in src.files)
        for f in src.tokenizer.files + reports:
            shutil.copyfile(Path(onnx_dir) / f, tmp / f)  # tokenizer; the passes' reports (what was lowered, accuracy)
        recipe_dict = recipe.to_dict()
        build = BuildSection(
            target=target.name, module=target.module, module_version=version,
            compute_capability=target.compute_capability,
            compute_capabilities=tuple(recipe.compute_capabilities) if target.module == "tensorrt_rtx" else (),
            hardware_compatibility=recipe.build.hardware_compatibility if target.module == "tensorrt" else None,
            optimization_level=recipe.build.optimization_level, workspace_gib=recipe.build.workspace_gib,
            engine=ENGINE, engine_bytes=len(engine), engine_sha256=sha256_file(tmp / ENGINE),
            engine_header=header,
            profile_mode=recipe.profile_mode,
            profiles=tuple(from_json(ProfileSpec, dict(p.to_dict(), index=i), "build profiles")
                           for i, p in enumerate(profiles)),
            graph_profile={g: i for i, p in enumerate(profiles) for g in p.graphs},
            # read from the parsed network the engine was built from: no engine can be
            # deserialized without a GPU (docs/FINDINGS.md)
            io=from_json(NetworkIO, io_box["io"], "network io"), io_source="network",
            # tensorrt_rtx: none, qcn ops are inlined from their ONNX function bodies
            plugins=tuple(plugins),
            onnx=OnnxSource(graph=onnx_path.name, sha256=src.files[onnx_path.name],
                            weights_sha256=src.files.get("weights.bin"), stage=src.stage),
            timing_cache=TIMING_CACHE if cache else None,
            runtime_cache=RUNTIME_CACHE if target.module == "tensorrt_rtx" else None,
            build_seconds=round(seconds, 2),
            budget=budget,
            layers=dict(layersb.summary(layers), file=LAYERS) if layers is not None else None,
        )
        manifest = dataclasses.replace(
            src, stage="build",
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            recipe=recipe_dict, recipe_sha256=sha256_json(recipe_dict),
            runtime=dataclasses.replace(src.runtime, backend=target.backend),
            graphs={name: dataclasses.replace(g, file=ENGINE) for name, g in src.graphs.items()},
            build=build, inputs_sha256=inputs_sha256, files=hash_files(tmp))
        write_manifest(tmp, manifest)
    return Path(out)
