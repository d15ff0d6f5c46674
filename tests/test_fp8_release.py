"""The official FP8 release kept bit-exact: a tiny FP8-block checkpoint (the project's generator,
the release's layout) exported with `quantization.weights: fp8` keeps the checkpoint's FP8 bytes
(transposed to [in, out]) behind DequantizeLinear(axis=0, block_size=b), and computes the same
logits as the `weights: none` export, which dequantizes on load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qcn.compile.export.checkpoint import open_checkpoint
from qcn.compile.export.config import load_model_config
from qcn.compile.export.fp8 import SCALE_SUFFIX, fp8_roles
from qcn.compile.export.tiny import TINY_SPECS, config_dict, write_tiny_checkpoint
from qcn.compile.export.weights import weight_specs
from qcn.compile.pipeline import compile_recipe
from qcn.compile.recipe import QuantizationOptions, Recipe, RuntimeOptions
from qcn.runtime.generate import load

# (spec, block): "odd" has ragged blocks everywhere (hidden 72, widths 40/56/88, block 32) and
# MQA; "bias" has attention biases and adjacent attention layers. The release's block (128) is
# checked at the weight map below (test_weight_map_fp8_form_dequantizes_exactly), cheaply.
CASES = [("odd", 32), ("bias", 16)]


def _compile(ckpt, out, weights: str, experts: str = "none"):
    recipe = Recipe(name=f"fp8-{weights}", checkpoint=ckpt, output=out, runtime=RuntimeOptions(max_context=128),
                    quantization=QuantizationOptions(weights=weights, experts=experts))
    return compile_recipe(recipe)


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def pair(request, tmp_path_factory):
    spec, block = request.param
    root = tmp_path_factory.mktemp(f"fp8-{spec}")
    ckpt = write_tiny_checkpoint(root / "ckpt", TINY_SPECS[spec], fp8_block=block, seed=3)
    return ckpt, block, _compile(ckpt, root / "fp8", "fp8"), _compile(ckpt, root / "none", "none")


def _initializers(artifact, graph="prefill"):
    proto = onnx.load(str(artifact / f"{graph}.onnx"))
    return proto, {t.name: t for t in proto.graph.initializer}


def _fp8_bytes(t: onnx.TensorProto) -> np.ndarray:
    assert t.data_type == onnx.TensorProto.FLOAT8E4M3FN
    return np.frombuffer(numpy_helper.to_array(t).tobytes(), np.uint8).reshape(tuple(t.dims))


def test_projections_keep_the_checkpoints_fp8_bytes(pair):
    ckpt, block, fp8, _ = pair
    cfg = load_model_config(ckpt)
    proto, inits = _initializers(fp8)
    dq = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    kept = [s for s in weight_specs(cfg) if s.fp8 == "projection"]
    assert kept and len(dq) == len(kept)
    with open_checkpoint(ckpt) as c:
        for s in kept:
            node = dq[s.name]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"axis": 0, "block_size": block}, s.name
            assert list(node.input) == [s.name, s.name + SCALE_SUFFIX]
            w = _fp8_bytes(inits[s.name])
            K, N = s.shape
            assert w.shape == (K, N)
            assert tuple(inits[s.name + SCALE_SUFFIX].dims) == (-(-K // block), N)
            if len(s.sources) == 1 and s.transform.__name__ == "_t":  # plain transposes: the bytes themselves
                raw = c.get_raw(s.sources[0]).view(torch.uint8).numpy()
                np.testing.assert_array_equal(w, raw.T, err_msg=s.name)
            # every kept weight (de-interleaved, concatenated too) holds exactly the checkpoint's FP8 values
            # byte multiset per tensor: a transform that only moves data keeps it
            raw_all = np.concatenate([c.get_raw(x).view(torch.uint8).numpy().ravel() for x in s.sources])
            np.testing.assert_array_equal(np.sort(w.ravel()), np.sort(raw_all), err_msg=s.name)
            consumers = [n.op_type for n in proto.graph.node if node.output[0] in n.input]
            assert consumers and set(consumers) == {"MatMul"}, (s.name, consumers)


def test_dequantized_weights_equal_dequantize_on_load_exactly(pair):
    """DQ(W, scale) of the FP8 export == the `weights: none` export's fp32 weight, bit for bit
    (the 1 x b re-expression of the b x b block scale is exact)."""
    ckpt, block, fp8, none = pair
    _, q = _initializers(fp8)
    _, f = _initializers(none)
    names = [n for n in q if n + SCALE_SUFFIX in q]
    assert names
    for name in names:
        w = numpy_helper.to_array(q[name]).astype(np.float32)
        scale = numpy_helper.to_array(q[name + SCALE_SUFFIX])
        deq = w * np.repeat(scale, block, axis=0)[: w.shape[0]]
        ref = numpy_helper.to_array(f[name])
        assert ref.dtype == np.float32
        np.testing.assert_array_equal(deq, ref, err_msg=name)


def test_logits_equal_dequantize_then_compute(pair):
    ckpt, _, fp8, none = pair
    vocab = load_model_config(ckpt).vocab_size
    ids = np.random.default_rng(7).integers(0, vocab, 37).tolist()
    outs = []
    for artifact in (fp8, none):
        gen = load(artifact, threads=1)
        try:
            s = gen.session
            h = s.allocate()
            logits = [s.prefill(h, ids)]
            tok = int(np.argmax(logits[-1]))
            for _ in range(5):
                logits.append(s.decode([h], [tok])[0])
                tok = int(np.argmax(logits[-1]))
            outs.append(np.stack([np.asarray(x).reshape(-1) for x in logits]))
        finally:
            gen.close()
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec,block", [("default", 128), ("mlp_only", 128), ("seven", 48)])
def test_weight_map_fp8_form_dequantizes_exactly(tmp_path, spec, block):
    """fp8_chunks x fp8_scale (1 x b blocks along K) == the dequantize-on-load weight, bit for bit,
    for every FP8 role (stacked experts [E, R, K] with [E, R, G] scales included)."""
    ckpt = write_tiny_checkpoint(tmp_path / "c", TINY_SPECS[spec], fp8_block=block, seed=5)
    with open_checkpoint(ckpt) as c:
        specs = [s for s in weight_specs(load_model_config(ckpt)) if s.fp8]
        assert {s.fp8 for s in specs} == {"projection", "expert", "shared_expert"}
        for s in specs:
            w = torch.cat([x.reshape(-1) for _, x in s.fp8_chunks(c)]).reshape(s.shape)
            assert w.dtype == torch.float8_e4m3fn
            scale = s.fp8_scale(c)
            k_axis = -1 if s.fp8 != "projection" else 0  # projections [K, N]; MoE weights [.., R, K]
            K = s.shape[k_axis]
            assert scale.shape[k_axis] == -(-K // block), s.name
            deq = w.float() * scale.repeat_interleave(block, dim=k_axis).narrow(k_axis, 0, K)
            assert torch.equal(deq, s.load(c, torch.float32)), s.name


def test_weights_none_and_non_fp8_checkpoints_are_unchanged(tmp_path):
    """weights: none on an FP8 checkpoint dequantizes (no FP8 initializer); weights: fp8 on a
    float checkpoint keeps nothing at export (the quantization pass quantizes it)."""
    assert fp8_roles("none", "none") == frozenset()
    ckpt = write_tiny_checkpoint(tmp_path / "f32", TINY_SPECS["sparse_step2"], seed=1)
    out = _compile(ckpt, tmp_path / "a", "fp8")
    proto, inits = _initializers(out)
    assert not [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert all(t.data_type != onnx.TensorProto.FLOAT8E4M3FN for t in inits.values())


def test_routers_embeddings_and_lm_head_are_never_fp8_specs(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_dict(TINY_SPECS["default"])))
    fp8 = {s.name.split(".")[-1]: s.fp8 for s in weight_specs(load_model_config(d)) if s.fp8}
    assert fp8 == {"in_proj_qkvz": "projection", "in_proj_ba": "projection", "out_proj": "projection",
                   "q_proj": "projection", "k_proj": "projection", "v_proj": "projection", "o_proj": "projection",
                   "experts_gate_up": "expert", "experts_down": "expert",
                   "shared_gate_up": "shared_expert", "shared_down": "shared_expert"}


def test_experts_keep_the_checkpoints_fp8_bytes_in_the_moe_fp8_format(tmp_path):
    """weights + experts fp8 on a 128-block FP8 checkpoint: every MoE layer is qcn::MoE "fp8"
    (overload "fp8") over the checkpoint's FP8 bytes (expert by expert, gate rows then up rows)
    with fp32 [E, R, ceil(K/128)] scales, and the logits equal the dequantize-on-load export."""
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", TINY_SPECS["default"], fp8_block=128, seed=4)
    fp8 = _compile(ckpt, tmp_path / "fp8", "fp8", "fp8")
    none = _compile(ckpt, tmp_path / "none", "none")
    cfg = load_model_config(ckpt)
    proto, inits = _initializers(fp8)
    moe = [n for n in proto.graph.node if n.op_type == "MoE"]
    assert len(moe) == sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) > 0
    assert {n.overload for n in moe} == {"fp8"} and any(f.name == "MoE" and f.overload == "fp8" for f in proto.functions)
    E = cfg.num_experts
    with open_checkpoint(ckpt) as c:
        for n in moe:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["weight_format"] == b"fp8"
            gate_up, down, shared_gate_up, shared_down = (n.input[i] for i in (2, 3, 4, 5))
            layer = gate_up.split(".")[1]
            src = f"model.layers.{layer}.mlp."
            want = np.concatenate([c.get_raw(f"{src}experts.{e}.{p}_proj.weight").view(torch.uint8).numpy()[None]
                                   for e in range(E) for p in ("gate", "up")], axis=1).reshape(E, -1, cfg.hidden_size)
            np.testing.assert_array_equal(_fp8_bytes(inits[gate_up]), want)
            want = np.stack([c.get_raw(f"{src}experts.{e}.down_proj.weight").view(torch.uint8).numpy() for e in range(E)])
            np.testing.assert_array_equal(_fp8_bytes(inits[down]), want)
            np.testing.assert_array_equal(_fp8_bytes(inits[shared_down]),
                                          c.get_raw(f"{src}shared_expert.down_proj.weight").view(torch.uint8).numpy())
            for w, s in zip((gate_up, down, shared_gate_up, shared_down), n.input[7:11]):
                t = inits[s]
                assert s == w + SCALE_SUFFIX and t.data_type == onnx.TensorProto.FLOAT
                K = inits[w].dims[-1]
                assert list(t.dims) == list(inits[w].dims[:-1]) + [-(-K // 128)]
    vocab = cfg.vocab_size
    ids = np.random.default_rng(3).integers(0, vocab, 21).tolist()
    outs = []
    for artifact in (fp8, none):
        gen = load(artifact, threads=1)
        try:
            h = gen.session.allocate()
            outs.append(np.stack([gen.session.prefill(h, ids), gen.session.decode([h], [5])[0]]))
        finally:
            gen.close()
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)


def test_the_release_through_every_fp8_pass_is_not_requantized(tmp_path):
    """weights + experts + kv_cache fp8 on the FP8 release: the passes add activation Q/DQ in
    front of the kept projections (fp8_activations) and FP8 caches, and re-quantize nothing
    (fp8_projection and fp8_experts rewrite no node: the weights are already the checkpoint's FP8)."""
    import argparse as a

    from qcn.compile.pipeline import run_pipeline
    from qcn.compile.recipe import CalibrationOptions, GateOptions

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", TINY_SPECS["default"], fp8_block=128, seed=4)
    text = tmp_path / "t.txt"
    text.write_text(Path(a.__file__).read_text())
    q = QuantizationOptions(weights="fp8", experts="fp8", kv_cache="fp8",
                            calibration=CalibrationOptions(source=text, tokens=512, seq_len=64),
                            gate=GateOptions(tokens=512, seq_len=64, top1_min=None, ppl_ratio_max=None))
    out = run_pipeline(Recipe(name="release", checkpoint=ckpt, output=tmp_path / "art",
                              runtime=RuntimeOptions(max_context=256), quantization=q)).output
    cfg = load_model_config(ckpt)
    n_proj = sum(1 for s in weight_specs(cfg) if s.fp8 == "projection")
    rows = {r["pass"]: r["graphs"]["prefill"] for r in json.loads((out / "passes_report.json").read_text())["passes"]
            if r["runs"]}
    assert rows["fp8_projection"]["rewritten"] == 0 and rows["fp8_experts"]["rewritten"] == 0
    assert rows["fp8_activations"]["rewritten"] == n_proj
    assert rows["kv_fp8"]["rewritten"] == cfg.layer_types.count("full_attention")
    proto = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_dq")]
    assert len(dq) == n_proj  # the export's weight DQs, untouched
    assert np.isfinite(json.loads((out / "accuracy.json").read_text())["ppl_ratio"])
