"""Checks a recipe before any work: output paths, the checkpoint against everything the runtime
will refuse at load, memory budget, quantization passes, TensorRT module.

`qcn.compile.recipe.validate` already checked the schema and the precision against the
target's compute capability (load time). These checks need the file system, config.json or an
import. The runtime's own load-time rules come from `qcn.support` (one definition, both sides).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ...support import state_dtype_problems, token_id_problems, tokenizer_vocab_problems
from ..artifacts import OutputError, check_output
from ..export.config import CheckpointError, ModelConfig, load_model_config
from ..recipe import Recipe, RecipeError
from .budget import Budget, compute_budget, fixes

# full TensorRT >= 10.9: strongly typed networks, tensorrt.plugin with AOT Triton kernels
MIN_TENSORRT = (10, 9)
INSTALL = {
    "tensorrt_rtx": "pip install tensorrt-rtx  (TensorRT for RTX 1.7+; builds CPU-only for "
                    "SM75/80/86/89/120/121; CUDA 13 wheels)",
    "tensorrt": "full TensorRT >= 10.9 from NVIDIA: pip install 'tensorrt>=10.9' on Linux x86_64/aarch64 with a "
                "CUDA 12/13 driver (or the TensorRT container / tarball from developer.nvidia.com/tensorrt)",
}


class PreflightError(RecipeError):
    """A recipe that cannot be built as it is; `.report` has the budget and every problem."""

    def __init__(self, message: str, report: "Preflight"):
        super().__init__(message)
        self.report = report


@dataclass
class Preflight:
    recipe: Recipe
    config_source: Path | None = None
    budget: Budget | None = None
    problems: list[str] = field(default_factory=list)
    module_version: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = [f"recipe {self.recipe.name}: target {self.recipe.target} ({self.recipe.target_info.module})"]
        if self.config_source:
            out.append(f"sized from {self.config_source / 'config.json'}")
        if self.budget:
            out.append(self.budget.table())
        out += [f"problem: {p}" for p in self.problems] or ["preflight: ok"]
        return "\n".join(out)


def model_config_for(recipe: Recipe) -> tuple[ModelConfig, Path]:
    """The checkpoint's config.json, else the recipe's model_config (a checkpoint not yet downloaded)."""
    for d in (recipe.checkpoint, recipe.model_config):
        if d is not None and (Path(d) / "config.json").is_file():
            return load_model_config(d), Path(d)
    where = [str(Path(d) / "config.json") for d in (recipe.checkpoint, recipe.model_config) if d is not None]
    raise RecipeError(f"no config.json to size the model with (looked at {where}); download the checkpoint "
                      "or set model_config: to a directory with its config.json")


def module_status(module: str) -> tuple[str | None, str | None]:
    """(version, problem) of a TensorRT Python module, without importing CUDA-heavy parts twice."""
    if importlib.util.find_spec(module) is None:
        return None, f"python module {module!r} is not installed; install it: {INSTALL[module]}"
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # a broken install (missing libnvinfer, wrong CUDA) surfaces here
        return None, f"python module {module!r} is installed but cannot be imported ({e}); reinstall: {INSTALL[module]}"
    version = getattr(mod, "__version__", "0")
    if module == "tensorrt":
        parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
        if parts < MIN_TENSORRT:
            return version, f"tensorrt {version} is too old; qcn needs >= 10.9: {INSTALL['tensorrt']}"
    return version, None


def quantization_problems(recipe: Recipe) -> list[str]:
    """Each quantization setting no pass of the target's module implements (the pass table says
    which exist: compile/passes/plan.py ``provides``), and what a quantized recipe needs: a
    calibration source that exists."""
    from ..passes.plan import missing_passes

    q, module = recipe.quantization, recipe.target_info.module
    out = []
    for key, value, modules in missing_passes(module, q):
        default = "activation" if key == "kv_cache" else "none"
        where = (f"it exists for {modules} targets only, not {module} ({recipe.target})" if modules
                 else "no pass implements it yet")
        out.append(f"quantization.{key}: {value} needs a quantization pass for it, and {where}; qcn will not fake it: "
                   f"use {default} (the activation dtype)" + (" or a target whose module has the pass" if modules else ""))
    if q.active:
        src = q.calibration.source
        if src is None:
            out.append("quantization.calibration.source: required when anything is quantized: a text file or a folder "
                       "of text files (held-out text: activation ranges and the accuracy gate are measured on it)")
        elif not Path(src).exists():
            out.append(f"quantization.calibration.source: {src} does not exist (a text file or a folder of text files)")
    return out


def output_problems(recipe: Recipe, *, force: bool = False) -> list[str]:
    """Every directory the pipeline writes must be free, a qcn artifact, or (--force) anything
    but the checkpoint / the current directory / a directory holding them."""
    from ..pipeline import stage_dirs

    out = []
    for d in dict.fromkeys(stage_dirs(recipe).values()):
        try:
            check_output(d, force=force, protect=[recipe.checkpoint])
        except OutputError as e:
            out.append(str(e))
    return out


def checkpoint_problems(recipe: Recipe) -> tuple[list[str], ModelConfig | None]:
    """The checkpoint against everything the runtime would refuse when it loads the artifact
    (EOS/BOS/PAD ids, tokenizer ids vs vocab_size, state dtypes of the target's backend), and
    what the export itself would refuse (config.json, rope_type, shards, tensor shapes)."""
    from ..export.checkpoint import open_checkpoint
    from ..export.onnx_export import state_layout
    from ..pipeline import tokenizer_section

    ckpt = Path(recipe.checkpoint)
    try:
        cfg = load_model_config(ckpt)
        open_checkpoint(ckpt).validate(cfg)
        tok, _gen = tokenizer_section(ckpt, cfg)
    except (CheckpointError, RecipeError) as e:
        return [str(e)], None
    where = f"checkpoint {ckpt}"
    problems = []
    if recipe.runtime.max_context > cfg.max_position_embeddings:
        problems.append(f"runtime.max_context {recipe.runtime.max_context} exceeds the checkpoint's "
                        f"max_position_embeddings {cfg.max_position_embeddings}")
    ids = token_id_problems(cfg.vocab_size, tok.eos_token_ids, tok.bos_token_id, tok.pad_token_id)
    if not tok.eos_token_ids:
        problems.append(f"{where} has no EOS token id (eos_token_id in generation_config.json or config.json): "
                        "the runtime needs one to end a generation")
        ids = [p for p in ids if p[0] != "tokenizer.eos_token_ids"]
    problems += [f"{where}: {key}: {msg} (config.json / generation_config.json)" for key, msg in ids]
    try:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        max_id = max(tk.get_vocab(with_added_tokens=True).values(), default=-1)
        problems += [f"{where}: {msg}" for _key, msg in tokenizer_vocab_problems(max_id, cfg.vocab_size)]
    except Exception as e:  # tokenizers raises plain Exception subclasses; the runtime refuses it the same way
        problems.append(f"{ckpt / 'tokenizer.json'}: the runtime cannot load it: {e}")
    states = [(s.input, s.dtype) for s in state_layout(cfg, recipe.export.activation_dtype)]
    for _key, msg in state_dtype_problems(recipe.target_info.backend, states):
        problems.append(f"export.activation_dtype: {recipe.export.activation_dtype} on target {recipe.target!r}: {msg}; "
                        f"use float32" + (" or a GPU target" if not recipe.target_info.is_gpu else ""))
    return problems, cfg


def preflight(recipe: Recipe, *, cfg: ModelConfig | None = None, check_module: bool = True,
              force: bool = False) -> Preflight:
    """Every check that can fail a build before it starts. Never raises for a problem it can
    describe: call `.raise_if_problems()` (or use `check`). `force`: the output may replace
    anything but the checkpoint (see `qcn.compile.artifacts.check_output`)."""
    report = Preflight(recipe)
    target = recipe.target_info
    report.problems += output_problems(recipe, force=force)
    ckpt_ok = True
    if Path(recipe.checkpoint).is_dir():
        problems, src_cfg = checkpoint_problems(recipe)
        report.problems += problems
        ckpt_ok = src_cfg is not None
        if cfg is None and src_cfg is not None:
            cfg, report.config_source = src_cfg, Path(recipe.checkpoint)
    elif not target.is_gpu or recipe.model_config is None:
        report.problems.append(f"checkpoint {recipe.checkpoint}: no such directory (a Hugging Face checkpoint "
                               "directory with config.json, *.safetensors and tokenizer.json)")
        ckpt_ok = False
    if not target.is_gpu:
        report.problems += quantization_problems(recipe)
        return report
    if cfg is None and ckpt_ok:
        try:
            cfg, report.config_source = model_config_for(recipe)
        except (RecipeError, CheckpointError) as e:
            report.problems.append(str(e))
        if cfg is not None and recipe.runtime.max_context > cfg.max_position_embeddings:
            report.problems.append(f"runtime.max_context {recipe.runtime.max_context} exceeds the model's "
                                   f"max_position_embeddings {cfg.max_position_embeddings}")
    if cfg is not None:
        report.budget = compute_budget(recipe, cfg)
        if not report.budget.fits:
            b = report.budget
            options = fixes(recipe, cfg)
            msg = (f"does not fit: needs {b.total_gib:.1f} GiB on one {target.name} ({b.available_gib:.1f} GiB usable)")
            if options:
                msg += f"; cheapest fix: {options[0]}" + (f"; other options: {'; '.join(options[1:])}" if options[1:] else "")
            else:
                msg += "; nothing in this recipe's reach makes it fit on one GPU"
            report.problems.append(msg)
    report.problems += quantization_problems(recipe)
    if check_module:
        report.module_version, problem = module_status(target.module)
        if problem:
            report.problems.append(problem)
    return report


def check(recipe: Recipe, **kwargs) -> Preflight:
    """preflight() that raises PreflightError listing every problem (budget table included)."""
    report = preflight(recipe, **kwargs)
    if report.problems:
        raise PreflightError(f"recipe {recipe.name!r} cannot be built:\n  - " + "\n  - ".join(report.problems)
                             + ("\n" + report.budget.table() if report.budget else ""), report)
    return report
