"""The compile pipeline: recipe -> export (ONNX) -> passes -> build (TensorRT engine).

Stage directories: for the cpu target the export directory *is* the artifact (`recipe.output`).
For GPU targets export and passes go to `<output>.stages/{export,passes}` and the build writes
`recipe.output`. Each stage's manifest records `inputs_sha256`; `run_pipeline` skips a stage
whose directory is whole and whose inputs did not change."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import shutil
from importlib import metadata
from pathlib import Path

import onnx

from qcn.artifact import (FORMAT, FORMAT_VERSION, STAGES, ArtifactError, CheckpointInfo, GenerationDefaults, GraphSpec,
                          Manifest, ModelSpec, RuntimeSpec, StateSpec, TensorSpec, TokenizerSpec, from_onnx, hash_files,
                          read_manifest, sha256_file, sha256_json, write_manifest)

from .artifacts import HashCache, atomic_dir, default_cache_path
from .export.checkpoint import open_checkpoint
from .export.fp8 import fp8_roles
from .export.config import CheckpointError, ModelConfig, load_model_config
from .export.modeling import rope_tables
from .export.onnx_export import GRAPHS, export_graphs, state_layout
from .recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt")
CARD_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 40}  # Qwen3-Coder-Next model card


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _io(values) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        out.append(TensorSpec(name=v.name, dtype=from_onnx(t.elem_type), shape=dims))
    return tuple(out)


def tokenizer_section(ckpt_dir: Path, cfg: ModelConfig) -> tuple[TokenizerSpec, dict]:
    """The manifest's tokenizer section (and generation_config.json) of a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    files = [f for f in TOKENIZER_FILES if (ckpt_dir / f).is_file()]
    if "tokenizer.json" not in files:
        raise RecipeError(f"checkpoint {ckpt_dir} has no tokenizer.json (the runtime needs it)")
    try:
        gen = json.loads((ckpt_dir / "generation_config.json").read_text()) if "generation_config.json" in files else {}
    except ValueError as e:
        raise CheckpointError(f"{ckpt_dir / 'generation_config.json'}: not readable JSON: {e}") from None
    eos = gen.get("eos_token_id")
    eos = list(cfg.eos_token_id) if eos is None else [eos] if isinstance(eos, int) else list(eos)
    tok_cfg = json.loads((ckpt_dir / "tokenizer_config.json").read_text()) if "tokenizer_config.json" in files else {}
    added = json.loads((ckpt_dir / "tokenizer.json").read_text()).get("added_tokens", [])
    section = TokenizerSpec(files=tuple(files), eos_token_ids=tuple(eos), bos_token_id=cfg.bos_token_id,
                            pad_token_id=gen.get("pad_token_id", cfg.pad_token_id),
                            chat_template=bool(tok_cfg.get("chat_template")),
                            special_tokens={t["content"]: t["id"] for t in added if t.get("special")})
    return section, gen


def _generation(recipe: Recipe, gen_config: dict) -> GenerationDefaults:
    out = {}
    for key, card in CARD_SAMPLING.items():
        value = getattr(recipe.generation, key)
        out[key] = value if value is not None else gen_config.get(key, card)
    return GenerationDefaults(**out)


def check_recipe_against_model(recipe: Recipe, cfg: ModelConfig) -> None:
    if recipe.runtime.max_context > cfg.max_position_embeddings:
        raise RecipeError(f"runtime.max_context {recipe.runtime.max_context} exceeds the checkpoint's "
                          f"max_position_embeddings {cfg.max_position_embeddings}")


