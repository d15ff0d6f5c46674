"""qcn::MoE Triton kernels vs the naive reference, on CPU through Triton's interpreter.

Fresh random inputs each run (the seed is in every failure message), odd sizes, outputs and
scratch buffers poisoned before each call, relative-norm tolerances (fp32 1e-5, bf16 1e-2,
quantized formats against the reference on the same dequantized weights); NaN never passes.
The AOT test compiles every kernel to PTX in a subprocess (no interpreter) started when the
module's tests start, so it overlaps the interpreter tests; QCN_AOT_ALL_TARGETS=1 compiles
every kernel for every target instead of one target per kernel.
"""


import pytest
import torch
from aot_run import aot_background, require_interpreter

pytest.importorskip("triton")

from qcn.compile.plugins.moe import (  # noqa: E402
    MoEConfig,
    dequantize_int4_groupwise,
    moe_forward,
    moe_reference,
    moe_route,
    pack_int4,
    quantize_fp8_rowwise,
    quantize_int4_groupwise,
    quantize_moe_weights,
    route_reference,
    unpack_int4,
)
from qcn.compile.plugins.moe import kernels as moe_kernels  # noqa: E402
from qcn.compile.plugins.moe import launch as moe_ops  # noqa: E402

require_interpreter(moe_kernels._router_logits_kernel)

H, I, IS, E = 40, 24, 20, 7  # odd sizes; I != Is
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# small tiles keep the interpreter quick; TINY also exercises multi-chunk K loops and
# several column blocks
CFG = MoEConfig(router_bn=16, router_bk=64, topk_bh=64, decode_bn_gate_up=32, decode_bn_down=32, decode_bk=64,
                prefill_bm=16, prefill_bn=32, prefill_bk=64, align_block=64, combine_bh=64)
