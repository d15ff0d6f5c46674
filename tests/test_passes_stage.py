"""The passes stage as a stage (compile/passes/stage.py): its directory, report and manifest, for
the cpu target (its cpu_* lowerings run; the plugin lowerings are reported as not run, with why) and for a full
TensorRT target (the plugin lowerings run: graphs after each pass, counts, plugin configs),
and stage skipping by input hashes."""

from __future__ import annotations

import dataclasses
import json
import os

import onnx
import pytest

from qcn.compile import cli
from qcn.compile.artifacts import sha256_file
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.passes.plan import pass_table, plan_for
from qcn.compile.plugins.registry import OPS
from qcn.compile.passes.stage import REPORT, report_text
from qcn.compile.pipeline import run_pipeline
from qcn.compile.recipe import RuntimeOptions, load_recipe

SPEC = "sparse_step2"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS[SPEC], seed=5)


@pytest.fixture(scope="module")
def cpu_art(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "tiny_cpu"
    rc = cli.main(["recipes/tiny_cpu.yaml", "--checkpoint", str(ckpt), "--out", str(out), "--until", "passes", "-q"])
    assert rc == 0
    return out


def test_cpu_passes_dir_is_the_artifact_with_a_report_of_every_pass(cpu_art):
    m = json.loads((cpu_art / "manifest.json").read_text())
    runs_on_cpu = [p.name for p, why in plan_for("onnxruntime") if why is None]
    # the fusions that pay on ONNX Runtime and the cpu lowerings (docs/PASSES.md)
    assert runs_on_cpu == ["fuse_rms_norm", "cpu_gated_deltanet", "cpu_moe_ort", "cpu_moe"]
    assert m["stage"] == "passes" and m["passes"]["module"] == "onnxruntime" and m["passes"]["run"] == runs_on_cpu
    report = json.loads((cpu_art / REPORT).read_text())
    names = [p.name for p in pass_table()]
    assert [r["pass"] for r in report["passes"]] == names and names
    lowerings = {e.lowering.pass_name for e in OPS}
    for row in report["passes"]:
        assert set(row["graphs"]) == {"prefill", "decode"}
        if row["pass"] in runs_on_cpu:  # tests/test_cpu_lowering.py checks what the cpu lowerings emit
            # cpu_moe runs after cpu_moe_ort: it gets only the MoE nodes cpu_moe_ort refused (none here)
            least = 0 if row["pass"] == "cpu_moe" else 1
            assert row["runs"] is True and all(c["rewritten"] >= least and c["refused"] == 0
                                               for c in row["graphs"].values()), row
            continue
        why = ("onnxruntime runs the op's ONNX function body" if row["pass"] in lowerings
               else "ONNX Runtime runs the quantized MoE body" if row["pass"] == "lower_moe_rtx"  # tensorrt_rtx only
               else "quantization.")  # the quantization rows: nothing asked for ("quantization.weights is 'none'")
        assert row["runs"] is False and why in row["why_not"], row
        assert all(c["rewritten"] == 0 for c in row["graphs"].values()), row
        if row["pass"] == "lower_cached_attention":  # the cpu lowerings left no GatedDeltaNet / float MoE node
            assert all(c["op_nodes"] >= 1 for c in row["graphs"].values()), row
    gdn = next(r for r in report["passes"] if r["pass"] == "cpu_gated_deltanet")
    assert all(c["rewritten"] == c["matched"] >= 1 and c["refused"] == 0 for c in gdn["graphs"].values()), gdn
    text = report_text(report)
    assert all(n in text for n in names) and "not run" in text
    # the graphs are the fused / lowered ones; the weights: the export's file (hard link) plus cpu_moe_ort's
    # interleaved gate_up in weights.passes.bin, or one compacted weights.bin when the graphs read under 75 %
    # of the export's (the experts' gate_up is replaced); listed and hashed either way
    export = cpu_art.with_name(cpu_art.name + ".stages") / "export"
    linked = os.path.samefile(cpu_art / "weights.bin", export / "weights.bin")
    assert linked == (cpu_art / "weights.passes.bin").is_file(), sorted(p.name for p in cpu_art.iterdir())
    for f in ("prefill.onnx", "decode.onnx"):
        assert not os.path.samefile(cpu_art / f, export / f)
        kinds = {(n.domain, n.op_type) for n in onnx.load(str(cpu_art / f), load_external_data=False).graph.node}
        assert {("", "RMSNormalization"), ("com.microsoft", "LinearAttention"), ("com.microsoft", "MoE")} <= kinds, kinds
        assert not {("qcn", "GatedDeltaNet"), ("qcn", "MoE")} & kinds
    assert sorted(m["files"]) == sorted(p.name for p in cpu_art.iterdir() if p.name != "manifest.json")
    assert all(sha256_file(cpu_art / f) == d for f, d in m["files"].items())


def test_cpu_artifact_loads_and_rerun_skips(cpu_art, ckpt):
    from qcn.runtime import load

    sess = load(cpu_art)
    assert sess is not None
    recipe = load_recipe("recipes/tiny_cpu.yaml", checkpoint=ckpt, output=cpu_art)
    again = run_pipeline(recipe, until="passes")
    assert again.ran == [] and again.skipped == ["export", "passes"]
    assert run_pipeline(recipe).skipped == ["export", "passes"]  # "build" for cpu = its last stage


def test_full_tensorrt_target_lowers_and_writes_each_pass(ckpt, tmp_path):
    pytest.importorskip("triton")
    r = load_recipe("recipes/tiny_rtx.yaml", checkpoint=ckpt, output=tmp_path / "h100")
    recipe = dataclasses.replace(r, target="h100", build=dataclasses.replace(r.build, compute_capabilities=(), profiles=None),
                                 runtime=RuntimeOptions(backend="tensorrt", prefill_chunk=16, max_batch=2, max_context=256))
    res = run_pipeline(recipe, until="passes")
    d = res.dirs["passes"]
    assert res.ran == ["export", "passes"] and res.output == d
    m = json.loads((d / "manifest.json").read_text())
    sec = m["passes"]
    assert sec["module"] == "tensorrt" and sec["run"] == [p.name for p, why in plan_for("tensorrt") if why is None]
    assert sec["run"] == [e.lowering.pass_name for e in OPS]  # nothing quantized: the lowerings only
    c = sec["counts"]
    assert c["lower_gated_deltanet"]["prefill"]["rewritten"] >= 1 and c["lower_moe"]["prefill"]["rewritten"] >= 1
    # prefill: T dynamic, attention refused (decode kernels only); decode: T == 1, lowered
    assert c["lower_cached_attention"]["prefill"]["rewritten"] == 0
    assert c["lower_cached_attention"]["prefill"]["refused"] == c["lower_cached_attention"]["prefill"]["matched"] >= 1
    assert c["lower_cached_attention"]["decode"]["rewritten"] >= 1
    assert set(sec["plugins"]) == {"lower_gated_deltanet", "lower_moe"}
    assert sec["plugins"]["lower_moe"]["config"]["top_k"] == TINY_SPECS[SPEC].num_experts_per_tok
    report = json.loads((d / REPORT).read_text())
    files = {row["pass"]: row["graphs"]["prefill"].get("file") for row in report["passes"]}
    # the graph after lower_gated_deltanet is kept; the one after the last changing pass is prefill.onnx
    index = {p.name: i for i, p in enumerate(pass_table(), start=1)}["lower_gated_deltanet"]
    assert {k: v for k, v in files.items() if k in sec["run"]} == {
        "lower_gated_deltanet": f"prefill.after_{index:02d}_lower_gated_deltanet.onnx",
        "lower_moe": "prefill.onnx", "lower_cached_attention": None}
    mid = onnx.load(str(d / files["lower_gated_deltanet"]), load_external_data=False)
    final = onnx.load(str(d / "prefill.onnx"), load_external_data=False)
    kinds = lambda g: {(n.domain, n.op_type) for n in g.graph.node}  # noqa: E731
    assert ("qcn", "MoE") in kinds(mid) and ("qcn", "GatedDeltaNet") not in kinds(mid)
    assert ("qcn", "MoE") not in kinds(final) and ("trt.plugins", "router_topk") in kinds(final)
    assert sorted(m["files"]) == sorted(p.name for p in d.iterdir() if p.name != "manifest.json")
    # same inputs: skipped; the build of another full-TensorRT target would reuse it
    assert run_pipeline(recipe, until="passes").skipped == ["export", "passes"]
    assert run_pipeline(dataclasses.replace(recipe, target="h200"), until="passes").skipped == ["export", "passes"]