def compile_recipe(recipe: Recipe, *, progress: bool = False, out: Path | None = None,
                   inputs_sha256: str | None = None, force: bool = False,
                   hash_cache: HashCache | None = None) -> Path:
    """Run the export stage of `recipe` into `out` (default `recipe.output`); returns it.
    Everything the runtime would refuse is refused before any work; `out` may replace an
    existing directory only if it is a qcn artifact, or (`force`) anything but the checkpoint."""
    from .build.preflight import checkpoint_problems

    out = Path(out) if out is not None else Path(recipe.output)
    ckpt_dir = Path(recipe.checkpoint)
    cfg = load_model_config(ckpt_dir)
    checkpoint = open_checkpoint(ckpt_dir)
    checkpoint.validate(cfg)
    check_recipe_against_model(recipe, cfg)
    problems, _ = checkpoint_problems(recipe)
    if problems:
        raise RecipeError(f"recipe {recipe.name!r} cannot be exported: " + "; ".join(problems))
    if checkpoint.mtp_names:
        log.info("checkpoint has %d MTP tensors (mtp.*); kept aside, not exported yet", len(checkpoint.mtp_names))
    tokenizer, gen_config = tokenizer_section(ckpt_dir, cfg)
    rope = rope_tables(cfg)
    act = recipe.export.activation_dtype
    cache = hash_cache if hash_cache is not None else HashCache()
    ckpt_files = checkpoint_fingerprint(ckpt_dir, cache, progress=progress)

    with atomic_dir(out, force=force, protect=[ckpt_dir]) as tmp:
        written = tmp
        paths = export_graphs(cfg, checkpoint, rope, tmp, activation_dtype=act, logits=recipe.export.logits,
                              opset=recipe.export.opset, progress=progress,
                              allow_nonfinite=recipe.export.allow_nonfinite,
                              fp8_roles=fp8_roles(recipe.quantization.weights, recipe.quantization.experts))
        for f in tokenizer.files:
            shutil.copyfile(ckpt_dir / f, tmp / f)
        graphs = {}
        for name in GRAPHS:
            proto = onnx.load(str(paths[name]), load_external_data=False)
            graphs[name] = GraphSpec(file=paths[name].name, logits=recipe.export.logits,
                                     inputs=_io(proto.graph.input), outputs=_io(proto.graph.output))
        recipe_dict = recipe.to_dict()
        manifest = Manifest(
            format=FORMAT, format_version=FORMAT_VERSION, stage="export",
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            qcn_version=_version("qcn"),
            tools={p: _version(p) for p in ("torch", "onnx", "onnxscript", "onnx-ir", "transformers")},
            recipe=recipe_dict, recipe_sha256=sha256_json(recipe_dict),
            checkpoint=CheckpointInfo(path=str(ckpt_dir.resolve()), config_sha256=sha256_file(ckpt_dir / "config.json"),
                                      files_sha256=ckpt_files, mtp_tensors=tuple(checkpoint.mtp_names)),
            model=ModelSpec(architecture="Qwen3NextForCausalLM", vocab_size=cfg.vocab_size,
                            hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
                            layer_types=tuple(cfg.layer_types), activation_dtype=act,
                            max_context=recipe.runtime.max_context),
            tokenizer=tokenizer,
            generation=_generation(recipe, gen_config),
            runtime=RuntimeSpec(backend=recipe.runtime.backend, prefill_chunk=recipe.runtime.prefill_chunk,
                                max_batch=recipe.runtime.max_batch),
            graphs=graphs,
            state=tuple(StateSpec(layer=s.layer, kind=s.kind, input=s.input, output=s.output, shape=tuple(s.shape),
                                  dtype=s.dtype) for s in state_layout(cfg, act)),
            files=hash_files(tmp, hasher=cache.sha256),
            inputs_sha256=inputs_sha256,
        )
        write_manifest(tmp, manifest)
    cache.moved(written, out)  # the files keep their inodes and times: the next no-op compile reads nothing
    if hash_cache is None:
        cache.save()
    log.info("wrote %s", out)
    return out


# ---------------------------------------------------------------------------------------
# stages



def stage_dirs(recipe: Recipe) -> dict[str, Path]:
    """The cpu target's artifact is the passes directory (onnxruntime runs it; no build stage);
    GPU targets' is the build's. Earlier stages go to `<output>.stages/`."""
    out = Path(recipe.output)
    base = out if out.name else out.absolute()  # "." or "/": the output checks refuse it with its own message
    work = base.with_name(base.name + ".stages") if base.name else base / ".stages"
    if not recipe.target_info.is_gpu:
        return {"export": work / "export", "passes": out}
    return {"export": work / "export", "passes": work / "passes", "build": out}


