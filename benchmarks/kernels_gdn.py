"""Benchmark the GatedDeltaNet Triton kernels at Qwen3-Coder-Next shapes.

    python benchmarks/kernels_gdn.py                 # on a CUDA GPU
    python benchmarks/kernels_gdn.py --dry-run       # CPU, Triton interpreter, tiny shapes, checks shapes only

Shapes: Hk=16, Hv=32, Dk=Dv=128, K=4, C=8192, activations bf16, states fp32.
Decode (T=1) for each --batch, prefill for each --prefill-tokens (B=1).

Method: median of CUDA-event timings after --warmup launches; every launch reads a
different copy of the inputs and states (copies rotated so that the working set of the
rotation is > 2x the L2 cache), so numbers are HBM-bound, not L2-resident. The launches of
one rotation are replayed as one CUDA graph (per-call events when capture fails), so host
launch overhead is not counted.
Bytes and FLOPs are counted by hand (below); bandwidth is also given as a fraction of a
measured device-to-device copy (read + write bytes / time of a 1 GiB copy_).

Baselines: PyTorch eager (the same op written with torch ops: conv update, l2norm, the
recurrent step for decode / transformers' torch_chunk_gated_delta_rule for prefill, gated
RMSNorm) and, when ``fla-core`` is installed, fla's fused_recurrent / chunk gated delta rule
(core recurrence only: fla's numbers exclude the conv and the gated norm, and q/k are
pre-expanded to Hv heads outside the timed region).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

HK, HV, DK, DV, KC = 16, 32, 128, 128, 4
TINY = dict(HK=2, HV=4, DK=16, DV=16, KC=4)
BT = 64


def dims(shape):
    C = 2 * shape["HK"] * shape["DK"] + shape["HV"] * shape["DV"]
    return shape["HK"], shape["HV"], shape["DK"], shape["DV"], shape["KC"], C


def bytes_moved(shape, B, T, act_bytes=2):
    """Minimum HBM traffic of one op call: every input read once, every output written once."""
    Hk, Hv, Dk, Dv, K, C = dims(shape)
    io = act_bytes * (B * T * C            # qkv
                      + B * T * Hv * Dv    # z
                      + 2 * B * T * Hv     # b, a
                      + B * T * Hv * Dv    # y
                      + C * K + Hv + Dv    # conv_weight, dt_bias, norm_weight
                      + 2 * B * C * (K - 1))  # conv_state in + out
    io += 4 * Hv                           # A_log
    io += 2 * 4 * B * Hv * Dk * Dv         # recurrent state read + write (fp32)
    return io


def flops(shape, B, T, chunked):
    """Hand-counted FLOPs (multiply-add = 2) of the algorithm as the kernel runs it."""
    Hk, Hv, Dk, Dv, K, C = dims(shape)
    conv = 2 * B * T * C * K
    norm = B * T * Hv * Dv * 8
    if not chunked:  # per token and v head: decay, S^T k, rank-1 update, S^T q
        core = B * T * Hv * (Dk * Dv + 2 * Dk * Dv + 2 * Dk * Dv + 2 * Dk * Dv)
    else:            # per chunk of BT and v head
        n = B * Hv * math.ceil(T / BT)
        per = (2 * BT * BT * Dk                          # K K^T
               + 2 * int(math.log2(BT)) * 2 * BT ** 3    # inverse by doubling
               + 2 * BT * BT * (Dk + Dv)                 # U, W
               + 2 * BT * Dk * Dv * 3                    # W S, Q S, K^T Vnew
               + 2 * BT * BT * Dk + 2 * BT * BT * Dv)    # Q K^T, A Vnew
        core = n * per
    return conv + core + norm


def make_inputs(shape, B, T, device, dtype, seed=0):
    import torch
    Hk, Hv, Dk, Dv, K, C = dims(shape)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)

    return dict(qkv=r(B, T, C), z=r(B, T, Hv, Dv), b=r(B, T, Hv), a=r(B, T, Hv),
                conv_weight=r(C, K, scale=0.5), A_log=r(Hv, scale=0.5, dt=torch.float32), dt_bias=r(Hv),
                norm_weight=r(Dv), conv_state=r(B, C, K - 1), recurrent_state=r(B, Hv, Dk, Dv, scale=0.1,
                                                                                  dt=torch.float32))


# ------------------------------------------------------------------------------ implementations
def run_triton(inp, Hk, out):
    from qcn.compile.plugins.gated_deltanet import decode, prefill  # cached after the first call
    T = inp["qkv"].shape[1]
    y, cso = out
    launch = decode.launch_decode if T == 1 else prefill.launch_prefill
    launch(*inp.values(), y, cso, inp["recurrent_state"], num_k_heads=Hk, norm_eps=1e-6)


def run_eager(inp, Hk, out):
    """The op in plain torch ops (fp32 math), as transformers runs it."""
    import torch
    import torch.nn.functional as F
    qkv, z = inp["qkv"], inp["z"]
    B, T, C = qkv.shape
    Hv, Dv = z.shape[2:]
    Dk = (C - Hv * Dv) // (2 * Hk)
    K = inp["conv_weight"].shape[1]
    x = torch.cat([inp["conv_state"], qkv.transpose(1, 2)], -1)
    out[1].copy_(x[:, :, -(K - 1):])
    conv = F.silu(F.conv1d(x, inp["conv_weight"].unsqueeze(1), groups=C)).transpose(1, 2)
    q, k, v = torch.split(conv, [Hk * Dk, Hk * Dk, Hv * Dv], -1)
    q, k, v = q.reshape(B, T, Hk, Dk).float(), k.reshape(B, T, Hk, Dk).float(), v.reshape(B, T, Hv, Dv).float()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # Dk^-0.5 applied below / by transformers
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = inp["b"].sigmoid().float()
    g = -inp["A_log"].exp() * F.softplus(inp["a"].float() + inp["dt_bias"].float())
    S = inp["recurrent_state"]
    if T == 1:
        rep = Hv // Hk
        qh, kh = q[:, 0].repeat_interleave(rep, 1) * Dk ** -0.5, k[:, 0].repeat_interleave(rep, 1)
        S.mul_(g[:, 0].exp()[..., None, None])
        delta = beta[:, 0, :, None] * (v[:, 0] - torch.einsum("bhk,bhkv->bhv", kh, S))
        S.add_(kh[..., None] * delta[:, :, None, :])
        o = torch.einsum("bhk,bhkv->bhv", qh, S)[:, None]
    else:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as chunk
        chunk = getattr(chunk, "__wrapped__", chunk)  # the torch path even when fla is installed
        o, S_new = chunk(q, k, v, g=g, beta=beta, initial_state=S, output_final_state=True)
        S.copy_(S_new)
    o = o.float()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    y = inp["norm_weight"].float() * o * F.silu(z.float())
    out[0].copy_(y.reshape(B, T, Hv * Dv))


def fla_fn():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:  # noqa: BLE001 - optional
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def make_fla_runner(inp, Hk):
    """fla core recurrence on the (pre-conv) q/k/v split of qkv: conv and gated norm excluded.

    Newer fla (>= 0.4) takes Hk q/k heads for Hv v heads (GVA) and fuses the gate and beta
    activations (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``): that is tried first, with
    the raw a / b like our op. Older fla gets q/k expanded to Hv heads and g / beta precomputed
    outside the timed region. ``run.mode`` says which ran."""
    import torch
    import torch.nn.functional as F
    fns = fla_fn()
    if fns is None:
        return None
    chunk, recur = fns
    qkv, z = inp["qkv"], inp["z"]
    B, T, C = qkv.shape
    Hv, Dv = z.shape[2:]
    Dk = (C - Hv * Dv) // (2 * Hk)
    q, k, v = torch.split(qkv, [Hk * Dk, Hk * Dk, Hv * Dv], -1)
    q, k = q.reshape(B, T, Hk, Dk).contiguous(), k.reshape(B, T, Hk, Dk).contiguous()
    v = v.reshape(B, T, Hv, Dv).contiguous()
    fn = recur if T == 1 else chunk
    state = inp["recurrent_state"]
    fused = dict(g=inp["a"].contiguous(), beta=inp["b"].contiguous(), use_gate_in_kernel=True,
                 A_log=inp["A_log"], dt_bias=inp["dt_bias"], use_beta_sigmoid_in_kernel=True)
    try:  # GVA + fused gates (fla >= 0.4); one untimed call checks that this fla takes them
        fn(q, k, v, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True, **fused)
        kw, qq, kk, mode = fused, q, k, "GVA, gates fused"
    except Exception:  # noqa: BLE001 - older fla: expanded heads, gates precomputed
        rep = Hv // Hk
        qq = q.repeat_interleave(rep, 2).contiguous()
        kk = k.repeat_interleave(rep, 2).contiguous()
        g = (-inp["A_log"].exp() * F.softplus(inp["a"].float() + inp["dt_bias"].float())).contiguous()
        kw, mode = dict(g=g, beta=inp["b"].sigmoid().contiguous()), "q/k expanded to Hv, gates precomputed"

    def run(_inp=None, _Hk=None, _out=None):
        fn(qq, kk, v, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True, **kw)
    run.mode = mode
    return run


# ------------------------------------------------------------------------------ timing
def time_cuda(fn_per_copy, n_copies, warmup, iters, use_graph=True):
    """Median seconds per call. Calls rotate over ``n_copies`` input copies.

    With ``use_graph`` one CUDA graph replays all copies once (host launch overhead, which
    exceeds a few-microsecond decode kernel, is then out of the measurement) and the
    median replay time is divided by n_copies; without it (or if capture fails) every call
    is bracketed by its own events.
    """
    import torch
    for i in range(max(warmup, n_copies)):
        fn_per_copy(i % n_copies)  # also compiles / autotunes outside the capture
    torch.cuda.synchronize()
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                for i in range(n_copies):
                    fn_per_copy(i)
            torch.cuda.current_stream().wait_stream(stream)
            graph.replay()
            torch.cuda.synchronize()
            reps = max(1, iters // n_copies)
            times = []
            for _ in range(max(reps, 5)):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                graph.replay()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e-3 / n_copies)
            return statistics.median(times)
        except Exception as exc:  # noqa: BLE001 - fall back to per-call events
            print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc}; timing per call)", flush=True)
            torch.cuda.synchronize()
    times = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn_per_copy((warmup + i) % n_copies)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return statistics.median(times)


def copy_bandwidth():
    import torch
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda i: dst.copy_(src), 1, 3, 10, use_graph=False)
    return 2 * n / t


def l2_bytes():
    import torch
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)


def bench_case(shape, B, T, args, bw):
    import torch
    Hk, Hv, Dk, Dv, K, C = dims(shape)
    nbytes = bytes_moved(shape, B, T)
    nflop = flops(shape, B, T, chunked=T > 1)
    n_copies = max(2, math.ceil(2 * l2_bytes() / nbytes))
    n_copies = min(n_copies, max(1, int(args.max_mem_gb * 2**30 // nbytes)))
    copies = [make_inputs(shape, B, T, "cuda", torch.bfloat16, seed=i) for i in range(n_copies)]
    outs = [(torch.empty(B, T, Hv * Dv, dtype=torch.bfloat16, device="cuda"), torch.empty_like(c["conv_state"]))
            for c in copies]
    rows = []
    impls = [("triton", run_triton)]
    if not args.no_eager:
        impls.append(("eager", run_eager))
    for name, fn in impls:
        t = time_cuda(lambda i: fn(copies[i], Hk, outs[i]), n_copies, args.warmup, args.iters)
        rows.append((name, t))
    if not args.no_fla and fla_fn() is not None:
        runners = [make_fla_runner(c, Hk) for c in copies]
        t = time_cuda(lambda i: runners[i](), n_copies, args.warmup, args.iters)
        rows.append(("fla(core)", t))
    for name, t in rows:
        print(f"{'decode' if T == 1 else 'prefill':8s} B={B:<4d} T={T:<6d} {name:10s} {t * 1e6:10.1f} us  "
              f"{nbytes / t / 1e9:8.1f} GB/s ({nbytes / t / bw:5.1%} of copy)  {nflop / t / 1e12:7.2f} TFLOP/s  "
              f"[{nbytes / 1e6:.1f} MB, {nflop / 1e9:.2f} GFLOP, {n_copies} copies]", flush=True)


def dry_run(args):
    """CPU: run both kernels (and the eager baseline) once at tiny shapes in the Triton interpreter;
    check output shapes, that every output is written, and that the eager baseline matches the reference."""
    import torch
    from qcn.compile.plugins.gated_deltanet import gated_deltanet_reference
    Hk, Hv, Dk, Dv, K, C = dims(TINY)
    for B, T in ((2, 1), (1, 70)):
        inp = make_inputs(TINY, B, T, "cpu", torch.float32)
        ref = gated_deltanet_reference(**{k: v.clone() for k, v in inp.items()}, num_k_heads=Hk)
        y = torch.full((B, T, Hv * Dv), float("nan"))
        cso = torch.full_like(inp["conv_state"], float("nan"))
        run_triton(inp, Hk, (y, cso))
        got = (y, cso, inp["recurrent_state"])
        for name, o, r, shp in zip(("y", "conv_state_out", "recurrent_state"), got, ref,
                                   ((B, T, Hv * Dv), (B, C, K - 1), (B, Hv, Dk, Dv))):
            assert tuple(o.shape) == shp == tuple(r.shape), (name, o.shape, shp)
            assert not torch.isnan(o).any(), name
        einp = make_inputs(TINY, B, T, "cpu", torch.float32)
        eo = (torch.empty(B, T, Hv * Dv), torch.empty_like(einp["conv_state"]))
        run_eager(einp, Hk, eo)  # the eager baseline must compute the same op
        for o, r in zip((eo[0], eo[1], einp["recurrent_state"]), ref):
            err = ((o.double() - r.double()).norm() / r.double().norm()).item()
            assert err < 1e-4, f"eager baseline disagrees with the reference: {err:.2e}"
        print(f"dry-run {'decode' if T == 1 else 'prefill'} B={B} T={T}: shapes ok; real-shape accounting: "
              f"{bytes_moved(dict(HK=HK, HV=HV, DK=DK, DV=DV, KC=KC), B, T) / 1e6:.2f} MB, "
              f"{flops(dict(HK=HK, HV=HV, DK=DK, DV=DV, KC=KC), B, T, T > 1) / 1e9:.3f} GFLOP")
    print("dry-run ok")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes, shape checks only")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64, 256])
    p.add_argument("--prefill-tokens", type=int, nargs="*", default=[512, 4096])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-mem-gb", type=float, default=16.0, help="cap on the rotated input copies")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--no-fla", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        return dry_run(args)
    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run")
    shape = dict(HK=HK, HV=HV, DK=DK, DV=DV, KC=KC)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s  L2 {l2_bytes() >> 20} MiB")
    for B in args.batch:
        bench_case(shape, B, 1, args, bw)
    for T in args.prefill_tokens:
        bench_case(shape, 1, T, args, bw)


if __name__ == "__main__":
    main()
