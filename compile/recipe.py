"""Recipes: the one place YAML is read. A recipe becomes a frozen `Recipe`; every unknown key
or bad value is a `RecipeError` naming the key and what would be valid.

Relative paths in a recipe are resolved against the current working directory (users run
`qcn-compile recipes/x.yaml` from the repository root).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TARGETS = ("cpu",)  # GPU targets arrive with the TensorRT build stage
BACKENDS = {"cpu": ("onnxruntime",)}
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
LOGITS_MODES = ("last", "all")
OPSETS = (23,)


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 23
    activation_dtype: str = "float32"
    logits: str = "last"  # "last": logits of the last token only; "all": every token (tests)


@dataclass(frozen=True)
class RuntimeOptions:
    backend: str = "onnxruntime"
    prefill_chunk: int = 64  # tokens per prefill call
    max_batch: int = 4  # sequences decoded together
    max_context: int = 4096  # prompt + generated tokens per sequence


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling defaults written to the manifest; None = take the checkpoint's generation_config.json
    (and the model card's 1.0 / 0.95 / 40 where that has none)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    checkpoint: Path
    output: Path
    target: str = "cpu"
    export: ExportOptions = field(default_factory=ExportOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    source: Path | None = None  # the YAML file it was read from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoint"], d["output"] = str(self.checkpoint), str(self.output)
        d["source"] = str(self.source) if self.source else None
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
    _choice(recipe.target, TARGETS, "target")
    _choice(recipe.runtime.backend, BACKENDS[recipe.target], "runtime.backend")
    _choice(recipe.export.opset, OPSETS, "export.opset")
    _choice(recipe.export.activation_dtype, ACTIVATION_DTYPES, "export.activation_dtype")
    _choice(recipe.export.logits, LOGITS_MODES, "export.logits")
    _number(recipe.runtime.prefill_chunk, "runtime.prefill_chunk", integer=True, minimum=1)
    _number(recipe.runtime.max_batch, "runtime.max_batch", integer=True, minimum=1)
    _number(recipe.runtime.max_context, "runtime.max_context", integer=True, minimum=2)
    g = recipe.generation
    if g.temperature is not None:
        _number(g.temperature, "generation.temperature", integer=False, minimum=0)
    if g.top_p is not None:
        _number(g.top_p, "generation.top_p", integer=False, minimum=0, maximum=1, open_min=True)
    if g.top_k is not None:
        _number(g.top_k, "generation.top_k", integer=True, minimum=0)
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
            checkpoint=Path(data["checkpoint"]),
            output=Path(data["output"]),
            target=data.get("target", "cpu"),
            export=_section(ExportOptions, data.get("export"), "export"),
            runtime=_section(RuntimeOptions, data.get("runtime"), "runtime"),
            generation=_section(GenerationOptions, data.get("generation"), "generation"),
            source=source,
        )
    except TypeError as e:  # pragma: no cover - _section checks keys first
        raise RecipeError(str(e)) from e
    return validate(recipe)


def load_recipe(path: Path | str, *, checkpoint: Path | None = None, output: Path | None = None) -> Recipe:
    """Read a YAML recipe; `checkpoint` / `output` override the recipe's paths (CLI flags)."""
    path = Path(path)
    if not path.is_file():
        recipes = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise RecipeError(f"recipe {path} does not exist" + (f"; recipes in {path.parent}: {recipes}" if recipes else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    try:
        recipe = recipe_from_dict(data, source=path)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e
    if checkpoint is not None:
        recipe = dataclasses.replace(recipe, checkpoint=Path(checkpoint))
    if output is not None:
        recipe = dataclasses.replace(recipe, output=Path(output))
    return recipe
