"""Shipped recipes, the target table, the memory budget and preflight (no TensorRT build)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from qcn.compile import cli
from qcn.compile.build import preflight as pf
from qcn.compile.build.budget import compute_budget, param_counts
from qcn.compile.export.config import load_model_config
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.pipeline import run_pipeline
from qcn.compile.recipe import TARGET_TABLE, RecipeError, load_recipe

REAL = Path("recipes/models/qwen3-coder-next")
HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "python module 'tensorrt' is not installed; install it: full TensorRT >= 10.9"

# recipe -> (budget fits, reasons it fails today); [] = builds
SHIPPED = {
    "tiny_cpu": (None, []),
    "pico_cpu": (None, []),
    "pico_fp8_cpu": (None, []),
    "pico_int4_cpu": (None, []),
    "pico_cpu_mtp": (None, []),
    "pico_cpu_mtp": (None, []),
    "pico_fp8_kv_cpu": (None, []),
    "tiny_rtx": (True, []),
    "rtx_sm89_fp8": (True, []),
    "h100_fp8": (True, [NO_TRT]),
    "h200_fp8": (True, [NO_TRT]),
    "h100_int4": (True, [NO_TRT]),   # FP8 projections + INT4 experts: both passes exist
    "a100_int4": (True, [NO_TRT]),
    "l40s_fp8": (False, ["does not fit: needs 77.9 GiB on one l40s (44.5 GiB usable); cheapest fix: INT4 experts",
                         NO_TRT]),
    "rtx_pro_6000_fp8": (True, []),
    "dgx_spark_fp8": (True, []),
}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS["default"], seed=0)


def test_every_recipe_is_listed_here():
    assert sorted(p.stem for p in Path("recipes").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_validates_or_fails_for_its_documented_reason(name, tiny_ckpt):
    text = Path(f"recipes/{name}.yaml").read_text()
    assert text.startswith("#"), "every recipe starts with a comment saying why"
    recipe = load_recipe(f"recipes/{name}.yaml", checkpoint=tiny_ckpt if name.startswith("tiny") else None)
    fits, reasons = SHIPPED[name]
    if name in ("tiny_rtx", "rtx_sm89_fp8") and not HAVE_RTX:
        reasons = ["pip install tensorrt-rtx"]
    if HAVE_TRT:
        reasons = [r for r in reasons if r != NO_TRT]
    report = pf.preflight(recipe)
    for reason in reasons:
        assert any(reason in p for p in report.problems), (reason, report.problems)
    for problem in report.problems:
        assert any(reason in problem for reason in reasons), ("undocumented problem", problem)
    if not reasons:
        assert report.ok, report.problems
    if fits is not None:
        assert report.budget.fits is fits, report.budget.table()
    if "does not fit" not in " ".join(reasons):
        assert not any("does not fit" in p for p in report.problems)


def test_real_model_numbers():
    cfg = load_model_config(REAL)
    n = param_counts(cfg)
    assert 79.5e9 < sum(n.values()) < 80e9  # "80B"
    assert 77e9 < n["routed_experts"] < 77.5e9
    r = load_recipe("recipes/h200_fp8.yaml")
    lines = {x.item: x for x in compute_budget(r, cfg).lines}
    # docs/FINDINGS.md: KV 24.6 KB per context token (BF16); DeltaNet state 32x128x128 fp32 per layer
    assert "24576 B/token" in lines["KV cache"].detail
    per_slot = 36 * (32 * 128 * 128 * 4 + 8192 * 3 * 2)
    assert lines["DeltaNet state (x2, ping-pong)"].gib == pytest.approx(2 * per_slot * 8 / 2**30)
    assert 74 < sum(lines[k].gib for k in ("routed experts", "dense weights", "embeddings, lm_head, router, norms")) < 76


def test_budget_names_the_cheapest_fix():
    r = load_recipe("recipes/h100_fp8.yaml")
    r = dataclasses.replace(r, runtime=dataclasses.replace(r.runtime, max_batch=4))
    report = pf.preflight(r, check_module=False)
    msg = next(p for p in report.problems if "does not fit" in p)
    assert "cheapest fix: fewer slots: runtime.max_batch: 1" in msg
    assert "shorter context: runtime.max_context:" in msg and "INT4 experts" in msg and "more GPUs" in msg
    bf16 = dataclasses.replace(r, quantization=dataclasses.replace(r.quantization, weights="none", experts="none"))
    msg = next(p for p in pf.preflight(bf16, check_module=False).problems if "does not fit" in p)
    assert "cheapest fix: INT4 experts: quantization.experts: int4" in msg
    assert "DOES NOT FIT" in pf.preflight(bf16, check_module=False).text()


def _recipe(tmp_path, base="h100_fp8", **changes) -> Path:
    data = yaml.safe_load(Path(f"recipes/{base}.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("base,change,message", [
    ("a100_int4", {"quantization.weights": "fp8"},
     r"quantization.weights: fp8 needs compute capability SM89\+ .* target 'a100' is SM80; targets that can: \['h100'"),
    ("h100_fp8", {"quantization.experts": "fp4"}, r"quantization.experts: fp4 needs compute capability SM100\+"),
    ("tiny_rtx", {"quantization.kv_cache": "fp8", "build.compute_capabilities": ["8.0", "8.9"]},
     r"quantization.kv_cache: fp8 needs .* is also built for SM80"),
    ("h100_fp8", {"target": "b200"}, r"target: 'b200' is not valid; choose one of \['cpu', 'h100'"),
    ("h100_fp8", {"build.compute_capabilities": ["9.0"]}, r"build.compute_capabilities: '9.0' is not valid; choose one of \['7.5'"),
    ("h100_fp8", {"build.compute_capabilities": ["8.9"]}, r"only for tensorrt_rtx targets"),
    ("tiny_rtx", {"build.hardware_compatibility": "ampere_plus"}, r"only for full TensorRT targets"),
    ("tiny_rtx", {"build.profiles": "split"}, r"fails to build with tensorrt_rtx 1.7.1"),
    ("tiny_rtx", {"build.compute_capabilities": ["12.0"]}, r"must include the target's own '8.9'"),
    ("tiny_rtx", {"build.optimization_level": 6}, r"build.optimization_level: 6 is out of range"),
    ("tiny_rtx", {"build.colour": 1}, r"build: unknown key\(s\) \['colour'\]; valid keys: \['compute_capabilities'"),
    ("tiny_rtx", {"runtime.backend": "onnxruntime"}, r"runtime.backend: 'onnxruntime' is not valid; choose one of \['tensorrt'\]"),
])
def test_bad_gpu_recipes(tmp_path, base, change, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(tmp_path, base, **change))


def test_missing_module_says_what_to_install(monkeypatch, tiny_ckpt):
    real = importlib.util.find_spec
    monkeypatch.setattr(pf.importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorrt") else real(name, *a))
    report = pf.preflight(load_recipe("recipes/tiny_rtx.yaml", checkpoint=tiny_ckpt))
    assert report.problems == ["python module 'tensorrt_rtx' is not installed; install it: pip install tensorrt-rtx  "
                               "(TensorRT for RTX 1.7+; builds CPU-only for SM75/80/86/89/120/121; CUDA 13 wheels)"]


def test_no_config_to_size_with(tmp_path):
    r = load_recipe(_recipe(tmp_path, "h100_fp8", model_config=str(tmp_path / "nowhere")))
    assert any("no config.json to size the model with" in p for p in pf.preflight(r, check_module=False).problems)


def test_a_precision_no_pass_provides_is_refused():
    r = load_recipe("recipes/rtx_pro_6000_fp8.yaml")  # SM120: FP4 is a valid precision, but no pass makes it
    r = dataclasses.replace(r, quantization=dataclasses.replace(r.quantization, weights="fp4"))
    assert pf.quantization_problems(r) == [
        "quantization.weights: fp4 needs a quantization pass for it, and no pass implements it yet; qcn will not fake "
        "it: use none (the activation dtype)"]


@pytest.mark.parametrize("quant,message", [
    ({"weights": "fp8"}, "quantization.calibration.source: required when anything is quantized"),
    ({"weights": "fp8", "calibration": {"source": "nowhere.txt"}}, "quantization.calibration.source: nowhere.txt does not exist"),
])
def test_quantization_without_its_source_is_refused_before_any_work(tmp_path, tiny_ckpt, quant, message):
    out = tmp_path / "out"
    path = _recipe(tmp_path, "tiny_cpu", quantization=quant)
    with pytest.raises(RecipeError, match=message):
        run_pipeline(load_recipe(path, checkpoint=tiny_ckpt, output=out))
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_cli_check_and_targets(capsys, tmp_path):
    assert cli.main(["--targets"]) == 0
    table = capsys.readouterr().out
    for name in TARGET_TABLE:
        assert name in table
    assert cli.main(["recipes/l40s_fp8.yaml", "--check"]) == 2
    out = capsys.readouterr().out
    assert "memory budget for one l40s GPU" in out and "DOES NOT FIT" in out and "cheapest fix" in out
    assert cli.main(["recipes/h100_fp8.yaml", "--out", str(tmp_path / "o")]) == 2  # fails before any work
    assert NO_TRT in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_budget_shows_fp8_kv_and_offers_it_as_a_fix():
    """The KV line is 1 byte per element with kv_cache: fp8 (half of bf16), and a recipe whose
    context only an FP8 cache makes fit is told so."""
    r = load_recipe("recipes/h100_fp8.yaml")
    cfg = load_model_config(REAL)
    kv = {x.item: x for x in compute_budget(r, cfg).lines}["KV cache"]
    fp8 = dataclasses.replace(r, quantization=dataclasses.replace(r.quantization, kv_cache="fp8"))
    kv8 = {x.item: x for x in compute_budget(fp8, cfg).lines}["KV cache"]
    assert "24576 B/token" in kv.detail and "12288 B/token" in kv8.detail and kv8.gib == pytest.approx(kv.gib / 2)
    long = dataclasses.replace(r, runtime=dataclasses.replace(r.runtime, max_context=98304))
    assert not compute_budget(long, cfg).fits
    msg = next(p for p in pf.preflight(long, check_module=False).problems if "does not fit" in p)
    assert "FP8 KV cache: quantization.kv_cache: fp8" in msg
    assert compute_budget(dataclasses.replace(long, quantization=fp8.quantization), cfg).fits
