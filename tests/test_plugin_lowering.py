"""Plugin lowering for full TensorRT (the onnxscript rules compile/passes/lower_*.py, their
registration through compile/plugins/registry.py and compile/build/plugins.py), on CPU.

No full TensorRT and no GPU here: the registrations run against the stub of ``tensorrt.plugin``
(tests/trt_stub.py, fixture ``trt_stub``) that records each plugin's descriptor function. Checked: the lowered
graph is valid ONNX; each plugin node names a registered plugin id (op_type + plugin_namespace),
has as many inputs as the descriptor has tensor parameters and exactly its attributes; the
descriptors evaluated along the chain give the original node's output shapes; one
must-NOT-lower case per op (node and its function body left alone); counts returned; nothing
happens for tensorrt_rtx. NOT covered (cannot run here): TensorRT's parser accepting these
nodes, building an engine with the plugins, running it.
"""

import inspect

import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("triton")

from trt_stub import TensorDesc  # noqa: E402

from qcn.compile.build import plugins as P  # noqa: E402
from qcn.compile.passes.base import PLUGIN_DOMAIN, PassError, apply, to_ir, to_proto  # noqa: E402
from qcn.compile.passes.lower_cached_attention import LowerCachedAttention  # noqa: E402
from qcn.compile.passes.lower_gated_deltanet import LowerGatedDeltaNet  # noqa: E402
from qcn.compile.passes.lower_moe import DECODE_MAX_TOKENS, LowerMoE  # noqa: E402
from qcn.compile.passes.plan import plan_for  # noqa: E402
from qcn.compile.passes.stage import run_graph  # noqa: E402
from qcn.compile.plugins.attention import op as attn_op  # noqa: E402
from qcn.compile.plugins.gated_deltanet import op as gdn_op  # noqa: E402
from qcn.compile.plugins.moe import op as moe_op  # noqa: E402

BF, F32, I64 = TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.INT64
OPSET = 23
# tiny sizes: GDN Hk 2, Hv 4, Dk = Dv 32, K 4; MoE H 64, E 8, I 32, Is 48, top_k 2; attention 4/2/32
Hk, Hv, Dk, Dv, K = 2, 4, 32, 32, 4
C = 2 * Hk * Dk + Hv * Dv
H, E, I, Is, TOPK = 64, 8, 32, 48, 2
HQ, KVH, D = 4, 2, 32
BIND = {"B": 2, "T": 5, "N": 10, "P": 70}
OP_PASS = {"GatedDeltaNet": "lower_gated_deltanet", "MoE": "lower_moe", "CachedAttention": "lower_cached_attention"}


def lower_all(m: onnx.ModelProto, module: str = "tensorrt"):
    """The passes stage's per-graph run: (lowered proto, {op: report entry})."""
    out, entries = run_graph(m, module, "test graph")
    by_pass = dict(zip([p.name for p, _ in plan_for(module)], entries))
    return out, {op: by_pass[name] for op, name in OP_PASS.items()}


def counts(entry: dict) -> dict:
    return {k: entry[k] for k in ("matched", "rewritten", "refused", "new_nodes")}


def plugins_section(results: dict) -> dict:
    return {OP_PASS[op]: {"config": r["config"], "plugins": r["plugins"]} for op, r in results.items() if r["rewritten"]}


def used_plugins(results: dict) -> list[str]:
    return sorted(set().union(*(r["plugins"] for r in results.values())))


# ---------------------------------------------------------------- test graphs
def vi(name, dt, shape):
    return helper.make_tensor_value_info(name, dt, shape)


def gdn_node(tag="", a_log_dt=F32, dv="static"):
    names = [f"{n}{tag}" for n in gdn_op.INPUTS]
    dvd = Dv if dv == "static" else "Dv"
    shapes = [["B", "T", C], ["B", "T", Hv, dvd], ["B", "T", Hv], ["B", "T", Hv], [C, K], [Hv], [Hv], [dvd],
              ["B", C, K - 1], ["B", Hv, Dk, dvd]]
    dts = [BF] * 5 + [a_log_dt] + [BF] * 3 + [F32]
    outs = [f"gdn_{n}{tag}" for n in gdn_op.OUTPUTS]
    out_vi = [vi(outs[0], BF, ["B", "T", Hv * Dv]), vi(outs[1], BF, ["B", C, K - 1]), vi(outs[2], F32, ["B", Hv, Dk, dvd])]
    node = helper.make_node("GatedDeltaNet", names, outs, name=f"gdn{tag}", domain="qcn", num_k_heads=Hk,
                            norm_eps=1e-6)
    return node, [vi(n, dt, s) for n, dt, s in zip(names, dts, shapes)], out_vi


