"""GatedDeltaNet kernels (decode, chunked prefill) vs the naive reference, on the Triton CPU interpreter.

Triton's interpreter is on for the whole session (tests/conftest.py). Sizes are small and odd; the
whole file is meant to stay well under 90 s on 2 cores. The AOT PTX test compiles one small
target per kernel by default; QCN_GDN_AOT_ALL=1 compiles both kernels at the real model
sizes for every target and assembles the PTX with ptxas.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from aot_run import require_interpreter

pytest.importorskip("triton")

from qcn.compile.plugins.gated_deltanet import reference as ref_mod  # noqa: E402
from qcn.compile.build.targets import AOT_TARGETS, arch  # noqa: E402
from qcn.compile.plugins.gated_deltanet import decode, prefill  # noqa: E402

require_interpreter(decode.gdn_decode_kernel)

gated_deltanet_reference = ref_mod.gated_deltanet_reference
CFGS = {"gqa": (3, 6, 16, 32), "mha": (2, 2, 32, 16), "small": (1, 2, 16, 32)}  # Hk, Hv, Dk, Dv


def make_inputs(B, T, Hk, Hv, Dk, Dv, K=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = 2 * Hk * Dk + Hv * Dv

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    return dict(qkv=r(B, T, C), z=r(B, T, Hv, Dv), b=r(B, T, Hv), a=r(B, T, Hv),
                conv_weight=r(C, K, scale=0.5), A_log=r(Hv, scale=0.5, dt=torch.float32),
                dt_bias=r(Hv), norm_weight=r(Dv), conv_state=r(B, C, K - 1),
                recurrent_state=r(B, Hv, Dk, Dv, scale=0.3, dt=torch.float32))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN/inf anywhere gives inf so it can never pass a bound."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def poisoned_outputs(inp):
    B, T, _ = inp["qkv"].shape
    Hv, Dv = inp["z"].shape[2:]
    y = torch.full((B, T, Hv * Dv), float("nan"), dtype=inp["qkv"].dtype)
    cso = torch.full_like(inp["conv_state"], float("nan"))
    so = torch.full_like(inp["recurrent_state"], float("nan"))
    return y, cso, so


def run_kernel(kind, inp, Hk, **kw):
    """Launch on NaN-poisoned outputs (separate state output) and return (y, conv_state_out, state_out)."""
    y, cso, so = poisoned_outputs(inp)
    launch = decode.launch_decode if kind == "decode" else prefill.launch_prefill
    launch(*inp.values(), y, cso, so, num_k_heads=Hk, norm_eps=1e-6, **kw)
    return y, cso, so


def check(outs, refs, dtype):
    for name, o, r in zip(("y", "conv_state_out", "recurrent_state_out"), outs, refs):
        assert not torch.isnan(o).any(), f"{name}: element left unwritten (NaN poison survived)"
        e = rel_err(o, r)
        bound = 1e-5 if name == "recurrent_state_out" or dtype == torch.float32 else tol(dtype)
        assert e < bound, f"{name}: rel err {e:.3e} >= {bound}"


# ---------------------------------------------------------------- reference vs transformers
def _transformers_op(inp, Hk, kernels=("recurrent", "chunk")):
    """The op assembled from transformers' own functions (torch paths, even if fla is installed)."""
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

    def torch_path(fn):
        return getattr(fn, "__wrapped__", fn)

    B, T, C = inp["qkv"].shape
    Hv, Dv = inp["z"].shape[2:]
    Dk = (C - Hv * Dv) // (2 * Hk)
    x = inp["qkv"].transpose(1, 2).contiguous()
    cs = inp["conv_state"].clone()
    conv = torch_path(hf.causal_conv1d_update)(x, cs, inp["conv_weight"], None, "silu").transpose(1, 2)
    q, k, v = torch.split(conv, [Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
    q, k, v = q.reshape(B, T, Hk, Dk), k.reshape(B, T, Hk, Dk), v.reshape(B, T, Hv, Dv)
    beta = inp["b"].sigmoid()
    g = -inp["A_log"].float().exp() * torch.nn.functional.softplus(inp["a"].float() + inp["dt_bias"])
    fns = {"recurrent": hf.torch_recurrent_gated_delta_rule, "chunk": hf.torch_chunk_gated_delta_rule}
    outs = {}
    for name in kernels:
        o, s = torch_path(fns[name])(q, k, v, g=g, beta=beta, initial_state=inp["recurrent_state"].clone(),
                                     output_final_state=True, use_qk_l2norm_in_kernel=True)
        norm = hf.Qwen3NextRMSNormGated(Dv, eps=1e-6).to(inp["norm_weight"].dtype)
        with torch.no_grad():
            norm.weight.copy_(inp["norm_weight"])
            yh = norm(o.reshape(-1, Dv), inp["z"].reshape(-1, Dv)).reshape(B, T, Hv * Dv)
        outs[name] = (yh, cs, s)
    return outs


def test_reference_matches_transformers():
    Hk, Hv, Dk, Dv, K, B, T = 2, 4, 8, 12, 4, 2, 7
    inp = make_inputs(B, T, Hk, Hv, Dk, Dv, K, seed=1)
    y, cso, so = gated_deltanet_reference(**inp, num_k_heads=Hk, norm_eps=1e-6)
    for name, (yh, cs, s) in _transformers_op(inp, Hk).items():
        assert rel_err(cso, cs) == 0.0
        assert rel_err(y, yh) < 1e-5, name
        assert rel_err(so, s) < 1e-5, name


def test_reference_bf16_rounds_like_transformers():
    """In bf16 the reference rounds where transformers does: y equal bit for bit here."""
    Hk, Hv, Dk, Dv, K, B, T = 2, 4, 8, 12, 4, 2, 7
    inp = make_inputs(B, T, Hk, Hv, Dk, Dv, K, dtype=torch.bfloat16, seed=1)
    y, cso, so = gated_deltanet_reference(**inp, num_k_heads=Hk)
    yh, cs, s = _transformers_op(inp, Hk, kernels=("recurrent",))["recurrent"]
    assert torch.equal(cso, cs)
    assert rel_err(y, yh) < 1e-3  # bit-identical on this seed; bound leaves room for rare double-rounding
    assert rel_err(so, s) < 1e-6


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", list(CFGS))
def test_decode_matches_reference(cfg, dtype):
    Hk, Hv, Dk, Dv = CFGS[cfg]
    inp = make_inputs(3, 1, Hk, Hv, Dk, Dv, dtype=dtype, seed=2)
    refs = gated_deltanet_reference(**inp, num_k_heads=Hk)
    check(run_kernel("decode", inp, Hk), refs, dtype)


def test_decode_public_updates_state_in_place():
    Hk, Hv, Dk, Dv = CFGS["gqa"]
    inp = make_inputs(2, 1, Hk, Hv, Dk, Dv, seed=3)
    refs = gated_deltanet_reference(**inp, num_k_heads=Hk)
    state = inp["recurrent_state"]
    y, cso, s = decode.gated_deltanet_decode(**inp, num_k_heads=Hk)
    assert s is state
    check((y, cso, s), refs, torch.float32)
    with pytest.raises(ValueError):
        decode.gated_deltanet_decode(**inp, num_k_heads=Hk, conv_state_out=inp["conv_state"])


# ---------------------------------------------------------------- prefill
PREFILL_CASES = [  # (cfg, T, dtype, block_v)
    ("gqa", 1, torch.float32, None), ("gqa", 15, torch.float32, None), ("mha", 63, torch.float32, None),
    ("gqa", 65, torch.float32, None), ("mha", 130, torch.float32, None), ("small", 65, torch.float32, 16),
    ("gqa", 15, torch.bfloat16, None), ("mha", 65, torch.bfloat16, None),
]


@pytest.mark.parametrize("cfg,T,dtype,block_v", PREFILL_CASES,
                         ids=[f"{c}-T{t}-{str(d)[6:]}-bv{bv}" for c, t, d, bv in PREFILL_CASES])
def test_prefill_matches_reference(cfg, T, dtype, block_v):
    Hk, Hv, Dk, Dv = CFGS[cfg]
    inp = make_inputs(2, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=T)
    refs = gated_deltanet_reference(**inp, num_k_heads=Hk)
    check(run_kernel("prefill", inp, Hk, block_v=block_v), refs, dtype)


def test_prefill_short_conv_kernel_and_long_state_tail():
    """K = 2 (state of one column) and K = 4 with T < K-1 (tail mixes conv_state and qkv)."""
    Hk, Hv, Dk, Dv = CFGS["mha"]
    for K, T in ((2, 5), (4, 2)):
        inp = make_inputs(1, T, Hk, Hv, Dk, Dv, K=K, seed=K)
        refs = gated_deltanet_reference(**inp, num_k_heads=Hk)
        check(run_kernel("prefill", inp, Hk), refs, torch.float32)


@pytest.mark.parametrize("kind,T,dtype,block_v", [("decode", 1, torch.float32, None),
                                                   ("prefill", 70, torch.float32, None),
                                                   ("prefill", 70, torch.bfloat16, None),
                                                   ("prefill", 33, torch.float32, 16)])
def test_non_power_of_two_sizes(kind, T, dtype, block_v):
    """Dk = 24, Dv = 20, Hk = 1, Hv = 3, K = 3: every tile is masked."""
    inp = make_inputs(2, T, 1, 3, 24, 20, K=3, dtype=dtype, seed=3)
    refs = gated_deltanet_reference(**inp, num_k_heads=1)
    check(run_kernel(kind, inp, 1, **({} if kind == "decode" else {"block_v": block_v})), refs, dtype)


def test_chunked_calls_equal_one_call():
    """Prefill 50 + decode 1 + prefill 49 tokens, carrying both states == one 100-token call."""
    Hk, Hv, Dk, Dv = CFGS["gqa"]
    inp = make_inputs(1, 100, Hk, Hv, Dk, Dv, seed=7)
    y_full, cs_full, s_full = prefill.gated_deltanet_prefill(
        **{**inp, "recurrent_state": inp["recurrent_state"].clone()}, num_k_heads=Hk)
    cs, s, ys = inp["conv_state"], inp["recurrent_state"].clone(), []
    for lo, hi in ((0, 50), (50, 51), (51, 100)):
        part = {k: (v[:, lo:hi].contiguous() if k in ("qkv", "z", "b", "a") else v) for k, v in inp.items()}
        part.update(conv_state=cs, recurrent_state=s)
        fn = decode.gated_deltanet_decode if hi - lo == 1 else prefill.gated_deltanet_prefill
        y, cs, s = fn(**part, num_k_heads=Hk)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-5
    assert rel_err(cs, cs_full) == 0.0
    assert rel_err(s, s_full) < 1e-5


@pytest.mark.parametrize("kind,T", [("decode", 1), ("prefill", 20)])
def test_batch_invariance(kind, T):
    """Each sequence's result is bitwise independent of the other sequences in the batch."""
    Hk, Hv, Dk, Dv = CFGS["gqa" if kind == "decode" else "small"]
    inp = make_inputs(3, T, Hk, Hv, Dk, Dv, seed=11)
    full = run_kernel(kind, inp, Hk)
    for i in (0, 2):
        one = run_kernel(kind, {k: (v[i:i + 1].contiguous() if v.dim() > 1 and v.shape[0] == 3 else v)
                                for k, v in inp.items()}, Hk)
        for a, b in zip(full, one):
            assert torch.equal(a[i:i + 1], b)


def test_nan_never_passes():
    ref = torch.randn(4, 5)
    bad = ref.clone()
    bad[1, 2] = float("nan")
    assert rel_err(bad, ref) == float("inf")
    assert not rel_err(bad, ref) < 1e-5
    with pytest.raises(AssertionError):
        check((bad, ref, ref), (ref, ref, ref), torch.float32)
    Hk, Hv, Dk, Dv = CFGS["mha"]
    inp = make_inputs(1, 3, Hk, Hv, Dk, Dv, seed=5)
    inp["qkv"][0, 1, 0] = float("nan")  # a NaN input must surface, not be masked away
    y, _, _ = run_kernel("prefill", inp, Hk)
    assert torch.isnan(y).any()


# ---------------------------------------------------------------- AOT PTX
REAL = dict(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, conv_kernel=4)
SMALL = dict(num_k_heads=2, num_v_heads=4, head_k_dim=32, head_v_dim=32, conv_kernel=4)
AOT_ALL = os.environ.get("QCN_GDN_AOT_ALL") == "1"
AOT_CASES = ([(kd, cc) for kd in ("decode", "prefill") for cc in AOT_TARGETS] if AOT_ALL
             else [("decode", 90), ("prefill", 80)])


@pytest.mark.parametrize("kind,cc", AOT_CASES, ids=[f"{k}-sm{c}" for k, c in AOT_CASES])
def test_aot_ptx(kind, cc):
    from qcn.compile.plugins.gated_deltanet import aot

    t0 = time.perf_counter()
    # default run: small sizes, and plain tf32 for the prefill (the tf32x3 UT transform of the
    # production config costs ~25 s more of cold compile); QCN_GDN_AOT_ALL=1: production config
    fast = {} if AOT_ALL or kind == "decode" else dict(dot_precision="tf32", inv_precision="tf32")
    k = aot.compile_kernel(kind, target=cc, **(REAL if AOT_ALL else SMALL), **fast)
    secs = time.perf_counter() - t0
    print(f"\n[aot] {kind} sm_{cc}: {secs:.1f}s, {k.ptx_target}, PTX {k.ptx_version}, shared {k.shared_mem} B, "
          f"warps {k.num_warps}, {len(k.ptx) / 1e3:.0f} kB")
    assert k.ptx_target == arch(cc).ptx_target  # triton picks sm_90a / sm_120a itself
    assert f".entry {k.kernel_name}(" in k.ptx
    assert k.params[:10] == ("qkv_ptr", "z_ptr", "b_ptr", "a_ptr", "cw_ptr", "A_log_ptr", "dt_bias_ptr", "nw_ptr",
                             "cs_ptr", "s_ptr")
    assert k.params[10:] == ("T", "y_ptr", "cso_ptr", "so_ptr")
    entry = k.ptx[k.ptx.index(f".entry {k.kernel_name}("):]
    assert entry[:entry.index(")")].count(".param") == len(k.params)  # hidden scratch params stripped
    assert k.shared_mem <= arch(cc).smem_bytes
    if AOT_ALL:
        aot.verify_ptx(k.ptx, k.ptx_target)


# ---------------------------------------------------------------- TRT plugin glue (fake tensorrt)
def test_trt_plugin_glue_with_fake_tensorrt(trt_stub):
    """Run trt_plugin's register/aot_impl against the stub of ``tensorrt.plugin`` (tests/trt_stub.py).

    Full TensorRT is not installed here; this only checks our glue (shape maths, kernel
    choice, launch parameters, extra args), not TensorRT's behaviour.
    """
    from trt_stub import TensorDesc as Desc

    from qcn.compile.plugins.gated_deltanet import trt_plugin

    trt_plugin.register(80)
    reg = {kind: fn for kind, fn in trt_stub[trt_plugin.PLUGIN_ID].items()}
    Hk, Hv, Dk, Dv, K, B = 2, 4, 32, 32, 4, 3
    C = 2 * Hk * Dk + Hv * Dv
    ins = [Desc((B, 1, C), "bfloat16"), Desc((B, 1, Hv, Dv), "bfloat16"), Desc((B, 1, Hv), "bfloat16"),
           Desc((B, 1, Hv), "bfloat16"), Desc((C, K), "bfloat16"), Desc((Hv,), "float32"), Desc((Hv,), "bfloat16"),
           Desc((Dv,), "bfloat16"), Desc((B, C, K - 1), "bfloat16"), Desc((B, Hv, Dk, Dv), "float32")]
    y, cso, so = reg["desc"](*ins, num_k_heads=Hk, norm_eps=1e-6)
    assert [int(e) for e in y.shape_expr] == [B, 1, Hv * Dv] and so is ins[9]
    assert len(reg["autotune"](*ins, (y, cso, so))[0].split(",")) == 13
    name, ptx, launch, extra = reg["aot"](*ins, Hk, 1e-6, (y, cso, so), 0)
    assert name == b"gdn_decode_kernel" and b".target sm_80" in ptx
    assert (launch.grid_x, int(launch.grid_y), launch.block_x) == (Hv, B, 128)  # decode_meta: 4 warps here
    assert 0 <= launch.shared_mem <= 48 * 1024
    assert extra == [1]  # the kernels' one int32 scalar: T


# ---------------------------------------------------------------- verify form (speculative decoding)
@pytest.mark.parametrize("cfg,B,T,K,dtype", [("gqa", 2, 4, 4, torch.float32), ("mha", 1, 3, 3, torch.bfloat16),
                                             ("small", 3, 1, 4, torch.float32), ("small", 1, 5, 2, torch.float16)])
def test_verify_kernel_gives_every_tokens_state(cfg, B, T, K, dtype, seed):
    """gdn_verify_kernel vs the reference's per-token states (entry t = the state after token t),
    on NaN-poisoned outputs; the input states stay untouched (a rejected draft never commits)."""
    from qcn.compile.plugins.gated_deltanet import verify

    Hk, Hv, Dk, Dv = CFGS[cfg]
    inp = make_inputs(B, T, Hk, Hv, Dk, Dv, K=K, dtype=dtype, seed=seed)
    before = {k: v.clone() for k, v in inp.items()}
    y = torch.full((B, T, Hv * Dv), float("nan"), dtype=dtype)
    css = torch.full((B, T, *inp["conv_state"].shape[1:]), float("nan"), dtype=dtype)
    ss = torch.full((B, T, Hv, Dk, Dv), float("nan"), dtype=torch.float32)
    verify.launch_verify(*inp.values(), y, css, ss, num_k_heads=Hk, norm_eps=1e-6)
    ref_y, ref_css, ref_ss = gated_deltanet_reference(*inp.values(), num_k_heads=Hk, norm_eps=1e-6,
                                                      per_token_states=True)
    for name, o, r in (("y", y, ref_y), ("conv_states", css, ref_css), ("recurrent_states", ss, ref_ss)):
        assert not torch.isnan(o).any(), f"{name}: element left unwritten (seed {seed})"
        bound = 1e-5 if name == "recurrent_states" or dtype == torch.float32 else tol(dtype)
        assert rel_err(o, r) < bound, f"{name}: rel err {rel_err(o, r):.3e} (seed {seed})"
    assert torch.equal(css.float(), ref_css.float()), f"conv states are copies, bit-exact (seed {seed})"
    for k, v in inp.items():
        assert torch.equal(v, before[k]), f"{k} was modified (seed {seed})"
    # the last entry is the plain op's state: verify with accept-all == one prefill/decode call
    _, cso, so = gated_deltanet_reference(*inp.values(), num_k_heads=Hk, norm_eps=1e-6)
    assert rel_err(ss[:, -1], so) < 1e-5 and torch.equal(css[:, -1].float(), cso.float())