CHECKPOINT_FILES = ("config.json", "model.safetensors.index.json") + TOKENIZER_FILES


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Every checkpoint file the export reads or copies: config.json, the index, every
    *.safetensors shard, the tokenizer and generation_config files."""
    ckpt_dir = Path(ckpt_dir)
    named = [ckpt_dir / f for f in CHECKPOINT_FILES if (ckpt_dir / f).is_file()]
    return sorted(named + list(ckpt_dir.glob("*.safetensors")), key=lambda p: p.name)


def checkpoint_fingerprint(ckpt_dir: Path, cache: HashCache | None = None, *, progress: bool = False) -> dict[str, str]:
    """sha256 of the bytes of every file in `checkpoint_files`, by name. With a `cache` an
    unchanged file (same path, size, mtime_ns, ctime_ns, inode) is not read again; any write
    to a file changes its times, so a changed byte is always seen."""
    cache = cache if cache is not None else HashCache()
    files = checkpoint_files(ckpt_dir)
    todo = sum(p.stat().st_size for p in files if cache.lookup(p)[0] is None)
    bar = None
    if progress and todo > 1 << 30:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="B", unit_scale=True, desc=f"hashing {Path(ckpt_dir).name}", leave=False)
    try:
        return {p.name: cache.sha256(p, progress=bar) for p in files}
    finally:
        if bar is not None:
            bar.close()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of qcn's own Python sources (the compiler is an input too: an edited exporter
    with an unchanged version number must not reuse the old ONNX)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for base in (root, root.parent):
        pattern = "**/*.py" if base == root else "*.py"
        for p in sorted(base.glob(pattern)):
            h.update(str(p.relative_to(base)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def export_inputs(recipe: Recipe, cache: HashCache | None = None, *, progress: bool = False) -> str:
    """The export stage's skip key: the recipe (minus paths and build settings), the bytes of
    every checkpoint file the export reads, qcn's sources and version, the export tools' versions."""
    d = recipe.to_dict()
    for k in ("source", "output", "build", "model_config", "checkpoint", "target"):  # not in the ONNX
        d.pop(k, None)
    return sha256_json({"recipe": d, "checkpoint": checkpoint_fingerprint(recipe.checkpoint, cache, progress=progress),
                        "qcn": _version("qcn"), "qcn_code": code_fingerprint(),
                        "tools": {p: _version(p) for p in ("torch", "onnx", "onnxscript")}})


def _manifest(d: Path) -> Manifest | None:
    """The stage directory's manifest, or None where there is none this qcn can read."""
    try:
        return read_manifest(d, verify_hashes=False)
    except ArtifactError as e:
        if Path(d).exists():
            log.info("%s: %s", d, e)
        return None


def up_to_date(d: Path, inputs_sha256: str, cache: HashCache | None = None) -> bool:
    """The stage directory exists, was made from these inputs and its files are unchanged."""
    m = _manifest(d)
    if not m or m.inputs_sha256 != inputs_sha256:
        return False
    cache = cache if cache is not None else HashCache()
    for rel, digest in m.files.items():
        p = Path(d) / rel
        if not p.is_file() or cache.sha256(p) != digest:
            log.warning("%s: %s changed since it was written; redoing the stage", d, rel)
            return False
    return True


def passes_inputs(recipe: Recipe, export_manifest: Manifest | None) -> str:
    """The passes stage's skip key: the export's files, the target's pass plan, quantization,
    qcn's sources and version."""
    from .passes.plan import plan_identity

    return sha256_json({"input_files": dict(export_manifest.files) if export_manifest else None,
                        "passes": plan_identity(recipe.target_info.module), "qcn": _version("qcn"),
                        "qcn_code": code_fingerprint(),
                        "quantization": dataclasses.asdict(recipe.quantization)})


def passes_stage(recipe: Recipe, export_dir: Path, out: Path, inputs_sha256: str, *, force: bool = False,
                 hash_cache: HashCache | None = None) -> Path:
    """Run the target's pass plan (compile/passes/plan.py) over the export directory into `out`:
    the graphs after each pass, passes_report.json and a manifest with stage "passes"."""
    from .passes.stage import files_section, run_passes

    src = _manifest(export_dir)
    if src is None or src.stage != "export":
        raise RecipeError(f"{export_dir}: not an export directory (no manifest with stage 'export'); "
                          f"run qcn-compile {recipe.source or 'RECIPE'} --until export")
    cache = hash_cache if hash_cache is not None else HashCache()
    with atomic_dir(out, force=force, protect=[recipe.checkpoint]) as tmp:
        written = tmp
        section = run_passes(Path(export_dir), tmp, recipe.target_info.module, src, cache)
        graphs, state = retyped_io(src, tmp)
        write_manifest(tmp, dataclasses.replace(
            src, stage="passes", passes=section, inputs_sha256=inputs_sha256, graphs=graphs, state=state,
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            files=files_section(tmp, cache)))
    cache.moved(written, out)
    log.info("wrote %s", out)
    return out


