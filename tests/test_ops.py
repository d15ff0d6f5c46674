"""Each qcn op alone: its ONNX function body (in onnxruntime) vs the naive per-token torch
reference on fresh random inputs of odd sizes, and the reference vs the transformers module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from op_harness import run_op_in_ort
from transformers import Qwen3NextConfig
from transformers.cache_utils import DynamicCache
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from qcn.compile.plugins.attention.op import OP as ATTENTION
from qcn.compile.plugins.attention.reference import cached_attention_reference
from qcn.compile.plugins.gated_deltanet.op import OP as GDN
from qcn.compile.plugins.moe.op import OP as MOE


def _close(ours, ref, atol):
    ours = torch.as_tensor(np.asarray(ours)) if not isinstance(ours, torch.Tensor) else ours
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ours).all()
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= atol, f"max abs error {err} > {atol}"


def _gdn_inputs(g, B, T, Hk, Hv, Dk, Dv, K):
    C = 2 * Hk * Dk + Hv * Dv
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(qkv=r(B, T, C), z=r(B, T, Hv, Dv), b=r(B, T, Hv), a=r(B, T, Hv), conv_weight=r(C, K) * 0.5,
                A_log=torch.rand(Hv, generator=g).mul(15).add(1).log(), dt_bias=r(Hv), norm_weight=r(Dv),
                conv_state=r(B, C, K - 1), recurrent_state=r(B, Hv, Dk, Dv))


@pytest.mark.parametrize("B,T,Hk,Hv,Dk,Dv,K", [(2, 7, 3, 6, 5, 4, 4), (1, 1, 2, 2, 3, 5, 3), (3, 13, 1, 2, 8, 7, 4),
                                              (1, 65, 2, 4, 6, 3, 5)])
def test_gated_deltanet_body_vs_reference(B, T, Hk, Hv, Dk, Dv, K):
    inputs = _gdn_inputs(torch.Generator().manual_seed(B * 100 + T), B, T, Hk, Hv, Dk, Dv, K)
    ref = GDN.torch_op(*inputs.values(), Hk, 1e-6)
    out = run_op_in_ort(GDN, inputs, dict(num_k_heads=Hk, norm_eps=1e-6), [3, 3, 4])
    for o, r in zip(out, ref):
        _close(o, r, 2e-5)


def test_gated_deltanet_chunked_calls_equal_one_call():
    inputs = _gdn_inputs(torch.Generator().manual_seed(7), 2, 11, 2, 4, 5, 3, 4)
    whole = GDN.torch_op(*inputs.values(), 2, 1e-6)
    conv, rec, ys = inputs["conv_state"], inputs["recurrent_state"], []
    for lo, hi in [(0, 1), (1, 5), (5, 11)]:
        part = {k: (v[:, lo:hi] if k in ("qkv", "z", "b", "a") else v) for k, v in inputs.items()}
        part.update(conv_state=conv, recurrent_state=rec)
        y, conv, rec = run_op_in_ort(GDN, part, dict(num_k_heads=2, norm_eps=1e-6), [3, 3, 4])
        conv, rec = torch.from_numpy(conv), torch.from_numpy(rec)
        ys.append(torch.from_numpy(y))
    _close(torch.cat(ys, dim=1), whole[0], 2e-5)
    _close(rec, whole[2], 2e-5)
    _close(conv, whole[1], 0)


def _hf_config(**kw):
    base = dict(hidden_size=40, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=6,
                linear_value_head_dim=5, linear_conv_kernel_dim=4, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, num_experts=7, num_experts_per_tok=3, moe_intermediate_size=9,
                shared_expert_intermediate_size=11, vocab_size=50, layer_types=["linear_attention"])
    base.update(kw)
    return Qwen3NextConfig(**base)


def _ours_from_hf_gdn(module, cfg, hidden, conv_state, rec_state):
    """Run the HF module's projections + our op (the modeling's weight transforms inlined)."""
    from qcn.compile.export.weights import _ba, _qkvz

    class C:  # the fields the weight transforms read
        linear_num_key_heads = cfg.linear_num_key_heads
        linear_num_value_heads = cfg.linear_num_value_heads
        linear_key_head_dim = cfg.linear_key_head_dim
        linear_value_head_dim = cfg.linear_value_head_dim

    B, T, _ = hidden.shape
    Hv, Dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + Hv * Dv
    qkvz = hidden @ _qkvz(C)([module.in_proj_qkvz.weight])
    qkv, z = qkvz[..., :conv_dim], qkvz[..., conv_dim:].reshape(B, T, Hv, Dv)
    ba = hidden @ _ba(C)([module.in_proj_ba.weight])
    y, conv_state, rec_state = GDN.torch_op(qkv, z, ba[..., :Hv], ba[..., Hv:], module.conv1d.weight[:, 0],
                                            module.A_log, module.dt_bias, module.norm.weight, conv_state, rec_state,
                                            cfg.linear_num_key_heads, cfg.rms_norm_eps)
    return module.out_proj(y), conv_state, rec_state


@pytest.mark.parametrize("Hk,Hv", [(2, 4), (3, 3)])
def test_gated_deltanet_reference_vs_transformers(Hk, Hv):
    torch.manual_seed(0)
    cfg = _hf_config(linear_num_key_heads=Hk, linear_num_value_heads=Hv)
    module = hf.Qwen3NextGatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        cache = DynamicCache(config=cfg)
        prompt, step = torch.randn(2, 9, cfg.hidden_size), torch.randn(2, 1, cfg.hidden_size)
        ref_prompt = module(prompt, cache_params=cache)
        ref_step = module(step, cache_params=cache)
        conv_dim = 2 * Hk * cfg.linear_key_head_dim + Hv * cfg.linear_value_head_dim
        conv0 = torch.zeros(2, conv_dim, cfg.linear_conv_kernel_dim - 1)
        rec0 = torch.zeros(2, Hv, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        out_prompt, conv, rec = _ours_from_hf_gdn(module, cfg, prompt, conv0, rec0)
        out_step, conv, rec = _ours_from_hf_gdn(module, cfg, step, conv, rec)
    _close(out_prompt, ref_prompt, 1e-5)
    _close(out_step, ref_step, 1e-5)
    _close(rec, cache.layers[0].recurrent_states[0], 1e-5)
    # transformers keeps K conv inputs, the contract keeps the K-1 that matter
    _close(conv, cache.layers[0].conv_states[0][:, :, 1:], 1e-6)


def _moe_inputs(g, N, H, E, I, Is):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(N, H), router_weight=r(E, H), gate_up=r(E, 2 * I, H) * 0.3, down=r(E, H, I) * 0.3,
                shared_gate_up=r(2 * Is, H) * 0.3, shared_down=r(H, Is) * 0.3, shared_gate=r(1, H))


@pytest.mark.parametrize("N,H,E,I,Is,k,norm", [(5, 12, 7, 6, 5, 3, True), (1, 9, 4, 3, 4, 1, False),
                                               (17, 10, 5, 4, 6, 2, True), (3, 8, 3, 5, 3, 3, False)])
def test_moe_body_vs_reference(N, H, E, I, Is, k, norm):
    inputs = _moe_inputs(torch.Generator().manual_seed(N * 10 + E), N, H, E, I, Is)
    ref = MOE.torch_op(*inputs.values(), k, norm, "float")
    out = run_op_in_ort(MOE, inputs, dict(top_k=k, norm_topk_prob=int(norm), weight_format="float"), [2])[0]
    _close(out, ref, 1e-5)


def test_moe_ties_pick_lowest_index():
    # identical router rows -> every expert ties; ONNX TopK and the reference (a stable sort, which
    # the torch op calls) both take the lowest indices
    inputs = _moe_inputs(torch.Generator().manual_seed(3), 4, 6, 5, 3, 2)
    inputs["router_weight"] = inputs["router_weight"][:1].repeat(5, 1)
    inputs["gate_up"][3:] = 100.0  # experts 3 and 4 would dominate if wrongly selected
    ref = MOE.torch_op(*inputs.values(), 2, True, "float")
    out = run_op_in_ort(MOE, inputs, dict(top_k=2, norm_topk_prob=1, weight_format="float"), [2])[0]
    _close(out, ref, 1e-5)
    assert ref.abs().max() < 50
    from qcn.compile.plugins.moe.reference import route_reference

    _, ids = route_reference(inputs["x"], inputs["router_weight"], 2, True, compute_dtype=None)
    assert ids.tolist() == [[0, 1]] * 4


@pytest.mark.parametrize("norm,k", [(True, 3), (False, 1)])
def test_moe_reference_vs_transformers(norm, k):
    torch.manual_seed(1)
    cfg = _hf_config(norm_topk_prob=norm, num_experts_per_tok=k)
    block = hf.Qwen3NextSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        x = torch.randn(2, 5, cfg.hidden_size)
        ref = block(x)
        se = block.shared_expert
        ours = MOE.torch_op(x.reshape(10, -1), block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj,
                            torch.cat([se.gate_proj.weight, se.up_proj.weight]), se.down_proj.weight,
                            block.shared_expert_gate.weight, k, norm, "float")
    _close(ours.reshape(ref.shape), ref, 1e-5)


def test_moe_rejects_unknown_weight_format():
    inputs = _moe_inputs(torch.Generator().manual_seed(0), 2, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="weight_format 'int3'.*valid"):
        MOE.torch_op(*inputs.values(), 1, True, "int3")


def _attn_inputs(g, B, T, Hq, KVH, D, P):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(B, T, Hq, D), k=r(B, T, KVH, D), v=r(B, T, KVH, D), past_key=r(B, KVH, P, D),
                past_value=r(B, KVH, P, D))


@pytest.mark.parametrize("B,T,Hq,KVH,D,P,lens", [(2, 5, 4, 2, 6, 9, [0, 9]), (3, 1, 3, 1, 5, 4, [4, 1, 2]),
                                                 (1, 7, 2, 2, 3, 0, [0]), (2, 3, 6, 2, 7, 130, [65, 130])])
def test_attention_body_vs_reference(B, T, Hq, KVH, D, P, lens):
    inputs = _attn_inputs(torch.Generator().manual_seed(P + T), B, T, Hq, KVH, D, P)
    inputs["past_len"] = torch.tensor(lens, dtype=torch.int64)
    ref = ATTENTION.torch_op(*inputs.values(), D ** -0.5)
    out = run_op_in_ort(ATTENTION, inputs, dict(scale=D ** -0.5), [4])[0]
    _close(out, ref, 1e-5)


def test_attention_ignores_cache_beyond_past_len():
    inputs = _attn_inputs(torch.Generator().manual_seed(5), 2, 2, 4, 2, 6, 8)
    inputs["past_len"] = torch.tensor([3, 5])
    out = run_op_in_ort(ATTENTION, inputs, dict(scale=0.3), [4])[0]
    inputs["past_key"][0, :, 3:] = 1e4  # garbage the runtime may leave in unused cache rows
    inputs["past_value"][1, :, 5:] = float("nan")
    out2 = run_op_in_ort(ATTENTION, inputs, dict(scale=0.3), [4])[0]
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("B,T,lens", [(3, 1, [0, 7, 4]), (2, 3, [7, 7]), (3, 2, [5, 2, 5]), (1, 1, [3])])
def test_attention_nan_and_inf_beyond_past_len_never_leak(B, T, lens):
    """NaN / inf in every unused cache row of K and V (every sequence, uniform and mixed lengths,
    rows between the shortest and the longest length too): the output equals the reference on
    the valid rows alone, bit for bit the same as with zeros there."""
    P = 7
    inputs = _attn_inputs(torch.Generator().manual_seed(31 + B * T), B, T, 4, 2, 6, P)
    inputs["past_len"] = torch.tensor(lens, dtype=torch.int64)
    clean = {k: v.clone() for k, v in inputs.items()}
    for b, n in enumerate(lens):
        clean["past_key"][b, :, n:] = 0
        clean["past_value"][b, :, n:] = 0
        inputs["past_key"][b, :, n:] = float("nan")
        inputs["past_value"][b, :, n:] = float("inf") if b % 2 else float("nan")
    out = run_op_in_ort(ATTENTION, inputs, dict(scale=0.4), [4])[0]
    _close(out, ATTENTION.torch_op(*clean.values(), 0.4), 1e-5)
    np.testing.assert_array_equal(out, run_op_in_ort(ATTENTION, clean, dict(scale=0.4), [4])[0])


def test_attention_reference_vs_transformers_eager():
    g = torch.Generator().manual_seed(11)
    B, T, Hq, KVH, D, P = 2, 4, 6, 2, 8, 5
    inputs = _attn_inputs(g, B, T, Hq, KVH, D, P)
    inputs["past_len"] = torch.full((B,), P, dtype=torch.int64)
    ours = ATTENTION.torch_op(*inputs.values(), D ** -0.5)

    class M(torch.nn.Module):
        num_key_value_groups, training = Hq // KVH, False

    keys = torch.cat([inputs["past_key"], inputs["k"].transpose(1, 2)], dim=2)
    values = torch.cat([inputs["past_value"], inputs["v"].transpose(1, 2)], dim=2)
    mask = torch.full((T, P + T), float("-inf")).triu(P + 1)[None, None]
    ref, _ = hf.eager_attention_forward(M(), inputs["q"].transpose(1, 2), keys, values, mask, scaling=D ** -0.5)
    _close(ours, ref, 1e-5)


def _fp8_cache(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("B,T,Hq,KVH,D,P,lens", [(2, 5, 4, 2, 6, 9, [0, 9]), (3, 1, 3, 1, 5, 4, [4, 1, 2]),
                                                 (2, 3, 6, 2, 7, 130, [65, 130])])
def test_attention_fp8_cache_body_vs_reference(B, T, Hq, KVH, D, P, lens):
    """FP8 caches with per-tensor scales (value = fp8 * scale, the decode kernel's convention):
    the op's fp8 body in ORT equals the reference that dequantizes the cache, and differs from
    reading the same bytes with scale 1 (the scales are used)."""
    from qcn.compile.plugins.attention.op import function_proto

    inputs = _attn_inputs(torch.Generator().manual_seed(3 * P + T), B, T, Hq, KVH, D, P)
    ks, vs = 0.013, 0.0071
    inputs["past_key"] = _fp8_cache(inputs["past_key"] * 3, ks)
    inputs["past_value"] = _fp8_cache(inputs["past_value"] * 2, vs)
    inputs["past_len"] = torch.tensor(lens, dtype=torch.int64)
    inputs["k_scale"], inputs["v_scale"] = torch.tensor([ks]), torch.tensor([vs])
    fp8_body = function_proto(23, fp8_cache=True)
    out = run_op_in_ort(ATTENTION, inputs, dict(scale=D ** -0.5), [4], function=fp8_body)[0]
    ref = cached_attention_reference(*(inputs[k] for k in ("q", "k", "v", "past_key", "past_value", "past_len")),
                                     k_scale=ks, v_scale=vs, softmax_scale=D ** -0.5, compute_dtype=torch.float32)
    _close(out, ref, 1e-5)
    if max(lens):
        wrong = cached_attention_reference(*(inputs[k] for k in ("q", "k", "v", "past_key", "past_value", "past_len")),
                                           softmax_scale=D ** -0.5, compute_dtype=torch.float32)
        assert (torch.from_numpy(out) - wrong).abs().max() > 1e-2


def test_attention_fp8_cache_garbage_beyond_past_len_never_leaks():
    """FP8 NaN bytes (0x7f) in the unused cache rows: the output equals the one with zeros there."""
    from qcn.compile.plugins.attention.op import function_proto

    inputs = _attn_inputs(torch.Generator().manual_seed(9), 2, 2, 4, 2, 6, 8)
    inputs["past_key"], inputs["past_value"] = _fp8_cache(inputs["past_key"], 0.01), _fp8_cache(inputs["past_value"], 0.02)
    inputs["past_len"] = torch.tensor([3, 5])
    inputs["k_scale"], inputs["v_scale"] = torch.tensor([0.01]), torch.tensor([0.02])
    body = function_proto(23, fp8_cache=True)
    clean = {k: v.clone() for k, v in inputs.items()}
    for b, n in enumerate([3, 5]):
        for name in ("past_key", "past_value"):
            clean[name][b, :, n:] = 0
            inputs[name].view(torch.uint8)[b, :, n:] = 0x7F
    a = run_op_in_ort(ATTENTION, inputs, dict(scale=0.3), [4], function=body)[0]
    np.testing.assert_array_equal(a, run_op_in_ort(ATTENTION, clean, dict(scale=0.3), [4], function=body)[0])
