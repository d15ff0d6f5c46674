"""GPU micro-benchmark of the qcn::MoE and decode-attention Triton kernels vs PyTorch eager.

    python benchmarks/kernels_moe_attn.py                 # real shapes, needs a CUDA GPU
    python benchmarks/kernels_moe_attn.py --json build/bench/kernels.json
    python benchmarks/kernels_moe_attn.py --dry-run       # CPU, tiny shapes, Triton interpreter:
                                                          # runs every case once, checks shapes only

Real shapes: MoE H=2048, E=512, top-10, I=Is=512, bf16 activations, weights dense bf16 /
FP8 per-channel / INT4 group-128; decode N in (1, 8), prefill N=2048. Attention (decode,
T=1): Hq=16, KVH=2, D=256, B=1, bf16 and fp8 caches, past_len 32K and 128K.

Method: every case gets several input sets rotated per iteration whose total size exceeds
4x the L2 cache (for MoE the token sets differ, so routing and the experts read differ too);
warm-up, then one CUDA-event pair per iteration, median reported. Bytes and FLOPs are counted
by hand (formulas in ``moe_cost`` / ``attn_cost``): bytes = each weight / cache byte that must
come from DRAM once (selected experts counted once per call from the actual routing), plus
activations. "copy%" = achieved bytes/s over a measured device-to-device copy bandwidth
(read + write bytes of a 2 GiB copy per second). Eager baselines: MoE = the transformers
Qwen3NextSparseMoeBlock algorithm (per-expert loop, torch ops) on dense weights (for the
quantized formats: dequantize the selected experts, then the same loop); attention = SDPA
over the valid cache prefix concatenated with the new token (``enable_gqa``).
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter at tiny shapes, shapes only")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--only", choices=("moe", "attn"), default=None)
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager baselines")
    return ap.parse_args(argv)


if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (importers set it themselves)

import torch  # noqa: E402

from qcn.compile.plugins.attention import DecodeAttentionConfig, cached_attention_decode  # noqa: E402
from qcn.compile.plugins.moe import (  # noqa: E402
    MoEConfig,
    dequantize_fp8_rowwise,
    dequantize_int4_groupwise,
    moe_forward,
    moe_route,
    quantize_moe_weights,
)

ARGS = DEV = MOE = ATT = MOE_CFG = ATT_CFG = None  # set by main() / configure()


def configure(dry_run: bool):
    """Shapes, tile configs and device of this module: tiny shapes on CPU for ``dry_run`` (the
    Triton interpreter: TRITON_INTERPRET=1 must be set before triton is imported), else the
    model's real shapes on the CUDA device."""
    global DEV, MOE, ATT, MOE_CFG, ATT_CFG
    if dry_run:
        DEV = torch.device("cpu")
        MOE = dict(H=64, E=9, K=3, I=32, IS=32, G=32, decode=(1, 5), prefill=(20,))
        ATT = dict(HQ=4, KVH=2, D=32, B=1, ctx=(40, 70), P_pad=8)
        MOE_CFG = MoEConfig(router_bn=16, router_bk=32, topk_bh=32, decode_bn_gate_up=16, decode_bn_down=32,
                            decode_bk=32, prefill_bm=16, prefill_bn=32, prefill_bk=32, align_block=64,
                            combine_bh=64)
        ATT_CFG = DecodeAttentionConfig(partition=32, block_n=16, block_s=4)
    else:
        DEV = torch.device("cuda")
        MOE = dict(H=2048, E=512, K=10, I=512, IS=512, G=128, decode=(1, 8), prefill=(2048,))
        ATT = dict(HQ=16, KVH=2, D=256, B=1, ctx=(32 * 1024, 128 * 1024), P_pad=256)
        MOE_CFG = MoEConfig()
        ATT_CFG = DecodeAttentionConfig()


ACT = torch.bfloat16


# ----------------------------------------------------------------------------- timing


def l2_bytes():
    if DEV.type != "cuda":
        return 0  # dry run: the minimum of two input sets
    props = torch.cuda.get_device_properties(DEV)
    return int(getattr(props, "L2_cache_size", 50 << 20))


