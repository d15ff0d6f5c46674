"""Whole-model decode step of Qwen3-Coder-Next at full size, random weights, our kernels in a CUDA graph.

    python benchmarks/decode_step.py                          # H100: INT4 experts, batch 1, 4K context
    python benchmarks/decode_step.py --experts fp8            # needs an H200 (~77 GiB of FP8 experts)
    python benchmarks/decode_step.py --experts bf16 --layers 8   # BF16 experts fit only for a subset
    python benchmarks/decode_step.py --batch 8 --context 32768 --proj fp8 --no-cuda-graph
    python benchmarks/decode_step.py --dry-run                # CPU, Triton interpreter, tiny shapes

NOTE: written in a session WITHOUT a GPU. Only ``--dry-run`` (CPU, ``TRITON_INTERPRET=1``,
tiny shapes) has been executed; the GPU mode (full sizes, CUDA graph, timings) has never run.

Model (docs/FINDINGS.md, docs/OPS.md): 48 layers, hidden 2048, layer i is gated attention
when i % 4 == 3 (12 layers: 16 Q / 2 KV heads x 256, q_proj gives [q | gate] per head,
q_norm/k_norm, RoPE rotate-half on the first 64 dims, output * sigmoid(gate)) and Gated
DeltaNet otherwise (36 layers: Hk=16, Hv=32, Dk=Dv=128, conv K=4); every layer ends in a MoE
(512 experts, top-10, expert width 512, one gated shared expert of width 512); zero-centred
RMSNorms; embedding and lm_head 151,936 x 2048 bf16; greedy argmax fed back as the next token.

Per step (one new token for each of --batch sequences):
  * embedding gather, RMSNorm, RoPE, residual adds, argmax: torch ops (bf16, norms in fp32);
  * projections (DeltaNet qkv / z / b,a / out; attention q / k / v / o; lm_head): torch
    matmuls. ``--proj bf16`` (default): bf16 weights, ``F.linear``. ``--proj fp8``: FP8 E4M3
    weights with one fp32 scale per matrix, activations quantised per tensor, run with
    ``torch._scaled_mm`` (bf16 out) IF a probe call on the device succeeds, else bf16 (the run
    prints which); the router and lm_head stay bf16, as in docs/FINDINGS.md' FP8 roofline;
  * GatedDeltaNet: ``qcn.compile.plugins.gated_deltanet.gated_deltanet_decode`` (fused conv +
    gating + recurrence on the fp32 state in place + gated RMSNorm). The conv state is
    double-buffered: even steps read buffer 0 and write buffer 1, odd steps the reverse, so two
    graphs are captured and replayed alternately (no copy-back);
  * attention: ``qcn.compile.plugins.attention.cached_attention_decode`` over a bf16 KV cache of
    --context filled positions; the new k/v are also written into the cache at position
    --context (as a runtime would; past_len stays fixed so every step costs the same);
  * MoE: ``qcn.compile.plugins.moe.moe_forward(weight_format=dense|fp8|int4)``, path "decode"
    for batch <= 16 (each selected expert read once), "prefill" (grouped GEMM) above.

Timing: three eager warm-up steps on a side stream (Triton compiles), capture of the two
graphs, --warmup replays, then one CUDA-event pair per step for --iters steps, median. Before capture one eager step checks every intermediate's shape/dtype and
finiteness and counts the distinct experts each MoE layer routes to (used for the bytes).
Bytes moved per step are counted by hand from the shapes and formats (``count_bytes``):
every weight read once (routed experts: the distinct selected experts of that step), the
DeltaNet fp32 state read + written, conv states, the KV cache read (+ the new entries
written), the lm_head; activations are left out (< 1 MB). "copy%" = those bytes per second
over the measured bandwidth of a 2 GiB device-to-device copy (read + write bytes / s) in the
same run.

``--dry-run``: TRITON_INTERPRET=1 is set before triton is imported and the same code runs on
CPU at tiny shapes (4 layers = 3 DeltaNet + 1 attention, hidden 64, 8 experts top-2, batch 2,
...): INT4 experts with FP8 projections (two steps: both conv-state parities), FP8 and BF16
experts with bf16 projections (one step each). It checks shapes, dtypes and finiteness only,
times nothing, prints the full-size memory estimates, and ends with the line
``dry run: shapes ok ...``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, shape checks only")
    ap.add_argument("--experts", choices=("int4", "fp8", "bf16"), default="int4",
                    help="routed + shared expert weight format (default int4: fits an H100)")
    ap.add_argument("--proj", choices=("bf16", "fp8"), default="bf16",
                    help="attention/DeltaNet projection weights (fp8 uses torch._scaled_mm if it works)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded per step")
    ap.add_argument("--context", type=int, default=4096, help="KV positions already filled per sequence")
    ap.add_argument("--layers", type=int, default=None, help="run only the first N layers (default all 48)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="launch eagerly from Python each step")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (importers set it themselves)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qcn.compile.plugins.attention import DecodeAttentionConfig, cached_attention_decode  # noqa: E402
from qcn.compile.plugins.gated_deltanet import gated_deltanet_decode  # noqa: E402
from qcn.compile.plugins.moe import DECODE_MAX_TOKENS, MoEConfig, moe_forward, moe_route  # noqa: E402

ACT = torch.bfloat16

FULL = dict(L=48, H=2048, V=151936, E=512, TOPK=10, I=512, IS=512, G=128,
            HK=16, HV=32, DK=128, DV=128, KC=4, HQ=16, KVH=2, D=256, ROT=64,
            THETA=10_000_000.0, EPS=1e-6, ATTN_EVERY=4)
TINY = dict(L=4, H=64, V=128, E=8, TOPK=2, I=32, IS=32, G=32,
            HK=1, HV=2, DK=16, DV=16, KC=4, HQ=4, KVH=2, D=32, ROT=8,
            THETA=10_000_000.0, EPS=1e-6, ATTN_EVERY=4)

# docs/FINDINGS.md, "Roofline (batch-1 decode, one GPU)"
FINDINGS_ROOFLINE = (
    "docs/FINDINGS.md roofline (batch 1): active ~3.56B params/token; bytes/token BF16 7.1 GB, FP8 (router + lm_head "
    "BF16) 3.9 GB, INT4 experts + FP8 rest 3.1 GB; DeltaNet state 151 MB/token; KV 24.6 KB per context token.\n"
    "  At 4K context, FP8: H100 (~3.0 TB/s copy) ~720 tok/s (~1.39 ms/token); H200 (~4.3 TB/s) ~1030 tok/s "
    "(~0.97 ms/token). Best published: 211 tok/s on 1x H200 FP8 (~20% of that bound).")


def is_attn(i, s):
    return i % s["ATTN_EVERY"] == s["ATTN_EVERY"] - 1


# ----------------------------------------------------------------------------- weights


class Init:
    """Random weights on the target device, generated directly in their storage format."""

    def __init__(self, dev, seed):
        self.dev = dev
        self.gen = torch.Generator(device=dev).manual_seed(seed)

    def randn(self, *shape, std=1.0, dtype=ACT):
        t = torch.randn(*shape, device=self.dev, dtype=dtype, generator=self.gen)
        return t.mul_(std)

    def uniform(self, *shape, lo, hi):
        return torch.rand(*shape, device=self.dev, generator=self.gen) * (hi - lo) + lo

    def experts(self, fmt, lead, k, group, chunk=32):
        """A stack [*lead, k] of weights of fan-in k in format fmt -> (weight, scale or None).

        dense: bf16 N(0, 1/k). fp8: E4M3 N(0, 1) with per-row fp32 scale k^-0.5 (generated in
        chunks of the first dim, to bound the bf16 temporary). int4: random bytes (nibbles
        uniform in [-8, 7], std ~4.6), per-group bf16 scales k^-0.5 / 4.6 * (1 +- 10%).
        """
        std = k ** -0.5
        if fmt == "dense":
            return self.randn(*lead, k, std=std), None
        if fmt == "fp8":
            w = torch.empty(*lead, k, device=self.dev, dtype=torch.float8_e4m3fn)
            flat = w.view(lead[0] if len(lead) > 1 else 1, -1, k)
            for i in range(0, flat.shape[0], chunk):
                n = min(chunk, flat.shape[0] - i)
                flat[i:i + n] = self.randn(n, *flat.shape[1:]).clamp_(-448, 448).to(torch.float8_e4m3fn)
            return w, torch.full(lead, std, device=self.dev, dtype=torch.float32)
        if fmt == "int4":
            w = torch.randint(0, 256, (*lead, (k + 1) // 2), device=self.dev, dtype=torch.uint8, generator=self.gen)
            s = (self.uniform(*lead, -(-k // group), lo=0.9, hi=1.1) * (std / 4.6)).to(ACT)
            return w, s
        raise ValueError(fmt)


class Linear:
    """y = x @ W^T in bf16, or FP8 weights (one fp32 scale per matrix) through torch._scaled_mm."""

    def __init__(self, init, n, k, fp8):
        w = init.randn(n, k, std=k ** -0.5)
        self.n, self.k, self.fp8 = n, k, fp8
        if fp8:
            amax = w.abs().amax().float().clamp(min=1e-12)
            self.scale = (amax / 448.0).reshape(())
            self.w = (w.float() / self.scale).to(torch.float8_e4m3fn)
            del w
        else:
            self.w = w

    def bytes(self):
        return self.w.numel() * self.w.element_size() + (4 if self.fp8 else 0)

    def __call__(self, x):
        if not self.fp8:
            return F.linear(x, self.w)
        xs = (x.abs().amax().float().clamp(min=1e-12) / 448.0).reshape(())
        xq = (x.float() / xs).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.w.t(), scale_a=xs, scale_b=self.scale, out_dtype=ACT)


def probe_scaled_mm(dev, b, s):
    """Whether torch._scaled_mm runs here for [b, H] x [H, N] (tensorwise scales, bf16 out)."""
    if not hasattr(torch, "_scaled_mm"):
        return False, "torch._scaled_mm missing"
    try:
        init = Init(dev, 1)
        lin = Linear(init, 2 * s["H"], s["H"], fp8=True)
        y = lin(init.randn(b, s["H"]))
        ref = F.linear(init.randn(b, s["H"]), lin.w.float().mul(lin.scale).to(ACT))
        ok = y.shape == ref.shape and y.dtype == ACT and bool(torch.isfinite(y.float()).all())
        return ok, "ok" if ok else f"bad output {tuple(y.shape)} {y.dtype}"
    except Exception as e:  # noqa: BLE001 -- any failure means: fall back to bf16
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


# ----------------------------------------------------------------------------- model


class DecodeModel:
    def __init__(self, s, dev, *, batch, context, n_layers, experts, proj_fp8, moe_cfg, attn_cfg, seed):
        self.s, self.dev = s, dev
        self.fmt = {"bf16": "dense", "fp8": "fp8", "int4": "int4"}[experts]
        self.moe_cfg, self.attn_cfg = moe_cfg, attn_cfg
        self.init = init = Init(dev, seed)
        H, HK, HV, DK, DV, KC = s["H"], s["HK"], s["HV"], s["DK"], s["DV"], s["KC"]
        HQ, KVH, D = s["HQ"], s["KVH"], s["D"]
        self.C = C = 2 * HK * DK + HV * DV

        self.embed = init.randn(s["V"], H, std=1.0)
        self.final_norm = init.randn(H, std=0.1)
        self.lm_head = Linear(init, s["V"], H, fp8=False)  # bf16, as in docs/FINDINGS.md
        self.layers = []
        for i in range(n_layers):
            L = dict(kind="attn" if is_attn(i, s) else "gdn",
                     in_norm=init.randn(H, std=0.1), post_norm=init.randn(H, std=0.1))
            if L["kind"] == "gdn":
                L.update(w_qkv=Linear(init, C, H, proj_fp8), w_z=Linear(init, HV * DV, H, proj_fp8),
                         w_ba=Linear(init, 2 * HV, H, proj_fp8), w_out=Linear(init, H, HV * DV, proj_fp8),
                         conv_w=init.randn(C, KC, std=KC ** -0.5),
                         A_log=torch.log(init.uniform(HV, lo=1.0, hi=16.0)),
                         dt_bias=init.randn(HV, std=0.5), norm_w=1.0 + init.randn(DV, std=0.1))
            else:
                L.update(w_q=Linear(init, HQ * 2 * D, H, proj_fp8), w_k=Linear(init, KVH * D, H, proj_fp8),
                         w_v=Linear(init, KVH * D, H, proj_fp8), w_o=Linear(init, H, HQ * D, proj_fp8),
                         q_norm=init.randn(D, std=0.1), k_norm=init.randn(D, std=0.1))
            gu, gus = init.experts(self.fmt, (s["E"], 2 * s["I"]), H, s["G"])
            dn, dns = init.experts(self.fmt, (s["E"], H), s["I"], s["G"])
            sgu, sgus = init.experts(self.fmt, (2 * s["IS"],), H, s["G"])
            sdn, sdns = init.experts(self.fmt, (H,), s["IS"], s["G"])
            moe = dict(router_weight=init.randn(s["E"], H, std=H ** -0.5), gate_up=gu, down=dn,
                       shared_gate_up=sgu, shared_down=sdn, shared_gate=init.randn(1, H, std=H ** -0.5),
                       weight_format=self.fmt)
            if self.fmt != "dense":
                moe.update(gate_up_scale=gus, down_scale=dns, shared_gate_up_scale=sgus, shared_down_scale=sdns)
            if self.fmt == "int4":
                moe["group_size"] = s["G"]
            L["moe"] = moe
            self.layers.append(L)

        rot = s["ROT"]
        self.inv_freq = 1.0 / (s["THETA"] ** (torch.arange(0, rot, 2, device=dev, dtype=torch.float32) / rot))
        self.set_batch(batch, context)

    def set_batch(self, batch, context):
        """(Re)allocate the per-sequence tensors for ``batch`` sequences of ``context`` filled positions:
        DeltaNet conv states (two buffers) and fp32 states, KV caches, the token and position inputs.
        The weights are kept, so one model serves several batch / context points."""
        s, dev, init = self.s, self.dev, self.init
        HV, DK, DV, KC, KVH, D = s["HV"], s["DK"], s["DV"], s["KC"], s["KVH"], s["D"]
        self.B, self.ctx = batch, context
        self.P = context + 1  # cache length: filled positions + the slot the new token is written to
        self.moe_path = "decode" if batch <= DECODE_MAX_TOKENS else "prefill"
        for L in self.layers:
            for k in ("conv", "state", "cache_k", "cache_v"):
                L.pop(k, None)  # free the old buffers before allocating the new ones
        for L in self.layers:
            if L["kind"] == "gdn":
                L.update(conv=[init.randn(batch, self.C, KC - 1),
                               torch.zeros(batch, self.C, KC - 1, device=dev, dtype=ACT)],
                         state=init.randn(batch, HV, DK, DV, std=0.05, dtype=torch.float32))
            else:
                L.update(cache_k=init.randn(batch, KVH, self.P, D), cache_v=init.randn(batch, KVH, self.P, D))
        # decode-time inputs (device tensors, so a captured graph sees them)
        self.tok = torch.randint(0, s["V"], (batch,), device=dev, generator=init.gen)
        self.past_len = torch.full((batch,), context, device=dev, dtype=torch.int64)
        self.pos = torch.full((1,), context, device=dev, dtype=torch.int64)

    # -- helpers
    def rmsnorm(self, x, w):
        """Zero-centred RMSNorm: x_hat * (1 + w), fp32 math."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.s["EPS"]) * (1.0 + w.float())).to(x.dtype)

    def rope(self, x, cos, sin):
        """Rotate-half RoPE on the first ROT dims of the last axis; x [..., D]."""
        rot = self.s["ROT"]
        xr, xp = x[..., :rot].float(), x[..., rot:]
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out.to(x.dtype), xp), dim=-1)

    # -- one decode step
    def step(self, parity, check=None, routed=None):
        """One token for every sequence. parity picks the conv-state buffers (0 -> 1 or 1 -> 0).

        check(name, tensor, shape, dtype) is called on every intermediate when given; routed
        (a list) receives each MoE layer's number of distinct selected experts when given
        (both need host syncs: never inside a captured graph)."""
        s, B = self.s, self.B
        H, HV, DV, HK = s["H"], s["HV"], s["DV"], s["HK"]
        HQ, KVH, D = s["HQ"], s["KVH"], s["D"]
        chk = check or (lambda *a: None)

        freqs = self.pos.float()[:, None] * self.inv_freq[None, :]  # [1, ROT/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()

        x = F.embedding(self.tok, self.embed)
        chk("embed", x, (B, H), ACT)
        for i, L in enumerate(self.layers):
            h = self.rmsnorm(x, L["in_norm"])
            if L["kind"] == "gdn":
                qkv = L["w_qkv"](h).view(B, 1, self.C)
                z = L["w_z"](h).view(B, 1, HV, DV)
                ba = L["w_ba"](h)
                b = ba[:, :HV].contiguous().view(B, 1, HV)
                a = ba[:, HV:].contiguous().view(B, 1, HV)
                cs_in, cs_out = L["conv"][parity], L["conv"][1 - parity]
                y, _, _ = gated_deltanet_decode(qkv, z, b, a, L["conv_w"], L["A_log"], L["dt_bias"], L["norm_w"],
                                                cs_in, L["state"], num_k_heads=HK, norm_eps=s["EPS"],
                                                conv_state_out=cs_out)
                chk(f"L{i} gdn y", y, (B, 1, HV * DV), ACT)
                chk(f"L{i} gdn conv_state", cs_out, (B, self.C, s["KC"] - 1), ACT)
                chk(f"L{i} gdn state", L["state"], (B, HV, s["DK"], DV), torch.float32)
                o = L["w_out"](y.view(B, HV * DV))
            else:
                qg = L["w_q"](h).view(B, HQ, 2 * D)
                q, gate = qg[..., :D], qg[..., D:]
                k = L["w_k"](h).view(B, KVH, D)
                v = L["w_v"](h).view(B, KVH, D)
                q = self.rope(self.rmsnorm(q, L["q_norm"]), cos, sin)
                k = self.rope(self.rmsnorm(k, L["k_norm"]), cos, sin)
                L["cache_k"].index_copy_(2, self.pos, k.unsqueeze(2))  # the runtime's cache write
                L["cache_v"].index_copy_(2, self.pos, v.unsqueeze(2))
                att = cached_attention_decode(q.reshape(B, 1, HQ, D), k.reshape(B, 1, KVH, D),
                                              v.reshape(B, 1, KVH, D), L["cache_k"], L["cache_v"], self.past_len,
                                              config=self.attn_cfg)
                chk(f"L{i} attn out", att, (B, 1, HQ, D), ACT)
                o = L["w_o"]((att.view(B, HQ, D) * torch.sigmoid(gate)).reshape(B, HQ * D))
            chk(f"L{i} mixer out", o, (B, H), ACT)
            x = x + o
            h = self.rmsnorm(x, L["post_norm"])
            if routed is not None:
                ids = moe_route(h, L["moe"]["router_weight"], L["moe"]["shared_gate"], s["TOPK"],
                                config=self.moe_cfg)[0]
                routed.append(int(torch.unique(ids).numel()))
            m = moe_forward(h, top_k=s["TOPK"], path=self.moe_path, config=self.moe_cfg, **L["moe"])
            chk(f"L{i} moe out", m, (B, H), ACT)
            x = x + m
            chk(f"L{i} residual", x, (B, H), ACT)
        logits = self.lm_head(self.rmsnorm(x, self.final_norm))
        chk("logits", logits, (B, s["V"]), ACT)
        self.tok.copy_(logits.argmax(-1))  # greedy: next step's input
        return logits