TINY = MoEConfig(router_bn=16, router_bk=16, topk_bh=16, decode_bn_gate_up=16, decode_bn_down=16, decode_bk=16,
                 prefill_bm=16, prefill_bn=16, prefill_bk=16, align_block=16, combine_bh=16)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every scratch buffer starts as NaN (floats) or -7 (ints)."""

    def empty(shape, *, device, dtype):
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(moe_ops, "_empty", empty)


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check(out, ref, tol, msg):
    assert torch.isfinite(out).all(), f"non-finite output ({msg})"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol} ({msg})"  # NaN fails too


def make(n, dtype, e=E, h=H, inter=I, inter_s=IS):
    x = torch.randn(n, h).to(dtype)
    return dict(
        x=x,
        router_weight=torch.randn(e, h).to(dtype),
        gate_up=(torch.randn(e, 2 * inter, h) / h**0.5).to(dtype),
        down=(torch.randn(e, h, inter) / inter**0.5).to(dtype),
        shared_gate_up=(torch.randn(2 * inter_s, h) / h**0.5).to(dtype),
        shared_down=(torch.randn(h, inter_s) / inter_s**0.5).to(dtype),
        shared_gate=torch.randn(1, h).to(dtype),
    )


def poisoned_like(x):
    return torch.full_like(x, float("nan"))


def reference(w, top_k, norm, **deq):
    ww = {**w, **deq}
    return moe_reference(ww["x"], ww["router_weight"], ww["gate_up"], ww["down"], ww["shared_gate_up"],
                         ww["shared_down"], ww["shared_gate"], top_k, norm)


# ----------------------------------------------------------------------------- router


@pytest.mark.parametrize("top_k,norm", [(1, True), (3, False), (3, True)])
def test_route_matches_reference_with_ties(seed, top_k, norm):
    w = make(17, torch.float32)
    # small multiples of 1/8: every logit is exact in any summation order, so experts 1/4
    # and 2/5 (equal router rows) tie exactly; the lowest index must come first
    w["x"] = torch.randint(-3, 4, (17, H)).float()
    r = torch.randint(-2, 3, (E, H)).float() / 8
    r[4] = r[1]
    r[5] = r[2]
    ids, tw, sw = moe_route(w["x"], r, w["shared_gate"], top_k, norm, config=CFG)
    ref_w, ref_ids = route_reference(w["x"], r, top_k, norm)
    assert torch.equal(ids.long(), ref_ids), f"seed {seed}"
    check(tw, ref_w, 1e-6, f"seed {seed}")
    check(sw, torch.sigmoid(w["x"].double() @ w["shared_gate"].double().T)[:, 0], 1e-6, f"seed {seed}")


# ----------------------------------------------------------------------------- dense weights


@pytest.mark.parametrize("dtype,n,top_k,path,norm,cfg", [
    (torch.float32, 1, 1, "decode", True, CFG),
    (torch.float32, 5, 3, "decode", False, CFG),
    (torch.float32, 5, 3, "prefill", True, CFG),
    (torch.float32, 17, 3, "auto", True, CFG),
    (torch.float32, 17, 3, "prefill", True, TINY),
    (torch.float32, 7, 3, "decode", True, TINY),
    (torch.bfloat16, 5, 3, "decode", True, CFG),
    (torch.bfloat16, 17, 3, "prefill", False, CFG),
], ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, MoEConfig) else ("tiny" if v is TINY else "cfg"))
def test_moe_matches_reference(seed, dtype, n, top_k, path, norm, cfg):
    w = make(n, dtype)
    out = poisoned_like(w["x"])
    y = moe_forward(**w, top_k=top_k, norm_topk_prob=norm, path=path, out=out, config=cfg)
    assert y is out and y.dtype == dtype and y.shape == (n, H)
    check(y, reference(w, top_k, norm), TOL[dtype], f"seed {seed}")


# ----------------------------------------------------------------------------- quantized weights


@pytest.mark.parametrize("fmt,group,dtype,n,path,fp8_soft", [
    ("fp8", 128, torch.bfloat16, 5, "decode", False),
    ("fp8", 128, torch.float32, 17, "prefill", True),
    ("int4", 128, torch.bfloat16, 17, "prefill", None),
    ("int4", 32, torch.float32, 5, "decode", None),
    ("int4", 32, torch.float32, 17, "prefill", None),
], ids=str)
def test_moe_quantized_matches_dequantized_reference(seed, fmt, group, dtype, n, path, fp8_soft):
    w = make(n, torch.float32)
    kw, deq = quantize_moe_weights(w.pop("gate_up"), w.pop("down"), w.pop("shared_gate_up"), w.pop("shared_down"),
                                   fmt, group)
    w = {k: v.to(dtype) for k, v in w.items()}
    cfg = MoEConfig(**{**CFG.__dict__, "fp8_software": fp8_soft})
    out = poisoned_like(w["x"])
    y = moe_forward(**w, **kw, top_k=3, path=path, out=out, config=cfg)
    check(y, reference(w, 3, True, **deq), TOL[dtype], f"seed {seed}")


def test_quantize_helpers(seed):
    q = torch.randint(-8, 8, (3, 5, 41), dtype=torch.int8)  # odd K: a padding nibble
    p = pack_int4(q)
    assert p.shape == (3, 5, 21) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p, 41), q)
    assert p[0, 0, 0] == ((int(q[0, 0, 0]) & 15) | ((int(q[0, 0, 1]) & 15) << 4))  # low nibble first
    w = torch.randn(4, 6, 40)
    pk, s = quantize_int4_groupwise(w, 32)
    assert s.shape == (4, 6, 2) and s.dtype == torch.bfloat16
    assert rel_err(dequantize_int4_groupwise(pk, s, 40, 32), w) < 0.15
    q8, s8 = quantize_fp8_rowwise(w)
    assert q8.dtype == torch.float8_e4m3fn and s8.shape == (4, 6)
    assert rel_err(q8.float() * s8[..., None], w) < 0.05


# ----------------------------------------------------------------------------- invariance, NaN


@pytest.mark.parametrize("path,n,m", [("decode", 4, 1), ("prefill", 17, 9)])
def test_batch_invariance(seed, path, n, m):
    """A token's output does not depend on the rest of the batch (bitwise, same path)."""
    w = make(n, torch.bfloat16)
    y = moe_forward(**w, top_k=3, path=path, config=CFG)
    rows = range(n) if m == 1 else [slice(0, m)]
    for r in rows:
        sub = {**w, "x": w["x"][r] if isinstance(r, slice) else w["x"][r:r + 1]}
        ys = moe_forward(**sub, top_k=3, path=path, config=CFG)
        assert torch.equal(ys, y[r] if isinstance(r, slice) else y[r:r + 1]), f"row {r}, seed {seed}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: invalid value in the NaN row
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_nan_token_stays_local(seed, path):
    w = make(5, torch.float32)
    w["x"][2, 7] = float("nan")
    y = moe_forward(**w, top_k=3, path=path, config=CFG)
    assert torch.isnan(y[2]).all(), f"NaN token must give NaN (seed {seed})"
    keep = [0, 1, 3, 4]
    ref = reference({**w, "x": w["x"][keep]}, 3, True)
    check(y[keep], ref, TOL[torch.float32], f"seed {seed}")


