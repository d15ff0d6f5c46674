"""qcn::CachedAttention decode kernels (T = 1, split-KV + reduce) vs the naive reference, on
CPU through Triton's interpreter.

Fresh random inputs (seed in failure messages), odd head dims, GQA 4/2 and 3/1, cache lengths
P in 1, 15, 63, 65, 130 with per-sequence past_len in [0, P], several splits per sequence;
output and scratch poisoned with NaN, cache rows >= past_len filled with NaN (never read);
batch invariance; relative-norm tolerances fp32 1e-5, bf16 1e-2. The AOT test compiles both
kernels to PTX in a subprocess started when the module's tests start; QCN_AOT_ALL_TARGETS=1
compiles for every target.
"""


import pytest
import torch
from aot_run import aot_background, require_interpreter

pytest.importorskip("triton")

from qcn.compile.plugins.attention import (  # noqa: E402
    DecodeAttentionConfig,
    cached_attention_decode,
    cached_attention_reference,
)
from qcn.compile.plugins.attention import kernels as attn_kernels  # noqa: E402
from qcn.compile.plugins.attention import launch as attn_ops  # noqa: E402

require_interpreter(attn_kernels._attn_decode_split_kernel)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CFG = DecodeAttentionConfig(partition=32, block_n=16, block_s=2)  # P=130: 5 splits, 2 blocks each


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    def empty(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(attn_ops, "_empty", empty)


def check(out, ref, tol, msg):
    assert torch.isfinite(out).all(), f"non-finite output ({msg})"
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < tol, f"relative error {err:.3g} >= {tol} ({msg})"


def make(b, p, hq, kvh, d, dtype, past_len=None):
    q = torch.randn(b, 1, hq, d).to(dtype)
    k = torch.randn(b, 1, kvh, d).to(dtype)
    v = torch.randn(b, 1, kvh, d).to(dtype)
    pk = torch.randn(b, kvh, p, d).to(dtype)
    pv = torch.randn(b, kvh, p, d).to(dtype)
    if past_len is None:
        past_len = torch.randint(0, p + 1, (b,))
        past_len[0], past_len[-1] = p, 0  # full and empty caches always present
    for i, n in enumerate(past_len.tolist()):  # rows >= past_len are garbage and must not be read
        pk[i, :, n:] = float("nan")
        pv[i, :, n:] = float("nan")
    return q, k, v, pk, pv, past_len.to(torch.int64)


CASES = [(torch.float32, 4, 2, 40, p) for p in (1, 15, 63, 65, 130)] + \
        [(torch.bfloat16, 3, 1, 48, p) for p in (1, 15, 63, 65, 130)] + \
        [(torch.float32, 3, 1, 48, 130), (torch.bfloat16, 4, 2, 40, 65)]


@pytest.mark.parametrize("dtype,hq,kvh,d,p", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_decode_matches_reference(seed, dtype, hq, kvh, d, p):
    q, k, v, pk, pv, pl = make(3, p, hq, kvh, d, dtype)
    out = torch.full_like(q, float("nan"))
    o = cached_attention_decode(q, k, v, pk, pv, pl, out=out, config=CFG)
    assert o is out and o.shape == q.shape and o.dtype == dtype
    check(o, cached_attention_reference(q, k, v, pk, pv, pl), TOL[dtype], f"seed {seed}, past_len {pl.tolist()}")


@pytest.mark.parametrize("software", [False, True], ids=["native_e4m3", "byte_decode"])
def test_fp8_cache(seed, software):
    q, k, v, pk, pv, pl = make(2, 65, 4, 2, 40, torch.bfloat16)
    ks, vs = torch.tensor([0.02]), torch.tensor([0.015])
    pk8 = (pk.float() / ks).nan_to_num(0.0).clamp(-448, 448).to(torch.float8_e4m3fn)
    pv8 = (pv.float() / vs).nan_to_num(0.0).clamp(-448, 448).to(torch.float8_e4m3fn)
    cfg = DecodeAttentionConfig(**{**CFG.__dict__, "fp8_software": software})
    o = cached_attention_decode(q, k, v, pk8, pv8, pl, k_scale=ks, v_scale=vs, config=cfg)
    ref = cached_attention_reference(q, k, v, pk8, pv8, pl, k_scale=ks, v_scale=vs)
    check(o, ref, TOL[torch.bfloat16], f"seed {seed}")


def test_batch_and_buffer_invariance(seed):
    """A sequence's output is bitwise the same alone, in a batch, and with a longer cache buffer."""
    q, k, v, pk, pv, pl = make(3, 70, 4, 2, 40, torch.bfloat16, past_len=torch.tensor([70, 33, 5]))
    o = cached_attention_decode(q, k, v, pk, pv, pl, config=CFG)
    for b in range(3):
        s = slice(b, b + 1)
        alone = cached_attention_decode(q[s], k[s], v[s], pk[s], pv[s], pl[s], config=CFG)
        assert torch.equal(alone, o[s]), f"batch {b}, seed {seed}"
    longer = [torch.cat([t, torch.randn(3, 2, 60, 40).to(t.dtype)], dim=2) for t in (pk, pv)]
    o2 = cached_attention_decode(q, k, v, *longer, pl, config=CFG)
    assert torch.equal(o2, o), f"seed {seed}"


def test_custom_scale_and_errors(seed):
    q, k, v, pk, pv, pl = make(2, 15, 4, 2, 40, torch.float32)
    o = cached_attention_decode(q, k, v, pk, pv, pl, softmax_scale=0.3, config=CFG)
    check(o, cached_attention_reference(q, k, v, pk, pv, pl, softmax_scale=0.3), TOL[torch.float32], f"seed {seed}")
    with pytest.raises(ValueError):
        cached_attention_decode(q.expand(2, 2, 4, 40), k, v, pk, pv, pl, config=CFG)  # T = 2
    with pytest.raises(ValueError):
        cached_attention_decode(q, k, v, pk.to(torch.float8_e4m3fn), pv.to(torch.float8_e4m3fn), pl, config=CFG)


# ----------------------------------------------------------------------------- AOT

_AOT_SCRIPT = r"""
import json, sys
from qcn.compile.plugins._triton import TARGETS, compile_spec, verify_ptx
from qcn.compile.plugins.attention.aot import attention_kernel_specs
names = [s.name for s in attention_kernel_specs()]
if sys.argv[1] == "1":
    plan = [(n, cc) for cc in TARGETS for n in names]
else:  # one target per kernel; the fp8 split kernel on sm_80 (byte-decoding variant)
    plan = list(zip(names, (120, 80, 89)))
rows = []
for name, cc in plan:
    s = {x.name: x for x in attention_kernel_specs(cc=cc)}[name]
    k = compile_spec(s, cc)
    ok = verify_ptx(k.ptx, k.ptx_target)
    rows.append(dict(spec=s.name, cc=cc, target=k.ptx_target, seconds=round(k.seconds, 2), ptxas=ok,
                     params=k.ptx.split(".entry", 1)[1].split(")", 1)[0].count(".param"),
                     nsig=sum(v != "constexpr" for v in s.signature.values()), smem=k.shared_mem))

# TensorRT plugin plumbing against a stub of tensorrt.plugin (see test_moe_kernels.py)
import inspect, types, typing
sys.path.insert(0, sys.argv[2])  # tests/: the one tensorrt.plugin stub
from trt_stub import SymExprs, TensorDesc, make_trt_stub
trt, trtp, REG = make_trt_stub()
sys.modules.update({"tensorrt": trt, "tensorrt.plugin": trtp})
from qcn.compile.plugins.attention import trt_plugin as tp
tp.register_attention_plugins(cc=89)
B, HQ, KVH, D, P = 2, 16, 2, 256, 1000
S = -(-P // 256)
q, kv, cache, pl = TensorDesc((B, 1, HQ, D)), TensorDesc((B, 1, KVH, D)), TensorDesc((B, KVH, P, D)), TensorDesc((B,))
m, acc, sc = TensorDesc((B, HQ, S)), TensorDesc((B, HQ, S, D)), TensorDesc((1,))
calls = {"decode_split_bf16": [q, cache, cache, pl], "decode_split_fp8": [q, cache, cache, pl, sc, sc],
         "decode_reduce": [q, kv, kv, pl, m, m, acc]}
expect = {"decode_split_bf16": ((B * KVH, S), [P], [(B, HQ, S), (B, HQ, S), (B, HQ, S, D)]),
          "decode_split_fp8": ((B * KVH, S), [P], [(B, HQ, S), (B, HQ, S), (B, HQ, S, D)]),
          "decode_reduce": ((B * HQ, 1), [S * 256, S], [(B, 1, HQ, D)])}
for pid, fns in REG.items():
    stage = pid.split("::")[1]
    sd, sa = inspect.signature(fns["desc"]), inspect.signature(fns["aot"])
    assert all(p.annotation is TensorDesc for p in sd.parameters.values()), pid
    assert list(sa.parameters) == list(sd.parameters) + ["outputs", "tactic"], pid
    assert len(typing.get_args(sa.return_annotation)) == 4, pid
    outs = fns["desc"](*calls[stage])
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    name, ptx, lp, extra = fns["aot"](*calls[stage], outs, 0)  # compiles for sm_89
    g, sc_, os_ = expect[stage]
    assert (lp.grid_x, lp.grid_y) == g and extra == sc_ and [tuple(o.shape_expr) for o in outs] == os_, stage
    assert ".entry " + name in ptx and lp.block_x == 128, stage
rows.append(dict(spec="trt_plugin_stub", plugins=sorted(REG)))
print(json.dumps(rows))
"""

aot_run = aot_background(_AOT_SCRIPT, "attn")


def test_aot_ptx_compiles(aot_run, record_property):
    rows = aot_run.rows(timeout=600)
    stub = rows.pop()
    assert stub["spec"] == "trt_plugin_stub" and len(stub["plugins"]) == 3, stub
    assert {r["spec"] for r in rows} >= {"attn_decode_split_bf16_kvbf16", "attn_decode_split_bf16_kvfp8",
                                         "attn_decode_reduce_bf16"}
    for r in rows:
        assert r["params"] == r["nsig"], r
    record_property("aot", rows)
    print("\n" + "\n".join(f"{r['spec']:32s} sm{r['cc']:<4d} {r['target']:8s} {r['seconds']:5.2f}s "
                           f"ptxas={r['ptxas']} smem={r['smem']}" for r in rows))
