"""INT4 through the whole passes stage on the tiny checkpoint: keep rules in the report, the
artifact loads and generates, weights compacted, and a too-tight gate fails the compile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qcn.compile import cli
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint

CAL = "recipes/calibration/pico_heldout.txt"


def _recipe(tmp: Path, **quant) -> Path:
    r = yaml.safe_load(Path("recipes/tiny_cpu.yaml").read_text())
    r["quantization"] = {"weights": "int4", "experts": "int4", "calibration": {"source": CAL, "tokens": 512,
                                                                               "seq_len": 64, "batch": 4},
                         "gate": {"tokens": 512, "seq_len": 64, "top1_min": None, "ppl_ratio_max": 1.5}, **quant}
    p = tmp / f"tiny_int4_{len(list(tmp.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS["sparse_step2"], seed=5)


def test_tiny_int4_awq_with_keep_compiles_reports_kept_and_generates(ckpt, tmp_path):
    out = tmp_path / "art"
    rc = cli.main([str(_recipe(tmp_path, int4_method="awq", keep=["layers.0.*", "layers.1.*"])), "--checkpoint", str(ckpt),
                   "--out", str(out), "-q"])
    assert rc == 0
    report = json.loads((out / "passes_report.json").read_text())
    rows = {r["pass"]: r for r in report["passes"]}
    proj = rows["int4_projections"]["graphs"]["prefill"]
    kept = [f["reason"] for f in proj["refusals"]]
    assert proj["rewritten"] > 0 and any("lm_head kept unquantized: default" in k for k in kept)
    assert any(k.startswith("layers.0.") and "matches quantization.keep pattern 'layers.0.*'" in k for k in kept)
    moe = rows["int4_experts"]["graphs"]["prefill"]
    assert moe["rewritten"] >= 1, moe
    assert any(f["reason"].startswith(("layers.0.experts_gate_up kept", "layers.1.experts_gate_up kept"))
               and "matches quantization.keep pattern" in f["reason"] for f in moe["refusals"]), moe
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["passed"] and acc["ppl_ratio"] < 1.5
    from qcn.runtime.generate import load
    gen = load(str(out))
    try:
        assert gen.backend.prepack == {"prefill", "decode"}   # MatMulNBits / QMoE in both graphs: both pack
        res = gen.generate(["def f(x):"], gen.params(max_new_tokens=4, temperature=0.0))
        assert 1 <= len(res[0].token_ids) <= 4
    finally:
        gen.close()


def test_tiny_int4_too_tight_gate_fails_the_compile(ckpt, tmp_path, capsys):
    out = tmp_path / "art"
    recipe = _recipe(tmp_path, int4_method="rtn")
    r = yaml.safe_load(recipe.read_text())
    r["quantization"]["gate"]["ppl_ratio_max"] = 1.0
    r["quantization"]["gate"]["kl_mean_max"] = 0.0
    recipe.write_text(yaml.safe_dump(r))
    rc = cli.main([str(recipe), "--checkpoint", str(ckpt), "--out", str(out), "-q"])
    assert rc != 0 and not out.exists()
    err = capsys.readouterr().err
    assert "accuracy gate failed" in err and "kl_mean" in err


def test_tiny_int8_lm_head_alone_compiles_gates_and_generates(ckpt, tmp_path):
    """quantization.lm_head: int8 with nothing else quantized: the gate still runs (the recipe is
    'active'), both graphs' lm_head is MatMulNBits 8-bit, and the artifact generates."""
    import onnx

    out = tmp_path / "art"
    rc = cli.main([str(_recipe(tmp_path, weights="none", experts="none", lm_head="int8")), "--checkpoint", str(ckpt),
                   "--out", str(out), "-q"])
    assert rc == 0
    rows = {r["pass"]: r for r in json.loads((out / "passes_report.json").read_text())["passes"]}
    for g in ("prefill", "decode"):
        assert rows["int8_cpu_lm_head"]["graphs"][g]["rewritten"] == 1
        nodes = onnx.load(out / f"{g}.onnx", load_external_data=False).graph.node
        nb = [n for n in nodes if n.op_type == "MatMulNBits"]
        assert len(nb) == 1 and {a.name: a.i for a in nb[0].attribute}["bits"] == 8
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["passed"] and abs(acc["ppl_ratio"] - 1) < 0.05 and acc["kl_mean"] > 0   # really quantized
    from qcn.runtime.generate import load
    gen = load(str(out))
    try:
        res = gen.generate(["def f(x):"], gen.params(max_new_tokens=4, temperature=0.0))
        assert 1 <= len(res[0].token_ids) <= 4
    finally:
        gen.close()
