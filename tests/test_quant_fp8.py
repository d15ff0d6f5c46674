"""FP8 W8A8 (compile/passes/quant/): the recipe schema, weights.passes.bin, the FP8 projection
rule (positive and must-NOT-fire), calibration ranges, the accuracy gate, and end to end on a
tiny random checkpoint: the quantized ONNX graph in ONNX Runtime equals a naive torch FP8
simulation of the same model, and a gate set too tight fails the compile leaving nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from qcn.compile.build import preflight as pf
from qcn.compile.passes.base import apply, to_ir, to_proto
from qcn.compile.passes.context import PassContext
from qcn.compile.passes.plan import missing_passes, plan_for
from qcn.compile.passes.quant import fp8
from qcn.compile.passes.quant.accuracy import Metrics, every_token_logits, failures
from qcn.compile.passes.quant.calibrate import ActivationRange, CalibrationError, token_windows
from qcn.compile.passes.quant.fp8_projection import Fp8Projection
from qcn.compile.passes.quant.weights import PASSES_WEIGHTS, PassWeights
from qcn.compile.recipe import (CalibrationOptions, GateOptions, QuantizationOptions, RecipeError, load_recipe)

HELDOUT = "recipes/calibration/pico_heldout.txt"


# --- recipe ------------------------------------------------------------------------------

def _write(tmp_path, quant: dict, base="recipes/tiny_cpu.yaml"):
    data = yaml.safe_load(open(base).read())
    data["quantization"] = quant
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_recipe_quantization_sections_are_typed_and_frozen(tmp_path):
    r = load_recipe(_write(tmp_path, {"weights": "fp8", "fp8_granularity": "block128",
                                      "calibration": {"source": HELDOUT, "tokens": 512, "ranges": "percentile",
                                                      "percentile": 99.9},
                                      "gate": {"top1_min": 0.9, "kl_mean_max": 0.1, "ppl_ratio_max": None}}))
    q = r.quantization
    assert isinstance(q.calibration, CalibrationOptions) and isinstance(q.gate, GateOptions) and q.active
    assert str(q.calibration.source) == HELDOUT and q.calibration.tokens == 512 and q.gate.ppl_ratio_max is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.calibration.tokens = 1
    d = r.to_dict()["quantization"]
    assert d["calibration"]["source"] == HELDOUT and json.dumps(d)  # JSON-able (the skip key hashes it)
    assert not QuantizationOptions().active


@pytest.mark.parametrize("quant,message", [
    ({"calibration": {"sorce": "x"}}, r"quantization.calibration: unknown key\(s\) \['sorce'\]; valid keys: \['batch'"),
    ({"gate": {"top1": 0.9}}, r"quantization.gate: unknown key\(s\) \['top1'\]"),
    ({"fp8_granularity": "tensor"}, r"quantization.fp8_granularity: 'tensor' is not valid; choose one of \['channel', 'block128'\]"),
    ({"calibration": {"ranges": "mse"}}, r"quantization.calibration.ranges: 'mse' is not valid; choose one of \['max', 'percentile'\]"),
    ({"calibration": {"percentile": 101}}, r"quantization.calibration.percentile: 101 is out of range"),
    ({"calibration": {"source": 3}}, r"quantization.calibration.source: expected a text file or a folder"),
    ({"gate": {"top1_min": 1.5}}, r"quantization.gate.top1_min: 1.5 is out of range"),
    ({"gate": {"ppl_ratio_max": 0.9}}, r"quantization.gate.ppl_ratio_max: 0.9 is out of range; must be >= 1"),
    ({"calibration": {"tokens": 0}}, r"quantization.calibration.tokens: 0 is out of range"),
])
def test_bad_quantization_recipes(tmp_path, quant, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, quant))


def test_preflight_asks_the_pass_table():
    q = QuantizationOptions(weights="fp8")
    for module in ("onnxruntime", "tensorrt", "tensorrt_rtx"):
        assert missing_passes(module, q) == []
        assert dict((p.name, why) for p, why in plan_for(module, q))["fp8_projection"] is None
    assert missing_passes("tensorrt_rtx", QuantizationOptions(weights="fp4")) == [("weights", "fp4", [])]
    assert dict((p.name, why) for p, why in plan_for("onnxruntime"))["fp8_projection"] == "quantization.weights is 'none'"
    r = load_recipe("recipes/pico_fp8_cpu.yaml")
    assert pf.quantization_problems(r) == []
    bad = dataclasses.replace(r, quantization=dataclasses.replace(r.quantization, weights="fp8", kv_cache="activation",
                                                                  calibration=CalibrationOptions()))
    assert pf.quantization_problems(bad) == [
        "quantization.calibration.source: required when anything is quantized: a text file or a folder of text files "
        "(held-out text: activation ranges and the accuracy gate are measured on it)"]


# --- weights.passes.bin ---------------------------------------------------------------------

def test_pass_weights_are_written_once_and_read_back(tmp_path):
    import onnx_ir as ir

    w = PassWeights(tmp_path)
    t = torch.randn(33, 7).to(torch.float8_e4m3fn)
    graphs = [ir.Graph([], [], nodes=[], name=g) for g in ("prefill", "decode")]
    from onnx_ir._tape import Builder

    vals = [w.add(Builder(g), "a.fp8", t) for g in graphs]
    small = w.add(Builder(graphs[0]), "a.input_scale", torch.tensor(0.5))
    w.close()
    assert list(w.written) == ["a.fp8"] and (tmp_path / PASSES_WEIGHTS).stat().st_size == t.numel()
    assert all(v.name in g.initializers for v, g in zip(vals, graphs))
    for v in vals:
        assert torch.equal(PassWeights.torch(v).view(torch.uint8), t.view(torch.uint8))
    assert not isinstance(small.const_value, ir.ExternalTensor) and float(PassWeights.torch(small)) == 0.5


# --- the rule on a hand-made graph ------------------------------------------------------------

K, N, N2 = 200, 24, 16  # K not a multiple of 128: the last block is short


def _graph(rng):
    """x [n, K] -> MatMul(x, W) -> Relu -> MatMul(., W2) = y (a graph output, like lm_head);
    plus MatMul(x, x^T) (two activations)."""
    W = rng.standard_normal((K, N)).astype(np.float32)
    W[:, 3] = 0  # an all-zero column: scale 1, exact zeros
    W2 = rng.standard_normal((N, N2)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "W2"], ["y"]), oh.make_node("Transpose", ["x"], ["xt"]),
             oh.make_node("MatMul", ["x", "xt"], ["g"])]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", K])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["n", N2]), oh.make_tensor_value_info("g", TP.FLOAT, ["n", "n"])],
                      [nh.from_array(W, "W"), nh.from_array(W2, "W2")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 10
    return m, W, W2


def _ctx(tmp_path, ranges, granularity="channel"):
    q = QuantizationOptions(weights="fp8", fp8_granularity=granularity,
                            calibration=CalibrationOptions(source=tmp_path))
    return PassContext("onnxruntime", q, "prefill", PassWeights(tmp_path), ranges)


def _amax(v):
    r = ActivationRange()
    r.update(np.array([v], np.float32))
    return r


@pytest.mark.parametrize("granularity", ["channel", "block128"])
def test_fp8_projection_rewrites_and_equals_a_naive_simulation(tmp_path, granularity):
    rng = np.random.default_rng(3)
    proto, W, _ = _graph(rng)
    model = to_ir(proto, "test")
    ctx = _ctx(tmp_path, {"W": _amax(2.5), "W2": _amax(9.0)}, granularity)
    res = apply(Fp8Projection(ctx), model)
    ctx.weights.close()
    # rewritten: x @ W; refused: the MatMul making graph output y (like lm_head), x @ x^T (two activations)
    assert res.rewritten == 1 and res.matched == 3, res.to_dict()
    reasons = [r for _, r in res.refused]
    assert len(reasons) == 2 and any("produces graph output 'y'" in r for r in reasons)
    assert any("weight 'xt' is not a constant initializer" in r for r in reasons)
    out = to_proto(model)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2 and "W" not in {i.name for i in out.graph.initializer}
    dq_w = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W.fp8")
    attrs = {a.name: oh.get_attribute_value(a) for a in dq_w.attribute}
    assert attrs == ({"axis": 1} if granularity == "channel" else {"axis": 0, "block_size": 128})
    path = tmp_path / "m.onnx"
    onnx.save(out, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    x = (rng.standard_normal((5, K)) * 1.5).astype(np.float32)
    x[0, 0] = 40.0  # beyond the calibrated range: saturates at 448 * s_x
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    # naive torch: per column (or per 128 rows x column) amax / 448, round to E4M3, dequantize, compute
    Wt = torch.from_numpy(W)
    if granularity == "channel":
        s = (Wt.abs().amax(0) / 448).where(Wt.abs().amax(0) > 0, torch.tensor(1.0))
        se = s.expand(K, N)
    else:
        s = torch.stack([Wt[i:i + 128].abs().amax(0) / 448 for i in range(0, K, 128)])
        s = s.where(s > 0, torch.tensor(1.0))
        se = torch.cat([s[i // 128][None] for i in range(K)])
    wdq = (Wt / se).to(torch.float8_e4m3fn).float() * se
    sx = torch.tensor(2.5 / 448)
    xdq = (torch.from_numpy(x) / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
    assert float(xdq[0, 0]) == pytest.approx(2.5)
    ref = torch.relu(xdq @ wdq) @ torch.from_numpy(_graph(np.random.default_rng(3))[2])
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_fp8_projection_must_not_fire(tmp_path):
    """No calibrated range, a non-float weight, a weight already behind DequantizeLinear, MatMuls
    inside a function body: nothing rewritten, each refusal says why (the DQ one is no candidate)."""
    rng = np.random.default_rng(0)
    proto, _, _ = _graph(rng)
    model = to_ir(proto, "test")
    res = apply(Fp8Projection(_ctx(tmp_path, {})), model)
    assert res.rewritten == 0 and any("no calibrated range for the input of 'W'" in r for _, r in res.refused)
    res = apply(Fp8Projection(_ctx(tmp_path, {"W": _amax(0.0)})), to_ir(proto, "test"))
    assert res.rewritten == 0 and any("range of the input of 'W' is 0.0" in r for _, r in res.refused)
    # already quantized weight (the official FP8 release): not this rule's candidate
    wq = nh.from_array(np.zeros((K, N), np.uint8), "Wq")
    wq.data_type = TP.FLOAT8E4M3FN
    nodes = [oh.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"], axis=1), oh.make_node("MatMul", ["x", "Wd"], ["h"]),
             oh.make_node("Relu", ["h"], ["y"])]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", K])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["n", N])], [wq, nh.from_array(np.ones(N, np.float32), "s")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    res = apply(Fp8Projection(_ctx(tmp_path, {"Wd": _amax(1.0), "Wq": _amax(1.0)})), to_ir(m, "test"))
    assert res.matched == 0 and res.rewritten == 0


# --- calibration --------------------------------------------------------------------------

def test_activation_range_max_and_percentile_in_bounded_memory():
    rng = np.random.default_rng(1)
    r, seen = ActivationRange(), []
    for scale in (0.01, 1.0, 30.0, 0.5):  # a later batch's max is far above the first's: bins merge
        x = rng.standard_normal(20000).astype(np.float32) * scale
        r.update(x)
        seen.append(np.abs(x))
    allv = np.concatenate(seen)
    assert r.amax == pytest.approx(allv.max()) and r.count == allv.size and r.counts.size == 2048
    for p in (50, 99, 99.9, 99.99):
        exact = np.percentile(allv, p)
        assert exact <= r.percentile(p) <= exact + r.top / 2048 + 1e-6, p
    assert r.percentile(100) == pytest.approx(allv.max())
    assert r.value(CalibrationOptions(ranges="max")) == r.amax
    z = ActivationRange()
    z.update(np.zeros(5))
    assert z.amax == 0 and z.percentile(99) == 0
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        r.update(np.array([np.nan]), "t")


def test_token_windows_from_a_file_and_a_folder(tmp_path):
    tok = "models/qcn-pico/tokenizer.json"
    a = token_windows(HELDOUT, tok, tokens=1000, seq_len=100)
    b = token_windows(HELDOUT, tok, tokens=300, seq_len=100, skip=1000)
    assert a.shape == (10, 100) and b.shape == (3, 100) and a.dtype == np.int64
    whole = token_windows(HELDOUT, tok, tokens=1300, seq_len=100)
    assert np.array_equal(whole[:10], a) and np.array_equal(whole[10:], b)  # the gate's tokens follow calibration's
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.py").write_text("print(2)\n" * 50)
    (tmp_path / "d" / "a.txt").write_text("x = 1\n" * 50)
    (tmp_path / "d" / "skip.bin").write_bytes(b"\xff\xfe")
    f = token_windows(tmp_path / "d", tok, tokens=64, seq_len=32)
    assert f.shape == (2, 32)
    with pytest.raises(CalibrationError, match=r"tokens, but gate needs tokens"):
        token_windows(tmp_path / "d", tok, tokens=64, seq_len=32, skip=10**6, what="gate")
    with pytest.raises(CalibrationError, match="does not exist"):
        token_windows(tmp_path / "nowhere", tok, tokens=64, seq_len=32)


# --- accuracy metrics ------------------------------------------------------------------------

def test_metrics_and_failures():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 11, (2, 6))
    ref = rng.standard_normal((2, 6, 11))
    ids[:, 1:] = ref[:, :-1].argmax(-1)  # the reference predicts the text; -ref does not
    m = Metrics()
    m.update(ids, ref, ref)
    r = m.result()
    assert r["tokens"] == 10 and r["top1_agreement"] == 1 and r["kl_mean"] == pytest.approx(0, abs=1e-12)
    assert r["ppl_ratio"] == pytest.approx(1)
    lp = ref[:, :-1] - np.log(np.exp(ref[:, :-1]).sum(-1, keepdims=True))
    assert r["ppl_reference"] == pytest.approx(np.exp(-np.take_along_axis(lp, ids[:, 1:, None], -1).mean()))
    m2 = Metrics()
    m2.update(ids, ref, -ref)
    bad = m2.result()
    q = QuantizationOptions(gate=GateOptions(top1_min=0.99, ppl_ratio_max=1.01, kl_mean_max=0.5))
    msgs = failures(bad, q)
    assert len(msgs) == 3 and msgs[0].startswith("top1_agreement ") and "< quantization.gate.top1_min 0.99" in msgs[0]
    assert failures(r, q) == []


# --- end to end on a tiny checkpoint -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_SPECS["odd"], seed=7)


def _tiny_recipe(tmp_path, ckpt, out, granularity="channel", gate=None):
    data = yaml.safe_load(open("recipes/tiny_cpu.yaml").read())
    data["quantization"] = {"weights": "fp8", "experts": "fp8", "fp8_granularity": granularity,
                            "calibration": {"source": HELDOUT, "tokens": 256, "seq_len": 64, "batch": 2},
                            "gate": gate or {"tokens": 256, "seq_len": 64, "top1_min": 0.5, "ppl_ratio_max": 1.5}}
    data["runtime"]["max_context"] = 512
    p = tmp_path / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_recipe(p, checkpoint=ckpt, output=out)


@contextlib.contextmanager
def _fp8_matmuls(quantized: dict[int, tuple[torch.Tensor, torch.Tensor]], seen: set):
    """Every ``x @ W`` whose W is one of ``quantized`` (id -> (dequantized W, activation scale))
    computes fake_quant(x) @ dequant(W): the naive FP8 simulation of the model."""
    from torch.overrides import TorchFunctionMode

    MATMULS = (torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul)

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in MATMULS and len(args) == 2 and id(args[1]) in quantized:
                wdq, sx = quantized[id(args[1])]
                seen.add(id(args[1]))
                xq = (args[0].float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
                return torch.matmul(xq, wdq)
            return func(*args, **kwargs)

    with Mode():
        yield


def test_fp8_graph_in_ort_equals_torch_fp8_simulation(tiny, tmp_path):
    from qcn.compile.export.checkpoint import open_checkpoint
    from qcn.compile.export.config import load_model_config
    from qcn.compile.export.modeling import QcnModel, rope_tables
    from qcn.compile.export.onnx_export import state_layout
    from qcn.compile.pipeline import run_pipeline
    from qcn.compile.passes.quant.calibrate import GraphRunner
    from qcn.artifact import read_manifest

    recipe = _tiny_recipe(tmp_path, tiny, tmp_path / "fp8")
    art = run_pipeline(recipe).output
    acc = json.loads((art / "accuracy.json").read_text())
    assert acc["passed"] and acc["tokens"] == 4 * 63 and 0 < acc["kl_mean"] and set(acc) >= {
        "tokens", "top1_agreement", "kl_mean", "ppl_ratio", "ppl_quantized", "ppl_reference"}
    m = read_manifest(art)  # every file, weights.passes.bin included, hashed and listed
    assert PASSES_WEIGHTS in m.files and "accuracy.json" in m.files

    cfg = load_model_config(tiny)
    rope = rope_tables(cfg)
    model = QcnModel(cfg, rope, device="cpu").eval()
    model.load_weights(open_checkpoint(tiny), rope)
    graph = onnx.load(str(art / "prefill.onnx"), load_external_data=False)
    scales = {i.name: float(nh.to_array(i)) for i in graph.graph.initializer if i.name.endswith(".input_scale")}
    params = dict(model.named_parameters())
    quantized = {}
    for name, sx in scales.items():
        w = params[name.removesuffix(".input_scale")]
        s = (w.abs().amax(0) / 448).where(w.abs().amax(0) > 0, torch.tensor(1.0))  # per output channel, naive
        quantized[id(w)] = ((w / s).to(torch.float8_e4m3fn).float() * s, torch.tensor(sx))
    assert len(quantized) == len(scales) > 0 and "lm_head.input_scale" not in scales
    experts = [n for n in params if n.rsplit(".", 1)[-1] in ("experts_gate_up", "experts_down", "shared_gate_up",
                                                              "shared_down")]
    stored = {i.name for i in graph.graph.initializer}
    assert experts and all(f"{n}.fp8" in stored and f"{n}.fp8_scale" in stored for n in experts)
    for n in experts:  # weight-only: the experts compute on the dequantized weights (per output row, naive)
        w = params[n].data
        s = (w.abs().amax(-1, keepdim=True) / 448).where(w.abs().amax(-1, keepdim=True) > 0, torch.tensor(1.0))
        params[n].data = (w / s).to(torch.float8_e4m3fn).float() * s
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 37))
    states = [torch.zeros((2, *[1 if d == "max_context" else d for d in s.shape])) for s in state_layout(cfg, "float32")]
    seen = set()
    with torch.no_grad(), _fp8_matmuls(quantized, seen):
        want = model(torch.from_numpy(ids), torch.zeros(2, dtype=torch.int64), states)[0].numpy()
    with torch.no_grad():  # projections unquantized (experts are): the difference the check must see
        plain = model(torch.from_numpy(ids), torch.zeros(2, dtype=torch.int64), states)[0].numpy()
    got = GraphRunner(graph, art, m.graphs["prefill"].inputs, ["logits"]).run(ids)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - plain).max() > 100 * np.abs(got - want).max()  # the check sees quantization
    assert len(seen) == len(quantized)  # every quantized projection went through the simulation


def test_too_tight_gate_fails_the_compile_and_leaves_nothing(tiny, tmp_path):
    from qcn.compile.pipeline import run_pipeline
    from qcn.compile.passes.quant.accuracy import AccuracyGateError

    out = tmp_path / "tight"
    recipe = _tiny_recipe(tmp_path, tiny, out, granularity="block128",
                          gate={"tokens": 128, "seq_len": 64, "top1_min": None, "ppl_ratio_max": None, "kl_mean_max": 0.0})
    with pytest.raises(AccuracyGateError, match=r"accuracy gate failed: kl_mean [0-9.e-]+ > quantization.gate.kl_mean_max 0"):
        run_pipeline(recipe)
    assert not out.exists()
    stages = out.with_name(out.name + ".stages")
    assert sorted(p.name for p in stages.iterdir()) == ["export"]  # the export stage stays (it passed)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left


def test_every_token_logits_bypasses_the_last_token_gather():
    x = oh.make_tensor_value_info("h", TP.FLOAT, ["b", "t", 4])
    nodes = [oh.make_node("Gather", ["h", "i"], ["sel"], axis=1), oh.make_node("Relu", ["sel"], ["r"]),
             oh.make_node("MatMul", ["r", "W"], ["logits"])]
    g = oh.make_graph(nodes, "g", [x], [oh.make_tensor_value_info("logits", TP.FLOAT, ["b", 3])],
                      [nh.from_array(np.array(-1, np.int64), "i"), nh.from_array(np.eye(4, 3, dtype=np.float32), "W")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 10
    all_ = every_token_logits(m)
    h = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    full = ort.InferenceSession(all_.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]
    last = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]
    assert full.shape == (2, 5, 3) and np.array_equal(full[:, -1], last)
    assert every_token_logits(all_) is all_


# --- FP8 experts: the qcn::MoE "fp8" format ---------------------------------------------------

@pytest.mark.parametrize("granularity", ["channel", "block128"])
def test_moe_fp8_body_in_ort_equals_the_reference(granularity):
    """The fp8 function body (ORT) == the naive reference on the dequantized weights (the op's
    own precision), odd sizes (H = 200: a short last 128-block); the per-row format is the kernels'."""
    from qcn.compile.plugins.moe import op as moe_op
    from qcn.compile.plugins.moe.quant import quantize_fp8_rowwise
    from qcn.compile.plugins.moe.reference import dequantize_fp8_blocks, moe_reference
    from qcn.compile.passes.quant.fp8_experts import quantize_rows

    g = torch.Generator().manual_seed(0)
    Nt, H, E, I, Is, k = 7, 200, 5, 24, 40, 2
    x = torch.randn(Nt, H, generator=g)
    rw = torch.randn(E, H, generator=g) * 0.1
    ws = {"gate_up": torch.randn(E, 2 * I, H, generator=g) * 0.05, "down": torch.randn(E, H, I, generator=g) * 0.05,
          "shared_gate_up": torch.randn(2 * Is, H, generator=g) * 0.05, "shared_down": torch.randn(H, Is, generator=g) * 0.05}
    ws["gate_up"][1, 3] = 0  # an all-zero row: scale 1
    sg = torch.randn(1, H, generator=g) * 0.1
    q, s = {}, {}
    for n, w in ws.items():
        q[n], s[n] = quantize_rows(w, granularity)
        G = 1 if granularity == "channel" else -(-w.shape[-1] // 128)
        assert s[n].shape == (*w.shape[:-1], G) and s[n].dtype == torch.float32
        if granularity == "channel":
            kq, ks = quantize_fp8_rowwise(w)  # the Triton kernels' FP8 format
            assert torch.equal(kq.view(torch.uint8), q[n].view(torch.uint8)) and torch.equal(ks, s[n][..., 0])
    dq = {n: dequantize_fp8_blocks(q[n], s[n]) for n in q}
    for n, w in ws.items():  # naive: each element times its own block's scale
        B = w.shape[-1] if s[n].shape[-1] == 1 else 128
        for kk in (0, w.shape[-1] - 1):
            assert torch.equal(dq[n][..., kk], q[n][..., kk].float() * s[n][..., kk // B])
    want = moe_reference(x, rw, dq["gate_up"], dq["down"], dq["shared_gate_up"], dq["shared_down"], sg, k, True,
                         compute_dtype=None)
    names = moe_op.INPUTS + moe_op.SCALE_INPUTS
    vals = [x, rw, q["gate_up"], q["down"], q["shared_gate_up"], q["shared_down"], sg] + [s[n] for n in moe_op.QUANTIZED]
    inits = []
    for n, v in zip(names[1:], vals[1:]):
        t = nh.from_array(v.view(torch.uint8).numpy() if v.dtype == torch.float8_e4m3fn else v.numpy(), n)
        if v.dtype == torch.float8_e4m3fn:
            t.data_type = TP.FLOAT8E4M3FN
        inits.append(t)
    node = oh.make_node("MoE", names, ["y"], domain="qcn", top_k=k, norm_topk_prob=1, weight_format="fp8")
    node.overload = moe_op.overload("fp8")
    gr = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", H])],
                       [oh.make_tensor_value_info("y", TP.FLOAT, ["n", H])], inits)
    m = oh.make_model(gr, opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid("qcn", 1)],
                      functions=[moe_op.function_proto(23, "fp8")])
    m.ir_version = 10
    onnx.checker.check_model(m)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=1e-6)