def retyped_io(src: Manifest, out: Path) -> tuple[dict[str, GraphSpec], tuple[StateSpec, ...]]:
    """The graphs' inputs/outputs and the state dtypes as the passes left them in ``out``: a pass
    may retype graph I/O (the FP8 KV cache: past_key.i / new_key.i become float8_e4m3fn), and the
    runtime allocates its buffers from the manifest. A state's dtype is its graph input's."""
    graphs = {}
    for name, g in src.graphs.items():
        proto = onnx.load(str(Path(out) / g.file), load_external_data=False)
        graphs[name] = dataclasses.replace(g, inputs=_io(proto.graph.input), outputs=_io(proto.graph.output))
    first = next(iter(graphs.values()))
    dtypes = {t.name: t.dtype for t in first.inputs}
    for g in graphs.values():
        for t in g.outputs:
            s = next((s for s in src.state if s.output == t.name), None)
            if s is not None and dtypes.get(s.input) != t.dtype:
                raise RecipeError(f"passes left state {s.input!r} as {dtypes.get(s.input)} but graph {g.file} "
                                  f"returns {t.name!r} as {t.dtype}")
    return graphs, tuple(dataclasses.replace(s, dtype=dtypes.get(s.input, s.dtype)) for s in src.state)


@dataclasses.dataclass
class PipelineResult:
    output: Path  # the last stage's directory
    dirs: dict[str, Path]
    ran: list[str]
    skipped: list[str]
    preflight: object | None = None


def run_pipeline(recipe: Recipe, *, until: str = "build", force: bool = False, progress: bool = False,
                 preflight_report=None, hash_cache: HashCache | None = None) -> PipelineResult:
    """Run the recipe's stages up to `until`, skipping up-to-date ones (unless `force`).
    Before any stage runs, the recipe is preflighted: output paths, the checkpoint against what
    the runtime refuses at load, and for GPU targets budget, passes and TensorRT module.
    `force`: redo every stage, and let the outputs replace anything but the checkpoint.
    `hash_cache`: where file hashes are remembered (default `default_cache_path()`)."""
    if until not in STAGES:
        raise RecipeError(f"--until {until!r}: choose one of {list(STAGES)}")
    dirs = stage_dirs(recipe)
    report = preflight_report
    if report is None:
        from .build.preflight import check

        report = check(recipe, check_module=until == "build", force=force)
    cache = hash_cache if hash_cache is not None else HashCache(default_cache_path())
    work = dirs["export"].parent  # <output>.stages
    made_work = not work.exists()
    try:
        return _run_stages(recipe, dirs, until, force, progress, report, cache)
    finally:
        cache.save()
        if made_work and work.is_dir() and not any(work.iterdir()):  # failed or interrupted: nothing of ours left
            work.rmdir()


def _run_stages(recipe, dirs, until, force, progress, report, cache) -> PipelineResult:
    stages = [s for s in STAGES[: STAGES.index(until) + 1] if s in dirs]
    ran, skipped = [], []
    prev = None
    for stage in stages:
        if stage == "export":
            key = export_inputs(recipe, cache, progress=progress)
        else:
            m = _manifest(dirs[prev])
            if stage == "passes":
                key = passes_inputs(recipe, m)
            else:
                key = sha256_json({"input_files": dict(m.files) if m else None,
                                   "recipe": {k: v for k, v in recipe.to_dict().items()
                                              if k not in ("source", "output", "checkpoint")},
                                   "module_version": report.module_version})
        if not force and up_to_date(dirs[stage], key, cache):
            log.info("stage %s: up to date (%s)", stage, dirs[stage])
            skipped.append(stage)
        else:
            if stage == "export":
                compile_recipe(recipe, progress=progress, out=dirs[stage], inputs_sha256=key, force=force,
                               hash_cache=cache)
            elif stage == "passes":
                passes_stage(recipe, dirs[prev], dirs[stage], key, force=force, hash_cache=cache)
            else:
                from .build.stage import build_stage

                budget = report.budget.to_dict() if report.budget else None
                build_stage(recipe, dirs[prev], dirs[stage], module_version=report.module_version,
                            inputs_sha256=key, budget=budget, force=force)
            ran.append(stage)
        prev = stage
    return PipelineResult(output=dirs[stages[-1]], dirs=dirs, ran=ran, skipped=skipped, preflight=report)
