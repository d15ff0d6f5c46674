"""FP8 KV cache (`quantization.kv_cache: fp8`, compile/passes/quant/kv_fp8.py): the pass's graphs,
the runtime's FP8 buffers, and the quantized graph against a naive torch simulation (the
unquantized model whose new K/V are quantized to E4M3 with the artifact's scales before they
enter the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper, numpy_helper

from qcn.compile.export.checkpoint import open_checkpoint
from qcn.compile.export.config import load_model_config
from qcn.compile.export.modeling import QcnModel, rope_tables
from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
from qcn.compile.passes.base import PassError, apply
from qcn.compile.passes.quant import kv_fp8
from qcn.compile.passes.quant.calibrate import ActivationRange
from qcn.compile.pipeline import run_pipeline
from qcn.compile.plugins.attention.op import function_proto
from qcn.compile.recipe import CalibrationOptions, GateOptions, QuantizationOptions, Recipe, RuntimeOptions
from qcn.runtime.generate import load

SPEC = "bias"  # 2 adjacent attention layers, attention biases: the smallest with several caches
FP8 = onnx.TensorProto.FLOAT8E4M3FN


def _text(tmp: Path) -> Path:
    import argparse
    import dataclasses as dc

    f = tmp / "calib.txt"
    f.write_text(Path(argparse.__file__).read_text() + Path(dc.__file__).read_text())
    return f


def _recipe(ckpt, out, text, kv: str):
    q = QuantizationOptions(kv_cache=kv, calibration=CalibrationOptions(source=text, tokens=512, seq_len=64, batch=4),
                            gate=GateOptions(tokens=512, seq_len=64, top1_min=None, ppl_ratio_max=None))
    return Recipe(name=f"kv-{kv}", checkpoint=ckpt, output=out, runtime=RuntimeOptions(max_context=256, max_batch=2),
                  quantization=q)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvfp8")
    ckpt = write_tiny_checkpoint(root / "ckpt", TINY_SPECS[SPEC], seed=2)
    text = _text(root)
    fp8 = run_pipeline(_recipe(ckpt, root / "fp8", text, "fp8")).output
    ref = run_pipeline(_recipe(ckpt, root / "ref", text, "activation")).output
    return ckpt, fp8, ref


def _attention_layers(ckpt) -> list[int]:
    return [i for i, k in enumerate(load_model_config(ckpt).layer_types) if k == "full_attention"]


def test_graphs_and_manifest_carry_fp8_caches(built):
    ckpt, art, _ = built
    layers = _attention_layers(ckpt)
    m = json.loads((art / "manifest.json").read_text())
    kv = {s["input"]: s["dtype"] for s in m["state"] if s["kind"] in ("key", "value")}
    assert kv and set(kv.values()) == {"float8_e4m3fn"} and len(kv) == 2 * len(layers)
    report = json.loads((art / "passes_report.json").read_text())
    row = next(r for r in report["passes"] if r["pass"] == "kv_fp8")
    for graph in ("prefill", "decode"):
        assert row["graphs"][graph]["rewritten"] == len(layers)
        proto = onnx.load(str(art / f"{graph}.onnx"), load_external_data=False)
        ins = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        outs = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
        for i in layers:
            assert ins[f"past_key.{i}"] == ins[f"past_value.{i}"] == FP8
            assert outs[f"new_key.{i}"] == outs[f"new_value.{i}"] == FP8
        nodes = [n for n in proto.graph.node if n.op_type == "CachedAttention"]
        assert len(nodes) == len(layers) and all(len(n.input) == 8 and n.overload == "fp8" for n in nodes)
        body = next(f for f in proto.functions if f.name == "CachedAttention" and f.overload == "fp8")
        assert list(body.input)[-2:] == ["k_scale", "v_scale"]
        assert [n.op_type for n in body.node].count("DequantizeLinear") == 2
    acc = json.loads((art / "accuracy.json").read_text())
    assert acc["tokens"] > 0 and np.isfinite(acc["ppl_ratio"])


def test_runtime_allocates_fp8_buffers_of_half_the_bytes(built):
    _, art, ref = built
    sizes = {}
    for name, a in (("fp8", art), ("ref", ref)):
        gen = load(a, threads=1)
        try:
            store = gen.session.store
            caches = store._cache
            assert caches
            sizes[name] = sum(c.nbytes for c in caches.values())
            if name == "fp8":
                assert {c.dtype for c in caches.values()} == {np.dtype(np.uint8)}
            h = gen.session.allocate()
            gen.session.prefill(h, list(range(5, 40)))
            snap = gen.session.snapshot(h)  # raw FP8 bytes travel in snapshots
            gen.session.restore(snap)
        finally:
            gen.close()
    assert sizes["fp8"] * 4 == sizes["ref"]  # fp32 activations: a quarter (bf16: a half)


def _scales(art: Path, layers) -> dict[int, tuple[float, float]]:
    proto = onnx.load(str(art / "prefill.onnx"), load_external_data=False)  # the scales are inline (4 bytes)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith("kv_cache.")}
    return {i: (float(inits[f"kv_cache.{i}.k_scale"].reshape(-1)[0]), float(inits[f"kv_cache.{i}.v_scale"].reshape(-1)[0]))
            for i in layers}


def _fake_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def test_graph_equals_naive_torch_fp8_kv_simulation(built):
    """ORT on the FP8-KV artifact == the eager torch model whose new K/V are quantized to E4M3
    (x / scale, saturated, round to nearest even) and dequantized before entering its cache."""
    ckpt, art, _ = built
    cfg = load_model_config(ckpt)
    layers = _attention_layers(ckpt)
    scales = _scales(art, layers)
    assert all(s > 0 for ks in scales.values() for s in ks)
    rope = rope_tables(cfg)
    model = QcnModel(cfg, rope, torch.float32, logits="last", device="cpu").eval()
    with open_checkpoint(ckpt) as c:
        model.load_weights(c, rope)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, 29).tolist()
    C, Kc = cfg.conv_dim, cfg.linear_conv_kernel_dim
    states = []
    for i, kind in enumerate(cfg.layer_types):
        if kind == "linear_attention":
            states += [torch.zeros(1, C, Kc - 1), torch.zeros(1, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                             cfg.linear_value_head_dim)]
        else:
            states += [torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim)] * 2
    ref_logits, ids, past = [], prompt, 0
    gen = load(art, threads=1)
    try:
        s = gen.session
        h = s.allocate()
        ours = [s.prefill(h, prompt)]
        for step in range(6):
            with torch.no_grad():
                out = model(torch.tensor([ids]), torch.tensor([past]), states)
            ref_logits.append(out[0][0].numpy())
            new = list(out[1:])
            for j, i in enumerate(range(len(cfg.layer_types))):
                a, b = new[2 * j], new[2 * j + 1]
                if cfg.layer_types[i] == "full_attention":
                    ks, vs = scales[i]
                    states[2 * j] = torch.cat([states[2 * j], _fake_fp8(a, ks)], dim=2)
                    states[2 * j + 1] = torch.cat([states[2 * j + 1], _fake_fp8(b, vs)], dim=2)
                else:
                    states[2 * j], states[2 * j + 1] = a, b
            past += len(ids)
            ids = [int(np.argmax(ref_logits[-1]))]
            if step < 5:
                ours.append(s.decode([h], ids)[0])
    finally:
        gen.close()
    ours = np.stack([np.asarray(x).reshape(-1) for x in ours])
    np.testing.assert_allclose(ours, np.stack(ref_logits), rtol=0, atol=2e-4)


def test_fp8_kv_differs_from_unquantized_but_stays_close(built):
    _, art, ref = built
    outs = []
    for a in (art, ref):
        gen = load(a, threads=1)
        try:
            h = gen.session.allocate()
            gen.session.prefill(h, list(range(3, 60)))
            outs.append(np.asarray(gen.session.decode([h], [7])[0]))
        finally:
            gen.close()
    diff = np.abs(outs[0] - outs[1]).max()
    assert 0 < diff < 0.5 * np.abs(outs[1]).max()


# --- the rule alone ------------------------------------------------------------------------

class _Ctx:
    def __init__(self, ranges):
        self.ranges = ranges
        self.quant = QuantizationOptions(kv_cache="fp8")
        self.weights = _InlineWeights()


class _InlineWeights:
    def add(self, op, name, tensor):
        return op.initializer(ir.tensor(tensor.numpy(), name=name), name=name)


def _attn_graph(cache_from_input: bool = True) -> ir.Model:
    """One CachedAttention layer 0 with its new K/V graph outputs, as the export writes it."""
    F = onnx.TensorProto.FLOAT
    B, T, Hq, KVH, D = "B", "T", 2, 1, 4
    inputs = [helper.make_tensor_value_info("q", F, [B, T, Hq, D]), helper.make_tensor_value_info("k", F, [B, T, KVH, D]),
              helper.make_tensor_value_info("v", F, [B, T, KVH, D]),
              helper.make_tensor_value_info("past_len", onnx.TensorProto.INT64, [B])]
    nodes = []
    if cache_from_input:
        inputs += [helper.make_tensor_value_info("past_key.0", F, [B, KVH, "P", D]),
                   helper.make_tensor_value_info("past_value.0", F, [B, KVH, "P", D])]
        pk, pv = "past_key.0", "past_value.0"
    else:  # caches computed in the graph (not the runtime's): not this pass's business
        inputs += [helper.make_tensor_value_info("kv_src", F, [B, KVH, "P", D])]
        nodes += [helper.make_node("Identity", ["kv_src"], ["pk"]), helper.make_node("Identity", ["kv_src"], ["pv"])]
        pk, pv = "pk", "pv"
    nodes += [helper.make_node("CachedAttention", ["q", "k", "v", pk, pv, "past_len"], ["out"], domain="qcn", scale=0.5),
              helper.make_node("Transpose", ["k"], ["new_key.0"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["v"], ["new_value.0"], perm=[0, 2, 1, 3])]
    outputs = [helper.make_tensor_value_info("out", F, [B, T, Hq, D]),
               helper.make_tensor_value_info("new_key.0", F, [B, KVH, T, D]),
               helper.make_tensor_value_info("new_value.0", F, [B, KVH, T, D])]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                          opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("qcn", 1)],
                          functions=[function_proto(23)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(m))


def _ranges(k=3.0, v=2.0):
    out = {}
    for key, amax in ((kv_fp8.range_key("new_key.0"), k), (kv_fp8.range_key("new_value.0"), v)):
        r = ActivationRange()
        r.update(np.array([amax], dtype=np.float32))
        out[key] = r
    return out


def test_rule_rewrites_a_runtime_cache_and_runs_in_ort():
    import onnxruntime as ort

    model = _attn_graph()
    assert kv_fp8.calibration_targets(model) == {kv_fp8.range_key("new_key.0"): "new_key.0",
                                                 kv_fp8.range_key("new_value.0"): "new_value.0"}
    res = apply(kv_fp8.KvFp8(_Ctx(_ranges())), model)
    assert res.counts() == {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 1}
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 3, 1, 4, generator=g), torch.randn(1, 3, 1, 4, generator=g)
    pk, pv = torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    ks, vs = 3.0 / 448, 2.0 / 448
    pk8, pv8 = (pk / ks).to(torch.float8_e4m3fn), (pv / vs).to(torch.float8_e4m3fn)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    as8 = lambda t: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(), FP8)  # noqa: E731
    out, nk, nv = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "past_len": np.array([4]),
                                  "past_key.0": as8(pk8), "past_value.0": as8(pv8)})
    want_k = (k.transpose(1, 2) / ks).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(nk).view(np.uint8), want_k)  # the bytes the runtime appends
    from qcn.compile.plugins.attention.reference import cached_attention_reference
    ref = cached_attention_reference(q, k, v, pk8, pv8, torch.tensor([4]), k_scale=ks, v_scale=vs, softmax_scale=0.5,
                                     compute_dtype=torch.float32)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_rule_must_not_fire():
    # caches that are not the runtime's graph inputs
    model = _attn_graph(cache_from_input=False)
    assert kv_fp8.calibration_targets(model) == {}
    assert apply(kv_fp8.KvFp8(_Ctx(_ranges())), model).counts()["rewritten"] == 0
    # a cache already FP8 (the op has its scale inputs): a second run changes nothing
    model = _attn_graph()
    apply(kv_fp8.KvFp8(_Ctx(_ranges())), model)
    assert apply(kv_fp8.KvFp8(_Ctx(_ranges())), model).counts() == {"matched": 0, "rewritten": 0, "refused": 0,
                                                                    "new_nodes": 0}
    # the recipe does not ask for it
    assert kv_fp8.SPEC.wanted(QuantizationOptions()) == "quantization.kv_cache is 'activation'"


def test_rule_without_a_range_is_an_error_naming_the_layer():
    with pytest.raises(PassError, match="layer 0 cannot have an FP8 KV cache: no calibrated range for new_key.0"):
        apply(kv_fp8.KvFp8(_Ctx({})), _attn_graph())