def test_rejects_bad_input():
    w = make(3, torch.float32)
    with pytest.raises(ValueError):
        moe_forward(**w, top_k=3, path="decode", config=CFG, weight_format="int4")  # missing scales / shapes
    big = make(17, torch.float32)
    with pytest.raises(ValueError):
        moe_forward(**big, top_k=3, path="decode", config=CFG)


# ----------------------------------------------------------------------------- AOT


_AOT_SCRIPT = r"""
import json, sys, time
from qcn.compile.plugins._triton import TARGETS, compile_spec, verify_ptx
from qcn.compile.plugins.moe.aot import moe_kernel_specs
if sys.argv[1] == "1":
    plan = [(s.name, cc) for cc in TARGETS for s in moe_kernel_specs(cc=cc)]
else:  # every kernel function once; all targets, all formats, fp8 native (sm_89) and byte-decoded (sm_80)
    plan = [("moe_router_logits_bf16", 90), ("moe_router_topk_bf16", 120), ("moe_align", 80),
            ("moe_combine_bf16_sorted", 89), ("moe_decode_gate_up_int4_bf16", 120),
            ("moe_decode_down_fp8_bf16", 89), ("moe_prefill_gate_up_fp8_bf16", 80),
            ("moe_prefill_down_dense_bf16", 90)]
rows = []
for name, cc in plan:
    s = {x.name: x for x in moe_kernel_specs(cc=cc)}[name]
    k = compile_spec(s, cc)
    t = time.perf_counter()
    ok = verify_ptx(k.ptx, k.ptx_target)
    rows.append(dict(spec=s.name, cc=cc, target=k.ptx_target, seconds=round(k.seconds, 2),
                     ptxas=ok, ptxas_seconds=round(time.perf_counter() - t, 2), entry=k.kernel_name,
                     params=k.ptx.split(".entry", 1)[1].split(")", 1)[0].count(".param"),
                     nsig=sum(v != "constexpr" for v in s.signature.values()), smem=k.shared_mem))

# TensorRT plugin plumbing against a stub of tensorrt.plugin (no TensorRT here): signatures
# follow the QDP rules, output descs / grids / int32 scalars evaluate on concrete shapes, and
# one plugin's aot_impl returns real PTX.
import inspect, types, typing
sys.path.insert(0, sys.argv[2])  # tests/: the one tensorrt.plugin stub
from trt_stub import SymExprs, TensorDesc, make_trt_stub
trt, trtp, REG = make_trt_stub()
sys.modules.update({"tensorrt": trt, "tensorrt.plugin": trtp})
from qcn.compile.plugins.moe import trt_plugin as tp
import qcn.compile.plugins._triton as T
real_compile = T.compile_spec
T.compile_spec = lambda spec, cc: types.SimpleNamespace(kernel_name="k", ptx="", num_warps=4, shared_mem=0)
tp.register_moe_plugins(cc=89)
N, k, H, E, I = 3, 10, 2048, 512, 512
R = N * (k + 1)
shapes = {"x": (N, H), "wr": (E, H), "logits": (N, E), "sg": (1, H), "topk_ids": (N, k), "topk_w": (N, k),
          "shared_w": (N,), "slot_row": (N * k,), "sorted": (N * k,), "expert_off": (E + 1,),
          "tile_off": (E + 1,), "ws": (E, 2 * I), "sws": (2 * I,)}
expect = {"router_logits": ((1, 8), [N, E, H], [(N, E)]), "router_topk": ((N, 1), [N, E, H], [(N, k), (N, k), (N,)]),
          "align": ((E, 1), [N * k, E], [(N * k,), (N * k,), (E + 1,), (E + 1,)]),
          "combine_slots": ((N, 8), [N, H], [(N, H)]), "decode_gate_up_int4": ((N * k + 1, 16), [N, H, I, I], [(R, I)]),
          "decode_down_fp8": ((N * k + 1, 32), [N, H, I, I], [(R, H)]),
          "prefill_gate_up_dense": ((1 + E + 1, 8), [N, E, H, I, I], [(R, I)])}
plug = []
for pid, fns in REG.items():
    assert set(fns) == {"desc", "autotune", "aot"}, pid
    sd, sa = inspect.signature(fns["desc"]), inspect.signature(fns["aot"])
    names = list(sd.parameters)
    assert all(p.annotation is TensorDesc for p in sd.parameters.values()), pid
    assert list(sa.parameters) == names + ["outputs", "tactic"], pid
    assert len(typing.get_args(sa.return_annotation)) == 4, pid
    stage = pid.split("::")[1]
    shp = dict(shapes, act=(R, I), inter=(R, H), w=(E, 2 * I, H) if "gate_up" in stage else (E, H, I),
               sw=(2 * I, H) if "gate_up" in stage else (H, I))
    ins = [TensorDesc(shp[n]) for n in names]
    outs = fns["desc"](*ins)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    name, ptx, lp, extra = fns["aot"](*ins, outs, 0)
    if stage in expect:
        g, sc, os_ = expect[stage]
        assert (lp.grid_x, lp.grid_y) == g and extra == sc and [tuple(o.shape_expr) for o in outs] == os_, \
            (stage, lp.grid_x, lp.grid_y, extra, [o.shape_expr for o in outs])
    plug.append(stage)
T.compile_spec = real_compile
fns = REG["qcn_moe::router_topk"]
name, ptx, lp, extra = fns["aot"](TensorDesc((N, E)), TensorDesc((N, H)), TensorDesc((1, H)), [], 0)
assert ".entry " + name in ptx and lp.block_x == 128
rows.append(dict(spec="trt_plugin_stub", plugins=sorted(plug), cc=89))
print(json.dumps(rows))
"""

aot_run = aot_background(_AOT_SCRIPT, "moe")


def test_aot_ptx_compiles(aot_run, record_property):
    rows = aot_run.rows(timeout=900)
    stub = rows.pop()
    assert stub["spec"] == "trt_plugin_stub" and len(stub["plugins"]) == 5 + 4 * 3, stub
    assert len(rows) >= 8 and {r["cc"] for r in rows} == {80, 89, 90, 120}
    for r in rows:
        # PTX parameters == the kernel's runtime parameters (Triton's scratch pointers stripped)
        assert r["params"] == r["nsig"], r
        assert r["target"] == {80: "sm_80", 89: "sm_89", 90: "sm_90a", 120: "sm_120a"}[r["cc"]]
    record_property("aot", rows)
    print("\n" + "\n".join(f"{r['spec']:36s} sm{r['cc']:<4d} {r['target']:8s} {r['seconds']:5.2f}s "
                           f"ptxas={r['ptxas']} {r['ptxas_seconds']:.2f}s smem={r['smem']}" for r in rows))