def moe_node(tag="", fmt="float", n="N", e_router=E):
    names = [f"{x}{tag}" for x in moe_op.INPUTS]
    shapes = [[n, H], [e_router, H], [E, 2 * I, H], [E, H, I], [2 * Is, H], [H, Is], [1, H]]
    node = helper.make_node("MoE", names, [f"y{tag}"], name=f"moe{tag}", domain="qcn", top_k=TOPK, norm_topk_prob=1,
                            weight_format=fmt)
    return node, [vi(x, BF, s) for x, s in zip(names, shapes)], [vi(f"y{tag}", BF, [n, H])]


def attn_node(tag="", t=1, past_len_dt=I64):
    names = [f"{x}{tag}" for x in attn_op.INPUTS]
    shapes = [["B", t, HQ, D], ["B", t, KVH, D], ["B", t, KVH, D], ["B", KVH, "P", D], ["B", KVH, "P", D], ["B"]]
    node = helper.make_node("CachedAttention", names, [f"out{tag}"], name=f"attn{tag}", domain="qcn", scale=D ** -0.5)
    return node, [vi(x, past_len_dt if x.startswith("past_len") else BF, s) for x, s in zip(names, shapes)], \
        [vi(f"out{tag}", BF, ["B", t, HQ, D])]


def model_of(*parts):
    nodes = [p[0] for p in parts]
    ins = [v for p in parts for v in p[1]]
    outs = [v for p in parts for v in p[2]]
    g = helper.make_graph(nodes, "g", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("qcn", 1)],
                          functions=[op.function_proto(OPSET) for op in (gdn_op, moe_op, attn_op)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


# ---------------------------------------------------------------- checks against the descriptors
def shapes_of(model):
    out = {}
    for v in list(model.graph.input) + list(model.graph.output):
        out[v.name] = [d.dim_value if d.HasField("dim_value") else BIND[d.dim_param]
                       for d in v.type.tensor_type.shape.dim]
    return out


def is_tensor_param(p):
    return p.annotation is TensorDesc or p.annotation in ("trtp.TensorDesc", "TensorDesc")


def check_against_registry(lowered, original_shapes, reg):
    """Every plugin node against its registered descriptor; returns the plugin ids used."""
    onnx.checker.check_model(lowered)
    shapes = dict(original_shapes)
    used = set()
    for node in lowered.graph.node:
        if node.domain != PLUGIN_DOMAIN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.pop("aot") == 1 and attrs.pop("plugin_version") == b"1"
        pid = f"{attrs.pop('plugin_namespace').decode()}::{node.op_type}"
        assert pid in reg and set(reg[pid]) == {"desc", "autotune", "aot"}, (pid, sorted(reg))
        params = list(inspect.signature(reg[pid]["desc"]).parameters.values())
        tensors = [p for p in params if is_tensor_param(p)]
        assert len(node.input) == len(tensors), (pid, list(node.input), [p.name for p in tensors])
        assert set(attrs) == {p.name for p in params if not is_tensor_param(p)}, (pid, attrs)
        outs = reg[pid]["desc"](*[TensorDesc(shapes[i]) for i in node.input], **attrs)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        assert len(outs) == len(node.output), pid
        for name, o in zip(node.output, outs):
            got = [int(x) for x in o.shape_expr]
            if name in original_shapes:  # a graph output: must be what the qcn node produced
                assert got == original_shapes[name], (pid, name, got, original_shapes[name])
            shapes[name] = got
        used.add(pid)
    return used


# ---------------------------------------------------------------- tests
def test_all_three_lower_and_match_registered_descriptors(trt_stub):
    m = model_of(gdn_node(), moe_node(), attn_node())
    shapes = shapes_of(m)
    lowered, res = lower_all(m)
    assert {op: counts(r) for op, r in res.items()} == {
        "GatedDeltaNet": {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 1},
        "MoE": {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 6},
        "CachedAttention": {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 2}}
    assert not any(n.domain == "qcn" for n in lowered.graph.node) and not lowered.functions
    ids = P.register_plugins(plugins_section(res), 89)
    from qcn.compile.plugins.gated_deltanet import trt_plugin as gdn_tp
    assert gdn_tp._registered == (89, None)  # the recipe's cc reached the GatedDeltaNet registration
    used = check_against_registry(lowered, shapes, trt_stub)
    assert used == set(ids) == set(used_plugins(res)) == {
        "qcn::GatedDeltaNet", "qcn_attn::decode_split_bf16", "qcn_attn::decode_reduce", "qcn_moe::router_logits",
        "qcn_moe::router_topk", "qcn_moe::align", "qcn_moe::prefill_gate_up_dense", "qcn_moe::prefill_down_dense",
        "qcn_moe::combine_sorted"}
    # registered: GDN 1, attention split_bf16 + reduce, MoE 5 + 4 for the dense format only
    assert len(trt_stub) == 1 + 2 + 9
    # graph outputs keep their names (the runtime binds by name)
    assert [o.name for o in lowered.graph.output] == [o.name for o in m.graph.output]


def test_moe_decode_chain_when_tokens_static_and_small(trt_stub):
    m = model_of(moe_node(n=4))
    shapes = shapes_of(m)
    lowered, res = lower_all(m)
    assert counts(res["MoE"]) == {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 5}
    P.register_plugins(plugins_section(res), 90)
    assert check_against_registry(lowered, shapes, trt_stub) >= {"qcn_moe::decode_gate_up_dense",
                                                                 "qcn_moe::decode_down_dense", "qcn_moe::combine_slots"}


def test_moe_decode_bound_is_the_kernels():
    from qcn.compile.plugins.moe import launch as ops

    assert DECODE_MAX_TOKENS == ops.DECODE_MAX_TOKENS


@pytest.mark.parametrize("case", ["gdn_a_log_fp16", "gdn_dynamic_dv", "moe_int4", "moe_bad_shape", "attn_prefill_T",
                                  "attn_fp32_past_len"])
def test_must_not_lower(case):
    part, op, why = {"gdn_a_log_fp16": (gdn_node(a_log_dt=TensorProto.FLOAT16), "GatedDeltaNet", "A_log"),
                     "gdn_dynamic_dv": (gdn_node(dv="dyn"), "GatedDeltaNet", "not static"),
                     "moe_int4": (moe_node(fmt="int4"), "MoE", "weight_format"),
                     "moe_bad_shape": (moe_node(e_router=E + 1), "MoE", "expected"),
                     "attn_prefill_T": (attn_node(t="T"), "CachedAttention", "T"),
                     "attn_fp32_past_len": (attn_node(past_len_dt=F32), "CachedAttention", "past_len")}[case]
    m = model_of(part)
    before = m.SerializeToString()
    lowered, res = lower_all(m)
    r = res[op]
    assert counts(r) == {"matched": 1, "rewritten": 0, "refused": 1, "new_nodes": 0}
    assert why in r["refusals"][0]["reason"] and used_plugins(res) == []
    assert lowered is m and m.SerializeToString() == before  # untouched: the parser inlines the body


def test_attention_static_T_above_one_refused_and_mixed_graph():
    m = model_of(attn_node("_p", t=3), attn_node("_d", t=1), gdn_node())
    lowered, r = lower_all(m)
    assert counts(r["CachedAttention"]) == {"matched": 2, "rewritten": 1, "refused": 1, "new_nodes": 2}
    assert "decode (T == 1) only" in r["CachedAttention"]["refusals"][0]["reason"]
    assert [f.name for f in lowered.functions] == ["CachedAttention"]  # still used by the refused node
    onnx.checker.check_model(lowered)


def test_second_node_with_other_config_is_refused():
    a = moe_node("_a")
    b = moe_node("_b")
    next(a for a in b[0].attribute if a.name == "top_k").i = 3  # plugins are registered with one top_k
    model = to_ir(model_of(a, b), "two moe")
    r = apply(LowerMoE(), model)
    assert r.counts() == {"matched": 2, "rewritten": 1, "refused": 1, "new_nodes": 6}
    assert "differs" in r.refused[0][1]


def test_passes_return_counts_individually():
    model = to_ir(model_of(gdn_node(), attn_node()), "g")
    assert apply(LowerGatedDeltaNet(), model).counts()["rewritten"] == 1
    assert apply(LowerCachedAttention(), model).counts() == {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 2}
    assert apply(LowerMoE(), model).counts() == {"matched": 0, "rewritten": 0, "refused": 0, "new_nodes": 0}
    onnx.checker.check_model(to_proto(model))


@pytest.mark.parametrize("module", ["onnxruntime", "tensorrt_rtx"])
def test_no_lowering_on_cpu_or_rtx(module):
    m = model_of(gdn_node(), moe_node(), attn_node())
    lowered, res = lower_all(m, module)
    assert lowered is m
    assert all(r == {"op_nodes": 1, "rewritten": 0} for r in res.values()), res
    assert all(why for p, why in plan_for(module) if p.name in OP_PASS.values())  # fusions may run there


def test_shape_inference_failure_is_an_error_not_a_weaker_check():
    node, ins, outs = moe_node()
    bad = helper.make_node("MatMul", [ins[0].name, "w3"], ["r"], name="broken")  # [N, 64] @ [3, 5]
    g = helper.make_graph([node, bad], "g", ins + [vi("w3", BF, [3, 5])], outs + [vi("r", BF, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("qcn", 1)],
                          functions=[moe_op.function_proto(OPSET)])
    with pytest.raises(PassError, match="bad.onnx: ONNX shape inference failed"):
        to_ir(m, "bad.onnx")


def test_register_twice_same_config_is_a_no_op_other_cc_is_an_error(trt_stub):
    _, res = lower_all(model_of(gdn_node(), moe_node()))
    section = plugins_section(res)
    assert P.register_plugins(section, 90) == P.register_plugins(section, 90)
    with pytest.raises(P.PluginRegistrationError, match="already registered"):
        P.register_plugins(section, 80)


@pytest.fixture(scope="module")
def tiny_prefill(tmp_path_factory):
    """A real exported prefill graph."""
    from qcn.compile.export.tiny import TINY_SPECS, write_tiny_checkpoint
    from qcn.compile.pipeline import compile_recipe
    from qcn.compile.recipe import Recipe, RuntimeOptions

    tmp = tmp_path_factory.mktemp("tiny")
    ckpt = write_tiny_checkpoint(tmp / "ckpt", TINY_SPECS["sparse_step2"], seed=0)
    art = compile_recipe(Recipe(name="t", checkpoint=ckpt, output=tmp / "art", runtime=RuntimeOptions(max_context=256)))
    return art / "prefill.onnx"


def test_exported_tiny_graph(tiny_prefill, trt_stub):
    m = onnx.load(str(tiny_prefill), load_external_data=False)
    lowered, res = lower_all(m)
    c = {op: counts(r) for op, r in res.items()}
    # T is dynamic in prefill.onnx: attention (decode kernels only) stays inlined; the others lower
    assert c["CachedAttention"]["rewritten"] == 0 and c["CachedAttention"]["refused"] == c["CachedAttention"]["matched"]
    assert c["GatedDeltaNet"]["refused"] == 0 and c["GatedDeltaNet"]["rewritten"] >= 1, res
    assert c["MoE"]["refused"] == 0 and c["MoE"]["rewritten"] >= 1, res
    P.register_plugins(plugins_section(res), 89)
    assert {p.split("::")[0] for p in used_plugins(res)} == {"qcn", "qcn_moe"}
    assert [i.name for i in lowered.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in lowered.graph.output] == [o.name for o in m.graph.output]
    # topological and SSA (the checker itself wants weights.bin beside the model)
    known = {v.name for v in lowered.graph.input} | {i.name for i in lowered.graph.initializer}
    for n in lowered.graph.node:
        assert all(i in known or i == "" for i in n.input), n.name
        assert not known & set(n.output), n.name
        known |= set(n.output)
    # the weights stay external references to the export's weights.bin
    assert {e.value for i in lowered.graph.initializer for e in i.external_data if e.key == "location"} == {"weights.bin"}


def test_attention_with_fp8_caches_lowers_to_the_fp8_split_kernel(trt_stub):
    """A node reading FP8 caches (the kv_fp8 pass's: overload "fp8", k_scale / v_scale inputs)
    lowers to decode_split_fp8(q, past_key, past_value, past_len, k_scale, v_scale), checked
    against the registered descriptor; without its scales it is refused."""
    FP8 = onnx.TensorProto.FLOAT8E4M3FN
    node, ins, outs = attn_node("_8")
    node.input.extend(["k_scale_8", "v_scale_8"])
    node.overload = attn_op.FP8_OVERLOAD
    for v in ins:
        if v.name.startswith("past_key") or v.name.startswith("past_value"):
            v.type.tensor_type.elem_type = FP8
    ins += [vi("k_scale_8", F32, [1]), vi("v_scale_8", F32, [1])]
    m = model_of((node, ins, outs))
    m.functions.append(attn_op.function_proto(OPSET, fp8_cache=True))
    onnx.checker.check_model(m)
    shapes = shapes_of(m)
    lowered, r = lower_all(m)
    assert counts(r["CachedAttention"]) == {"matched": 1, "rewritten": 1, "refused": 0, "new_nodes": 2}
    split = next(n for n in lowered.graph.node if n.op_type == "decode_split_fp8")
    assert list(split.input) == ["q_8", "past_key_8", "past_value_8", "past_len_8", "k_scale_8", "v_scale_8"]
    P.register_plugins(plugins_section(r), 89)
    assert check_against_registry(lowered, shapes, trt_stub) == {"qcn_attn::decode_split_fp8", "qcn_attn::decode_reduce"}
    # the same FP8 caches without their scales: refused, left to the function body
    node2, ins2, outs2 = attn_node("_n")
    for v in ins2:
        if v.name.startswith(("past_key", "past_value")):
            v.type.tensor_type.elem_type = FP8
    model = to_ir(helper.make_model(helper.make_graph([node2], "g", ins2, outs2), opset_imports=m.opset_import), "g")
    res = apply(LowerCachedAttention(), model)
    assert res.counts()["rewritten"] == 0 and "k_scale and v_scale" in res.refused[0][1]