def bench(fn, inputs, iters, warmup):
    """Median milliseconds of fn(*inputs[i % len(inputs)]) over iters, one event pair each."""
    if DEV.type != "cuda":
        for a in inputs[:1]:
            fn(*a)
        return float("nan")
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a = inputs[i % len(inputs)]
        s.record()
        fn(*a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def copy_bandwidth():
    """Bytes (read + write) per second of a 2 GiB device-to-device copy, median of 20."""
    if DEV.type != "cuda":
        return float("nan")
    n = 1 << 31
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = bench(b.copy_, [(a,)], 20, 3)
    return 2 * n / (ms * 1e-3)


def rotations(bytes_per_set, cap=16):
    return max(2, min(cap, -(-4 * l2_bytes() // max(bytes_per_set, 1))))


# ----------------------------------------------------------------------------- MoE


def moe_weights(fmt):
    H, E, I, IS = MOE["H"], MOE["E"], MOE["I"], MOE["IS"]
    gen = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*s, scale):
        return (torch.randn(*s, device=DEV, generator=gen, dtype=torch.float32) * scale).to(ACT)

    w = dict(router_weight=rnd(E, H, scale=H ** -0.5), shared_gate=rnd(1, H, scale=H ** -0.5))
    dense = dict(gate_up=rnd(E, 2 * I, H, scale=H ** -0.5), down=rnd(E, H, I, scale=I ** -0.5),
                 shared_gate_up=rnd(2 * IS, H, scale=H ** -0.5), shared_down=rnd(H, IS, scale=IS ** -0.5))
    if fmt == "dense":
        return {**w, **dense, "weight_format": "dense"}
    kw, _ = quantize_moe_weights(dense["gate_up"], dense["down"], dense["shared_gate_up"], dense["shared_down"],
                                 fmt, MOE["G"])
    del dense
    return {**w, **kw}


def weight_bytes_per_expert(fmt):
    H, I = MOE["H"], MOE["I"]
    if fmt == "dense":
        return 3 * I * H * 2
    if fmt == "fp8":
        return 3 * I * H + (2 * I + H) * 4
    g = MOE["G"]
    return 3 * I * H // 2 + (2 * I * -(-H // g) + H * -(-I // g)) * 2


def moe_cost(n, fmt, unique_experts):
    """Hand count. Bytes: router (E*H bf16) + each selected expert once + shared expert +
    x read and y written (bf16) + intermediates (act [N*(k+1), I] written and read, inter
    [N*(k+1), H] written and read, bf16). FLOPs: 2*N*(E*H + k*3*I*H + 3*Is*H)."""
    H, E, K, I, IS = MOE["H"], MOE["E"], MOE["K"], MOE["I"], MOE["IS"]
    wb = weight_bytes_per_expert(fmt)
    shared = wb * IS // I
    inter = 2 * n * (K + 1) * (I + H) * 2
    byt = E * H * 2 + unique_experts * wb + shared + 2 * n * H * 2 + inter
    flops = 2 * n * (E * H + K * 3 * I * H + 3 * IS * H)
    return byt, flops


def moe_eager(x, w, fmt):
    """transformers' Qwen3NextSparseMoeBlock algorithm in torch ops (dequantizing the selected
    experts for quantized formats)."""
    K = MOE["K"]
    logits = x @ w["router_weight"].T
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, K, dim=-1)
    top = (top / top.sum(-1, keepdim=True)).to(x.dtype)
    y = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        gu, dn = _expert_weights(w, fmt, e)
        g, u = (x[tok] @ gu.T).chunk(2, dim=-1)
        y.index_add_(0, tok, ((torch.nn.functional.silu(g) * u) @ dn.T) * top[tok, slot, None])
    sgu, sdn = _expert_weights(w, fmt, None)
    g, u = (x @ sgu.T).chunk(2, dim=-1)
    return y + torch.sigmoid(x @ w["shared_gate"].T) * ((torch.nn.functional.silu(g) * u) @ sdn.T)


def _expert_weights(w, fmt, e):
    names = ("gate_up", "down") if e is not None else ("shared_gate_up", "shared_down")
    out = []
    for nm in names:
        t = w[nm] if e is None else w[nm][e]
        if fmt == "fp8":
            s = w[nm + "_scale"] if e is None else w[nm + "_scale"][e]
            t = dequantize_fp8_rowwise(t, s).to(ACT)
        elif fmt == "int4":
            s = w[nm + "_scale"] if e is None else w[nm + "_scale"][e]
            k = MOE["H"] if "gate_up" in nm else (MOE["I"] if e is not None else MOE["IS"])
            t = dequantize_int4_groupwise(t, s, k, MOE["G"]).to(ACT)
        out.append(t)
    return out


def run_moe(results, bw):
    H, K = MOE["H"], MOE["K"]
    small = ("router_weight", "shared_gate", "shared_gate_up", "shared_gate_up_scale", "shared_down",
             "shared_down_scale")
    for fmt in ("dense", "fp8", "int4"):
        w = moe_weights(fmt)
        for path, ns in (("decode", MOE["decode"]), ("prefill", MOE["prefill"])):
            for n in ns:
                per_set = moe_cost(n, fmt, min(MOE["E"], n * K))[0]
                # each set: its own tokens (so its own routing) and its own copy of the router and
                # shared expert (which every call reads); the routed experts are shared
                sets = [(torch.randn(n, H, device=DEV, dtype=ACT),
                         {k: (v.clone() if k in small else v) for k, v in w.items()})
                        for _ in range(rotations(per_set))]
                uniq = statistics.mean(
                    torch.unique(moe_route(x, ws["router_weight"], ws["shared_gate"], K, config=MOE_CFG)[0]).numel()
                    for x, ws in sets)
                byt, flops = moe_cost(n, fmt, uniq)

                def ours(x, ws, path=path):
                    return moe_forward(x, top_k=K, path=path, config=MOE_CFG, **ws)

                y = ours(*sets[0])
                assert y.shape == (n, H) and y.dtype == ACT, (y.shape, y.dtype)
                ms = bench(ours, sets, ARGS.iters, ARGS.warmup)
                eager_ms = float("nan")
                if not ARGS.no_eager:
                    ye = moe_eager(sets[0][0], sets[0][1], fmt)
                    assert ye.shape == y.shape
                    eager_ms = bench(lambda x, ws, fmt=fmt: moe_eager(x, ws, fmt), sets,
                                     max(5, ARGS.iters // 5), max(2, ARGS.warmup // 5))
                results.append(row(f"moe {path} {fmt}", f"N={n} uniq_experts={uniq:.1f}", ms, eager_ms, byt, flops, bw))
                del sets
        del w
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- attention


def attn_cost(b, ctx, cache_bytes):
    """Hand count. Bytes: K and V of ctx positions x KVH x D (cache dtype) + q, new k/v, out
    (bf16) + partials (m, l, acc fp32; written + read). FLOPs: 4 * B * Hq * (ctx + 1) * D."""
    HQ, KVH, D = ATT["HQ"], ATT["KVH"], ATT["D"]
    s = -(-ctx // ATT_CFG.partition)
    byt = b * (2 * KVH * ctx * D * cache_bytes + (2 * HQ * D + 2 * KVH * D) * 2 + 2 * HQ * s * (D + 2) * 4)
    return byt, 4 * b * HQ * (ctx + 1) * D


def attn_eager(q, k, v, pk, pv, pl, ks, vs):
    outs = []
    for i in range(q.shape[0]):
        n = int(pl[i])
        kk, vv = pk[i:i + 1, :, :n], pv[i:i + 1, :, :n]
        if ks is not None:
            kk, vv = (kk.float() * ks).to(q.dtype), (vv.float() * vs).to(q.dtype)
        kk = torch.cat([kk, k[i:i + 1].transpose(1, 2)], dim=2)
        vv = torch.cat([vv, v[i:i + 1].transpose(1, 2)], dim=2)
        o = torch.nn.functional.scaled_dot_product_attention(q[i:i + 1].transpose(1, 2), kk, vv, enable_gqa=True)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)


def run_attn(results, bw):
    HQ, KVH, D, B = ATT["HQ"], ATT["KVH"], ATT["D"], ATT["B"]
    for cache in ("bf16", "fp8"):
        cb = 1 if cache == "fp8" else 2
        for ctx in ATT["ctx"]:
            p = ctx + ATT["P_pad"]  # the runtime's buffer is longer than the context
            byt, flops = attn_cost(B, ctx, cb)
            sets = []
            for _ in range(rotations(byt, cap=8)):
                pk = torch.randn(B, KVH, p, D, device=DEV, dtype=ACT)
                pv = torch.randn(B, KVH, p, D, device=DEV, dtype=ACT)
                ks = vs = None
                if cache == "fp8":
                    ks, vs = torch.tensor([0.01], device=DEV), torch.tensor([0.01], device=DEV)
                    pk, pv = (pk / ks).to(torch.float8_e4m3fn), (pv / vs).to(torch.float8_e4m3fn)
                sets.append((torch.randn(B, 1, HQ, D, device=DEV, dtype=ACT),
                             torch.randn(B, 1, KVH, D, device=DEV, dtype=ACT),
                             torch.randn(B, 1, KVH, D, device=DEV, dtype=ACT), pk, pv,
                             torch.full((B,), ctx, device=DEV, dtype=torch.int64), ks, vs))

            def ours(q, k, v, pk, pv, pl, ks, vs):
                return cached_attention_decode(q, k, v, pk, pv, pl, k_scale=ks, v_scale=vs, config=ATT_CFG)

            o = ours(*sets[0])
            assert o.shape == (B, 1, HQ, D) and o.dtype == ACT, (o.shape, o.dtype)
            ms = bench(ours, sets, ARGS.iters, ARGS.warmup)
            eager_ms = float("nan")
            if not ARGS.no_eager:
                assert attn_eager(*sets[0]).shape == o.shape
                eager_ms = bench(attn_eager, sets, max(5, ARGS.iters // 5), max(2, ARGS.warmup // 5))
            splits = -(-p // ATT_CFG.partition)
            results.append(row(f"attn decode kv{cache}", f"B={B} ctx={ctx} splits={splits}", ms, eager_ms, byt, flops,
                               bw))
            del sets
            if DEV.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main


def row(name, shape, ms, eager_ms, byt, flops, bw):
    gbs = byt / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
    return dict(case=name, shape=shape, ms=ms, eager_ms=eager_ms, bytes=int(byt), flops=int(flops), GBps=gbs,
                TFLOPs=flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan"),
                copy_frac=(byt / (ms * 1e-3)) / bw if ms == ms and bw == bw else float("nan"),
                speedup=eager_ms / ms if ms == ms and eager_ms == eager_ms else float("nan"))


def main(argv=None):
    global ARGS
    ARGS = parse_args(argv)
    if not ARGS.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run")
    configure(ARGS.dry_run)
    t0 = time.time()
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu (Triton interpreter, --dry-run)"
    print(f"device: {dev}; copy bandwidth {bw / 1e9:.0f} GB/s (read+write); L2 {l2_bytes() >> 20} MiB; "
          f"torch {torch.__version__}")
    results = []
    if ARGS.only in (None, "moe"):
        run_moe(results, bw)
    if ARGS.only in (None, "attn"):
        run_attn(results, bw)
    hdr = (f"{'case':24s} {'shape':34s} {'ms':>9s} {'eager ms':>9s} {'x':>6s} {'MB':>9s} {'GB/s':>8s} {'copy%':>6s} "
           f"{'TFLOP/s':>8s}")
    print(hdr)
    for r in results:
        print(f"{r['case']:24s} {r['shape']:34s} {r['ms']:9.4f} {r['eager_ms']:9.4f} {r['speedup']:6.2f} "
              f"{r['bytes'] / 1e6:9.2f} {r['GBps']:8.1f} {100 * r['copy_frac']:6.1f} {r['TFLOPs']:8.2f}")
    if ARGS.dry_run:
        print(f"dry run: {len(results)} cases ran on CPU, shapes checked ({time.time() - t0:.1f}s); no timings")
    if ARGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(ARGS.json)), exist_ok=True)
        with open(ARGS.json, "w") as f:
            json.dump(dict(device=dev, copy_bandwidth=bw, torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