def test_fp8_experts_rule_and_lowering(tmp_path):
    """Positive: every float MoE node -> fp8 with the fp8 body; must NOT fire: an fp8 node (no
    candidate), a non-constant weight (refused, and then a mixed graph is an error). lower_moe
    lowers fp8 per-row scales to the kernels' fp8 plugins and refuses 1x128 blocks, saying why."""
    import onnx_ir as ir

    from qcn.compile.passes.lower_moe import LowerMoE
    from qcn.compile.passes.quant.fp8_experts import Fp8Experts
    from qcn.compile.plugins.moe import op as moe_op

    H, E, I, Is = 160, 4, 16, 24  # H > 128: block128 scales have 2 blocks along H
    rng = np.random.default_rng(0)

    def graph(n_moe=2, const=None):
        const = set(range(n_moe)) if const is None else const  # MoE nodes whose `down` weight is a constant
        nodes, inits, prev = [], [], "x"
        for j in range(n_moe):
            names = [prev] + [f"{n}{j}" for n in moe_op.INPUTS[1:]]
            shapes = {"router_weight": (E, H), "gate_up": (E, 2 * I, H), "down": (E, H, I), "shared_gate_up": (2 * Is, H),
                      "shared_down": (H, Is), "shared_gate": (1, H)}
            for n, shp in shapes.items():
                if j in const or n != "down":
                    inits.append(nh.from_array((rng.standard_normal(shp) * 0.1).astype(np.float32), f"{n}{j}"))
            nodes.append(oh.make_node("MoE", names, [f"y{j}"], domain="qcn", top_k=2, norm_topk_prob=1,
                                      weight_format="float"))
            prev = f"y{j}"
        inputs = [oh.make_tensor_value_info("x", TP.FLOAT, [5, H])]
        inputs += [oh.make_tensor_value_info(f"down{j}", TP.FLOAT, [E, H, I]) for j in range(n_moe) if j not in const]
        g = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info(prev, TP.FLOAT, [5, H])], inits,
                          value_info=[oh.make_tensor_value_info(f"y{j}", TP.FLOAT, [5, H]) for j in range(n_moe - 1)])
        m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid("qcn", 1)],
                          functions=[moe_op.function_proto(23)])
        m.ir_version = 10
        return m

    def ctx(gran):
        return PassContext("tensorrt", QuantizationOptions(experts="fp8", fp8_granularity=gran,
                                                           calibration=CalibrationOptions(source=tmp_path)),
                           "decode", PassWeights(tmp_path / gran), {})

    for gran in ("channel", "block128"):
        (tmp_path / gran).mkdir()
        proto = graph()
        model = to_ir(proto, "t")
        c = ctx(gran)
        res = apply(Fp8Experts(c), model)
        c.weights.close()
        assert res.counts() == {"matched": 2, "rewritten": 2, "refused": 0, "new_nodes": 2}
        out = to_proto(model)
        assert [oh.get_attribute_value(a) for n in out.graph.node for a in n.attribute if a.name == "weight_format"] \
            == [b"fp8", b"fp8"]
        body = [f for f in out.functions if f.overload == "fp8"]
        assert len(body) == 1 and list(body[0].input)[-4:] == moe_op.SCALE_INPUTS
        assert [n.overload for n in out.graph.node if n.op_type == "MoE"] == ["fp8", "fp8"]
        path = tmp_path / gran / "m.onnx"
        onnx.save(out, str(path))
        x = rng.standard_normal((5, H)).astype(np.float32)
        yq = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        # quantized (exactness: test_moe_fp8_body_in_ort_equals_the_torch_op; routing may flip here)
        assert np.isfinite(yq).all() and np.abs(yq - y).max() > 0
        again = apply(Fp8Experts(ctx(gran)), model)  # must NOT fire on fp8 nodes
        assert again.matched == 0 and again.rewritten == 0
        low = apply(LowerMoE(), to_ir(onnx.load(str(path), load_external_data=False), "t"))
        if gran == "channel":
            assert low.rewritten == 2 and low.config["weight_formats"] == ["fp8"]
            assert any(p.endswith("_fp8") for p in low.plugins)
        else:
            assert low.rewritten == 0 and "1x128 blocks" in low.refused[0][1] and "one fp32 scale per output row" in low.refused[0][1]
    (tmp_path / "mixed").mkdir()
    c = PassContext("onnxruntime", QuantizationOptions(experts="fp8", calibration=CalibrationOptions(source=tmp_path)),
                    "prefill", PassWeights(tmp_path / "mixed"), {})
    res = apply(Fp8Experts(c), to_ir(graph(const=set()), "t"))  # no constant down weights: refused, nothing mixed
    assert res.rewritten == 0 and len(res.refused) == 2 and all("is not a constant initializer" in w for _, w in res.refused)
    m = to_ir(graph(const={0}), "t")  # node 0 rewritten, node 1 refused: float and fp8 overloads in one graph
    res = apply(Fp8Experts(c), m)
    assert res.rewritten == 1 and len(res.refused) == 1
    out = to_proto(m)
    assert sorted(f.overload for f in out.functions) == ["", "fp8"]
    path = tmp_path / "mixed" / "m.onnx"
    onnx.save(out, str(path))
    feeds = {"x": rng.standard_normal((5, H)).astype(np.float32),
             "down1": (rng.standard_normal((E, H, I)) * 0.1).astype(np.float32)}
    assert np.isfinite(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]).all()
    c.weights.close()