# ----------------------------------------------------------------------------- bytes


def expert_bytes(fmt, rows, k, group):
    """Bytes of a [rows, k] expert matrix in fmt, scales included."""
    if fmt == "dense":
        return rows * k * 2
    if fmt == "fp8":
        return rows * k + rows * 4
    return rows * ((k + 1) // 2) + rows * -(-k // group) * 2


def count_bytes(model, routed):
    """Hand count of bytes moved per decode step (see the module docstring), by category."""
    s, B, ctx, fmt = model.s, model.B, model.ctx, model.fmt
    H, E, I, IS, G = s["H"], s["E"], s["I"], s["IS"], s["G"]
    per_expert = expert_bytes(fmt, 2 * I, H, G) + expert_bytes(fmt, H, I, G)
    shared = expert_bytes(fmt, 2 * IS, H, G) + expert_bytes(fmt, H, IS, G)
    cat = dict.fromkeys(("embedding row", "norm weights", "DeltaNet projections", "DeltaNet small weights",
                         "DeltaNet fp32 state (read+write)", "DeltaNet conv state (read+write)",
                         "attention projections", "KV cache read", "KV cache write (new token)",
                         "MoE router (bf16)", "MoE routed experts", "MoE shared expert + gate", "lm_head (bf16)"), 0)
    cat["embedding row"] = B * H * 2
    cat["norm weights"] = (2 * len(model.layers) + 1) * H * 2
    cat["lm_head (bf16)"] = model.lm_head.bytes()
    for i, L in enumerate(model.layers):
        if L["kind"] == "gdn":
            cat["DeltaNet projections"] += sum(L[k].bytes() for k in ("w_qkv", "w_z", "w_ba", "w_out"))
            cat["DeltaNet small weights"] += (L["conv_w"].numel() * 2 + s["HV"] * (4 + 2) + s["DV"] * 2)
            cat["DeltaNet fp32 state (read+write)"] += 2 * L["state"].numel() * 4
            cat["DeltaNet conv state (read+write)"] += 2 * L["conv"][0].numel() * 2
        else:
            cat["attention projections"] += sum(L[k].bytes() for k in ("w_q", "w_k", "w_v", "w_o"))
            cat["norm weights"] += 2 * s["D"] * 2
            cat["KV cache read"] += B * 2 * s["KVH"] * ctx * s["D"] * 2
            cat["KV cache write (new token)"] += B * 2 * s["KVH"] * s["D"] * 2
        cat["MoE router (bf16)"] += E * H * 2
        cat["MoE routed experts"] += routed[i] * per_expert
        cat["MoE shared expert + gate"] += shared + H * 2
    return cat


# ----------------------------------------------------------------------------- timing


def copy_bandwidth(dev):
    """Bytes (read + write) per second of a 2 GiB device-to-device copy, median of 20."""
    n = 1 << 31
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        b.copy_(a)
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (statistics.median(times) * 1e-3)


def time_steps(model, use_graph, iters, warmup):
    """Median ms per decode step (CUDA events), after warm-up; steps alternate conv parities."""
    if use_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture (Triton compiles, allocator settles)
            for i in range(3):
                model.step(i % 2)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for p in (0, 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                model.step(p)
            graphs.append(g)
        torch.cuda.synchronize()
        run = [g.replay for g in graphs]
    else:
        run = [lambda: model.step(0), lambda: model.step(1)]
    for i in range(warmup):
        run[i % 2]()
    torch.cuda.synchronize()
    events = []
    for i in range(iters):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        run[i % 2]()
        en.record()
        events.append((st, en))
    torch.cuda.synchronize()
    return statistics.median(st.elapsed_time(en) for st, en in events)


# ----------------------------------------------------------------------------- main


def estimate_weight_bytes(s, n_layers, fmt, proj_fp8, batch, context):
    """Rough device memory of the model (weights, states, caches) before building it."""
    H = s["H"]
    pe = expert_bytes(fmt, 2 * s["I"], H, s["G"]) + expert_bytes(fmt, H, s["I"], s["G"])
    pb = 1 if proj_fp8 else 2
    C = 2 * s["HK"] * s["DK"] + s["HV"] * s["DV"]
    gdn = (C + s["HV"] * s["DV"] + 2 * s["HV"]) * H * pb + s["HV"] * s["DV"] * H * pb \
        + batch * s["HV"] * s["DK"] * s["DV"] * 4
    att = (2 * s["HQ"] * s["D"] + 2 * s["KVH"] * s["D"] + s["HQ"] * s["D"]) * H * pb \
        + 2 * batch * s["KVH"] * (context + 1) * s["D"] * 2
    total = 2 * s["V"] * H * 2
    for i in range(n_layers):
        total += (att if is_attn(i, s) else gdn) + s["E"] * pe + s["E"] * H * 2
    return total


def checked_step(model):
    """One eager step of each conv parity, the first with every intermediate's shape, dtype and
    finiteness checked and each MoE layer's distinct experts counted (host syncs: never captured).
    Returns (number of tensors checked, distinct experts per MoE layer)."""
    n_checked = [0]

    def check(nm, t, shape, dtype):
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (nm, tuple(t.shape), t.dtype, shape, dtype)
        assert bool(torch.isfinite(t.float()).all()), f"{nm}: non-finite values"
        n_checked[0] += 1

    routed = []
    model.step(0, check=check, routed=routed)
    model.step(1)  # both parities ran eagerly once
    if model.dev.type == "cuda":
        torch.cuda.synchronize()
    return n_checked[0], routed


def measure(model, bw, *, use_graph=True, iters=50, warmup=10):
    """Check one step (``checked_step``), time steps (``time_steps``) and count the bytes; returns a dict:
    ms (median per step), tokens_per_s, bytes (per step) and bytes_by_category, GBps, copy_frac
    (achieved / copy bandwidth bw in bytes/s), bound_ms / bound_tokens_per_s (counted bytes / bw),
    checked, routed."""
    n_checked, routed = checked_step(model)
    ms = time_steps(model, use_graph, iters, warmup)
    cat = count_bytes(model, routed)
    byt = sum(cat.values())
    achieved = byt / (ms * 1e-3)
    bound_ms = byt / bw * 1e3
    return dict(ms=ms, tokens_per_s=model.B * 1e3 / ms, bytes=byt, bytes_by_category=cat, GBps=achieved / 1e9,
                copy_frac=achieved / bw, bound_ms=bound_ms, bound_tokens_per_s=model.B * 1e3 / bound_ms,
                checked=n_checked, routed=routed)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run")
    s, dev = FULL, torch.device("cuda")
    n_layers = args.layers or s["L"]
    fmt = {"bf16": "dense", "fp8": "fp8", "int4": "int4"}[args.experts]
    name = torch.cuda.get_device_name(dev)
    print(f"device: {name}; torch {torch.__version__}")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth (2 GiB device-to-device, read+write): {bw / 1e9:.0f} GB/s")

    proj_fp8 = False
    if args.proj == "fp8":
        proj_fp8, why = probe_scaled_mm(dev, args.batch, s)
        print(f"projections: {'FP8 via torch._scaled_mm' if proj_fp8 else 'BF16 (fallback: ' + why + ')'}")
    else:
        print("projections: BF16 (F.linear)")
    need = estimate_weight_bytes(s, n_layers, fmt, proj_fp8, args.batch, args.context)
    free, total = torch.cuda.mem_get_info(dev)
    print(f"model: {n_layers} layers, experts {args.experts}, batch {args.batch}, context {args.context}; "
          f"~{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    if need > 0.97 * free:
        sys.exit(f"does not fit: ~{need / 2**30:.1f} GiB > {free / 2**30:.1f} GiB free; use --layers N, "
                 f"--experts int4 or a larger GPU (FP8 experts need an H200)")
    t0 = time.time()
    model = DecodeModel(s, dev, batch=args.batch, context=args.context, n_layers=n_layers, experts=args.experts,
                        proj_fp8=proj_fp8, moe_cfg=MoEConfig(), attn_cfg=DecodeAttentionConfig(), seed=args.seed)
    torch.cuda.synchronize()
    print(f"built in {time.time() - t0:.1f}s; {torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB allocated; "
          f"MoE path {model.moe_path}")

    r = measure(model, bw, use_graph=not args.no_cuda_graph, iters=args.iters, warmup=args.warmup)
    print(f"checked step: {r['checked']} tensors, shapes/dtypes ok, finite; distinct experts per MoE layer: "
          f"mean {statistics.mean(r['routed']):.1f} (top-{s['TOPK']} x batch {args.batch})")
    cat, byt, B, ms = r["bytes_by_category"], r["bytes"], args.batch, r["ms"]
    print(f"\nbytes moved per step (hand count; per token = / batch {B}):")
    for k, v in cat.items():
        print(f"  {k:36s} {v / 1e6:12.2f} MB  {100 * v / byt:5.1f}%")
    print(f"  {'total':36s} {byt / 1e6:12.2f} MB  (per token {byt / B / 1e9:.3f} GB)")
    mode = "CUDA graph" if not args.no_cuda_graph else "eager launches"
    print(f"\n{name}, {mode}, experts {args.experts}, projections {'fp8' if proj_fp8 else 'bf16'}, "
          f"{n_layers} layers, batch {B}, context {args.context}:")
    print(f"  {ms:.3f} ms per step (median of {args.iters}) = {ms:.3f} ms/token latency per sequence; "
          f"{r['tokens_per_s']:.1f} tokens/s")
    print(f"  {r['GBps']:.0f} GB/s = {100 * r['copy_frac']:.1f}% of the measured copy bandwidth "
          f"({bw / 1e9:.0f} GB/s)")
    print(f"  this run's bound (counted bytes / copy bandwidth): {r['bound_ms']:.3f} ms/step, "
          f"{r['bound_tokens_per_s']:.0f} tokens/s")
    print("  " + FINDINGS_ROOFLINE)


def dry_run(args):
    s, dev = TINY, torch.device("cpu")
    t0 = time.time()
    moe_cfg = MoEConfig(router_bn=16, router_bk=32, topk_bh=32, decode_bn_gate_up=16, decode_bn_down=32,
                        decode_bk=32, prefill_bm=16, prefill_bn=32, prefill_bk=32, align_block=64, combine_bh=64)
    attn_cfg = DecodeAttentionConfig(partition=32, block_n=16, block_s=4)
    batch, context = (2 if args.batch == 1 else min(args.batch, 4)), 40
    n_layers = args.layers or s["L"]
    proj_ok, why = probe_scaled_mm(dev, batch, s)
    print(f"dry run on CPU (TRITON_INTERPRET=1): {n_layers} layers "
          f"({sum(not is_attn(i, s) for i in range(n_layers))} DeltaNet + {sum(is_attn(i, s) for i in range(n_layers))}"
          f" attention), hidden {s['H']}, {s['E']} experts top-{s['TOPK']}, batch {batch}, context {context}; "
          f"torch._scaled_mm probe: {why}")
    n_total = 0
    # every expert format; FP8 projections with the INT4 experts; both conv-state parities once
    # (the Triton interpreter costs seconds per step, so the test stays well under a minute)
    for experts, proj, steps in (("int4", "fp8", 2), ("fp8", "bf16", 1), ("bf16", "bf16", 1)):
        proj_fp8 = proj == "fp8" and proj_ok
        model = DecodeModel(s, dev, batch=batch, context=context, n_layers=n_layers, experts=experts,
                            proj_fp8=proj_fp8, moe_cfg=moe_cfg, attn_cfg=attn_cfg, seed=args.seed)
        seen = []

        def check(nm, t, shape, dtype, seen=seen):
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, \
                (nm, tuple(t.shape), t.dtype, shape, dtype)
            assert bool(torch.isfinite(t.float()).all()), f"{nm}: non-finite values"
            seen.append(nm)

        routed = []
        logits = None
        for p in range(steps):
            logits = model.step(p, check=check, routed=routed if p == 0 else None)
        cat = count_bytes(model, routed)
        assert all(v >= 0 for v in cat.values()) and 1 <= min(routed) <= max(routed) <= s["E"], routed
        n_total += len(seen)
        print(f"  experts {experts:4s} proj {'fp8' if proj_fp8 else 'bf16'}: {len(seen)} tensors checked over {steps} "
              f"steps, logits {list(logits.shape)} {str(logits.dtype).replace('torch.', '')}, "
              f"distinct experts/layer {routed}, {sum(cat.values()) / 1e3:.1f} KB/step counted")
    est = ", ".join(f"{e} {estimate_weight_bytes(FULL, FULL['L'], f, False, 1, 4096) / 2**30:.1f} GiB"
                    for e, f in (("int4", "int4"), ("fp8", "fp8"), ("bf16", "dense")))
    print(f"full-size model memory estimate (48 layers, batch 1, 4K context, bf16 projections): {est}")
    print(f"dry run: shapes ok ({n_total} tensors; every step's shapes/dtypes right, outputs finite) "
          f"in {time.time() - t0:.1f}s; no timings")


if __name__ == "__main__":
    main()
