"""The compile pipeline: recipe -> validated checkpoint -> ONNX artifact with its manifest."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from importlib import metadata
from pathlib import Path

import onnx

from .artifacts import atomic_dir, sha256_file, sha256_json
from .export.checkpoint import open_checkpoint
from .export.config import ModelConfig, load_model_config
from .export.modeling import rope_tables
from .export.onnx_export import GRAPHS, export_graphs, state_layout
from .recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "qcn-artifact", 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt")
CARD_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 40}  # Qwen3-Coder-Next model card
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64"}


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _io(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims})
    return out


def _tokenizer_section(ckpt_dir: Path, cfg: ModelConfig) -> tuple[dict, dict]:
    files = [f for f in TOKENIZER_FILES if (ckpt_dir / f).is_file()]
    if "tokenizer.json" not in files:
        raise RecipeError(f"checkpoint {ckpt_dir} has no tokenizer.json (the runtime needs it)")
    gen = json.loads((ckpt_dir / "generation_config.json").read_text()) if "generation_config.json" in files else {}
    eos = gen.get("eos_token_id", list(cfg.eos_token_id))
    eos = [eos] if isinstance(eos, int) else list(eos)
    tok_cfg = json.loads((ckpt_dir / "tokenizer_config.json").read_text()) if "tokenizer_config.json" in files else {}
    section = {"files": files, "eos_token_ids": eos, "bos_token_id": cfg.bos_token_id,
               "pad_token_id": gen.get("pad_token_id", cfg.pad_token_id),
               "chat_template": bool(tok_cfg.get("chat_template"))}
    return section, gen


def _generation(recipe: Recipe, gen_config: dict) -> dict:
    out = {}
    for key, card in CARD_SAMPLING.items():
        value = getattr(recipe.generation, key)
        out[key] = value if value is not None else gen_config.get(key, card)
    return out


def check_recipe_against_model(recipe: Recipe, cfg: ModelConfig) -> None:
    if recipe.runtime.max_context > cfg.max_position_embeddings:
        raise RecipeError(f"runtime.max_context {recipe.runtime.max_context} exceeds the checkpoint's "
                          f"max_position_embeddings {cfg.max_position_embeddings}")


def compile_recipe(recipe: Recipe, *, progress: bool = False) -> Path:
    """Run the export stage of `recipe`; returns the artifact directory."""
    ckpt_dir = Path(recipe.checkpoint)
    cfg = load_model_config(ckpt_dir)
    checkpoint = open_checkpoint(ckpt_dir)
    checkpoint.validate(cfg)
    check_recipe_against_model(recipe, cfg)
    if checkpoint.mtp_names:
        log.info("checkpoint has %d MTP tensors (mtp.*); kept aside, not exported yet", len(checkpoint.mtp_names))
    tokenizer, gen_config = _tokenizer_section(ckpt_dir, cfg)
    rope = rope_tables(cfg)
    act = recipe.export.activation_dtype

    with atomic_dir(recipe.output) as tmp:
        paths = export_graphs(cfg, checkpoint, rope, tmp, activation_dtype=act, logits=recipe.export.logits,
                              opset=recipe.export.opset, progress=progress)
        for f in tokenizer["files"]:
            shutil.copyfile(ckpt_dir / f, tmp / f)
        graphs = {}
        for name in GRAPHS:
            proto = onnx.load(str(paths[name]), load_external_data=False)
            graphs[name] = {"file": paths[name].name, "logits": recipe.export.logits,
                            "inputs": _io(proto.graph.input), "outputs": _io(proto.graph.output)}
        recipe_dict = recipe.to_dict()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "stage": "export",
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "qcn_version": _version("qcn"),
            "tools": {p: _version(p) for p in ("torch", "onnx", "onnxscript", "onnx-ir", "transformers")},
            "recipe": recipe_dict, "recipe_sha256": sha256_json(recipe_dict),
            "checkpoint": {"path": str(ckpt_dir.resolve()), "config_sha256": sha256_file(ckpt_dir / "config.json"),
                           "mtp_tensors": list(checkpoint.mtp_names)},
            "model": {"architecture": "Qwen3NextForCausalLM", "vocab_size": cfg.vocab_size,
                      "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
                      "layer_types": list(cfg.layer_types), "activation_dtype": act,
                      "max_context": recipe.runtime.max_context},
            "tokenizer": tokenizer,
            "generation": _generation(recipe, gen_config),
            "runtime": {"backend": recipe.runtime.backend, "prefill_chunk": recipe.runtime.prefill_chunk,
                        "max_batch": recipe.runtime.max_batch},
            "graphs": graphs,
            "state": [{"layer": s.layer, "kind": s.kind, "input": s.input, "output": s.output,
                       "shape": list(s.shape), "dtype": s.dtype} for s in state_layout(cfg, act)],
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s", recipe.output)
    return Path(recipe.output)