# --- FP8 activations in front of already-FP8 weights (the official FP8 release) ----------------

def test_fp8_activations_rule_adds_only_the_activation_qdq(tmp_path):
    from qcn.compile.passes.quant.fp8_activations import Fp8Activations, calibration_targets

    rng = np.random.default_rng(4)
    W = torch.from_numpy(rng.standard_normal((K, N)).astype(np.float32))
    s = torch.stack([W[i:i + 128].abs().amax(0) / 448 for i in range(0, K, 128)])  # 1x128 blocks
    wq = (W / s.repeat_interleave(128, 0)[:K]).to(torch.float8_e4m3fn)
    wq_t = nh.from_array(wq.view(torch.uint8).numpy(), "Wq")
    wq_t.data_type = TP.FLOAT8E4M3FN
    i8 = nh.from_array(np.zeros((K, N), np.int8), "Wi8")  # an int8 DequantizeLinear: refused, not FP8
    nodes = [oh.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"], axis=0, block_size=128),
             oh.make_node("MatMul", ["x", "Wd"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("DequantizeLinear", ["Wi8", "si"], ["Wid"], axis=1),
             oh.make_node("MatMul", ["x", "Wid"], ["h2"]), oh.make_node("Add", ["r", "h2"], ["y"])]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", K])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["n", N])],
                      [wq_t, nh.from_array(s.numpy(), "s"), i8, nh.from_array(np.ones(N, np.float32), "si")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 10
    model = to_ir(m, "t")
    assert calibration_targets(model) == {"Wq": "x"}
    c = _ctx(tmp_path, {"Wq": _amax(3.0)})
    res = apply(Fp8Activations(c), model)
    c.weights.close()
    assert res.rewritten == 1 and res.matched == 2 and "other than a float8e4m3fn constant" in res.refused[0][1]
    out = to_proto(model)
    inits = {i.name: i for i in out.graph.initializer}
    assert inits["Wq"].raw_data == wq.view(torch.uint8).numpy().tobytes()  # the checkpoint's bytes, untouched
    assert [n.op_type for n in out.graph.node].count("QuantizeLinear") == 1
    x = rng.standard_normal((3, K)).astype(np.float32)
    y = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sx = torch.tensor(3.0 / 448)
    xdq = (torch.from_numpy(x) / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
    ref = torch.relu(xdq @ (wq.float() * s.repeat_interleave(128, 0)[:K])) + torch.from_numpy(x) @ torch.zeros(K, N)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)
    again = apply(Fp8Activations(_ctx(tmp_path, {"Wq": _amax(3.0)})), model)  # must NOT fire twice
    assert again.rewritten == 0 and again.matched == 1  # only the int8 one, refused again
