"""GPU truth in one call: every kernel checked and timed, the 48-layer decode step timed, one summary.

    bash benchmarks/gpu_suite.sh                     # on the GPU machine (installs .whl/ wheels, then this)
    python benchmarks/gpu_suite.py                   # the same without the wheel step; writes to $OUT
    python benchmarks/gpu_suite.py --dry-run         # CPU: imports, Triton API check, plan + time budget,
                                                     # the plan's shapes, and every section's code path once
                                                     # at tiny shapes under TRITON_INTERPRET=1
    python benchmarks/gpu_suite.py --sections kernels,decode_step --budget 300   # a rerun of part of it

Sections, in order (each time-boxed; a failing case or section is recorded and the suite goes on):
  env          GPU, driver, torch / triton / fla versions, which Triton the kernels run with, a static
               check that every ``tl.*`` name and keyword the kernels use exists in that Triton, and a
               2 GiB device-to-device copy (read + write bytes / s): the bandwidth every "% of copy" uses.
  correctness  every kernel against its PyTorch reference (float64, on the GPU) on fresh random inputs,
               outputs poisoned with NaN first: the cases of tests/kernels/ (same sizes, dtypes, tile
               configs; looser bounds where the GPU uses tf32 tensor cores, see ``gdn_bounds``) plus the
               model's real sizes (DeltaNet Hk 16 / Hv 32 / D 128, MoE E 512 top-10 I 512, attention
               16 / 2 heads x 256). Runs in parallel worker processes (a crashed CUDA context costs one case).
  kernels      each kernel at real shapes, timed as a CUDA graph over input copies rotated past the L2
               (``kernels_gdn.time_cuda``): us, GB/s from hand-counted bytes, % of the copy bandwidth;
               Gated DeltaNet decode and chunked prefill against flash-linear-attention's fused_recurrent /
               chunk gated delta rule (``fla``, core recurrence only) on the same shapes when fla imports.
  decode_step  the whole 48-layer decode step (benchmarks/decode_step.py) with random weights under a CUDA
               graph, experts FP8, INT4 and BF16 (BF16 experts of 48 layers do not fit: the most layers
               that fit), batch 1 and 8, context 4K and 32K: tokens/s and % of the roofline (counted bytes
               over the copy bandwidth).
Then the goals of issue #15 Part 2 are evaluated (pass / miss with the margin, or why not measured).

Output: ``gpu_suite.json``, ``gpu_suite.md`` and ``gpu_suite_workers.log`` under --out (default $OUT, else
./gpu_suite_out), rewritten after every finished case, so a run killed at its time limit still returns what
finished. How to run it on the lent H200 (wheels, the one ``run`` call): benchmarks/README.md.

NOTE: written in a session WITHOUT a GPU. Only ``--dry-run`` (CPU, interpreter, tiny shapes) and the
orchestration (fake workers, tests/test_gpu_suite.py) have run; the GPU paths are unexecuted.
Exit status: 0 all ran and passed, 1 a case failed or a section did not finish, 2 bad plan / imports.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as _dt
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SECTIONS = ("correctness", "kernels", "decode_step")
LIMIT_S = 480            # the issue's wall-time limit for the whole suite on the GPU machine
DEFAULT_BUDGET_S = 450   # what the suite plans to use (the .sh's wheel install and start-up fit in the rest)
ENV_EST_S = 15           # env section: imports, nvidia-smi, the copy
WORKER_START_S = 8       # python + torch + CUDA context in a fresh worker
GPU_MEM_GIB = 139.0      # H200 as lent here (KINDS.md)
GPU_WORKERS = 8          # parallel correctness workers: the GPU machine has 16 CPU cores (Triton compiles on them)


# ============================================================================ plan


@dataclasses.dataclass(frozen=True)
class Case:
    section: str
    name: str
    kind: str       # runner key in RUNNERS
    params: dict
    est_s: float    # estimated seconds on the H200 machine, Triton compile included


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    cases: tuple
    workers: int    # parallel worker processes (1: the GPU is timed alone)
    box_s: float    # time box
    groups: tuple = ()  # case names that must share one worker, in order (decode_step: one model per group)

    def estimate(self) -> float:
        """Wall seconds: cases spread over the workers (longest first), plus each worker's start-up."""
        loads = [0.0] * self.workers
        for c in sorted(self.cases, key=lambda c: -c.est_s):
            loads[loads.index(min(loads))] += c.est_s
        return max(loads) + WORKER_START_S


GDN_CFGS = {"gqa": (3, 6, 16, 32), "mha": (2, 2, 32, 16), "small": (1, 2, 16, 32), "odd": (1, 3, 24, 20),
            "real": (16, 32, 128, 128)}  # Hk, Hv, Dk, Dv (tests/kernels/test_gated_deltanet_kernels.py + real)
MOE_SMALL = dict(H=40, I=24, IS=20, E=7)  # tests/kernels/test_moe_kernels.py
MOE_REAL = dict(H=2048, I=512, IS=512, E=512)
# tile configs of tests/kernels/ (small tiles: many K loops and column blocks at small sizes)
MOE_TEST_CFG = dict(router_bn=16, router_bk=64, topk_bh=64, decode_bn_gate_up=32, decode_bn_down=32, decode_bk=64,
                    prefill_bm=16, prefill_bn=32, prefill_bk=64, align_block=64, combine_bh=64)
MOE_TINY_CFG = dict(router_bn=16, router_bk=16, topk_bh=16, decode_bn_gate_up=16, decode_bn_down=16, decode_bk=16,
                    prefill_bm=16, prefill_bn=16, prefill_bk=16, align_block=16, combine_bh=16)
ATTN_TEST_CFG = dict(partition=32, block_n=16, block_s=2)


def _c(section, name, kind, est, **params):
    return Case(section, name, kind, params, float(est))


def correctness_cases(real: bool) -> list[Case]:
    S = "correctness"
    cs = []
    if not real:  # --dry-run: one tiny case per kernel path, under the interpreter
        return [
            _c(S, "gdn decode small fp32 B2", "gdn", 1, cfg="small", B=2, T=1, K=4, dtype="fp32", op="decode"),
            _c(S, "gdn prefill mha T20 fp32", "gdn", 1, cfg="mha", B=1, T=20, K=4, dtype="fp32", op="prefill"),
            _c(S, "moe dense decode fp32 N5", "moe", 1, fmt="dense", dtype="fp32", n=5, top_k=3, path="decode",
               cfg="test", size="small"),
            _c(S, "moe int4 g32 prefill fp32 N17", "moe", 1, fmt="int4", group=32, dtype="fp32", n=17, top_k=3,
               path="prefill", cfg="test", size="small"),
            _c(S, "moe fp8 decode bf16 N3 bytes", "moe", 1, fmt="fp8", dtype="bf16", n=3, top_k=3, path="decode",
               cfg="test", size="small", fp8_software=True),
            _c(S, "attn bf16 P15", "attn", 1, dtype="bf16", B=2, P=15, HQ=4, KVH=2, D=32, cfg="test"),
            _c(S, "attn fp8 bytes P15", "attn", 1, dtype="bf16", B=2, P=15, HQ=4, KVH=2, D=32, cfg="test",
               fp8="software"),
            _c(S, "moe NaN token stays local decode", "moe_nan", 1, path="decode"),
        ]
    # ---- Gated DeltaNet (test_gated_deltanet_kernels.py), then real sizes
    for cfg in ("gqa", "mha", "small"):
        for dt in ("fp32", "bf16"):
            cs.append(_c(S, f"gdn decode {cfg} {dt} B3", "gdn", 2, cfg=cfg, B=3, T=1, K=4, dtype=dt, op="decode"))
    cs.append(_c(S, "gdn decode odd(1/3x24x20,K3) fp32 B2", "gdn", 2, cfg="odd", B=2, T=1, K=3, dtype="fp32",
                 op="decode"))
    for B, dt in ((1, "bf16"), (8, "bf16"), (2, "fp32")):
        cs.append(_c(S, f"gdn decode real {dt} B{B}", "gdn", 3, cfg="real", B=B, T=1, K=4, dtype=dt, op="decode"))
    for cfg, T, dt, bv in (("gqa", 1, "fp32", None), ("gqa", 15, "fp32", None), ("mha", 63, "fp32", None),
                           ("gqa", 65, "fp32", None), ("mha", 130, "fp32", None), ("small", 65, "fp32", 16),
                           ("gqa", 15, "bf16", None), ("mha", 65, "bf16", None)):
        cs.append(_c(S, f"gdn prefill {cfg} T{T} {dt} bv{bv}", "gdn", 5, cfg=cfg, B=2, T=T, K=4, dtype=dt,
                     op="prefill", block_v=bv))
    for K, T in ((2, 5), (4, 2)):
        cs.append(_c(S, f"gdn prefill mha K{K} T{T} fp32", "gdn", 5, cfg="mha", B=1, T=T, K=K, dtype="fp32",
                     op="prefill"))
    for T, dt, bv in ((70, "fp32", None), (70, "bf16", None), (33, "fp32", 16)):
        cs.append(_c(S, f"gdn prefill odd T{T} {dt} bv{bv}", "gdn", 5, cfg="odd", B=2, T=T, K=3, dtype=dt,
                     op="prefill", block_v=bv))
    for B, T, dt in ((1, 4096, "bf16"), (2, 257, "bf16"), (1, 200, "fp32")):
        cs.append(_c(S, f"gdn prefill real T{T} {dt} B{B}", "gdn", 20, cfg="real", B=B, T=T, K=4, dtype=dt,
                     op="prefill"))
    for cfg in ("gqa", "real"):
        cs.append(_c(S, f"gdn chain 50+1+49 == 100 {cfg} fp32", "gdn_chain", 8 if cfg == "gqa" else 20, cfg=cfg))
    for op, T, cfg in (("decode", 1, "gqa"), ("prefill", 20, "small"), ("decode", 1, "real")):
        cs.append(_c(S, f"gdn batch invariance {op} {cfg}", "gdn_inv", 3, op=op, T=T, cfg=cfg))
    # ---- MoE (test_moe_kernels.py), then real sizes
    for dt, n, k, path, norm, cfg in (("fp32", 1, 1, "decode", True, "test"), ("fp32", 5, 3, "decode", False, "test"),
                                      ("fp32", 5, 3, "prefill", True, "test"), ("fp32", 17, 3, "auto", True, "test"),
                                      ("fp32", 17, 3, "prefill", True, "tiny"), ("fp32", 7, 3, "decode", True, "tiny"),
                                      ("bf16", 5, 3, "decode", True, "test"), ("bf16", 17, 3, "prefill", False, "test"),
                                      ("bf16", 5, 3, "decode", True, "default"),
                                      ("bf16", 17, 3, "prefill", True, "default")):
        cs.append(_c(S, f"moe dense {path} {dt} N{n} k{k} norm{int(norm)} {cfg}", "moe", 4, fmt="dense", dtype=dt,
                     n=n, top_k=k, path=path, norm=norm, cfg=cfg, size="small"))
    for fmt, g, dt, n, path, soft in (("fp8", 128, "bf16", 5, "decode", False), ("fp8", 128, "fp32", 17, "prefill", True),
                                      ("int4", 128, "bf16", 17, "prefill", None), ("int4", 32, "fp32", 5, "decode", None),
                                      ("int4", 32, "fp32", 17, "prefill", None)):
        cs.append(_c(S, f"moe {fmt} g{g} {path} {dt} N{n} soft{soft}", "moe", 4, fmt=fmt, group=g, dtype=dt, n=n,
                     top_k=3, path=path, cfg="test", size="small", fp8_software=soft))
    for fmt in ("dense", "fp8", "int4"):
        for n, path in ((1, "decode"), (8, "decode"), (64, "prefill")):
            cs.append(_c(S, f"moe real {fmt} {path} bf16 N{n}", "moe", 8, fmt=fmt, dtype="bf16", n=n, top_k=10,
                         path=path, cfg="default", size="real"))
    cs.append(_c(S, "moe real fp8(bytes) decode bf16 N8", "moe", 8, fmt="fp8", dtype="bf16", n=8, top_k=10,
                 path="decode", cfg="default", size="real", fp8_software=True))
    for path, n, m in (("decode", 4, 1), ("prefill", 17, 9)):
        cs.append(_c(S, f"moe batch invariance {path}", "moe_inv", 3, path=path, n=n, m=m))
    for path in ("decode", "prefill"):
        cs.append(_c(S, f"moe NaN token stays local {path}", "moe_nan", 3, path=path))
    # ---- attention (test_attention_kernels.py), then real sizes
    for dt, hq, kvh, d in (("fp32", 4, 2, 40), ("bf16", 3, 1, 48)):
        for P in (1, 15, 63, 65, 130):
            cs.append(_c(S, f"attn {dt} {hq}/{kvh}x{d} P{P}", "attn", 2, dtype=dt, B=3, P=P, HQ=hq, KVH=kvh, D=d,
                         cfg="test"))
    cs.append(_c(S, "attn fp32 3/1x48 P130", "attn", 2, dtype="fp32", B=3, P=130, HQ=3, KVH=1, D=48, cfg="test"))
    cs.append(_c(S, "attn bf16 4/2x40 P65", "attn", 2, dtype="bf16", B=3, P=65, HQ=4, KVH=2, D=40, cfg="test"))
    for fp8 in ("native", "software"):
        cs.append(_c(S, f"attn fp8 cache {fp8} P65", "attn", 2, dtype="bf16", B=2, P=65, HQ=4, KVH=2, D=40,
                     cfg="test", fp8=fp8))
    cs.append(_c(S, "attn batch + buffer invariance", "attn_inv", 2))
    for B, P, fp8 in ((1, 4096, None), (8, 4096, None), (1, 32768, None), (1, 4096, "native"), (8, 32768, "native")):
        cs.append(_c(S, f"attn real 16/2x256 B{B} P{P} kv{'fp8' if fp8 else 'bf16'}", "attn", 4, dtype="bf16", B=B,
                     P=P, HQ=16, KVH=2, D=256, cfg="default", fp8=fp8))
    return cs


def kernel_cases(real: bool) -> list[Case]:
    """Timed cases, most important first (the goals), so a time box cuts the least useful ones."""
    S = "kernels"
    if not real:
        return [_c(S, "gdn decode B2", "t_gdn", 1, B=2, T=1), _c(S, "gdn prefill T70", "t_gdn", 1, B=1, T=70),
                _c(S, "fla gdn decode B2", "t_fla", 1, B=2, T=1),
                _c(S, "moe decode dense N1", "t_moe", 1, fmt="dense", n=1, path="decode"),
                _c(S, "attn kvbf16 B1 ctx40", "t_attn", 1, B=1, ctx=40, cache="bf16")]
    # qcn's goal cases first, then fla on the same shapes (its first calls compile and autotune: slow,
    # and a case over its limit must not cost the MoE goals), then the rest
    cs = [_c(S, "gdn decode B1", "t_gdn", 5, B=1, T=1), _c(S, "gdn prefill T4096", "t_gdn", 8, B=1, T=4096)]
    cs += [_c(S, f"moe decode {f} N1", "t_moe", 5, fmt=f, n=1, path="decode") for f in ("fp8", "int4", "dense")]
    cs += [_c(S, "attn kvbf16 B1 ctx4096", "t_attn", 3, B=1, ctx=4096, cache="bf16"),
           _c(S, "fla gdn decode B1", "t_fla", 10, B=1, T=1), _c(S, "fla gdn prefill T4096", "t_fla", 35, B=1, T=4096),
           _c(S, "gdn decode B8", "t_gdn", 3, B=8, T=1), _c(S, "gdn prefill T512", "t_gdn", 5, B=1, T=512),
           _c(S, "fla gdn decode B8", "t_fla", 3, B=8, T=1), _c(S, "fla gdn prefill T512", "t_fla", 5, B=1, T=512)]
    cs += [_c(S, f"moe decode {f} N8", "t_moe", 4, fmt=f, n=8, path="decode") for f in ("fp8", "int4", "dense")]
    cs += [_c(S, f"attn kv{c} B{b} ctx{x}", "t_attn", 3, B=b, ctx=x, cache=c)
           for c, b, x in (("bf16", 1, 32768), ("fp8", 1, 32768), ("bf16", 8, 4096), ("bf16", 8, 32768))]
    cs += [_c(S, "gdn decode B64", "t_gdn", 3, B=64, T=1), _c(S, "fla gdn decode B64", "t_fla", 3, B=64, T=1)]
    cs += [_c(S, f"moe prefill {f} N2048", "t_moe", 5, fmt=f, n=2048, path="prefill") for f in ("fp8", "int4", "dense")]
    return cs


DECODE_POINTS = ((1, 4096), (8, 4096), (1, 32768), (8, 32768))  # (batch, context); the goal's point first


def decode_cases(real: bool) -> list[Case]:
    S = "decode_step"
    if not real:
        return [_c(S, "decode int4 proj fp8 B2 ctx40", "decode", 2, experts="int4", proj="fp8", batch=2,
                   context=40, layers=4, first=True)]
    cs = []
    for experts, proj, build in (("fp8", "fp8", 15), ("int4", "fp8", 12), ("bf16", "bf16", 15)):
        for i, (b, ctx) in enumerate(DECODE_POINTS):
            cs.append(_c(S, f"decode {experts} B{b} ctx{ctx}", "decode", (build if i == 0 else 0) + 7, experts=experts,
                         proj=proj, batch=b, context=ctx, layers=None, first=i == 0))
    return cs


def build_plan(real: bool, budget: float, sections=SECTIONS) -> list[Section]:
    corr = correctness_cases(real)
    dec = decode_cases(real)
    groups = tuple(tuple(c.name for c in dec if c.params["experts"] == e)
                   for e in dict.fromkeys(c.params["experts"] for c in dec))
    plan = [Section("correctness", tuple(corr), GPU_WORKERS if real else 1, 120 if real else 60),
            Section("kernels", tuple(kernel_cases(real)), 1, 155 if real else 60),
            Section("decode_step", tuple(dec), 1, 155 if real else 60, groups=groups)]
    return [s for s in plan if s.name in sections]


def plan_problems(plan: list[Section], budget: float) -> list[str]:
    """What is wrong with the plan for the GPU machine: time over budget / boxes, shapes that cannot run."""
    out = []
    est = ENV_EST_S + sum(s.estimate() for s in plan)
    boxes = ENV_EST_S + sum(s.box_s for s in plan)
    if budget > LIMIT_S:
        out.append(f"--budget {budget:.0f}s exceeds the suite's limit of {LIMIT_S}s (8 minutes)")
    if est > budget:
        out.append(f"plan needs ~{est:.0f}s > budget {budget:.0f}s")
    if boxes > budget:
        out.append(f"section time boxes sum to {boxes:.0f}s > budget {budget:.0f}s")
    for s in plan:
        if s.estimate() > s.box_s:
            out.append(f"section {s.name}: estimated {s.estimate():.0f}s > its time box {s.box_s:.0f}s")
        names = [c.name for c in s.cases]
        if len(set(names)) != len(names):
            out.append(f"section {s.name}: duplicate case names")
        for c in s.cases:
            out += [f"{c.name}: {p}" for p in case_shape_problems(c)]
    return out


def case_shape_problems(c: Case) -> list[str]:
    """Shape / size checks of one case, without allocating anything."""
    p, bad = c.params, []
    if c.kind in ("gdn", "gdn_chain"):
        Hk, Hv, Dk, Dv = GDN_CFGS[p["cfg"]]
        if Hv % Hk:
            bad.append(f"Hv={Hv} is not a multiple of Hk={Hk}")
        if c.kind == "gdn" and (p["T"] < 1 or p["B"] < 1 or p["K"] < 1):
            bad.append("B, T, K must be >= 1")
        if c.kind == "gdn" and p["op"] == "decode" and p["T"] != 1:
            bad.append("decode takes T == 1")
        if p.get("block_v") and p["block_v"] & (p["block_v"] - 1):
            bad.append(f"block_v={p['block_v']} is not a power of two")
    elif c.kind == "moe":
        sz = MOE_REAL if p["size"] == "real" else MOE_SMALL
        if not 1 <= p["top_k"] <= sz["E"]:
            bad.append(f"top_k={p['top_k']} not in [1, E={sz['E']}]")
        if p["path"] == "decode" and p["n"] > 16:
            bad.append(f"decode path takes <= 16 tokens, got {p['n']}")
        if p["fmt"] == "int4":
            cfg = {**dataclass_defaults("moe"), **{"test": MOE_TEST_CFG, "tiny": MOE_TINY_CFG}.get(p["cfg"], {})}
            g = p.get("group", 128)
            for k in ("decode_bk", "prefill_bk"):  # the kernels' K tile is min(BK, group): a power of two dividing it
                bk = min(cfg[k], g)
                if g % bk or bk & (bk - 1):
                    bad.append(f"int4 group {g} does not take {k}={cfg[k]} (K tile {bk})")
        wbytes = sz["E"] * 3 * sz["I"] * sz["H"] * 4 * 3  # fp32 weights + quantized + dequantized copies
        if wbytes > GPU_MEM_GIB * 2**30 / 4:
            bad.append(f"weights need ~{wbytes / 2**30:.0f} GiB per worker")
    elif c.kind == "attn":
        if p["HQ"] % p["KVH"]:
            bad.append(f"HQ={p['HQ']} is not a multiple of KVH={p['KVH']}")
        cfg = {**dataclass_defaults("attn"), **(ATTN_TEST_CFG if p["cfg"] == "test" else {})}
        if cfg["partition"] % cfg["block_n"]:
            bad.append(f"partition {cfg['partition']} not a multiple of block_n {cfg['block_n']}")
    elif c.kind == "decode" and p["layers"] is None:
        ds = _import_bench("decode_step")
        fmt = {"bf16": "dense", "fp8": "fp8", "int4": "int4"}[p["experts"]]
        n = decode_layers(p["experts"])
        need = ds.estimate_weight_bytes(ds.FULL, n, fmt, p["proj"] == "fp8", p["batch"], p["context"])
        if need > 0.9 * GPU_MEM_GIB * 2**30:
            bad.append(f"{n} layers need ~{need / 2**30:.0f} GiB > 90% of {GPU_MEM_GIB:.0f} GiB")
        if n % 4:
            bad.append(f"{n} layers is not a whole number of (3 DeltaNet + 1 attention) blocks")
    return bad


def dataclass_defaults(which: str) -> dict:
    if which == "moe":
        from qcn.compile.plugins.moe import MoEConfig as C
    else:
        from qcn.compile.plugins.attention import DecodeAttentionConfig as C
    return {f.name: f.default for f in dataclasses.fields(C)}


def decode_layers(experts: str) -> int:
    """All 48 layers, except BF16 experts: the most whole 4-layer blocks that fit in ~85% of the GPU at the
    largest batch / context point (48 layers of BF16 experts are ~148 GiB)."""
    ds = _import_bench("decode_step")
    if experts != "bf16":
        return ds.FULL["L"]
    b, ctx = max(DECODE_POINTS)
    n = ds.FULL["L"]
    while n > 4 and ds.estimate_weight_bytes(ds.FULL, n, "dense", False, b, ctx) > 0.85 * GPU_MEM_GIB * 2**30:
        n -= 4
    return n


# ============================================================================ imports


def package_roots() -> dict:
    """``setup.py``'s ROOTS: import package -> source folder (``{"qcn": "qcn_pkg", "qcn.compile": "compile",
    ...}``), read from its source (running setup.py would run setuptools)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["ROOTS"]:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{ROOT / 'setup.py'} has no ROOTS = {{package: folder}} assignment")


def use_checkout():
    """Make ``import qcn`` and ``import qcn.compile...`` resolve to this checkout (setup.py's package roots,
    loaded directly: the GPU machine has the working tree but no install; qcn.runtime is not needed and not
    loaded). Also puts benchmarks/ on sys.path."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if "qcn" in sys.modules:  # imported already (a test process): keep what the importer chose
        return
    mapping = package_roots()
    for name in ("qcn", "qcn.compile"):
        path = ROOT / mapping[name]
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, mod)


def _import_bench(name):
    use_checkout()
    return importlib.import_module(name)


PUBLIC_API = {  # what the suite calls; a missing name is an import error of the plan
    "qcn.compile.plugins.gated_deltanet": ("gated_deltanet_decode", "gated_deltanet_prefill",
                                           "gated_deltanet_reference"),
    "qcn.compile.plugins.moe": ("MoEConfig", "moe_forward", "moe_route", "moe_reference", "quantize_moe_weights",
                                "DECODE_MAX_TOKENS"),
    "qcn.compile.plugins.attention": ("DecodeAttentionConfig", "cached_attention_decode",
                                      "cached_attention_reference"),
    "decode_step": ("FULL", "TINY", "DecodeModel", "probe_scaled_mm", "checked_step", "measure", "count_bytes",
                    "estimate_weight_bytes"),
    "kernels_gdn": ("TINY", "dims", "make_inputs", "bytes_moved", "flops", "time_cuda", "make_fla_runner", "fla_fn",
                    "l2_bytes"),
    "kernels_moe_attn": ("configure", "moe_weights", "moe_cost", "attn_cost", "rotations"),
}


def check_imports() -> list[str]:
    """Import every module and name the suite uses; returns one line per failure."""
    bad = []
    try:
        use_checkout()
    except Exception as e:  # noqa: BLE001 -- reported, the suite cannot start
        return [f"loading the qcn package from {ROOT}: {type(e).__name__}: {e}"]
    for mod, names in PUBLIC_API.items():
        try:
            m = importlib.import_module(mod)
            for n in names:
                getattr(m, n)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{mod}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return bad


def triton_api_check(sources=None) -> dict:
    """Every ``tl.NAME`` / ``triton.NAME`` the kernel sources (default: compile/plugins/*/*.py) use, and every
    keyword passed to a ``tl.*`` call, looked up in the Triton that runs (static: parsed, nothing compiled)."""
    import triton
    import triton.language as tl

    names, kws, missing = set(), set(), []
    for f in sources or sorted((ROOT / "compile" / "plugins").glob("*/*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("tl", "triton"):
                names.add((node.value.id, node.attr))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "tl":
                for k in node.keywords:
                    if k.arg:
                        kws.add((node.func.attr, k.arg))
    mods = {"tl": tl, "triton": triton}
    for base, attr in sorted(names):
        if not hasattr(mods[base], attr):
            try:
                importlib.import_module(f"triton.{attr}")  # a submodule (triton.compiler, ...)
            except ImportError:
                missing.append(f"{base}.{attr}")
    for fn, kw in sorted(kws):
        obj = getattr(tl, fn, None)
        if obj is None:
            continue
        try:
            sig = inspect.signature(getattr(obj, "fn", obj))
        except (TypeError, ValueError):
            continue
        if kw not in sig.parameters and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            missing.append(f"tl.{fn}(..., {kw}=)")
    return dict(triton=triton.__version__, names_checked=len(names), keywords_checked=len(kws), missing=missing)


# ============================================================================ worker: correctness


def _dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf when anything is non-finite, so NaN never passes."""
    import torch
    o, r = out.double(), ref.double().to(out.device)
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def _check(checks, name, out, ref, bound):
    e = rel_err(out, ref)
    checks.append(dict(output=name, err=e, bound=bound, ok=bool(e <= bound)))


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def gdn_bounds(op, dtype):
    """(y, conv_state_out, state) bounds. As tests/kernels/ (fp32 1e-5, 16-bit y 1e-2, state 1e-5), except the
    prefill state with 16-bit activations: on the GPU its q/k/state products run on tf32 tensor cores
    (prefill_meta's default for bf16; exact fp32 under the interpreter), ~1e-3 relative."""
    y = 1e-5 if dtype == "fp32" else 1e-2
    state = 1e-5 if (dtype == "fp32" or op == "decode") else 3e-3
    return y, 0.0, state


def gdn_inputs(B, T, Hk, Hv, Dk, Dv, K, dtype, dev, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    C = 2 * Hk * Dk + Hv * Dv

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(dev)

    return dict(qkv=r(B, T, C), z=r(B, T, Hv, Dv), b=r(B, T, Hv), a=r(B, T, Hv), conv_weight=r(C, K, scale=0.5),
                A_log=r(Hv, scale=0.5, dt=torch.float32), dt_bias=r(Hv), norm_weight=r(Dv),
                conv_state=r(B, C, K - 1), recurrent_state=r(B, Hv, Dk, Dv, scale=0.3, dt=torch.float32))


def run_gdn(p, ctx):
    import torch
    from qcn.compile.plugins.gated_deltanet import (gated_deltanet_decode, gated_deltanet_prefill,
                                                    gated_deltanet_reference)
    dev, seed = ctx["dev"], _seed()
    Hk, Hv, Dk, Dv = GDN_CFGS[p["cfg"]]
    dt = _dtype(p["dtype"])
    inp = gdn_inputs(p["B"], p["T"], Hk, Hv, Dk, Dv, p["K"], dt, dev, seed)
    with torch.device(dev):
        ref = gated_deltanet_reference(**{k: v.clone() for k, v in inp.items()}, num_k_heads=Hk)
    y = torch.full((p["B"], p["T"], Hv * Dv), float("nan"), dtype=dt, device=dev)
    cso = torch.full_like(inp["conv_state"], float("nan"))
    if p["op"] == "decode":
        state = inp["recurrent_state"].clone()
        gated_deltanet_decode(**{**inp, "recurrent_state": state}, num_k_heads=Hk, y=y, conv_state_out=cso)
    else:
        state = torch.full_like(inp["recurrent_state"], float("nan"))
        gated_deltanet_prefill(**inp, num_k_heads=Hk, y=y, conv_state_out=cso, recurrent_state_out=state,
                               block_v=p.get("block_v"))
    checks = []
    for name, out, r, bound in zip(("y", "conv_state_out", "recurrent_state_out"), (y, cso, state), ref,
                                   gdn_bounds(p["op"], p["dtype"])):
        _check(checks, name, out, r, bound)
    yield dict(seed=seed, checks=checks)


def run_gdn_chain(p, ctx):
    """Prefill 50 + decode 1 + prefill 49 tokens, carrying both states == one 100-token prefill (fp32)."""
    import torch
    from qcn.compile.plugins.gated_deltanet import gated_deltanet_decode, gated_deltanet_prefill
    dev, seed = ctx["dev"], _seed()
    Hk, Hv, Dk, Dv = GDN_CFGS[p["cfg"]]
    inp = gdn_inputs(1, 100, Hk, Hv, Dk, Dv, 4, torch.float32, dev, seed)
    y_full, cs_full, s_full = gated_deltanet_prefill(**{**inp, "recurrent_state": inp["recurrent_state"].clone()},
                                                     num_k_heads=Hk)
    cs, s, ys = inp["conv_state"], inp["recurrent_state"].clone(), []
    for lo, hi in ((0, 50), (50, 51), (51, 100)):
        part = {k: (v[:, lo:hi].contiguous() if k in ("qkv", "z", "b", "a") else v) for k, v in inp.items()}
        part.update(conv_state=cs, recurrent_state=s)
        fn = gated_deltanet_decode if hi - lo == 1 else gated_deltanet_prefill
        y, cs, s = fn(**part, num_k_heads=Hk)
        ys.append(y)
    checks = []
    _check(checks, "y", torch.cat(ys, 1), y_full, 1e-5)
    _check(checks, "conv_state_out", cs, cs_full, 0.0)
    _check(checks, "recurrent_state_out", s, s_full, 1e-5)
    yield dict(seed=seed, checks=checks)


def run_moe(p, ctx):
    import torch
    from qcn.compile.plugins.moe import MoEConfig, moe_forward, moe_reference, quantize_moe_weights
    dev, seed = ctx["dev"], _seed()
    torch.manual_seed(seed)
    sz = MOE_REAL if p["size"] == "real" else MOE_SMALL
    H, I, IS, E, n, k = sz["H"], sz["I"], sz["IS"], sz["E"], p["n"], p["top_k"]
    dt = _dtype(p["dtype"])
    real = p["size"] == "real"
    cfg = MoEConfig(**{"test": MOE_TEST_CFG, "tiny": MOE_TINY_CFG, "default": {}}[p["cfg"]],
                    fp8_software=p.get("fp8_software"))

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev) * scale

    # small: tests/kernels' weights (router N(0, 1)); real: the benchmark's (router N(0, 1/H), softer routing)
    w = dict(x=rnd(n, H), router_weight=rnd(E, H, scale=H ** -0.5 if real else 1.0),
             shared_gate=rnd(1, H, scale=H ** -0.5 if real else 1.0))
    mats = dict(gate_up=rnd(E, 2 * I, H, scale=H ** -0.5), down=rnd(E, H, I, scale=I ** -0.5),
                shared_gate_up=rnd(2 * IS, H, scale=H ** -0.5), shared_down=rnd(H, IS, scale=IS ** -0.5))
    if p["fmt"] == "dense":
        kw = {m: t.to(dt) for m, t in mats.items()}
        deq = kw
    else:
        kw, deq = quantize_moe_weights(*mats.values(), p["fmt"], p.get("group", 128))
    del mats
    w = {m: t.to(dt) for m, t in w.items()}
    out = torch.full_like(w["x"], float("nan"))
    y = moe_forward(**w, **kw, top_k=k, norm_topk_prob=p.get("norm", True), path=p["path"], out=out, config=cfg)
    with torch.device(dev):
        ref = moe_reference(w["x"], w["router_weight"], deq["gate_up"], deq["down"], deq["shared_gate_up"],
                            deq["shared_down"], w["shared_gate"], k, p.get("norm", True))
    checks = []
    _check(checks, "y", y, ref, 1e-5 if p["dtype"] == "fp32" else 1e-2)
    checks.append(dict(output="y is out (every element written)", err=0.0 if y is out else 1.0, bound=0.0,
                       ok=y is out))
    yield dict(seed=seed, checks=checks)


def run_attn(p, ctx):
    import torch
    from qcn.compile.plugins.attention import (DecodeAttentionConfig, cached_attention_decode,
                                               cached_attention_reference)
    dev, seed = ctx["dev"], _seed()
    torch.manual_seed(seed)
    dt = _dtype(p["dtype"])
    b, P, hq, kvh, d = p["B"], p["P"], p["HQ"], p["KVH"], p["D"]
    soft = {"native": False, "software": True}.get(p.get("fp8"))
    cfg = DecodeAttentionConfig(**(ATTN_TEST_CFG if p["cfg"] == "test" else {}), fp8_software=soft)
    q = torch.randn(b, 1, hq, d, device=dev).to(dt)
    k = torch.randn(b, 1, kvh, d, device=dev).to(dt)
    v = torch.randn(b, 1, kvh, d, device=dev).to(dt)
    pk = torch.randn(b, kvh, P, d, device=dev).to(dt)
    pv = torch.randn(b, kvh, P, d, device=dev).to(dt)
    pl = torch.randint(0, P + 1, (b,), device=dev)
    pl[0] = P
    if b > 1:
        pl[-1] = 0  # full and empty caches always present
    for i, m in enumerate(pl.tolist()):  # rows >= past_len are garbage and must never be read
        pk[i, :, m:] = float("nan")
        pv[i, :, m:] = float("nan")
    ks = vs = None
    if p.get("fp8"):
        ks, vs = torch.tensor([0.02], device=dev), torch.tensor([0.015], device=dev)
        pk = (pk.float() / ks).nan_to_num(0.0).clamp(-448, 448).to(torch.float8_e4m3fn)
        pv = (pv.float() / vs).nan_to_num(0.0).clamp(-448, 448).to(torch.float8_e4m3fn)
    out = torch.full_like(q, float("nan"))
    o = cached_attention_decode(q, k, v, pk, pv, pl.to(torch.int64), k_scale=ks, v_scale=vs, out=out, config=cfg)
    with torch.device(dev):
        ref = cached_attention_reference(q, k, v, pk, pv, pl, k_scale=ks, v_scale=vs)
    checks = []
    _check(checks, "out", o, ref, 1e-5 if p["dtype"] == "fp32" else 1e-2)
    checks.append(dict(output="out is out", err=0.0 if o is out else 1.0, bound=0.0, ok=o is out))
    yield dict(seed=seed, past_len=pl.tolist()[:8], checks=checks)


def _bitwise(checks, name, a, b):
    import torch
    same = torch.equal(a, b)
    checks.append(dict(output=name, err=0.0 if same else float((a.double() - b.double()).abs().max()), bound=0.0,
                       ok=bool(same)))


def run_gdn_inv(p, ctx):
    """Each sequence's outputs are bitwise those of the same sequence run alone (tests/kernels)."""
    import torch
    from qcn.compile.plugins.gated_deltanet import gated_deltanet_decode, gated_deltanet_prefill
    dev, seed = ctx["dev"], _seed()
    Hk, Hv, Dk, Dv = GDN_CFGS[p["cfg"]]
    dt = torch.bfloat16 if p["cfg"] == "real" else torch.float32
    inp = gdn_inputs(3, p["T"], Hk, Hv, Dk, Dv, 4, dt, dev, seed)
    fn = gated_deltanet_decode if p["op"] == "decode" else gated_deltanet_prefill

    def run(x):
        x = {k: v.clone() for k, v in x.items()}
        return fn(**x, num_k_heads=Hk)

    full, checks = run(inp), []
    for i in (0, 2):
        one = run({k: (v[i:i + 1].contiguous() if v.dim() > 1 and v.shape[0] == 3 else v) for k, v in inp.items()})
        for name, a, b in zip(("y", "conv_state_out", "recurrent_state_out"), full, one):
            _bitwise(checks, f"{name}[{i}]", a[i:i + 1], b)
    yield dict(seed=seed, checks=checks)


def _moe_small(n, dtype, dev):
    import torch
    H, I, IS, E = MOE_SMALL["H"], MOE_SMALL["I"], MOE_SMALL["IS"], MOE_SMALL["E"]
    return dict(x=torch.randn(n, H, device=dev).to(dtype), router_weight=torch.randn(E, H, device=dev).to(dtype),
                gate_up=(torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(dtype),
                down=(torch.randn(E, H, I, device=dev) / I ** 0.5).to(dtype),
                shared_gate_up=(torch.randn(2 * IS, H, device=dev) / H ** 0.5).to(dtype),
                shared_down=(torch.randn(H, IS, device=dev) / IS ** 0.5).to(dtype),
                shared_gate=torch.randn(1, H, device=dev).to(dtype))


def run_moe_inv(p, ctx):
    """A token's output does not depend on the rest of the batch (bitwise, same path)."""
    import torch
    from qcn.compile.plugins.moe import MoEConfig, moe_forward
    seed = _seed()
    torch.manual_seed(seed)
    cfg = MoEConfig(**MOE_TEST_CFG)
    w = _moe_small(p["n"], torch.bfloat16, ctx["dev"])
    y = moe_forward(**w, top_k=3, path=p["path"], config=cfg)
    checks = []
    rows = [slice(r, r + 1) for r in range(p["n"])] if p["m"] == 1 else [slice(0, p["m"])]
    for r in rows:
        _bitwise(checks, f"y[{r.start}:{r.stop}]", moe_forward(**{**w, "x": w["x"][r]}, top_k=3, path=p["path"],
                                                              config=cfg), y[r])
    yield dict(seed=seed, checks=checks)


def run_moe_nan(p, ctx):
    """A NaN in one token gives NaN for that token only; the others still match the reference."""
    import torch
    from qcn.compile.plugins.moe import MoEConfig, moe_forward, moe_reference
    seed = _seed()
    torch.manual_seed(seed)
    w = _moe_small(5, torch.float32, ctx["dev"])
    w["x"][2, 7] = float("nan")
    y = moe_forward(**w, top_k=3, path=p["path"], config=MoEConfig(**MOE_TEST_CFG))
    keep = [0, 1, 3, 4]
    with torch.device(ctx["dev"]):
        ref = moe_reference(w["x"][keep], w["router_weight"], w["gate_up"], w["down"], w["shared_gate_up"],
                            w["shared_down"], w["shared_gate"], 3)
    checks = [dict(output="y[2] all NaN", err=0.0 if bool(torch.isnan(y[2]).all()) else 1.0, bound=0.0,
                   ok=bool(torch.isnan(y[2]).all()))]
    _check(checks, "y[other tokens]", y[keep], ref, 1e-5)
    yield dict(seed=seed, checks=checks)


def run_attn_inv(p, ctx):
    """A sequence's output is bitwise the same alone, in a batch, and with a longer cache buffer."""
    import torch
    from qcn.compile.plugins.attention import DecodeAttentionConfig, cached_attention_decode
    dev, seed = ctx["dev"], _seed()
    torch.manual_seed(seed)
    cfg = DecodeAttentionConfig(**ATTN_TEST_CFG)
    b, P, hq, kvh, d = 3, 70, 4, 2, 40
    q, k, v = (torch.randn(b, 1, h, d, device=dev).to(torch.bfloat16) for h in (hq, kvh, kvh))
    pk, pv = (torch.randn(b, kvh, P, d, device=dev).to(torch.bfloat16) for _ in range(2))
    pl = torch.tensor([70, 33, 5], device=dev)
    o = cached_attention_decode(q, k, v, pk, pv, pl, config=cfg)
    checks = []
    for i in range(b):
        s = slice(i, i + 1)
        _bitwise(checks, f"out[{i}] alone", cached_attention_decode(q[s], k[s], v[s], pk[s], pv[s], pl[s], config=cfg),
                 o[s])
    longer = [torch.cat([t, torch.randn(b, kvh, 60, d, device=dev).to(t.dtype)], dim=2) for t in (pk, pv)]
    _bitwise(checks, "out, longer buffer", cached_attention_decode(q, k, v, *longer, pl, config=cfg), o)
    yield dict(seed=seed, checks=checks)


# ============================================================================ worker: timings


def _time(fn, n_copies, ctx):
    """Median seconds per call (kernels_gdn.time_cuda: one CUDA graph over the rotated copies); the dry run
    calls each copy once and times nothing."""
    if ctx["dry"]:
        for i in range(n_copies):
            fn(i)
        return float("nan")
    kg = _import_bench("kernels_gdn")
    return kg.time_cuda(fn, n_copies, ctx["warmup"], ctx["iters"])


def _row(impl, t, nbytes, nflop, bw, **extra):
    return dict(impl=impl, us=t * 1e6, GBps=nbytes / t / 1e9, copy_frac=nbytes / t / bw, TFLOPs=nflop / t / 1e12,
                bytes=int(nbytes), flops=int(nflop), **extra)


def run_t_gdn(p, ctx):
    import torch
    from qcn.compile.plugins.gated_deltanet import gated_deltanet_decode, gated_deltanet_prefill
    kg = _import_bench("kernels_gdn")
    shape = kg.TINY if ctx["dry"] else dict(HK=16, HV=32, DK=128, DV=128, KC=4)
    Hk, Hv, Dk, Dv, K, C = kg.dims(shape)
    B, T, dev = p["B"], p["T"], ctx["dev"]
    dt = torch.float32 if ctx["dry"] else torch.bfloat16
    nbytes, nflop = kg.bytes_moved(shape, B, T), kg.flops(shape, B, T, chunked=T > 1)
    n = 1 if ctx["dry"] else max(2, math.ceil(2 * kg.l2_bytes() / nbytes))
    n = min(n, max(1, int(8 * 2**30 // nbytes)))
    copies = [kg.make_inputs(shape, B, T, dev, dt, seed=i) for i in range(n)]
    outs = [(torch.empty(B, T, Hv * Dv, dtype=dt, device=dev), torch.empty_like(c["conv_state"])) for c in copies]
    fn = gated_deltanet_decode if T == 1 else gated_deltanet_prefill

    def ours(i):
        fn(**copies[i], num_k_heads=Hk, y=outs[i][0], conv_state_out=outs[i][1])

    t = _time(ours, n, ctx)
    yield _row("qcn", t, nbytes, nflop, ctx["bw"], B=B, T=T, copies=n)


def run_t_fla(p, ctx):
    """fla's fused_recurrent (T = 1) / chunk gated delta rule on the shapes and input copies of ``run_t_gdn``;
    its bytes and FLOPs are counted as for qcn's whole op (so GB/s compare times, not fla's own traffic)."""
    import torch
    kg = _import_bench("kernels_gdn")
    B, T = p["B"], p["T"]
    if kg.fla_fn() is None:
        yield dict(impl="fla-core", skipped="fla is not importable here (carry the fla-core wheel in .whl/)", B=B, T=T)
        return
    if ctx["dry"]:
        yield dict(impl="fla-core", skipped="dry run: fla imports, but is not run on the CPU", B=B, T=T)
        return
    shape = dict(HK=16, HV=32, DK=128, DV=128, KC=4)
    nbytes, nflop = kg.bytes_moved(shape, B, T), kg.flops(shape, B, T, chunked=T > 1)
    n = max(2, math.ceil(2 * kg.l2_bytes() / nbytes))
    n = min(n, max(1, int(8 * 2**30 // nbytes)))
    copies = [kg.make_inputs(shape, B, T, ctx["dev"], torch.bfloat16, seed=i) for i in range(n)]
    runners = [kg.make_fla_runner(c, shape["HK"]) for c in copies]
    tf = _time(lambda i: runners[i](), n, ctx)
    yield _row("fla-core", tf, nbytes, nflop, ctx["bw"], B=B, T=T, copies=n, mode=runners[0].mode,
               note="core recurrence only: no conv, no gated RMSNorm (less work than qcn's op)")


def run_t_moe(p, ctx):
    import statistics as st

    import torch
    from qcn.compile.plugins.moe import moe_forward, moe_route
    km = _import_bench("kernels_moe_attn")
    km.configure(ctx["dry"])
    M, dev, n, fmt = km.MOE, km.DEV, p["n"], p["fmt"]
    H, K = M["H"], M["K"]
    w = km.moe_weights(fmt)
    small = ("router_weight", "shared_gate", "shared_gate_up", "shared_gate_up_scale", "shared_down",
             "shared_down_scale")
    per_set = km.moe_cost(n, fmt, min(M["E"], n * K))[0]
    # each set: its own tokens (so its own routing) and its own router / shared expert copy; routed experts shared
    sets = [(torch.randn(n, H, device=dev, dtype=torch.bfloat16),
             {k: (v.clone() if k in small else v) for k, v in w.items()})
            for _ in range(1 if ctx["dry"] else km.rotations(per_set))]
    uniq = st.mean(torch.unique(moe_route(x, ws["router_weight"], ws["shared_gate"], K, config=km.MOE_CFG)[0]).numel()
                   for x, ws in sets)
    nbytes, nflop = km.moe_cost(n, fmt, uniq)
    outs = [torch.empty_like(x) for x, _ in sets]

    def ours(i):
        moe_forward(sets[i][0], top_k=K, path=p["path"], out=outs[i], config=km.MOE_CFG, **sets[i][1])

    t = _time(ours, len(sets), ctx)
    yield _row("qcn", t, nbytes, nflop, ctx["bw"], fmt=fmt, n=n, path=p["path"], unique_experts=uniq,
               copies=len(sets))


def run_t_attn(p, ctx):
    import torch
    from qcn.compile.plugins.attention import cached_attention_decode
    km = _import_bench("kernels_moe_attn")
    km.configure(ctx["dry"])
    A, dev = km.ATT, km.DEV
    HQ, KVH, D, B, ctx_len = A["HQ"], A["KVH"], A["D"], p["B"], p["ctx"]
    cb = 1 if p["cache"] == "fp8" else 2
    nbytes, nflop = km.attn_cost(B, ctx_len, cb)
    P = ctx_len + A["P_pad"]
    sets = []
    for _ in range(1 if ctx["dry"] else km.rotations(nbytes, cap=8)):
        pk = torch.randn(B, KVH, P, D, device=dev, dtype=torch.bfloat16)
        pv = torch.randn(B, KVH, P, D, device=dev, dtype=torch.bfloat16)
        ks = vs = None
        if cb == 1:
            ks, vs = torch.tensor([0.01], device=dev), torch.tensor([0.01], device=dev)
            pk, pv = (pk / ks).to(torch.float8_e4m3fn), (pv / vs).to(torch.float8_e4m3fn)
        sets.append(dict(q=torch.randn(B, 1, HQ, D, device=dev, dtype=torch.bfloat16),
                         k=torch.randn(B, 1, KVH, D, device=dev, dtype=torch.bfloat16),
                         v=torch.randn(B, 1, KVH, D, device=dev, dtype=torch.bfloat16), past_key=pk, past_value=pv,
                         past_len=torch.full((B,), ctx_len, device=dev, dtype=torch.int64), k_scale=ks, v_scale=vs))
    outs = [torch.empty_like(s["q"]) for s in sets]

    def ours(i):
        cached_attention_decode(**sets[i], out=outs[i], config=km.ATT_CFG)

    t = _time(ours, len(sets), ctx)
    yield _row("qcn", t, nbytes, nflop, ctx["bw"], B=B, ctx=ctx_len, cache=p["cache"], copies=len(sets))


# ============================================================================ worker: decode step


def run_decode(p, ctx):
    """One point of the 48-layer decode step; the model of a format is built by its first point and kept in
    the worker (``ctx['models']``) for the others (set_batch only reallocates states and caches)."""
    import torch
    ds = _import_bench("decode_step")
    from qcn.compile.plugins.attention import DecodeAttentionConfig
    from qcn.compile.plugins.moe import MoEConfig
    dry, dev = ctx["dry"], ctx["dev"]
    s = ds.TINY if dry else ds.FULL
    key = (p["experts"], p["proj"])
    n_layers = p["layers"] or decode_layers(p["experts"])
    info = ctx["models"].get(key)
    if info is None:
        for k in list(ctx["models"]):  # one model on the GPU at a time
            del ctx["models"][k]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        proj_fp8, why = False, "bf16 requested"
        if p["proj"] == "fp8":
            proj_fp8, why = ds.probe_scaled_mm(dev, 1, s)
        if dry:
            moe_cfg = MoEConfig(router_bn=16, router_bk=32, topk_bh=32, decode_bn_gate_up=16, decode_bn_down=32,
                                decode_bk=32, prefill_bm=16, prefill_bn=32, prefill_bk=32, align_block=64,
                                combine_bh=64)
            attn_cfg = DecodeAttentionConfig(partition=32, block_n=16, block_s=4)
        else:
            moe_cfg, attn_cfg = MoEConfig(), DecodeAttentionConfig()
        t0 = time.time()
        model = ds.DecodeModel(s, dev, batch=p["batch"], context=p["context"], n_layers=n_layers,
                               experts=p["experts"], proj_fp8=proj_fp8, moe_cfg=moe_cfg, attn_cfg=attn_cfg, seed=0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        info = ctx["models"][key] = dict(model=model, proj_fp8=proj_fp8, proj_why=why, build_s=time.time() - t0)
    model = info["model"]
    model.set_batch(p["batch"], p["context"])
    row = dict(experts=p["experts"], proj="fp8" if info["proj_fp8"] else "bf16", proj_probe=info["proj_why"],
               layers=n_layers, batch=p["batch"], context=p["context"], build_s=info["build_s"])
    if dry:
        n_checked, routed = ds.checked_step(model)
        cat = ds.count_bytes(model, routed)
        yield dict(row, checked=n_checked, bytes=sum(cat.values()), ms=float("nan"))
        return
    r = ds.measure(model, ctx["bw"], use_graph=True, iters=ctx["iters"], warmup=ctx["warmup"])
    cat = r.pop("bytes_by_category")
    # roofline as in docs/FINDINGS.md (FP8 weights except router and lm_head): projections counted at one byte
    fp8_bytes = r["bytes"] - (0 if info["proj_fp8"] else (cat["DeltaNet projections"] + cat["attention projections"]) / 2)
    fp8_bound_ms = fp8_bytes / ctx["bw"] * 1e3
    yield dict(row, **{k: v for k, v in r.items() if k != "routed"}, roofline_frac=r["bound_ms"] / r["ms"],
               fp8_roofline_ms=fp8_bound_ms, fp8_roofline_frac=fp8_bound_ms / r["ms"],
               mean_routed=statistics.mean(r["routed"]), bytes_by_category={k: int(v) for k, v in cat.items()},
               gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30)


RUNNERS = dict(gdn=run_gdn, gdn_chain=run_gdn_chain, gdn_inv=run_gdn_inv, moe=run_moe, moe_inv=run_moe_inv,
               moe_nan=run_moe_nan, attn=run_attn, attn_inv=run_attn_inv, t_gdn=run_t_gdn, t_fla=run_t_fla,
               t_moe=run_t_moe, t_attn=run_t_attn, decode=run_decode)


def worker_main(args):
    """Run the cases of --cases-file in order; one JSON line per result, flushed as it is written."""
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    parent = os.getppid()

    def orphan_watch():  # the suite was killed (SIGKILL leaves no handler): stop too, freeing the GPU
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(4)

    import threading
    threading.Thread(target=orphan_watch, daemon=True).start()
    use_checkout()
    import torch
    cases = [Case(**c) for c in json.loads(Path(args.cases_file).read_text())]
    dev = torch.device("cpu" if args.dry_run else "cuda")
    ctx = dict(dry=args.dry_run, dev=dev, bw=args.copy_bw, iters=args.iters, warmup=args.warmup, models={})
    out = open(args.jsonl, "a", buffering=1)
    for c in cases:
        t0 = time.time()
        out.write(json.dumps(dict(name=c.name, event="start")) + "\n")
        try:
            n = 0
            for res in RUNNERS[c.kind](c.params, ctx):
                n += 1
                status = "ok"
                if "checks" in res:
                    status = "pass" if all(ch["ok"] for ch in res["checks"]) else "FAIL"
                elif "error" in res:
                    status = "error"
                elif "skipped" in res:
                    status = "skipped"
                out.write(json.dumps(_jsonable(dict(name=c.name, section=c.section, kind=c.kind, params=c.params,
                                                    status=status, seconds=time.time() - t0, **res))) + "\n")
        except Exception as e:  # noqa: BLE001 -- recorded; the next case runs
            out.write(json.dumps(_jsonable(dict(name=c.name, section=c.section, kind=c.kind, params=c.params,
                                                status="error", seconds=time.time() - t0,
                                                error=f"{type(e).__name__}: {str(e)[:500]}",
                                                traceback=traceback.format_exc()[-2000:]))) + "\n")
            if dev.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 -- the CUDA context is gone: let the orchestrator restart us
                    out.write(json.dumps(dict(name=c.name, event="cuda_context_lost")) + "\n")
                    out.close()
                    os._exit(3)
    out.close()
    return 0


def _jsonable(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return str(o)


# ============================================================================ orchestrator


def now_iso():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Report:
    """The summary: rewritten (JSON + markdown, atomically) after every change."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = dict(suite="qcn benchmarks/gpu_suite.py", started=now_iso(), updated=None, finished=False,
                         **meta, env={}, plan={}, sections={}, results=[], goals=[])

    def write(self):
        self.data["updated"] = now_iso()
        self.data["goals"] = evaluate_goals(self.data)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_suite.json", json.dumps(_jsonable(self.data), indent=1)),
                           ("gpu_suite.md", render_markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def env_section(dry: bool) -> dict:
    env = dict(python=sys.version.split()[0], platform=platform.platform(), host=platform.node(),
               cpu_count=os.cpu_count())
    import torch
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    try:
        import triton
        env["triton"] = triton.__version__
        env["triton_path"] = str(Path(triton.__file__).parent)
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not importable: {e}"
    carried = sorted(p.name for p in (ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    env["carried_wheels"] = carried
    env["triton_source"] = ("a carried wheel (.whl/)" if any(w.startswith("triton-") for w in carried)
                            and "/tmp/site" in env.get("triton_path", "") else "the machine's own install")
    spec = importlib.util.find_spec("fla")
    if spec is None:
        env["fla"] = "absent"
    else:
        try:
            from importlib.metadata import version
            env["fla"] = version("fla-core")
        except Exception:  # noqa: BLE001
            env["fla"] = "present (version unknown)"
        env["fla_path"] = str(Path(spec.origin).parent)
    try:
        env["triton_api"] = triton_api_check()
    except Exception as e:  # noqa: BLE001
        env["triton_api"] = dict(error=f"{type(e).__name__}: {e}")
    if shutil.which("nvidia-smi"):
        try:
            q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,persistence_mode"
            r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20)
            env["nvidia_smi"] = dict(zip(q.split(","), [v.strip() for v in r.stdout.strip().split(",")]))
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"failed: {e}"
    env["cuda_available"] = bool(torch.cuda.is_available())
    if dry or not torch.cuda.is_available():
        env["copy_GBps"] = None
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               gpu_mem_gib=props.total_memory / 2**30, l2_mib=getattr(props, "L2_cache_size", 0) / 2**20)
    n = 1 << 31  # 2 GiB device-to-device copy, read + write bytes, median of 20 after 3 warm-ups
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    env["copy_GBps"] = 2 * n / statistics.median(ts) / 1e9
    env["copy_spread"] = (max(ts) - min(ts)) / statistics.median(ts)
    return env


class Orchestrator:
    """Runs each section's cases in worker processes (this file with --worker), collects their JSON lines into
    the report, enforces the time boxes, and restarts a worker that died for the cases it had left."""

    worker_cmd = (sys.executable, str(Path(__file__).resolve()))

    def __init__(self, args, report: Report, deadline: float):
        self.args, self.report, self.deadline = args, report, deadline
        self.tmp = Path(tempfile.mkdtemp(prefix="qcn_gpu_suite_"))
        self.procs = []
        self.failed = False
        self.printed = 0
        self.collected = set()

    def collect(self, w):
        """Append a finished (or killed) worker's output to gpu_suite_workers.log under --out (its warnings,
        tracebacks, kernels_gdn's "CUDA graph capture failed" notes)."""
        if w["tag"] in self.collected or not w["stderr"].exists():
            return
        self.collected.add(w["tag"])
        text = w["stderr"].read_text(errors="replace")
        with open(self.report.out / "gpu_suite_workers.log", "a") as f:
            f.write(f"===== worker {w['tag']} ({len(w['cases'])} cases: {w['cases'][0].name} ...), exit "
                    f"{w['proc'].poll()}\n{text[-200_000:]}\n")

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs = []

    def start(self, section: Section, cases: list[Case], tag: str):
        cf = self.tmp / f"{section.name}-{tag}.cases.json"
        cf.write_text(json.dumps([dataclasses.asdict(c) for c in cases]))
        jl = self.tmp / f"{section.name}-{tag}.jsonl"
        err = open(self.tmp / f"{section.name}-{tag}.stderr", "w")
        bw = self.report.data["env"].get("copy_GBps")
        cmd = [*self.worker_cmd, "--worker", "--cases-file", str(cf), "--jsonl", str(jl),
               "--copy-bw", str(bw * 1e9 if bw else float("nan")),
               "--iters", str(self.args.iters), "--warmup", str(self.args.warmup)] + \
            (["--dry-run"] if self.args.dry_run else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # same session as the suite (no setsid): whoever stops the suite stops its workers too
        p = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append(p)
        return dict(proc=p, jsonl=jl, stderr=self.tmp / f"{section.name}-{tag}.stderr", cases=cases, offset=0,
                    started=None, current=None, tag=f"{section.name}-{tag}")

    def read_new(self, w) -> list[dict]:
        if not w["jsonl"].exists():
            return []
        with open(w["jsonl"]) as f:
            f.seek(w["offset"])
            chunk = f.read()
        end = chunk.rfind("\n") + 1
        w["offset"] += len(chunk[:end].encode())
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

    def run_section(self, section: Section, later_boxes: float):
        rep = self.report.data
        # the section's box, plus whatever earlier sections left unused; later sections keep their boxes
        box = max(0.0, self.deadline - time.time() - later_boxes)
        st = rep["sections"][section.name] = dict(status="running", started=now_iso(), box_s=round(box, 1),
                                                  estimate_s=round(section.estimate(), 1), cases=len(section.cases),
                                                  done=0, failed=0, notes=[])
        if box < 10:
            st.update(status="skipped", notes=["no time left in the budget"])
            for c in section.cases:
                rep["results"].append(dict(name=c.name, section=c.section, kind=c.kind, params=c.params,
                                           status="not run", error="no time left in the budget"))
            self.failed = True
            self.report.write()
            return
        t_end = time.time() + box
        t0 = time.time()
        queues = self.shard(section)
        done = set()
        workers, tag = [], 0
        for q in queues:
            if q:
                workers.append(self.start(section, q, str(tag)))
                tag += 1
        self.report.write()
        last_write = time.time()
        while workers:
            changed = False
            for w in list(workers):
                for ev in self.read_new(w):
                    if ev.get("event") == "start":
                        w["current"], w["current_t0"] = ev["name"], time.time()
                        continue
                    if ev.get("event") == "cuda_context_lost":
                        continue
                    rep["results"].append(ev)
                    done.add(ev["name"])
                    st["done"] = len(done)
                    if ev["status"] in ("FAIL", "error"):
                        st["failed"] += 1
                        self.failed = True
                    changed = True
                rc = w["proc"].poll()
                limit = case_limit(next((c for c in w["cases"] if c.name == w["current"]), None))
                if rc is None and w["current"] not in (None, *done) and time.time() - w["current_t0"] > limit:
                    w["killed"] = f"case ran over its limit of {limit:.0f}s; worker killed"
                    w["proc"].kill()
                    rc = w["proc"].wait()
                if rc is not None:
                    self.collect(w)
                    for ev in self.read_new(w):  # anything written just before exit
                        if ev.get("event"):
                            continue
                        rep["results"].append(ev)
                        done.add(ev["name"])
                        changed = True
                    left = [c for c in w["cases"] if c.name not in done]
                    workers.remove(w)
                    if left:
                        tail = w["stderr"].read_text(errors="replace")[-1500:]
                        crashed = left[0] if w["current"] == left[0].name or rc != 0 else None
                        if crashed is not None:
                            rep["results"].append(dict(name=crashed.name, section=crashed.section, kind=crashed.kind,
                                                       params=crashed.params, status="error",
                                                       error=w.get("killed") or f"worker exited with {rc} during "
                                                                                "this case",
                                                       worker_log_tail=tail))
                            done.add(crashed.name)
                            st["failed"] += 1
                            self.failed = True
                            left = left[1:]
                        st["notes"].append(f"worker {w['tag']} exited {rc} with {len(left) + 1} cases left")
                        if left and t_end - time.time() > 15:
                            workers.append(self.start(section, left, str(tag)))  # a fresh worker for the rest
                            tag += 1
                        else:
                            for c in left:
                                rep["results"].append(dict(name=c.name, section=c.section, kind=c.kind,
                                                           params=c.params, status="not run",
                                                           error="worker crashed; no time to restart"))
                                done.add(c.name)
                    changed = True
            if time.time() > t_end:
                self.kill_all()
                for w in workers:
                    self.collect(w)
                for c in section.cases:
                    if c.name not in done:
                        rep["results"].append(dict(name=c.name, section=c.section, kind=c.kind, params=c.params,
                                                   status="not run", error=f"section time box ({box:.0f}s) ran out"))
                st["status"] = "timeout"
                st["notes"].append(f"time box {box:.0f}s ran out; {len(section.cases) - len(done)} cases not run")
                self.failed = True
                break
            st["elapsed_s"] = round(time.time() - t0, 1)
            if changed or time.time() - last_write > 5:
                self.report.write()
                last_write = time.time()
            if changed:
                self.progress(section)
            time.sleep(0.3)
        if st["status"] == "running":
            st["status"] = "done" if st["failed"] == 0 else "done, with failures"
        st["elapsed_s"] = round(time.time() - t0, 1)
        self.report.write()
        self.progress(section, final=True)

    def shard(self, section: Section) -> list[list[Case]]:
        """Cases over the workers: groups kept together, longest first onto the least loaded worker; each
        worker keeps the plan's order (so the most important cases run first)."""
        order = {c.name: i for i, c in enumerate(section.cases)}
        by_name = {c.name: c for c in section.cases}
        units = [[by_name[n] for n in g] for g in section.groups]
        grouped = {n for g in section.groups for n in g}
        units += [[c] for c in section.cases if c.name not in grouped]
        loads = [0.0] * section.workers
        shards = [[] for _ in range(section.workers)]
        for u in sorted(units, key=lambda u: -sum(c.est_s for c in u)):
            i = loads.index(min(loads))
            shards[i] += u
            loads[i] += sum(c.est_s for c in u)
        if section.workers == 1:
            return [list(section.cases)]
        return [sorted(s, key=lambda c: order[c.name]) for s in shards]

    def progress(self, section: Section, final=False):
        st = self.report.data["sections"][section.name]
        for r in self.report.data["results"][self.printed:]:
            print(f"[{section.name}] {r['status']:8s} {r['name']}  {_brief(r)}", flush=True)
        self.printed = len(self.report.data["results"])
        if final:
            print(f"[{section.name}] {st['status']}: {st['done']}/{st['cases']} cases, {st['failed']} failed, "
                  f"{st.get('elapsed_s', 0):.0f}s of {st['box_s']:.0f}s", flush=True)


def _worst(checks):
    """The check closest to (or furthest past) its bound; ties: the first (the main output)."""
    def ratio(c):
        if c["err"] is None or not c["ok"]:
            return math.inf
        return c["err"] / c["bound"] if c["bound"] else (0.0 if c["err"] == 0 else math.inf)
    return max(checks, key=ratio)


def case_limit(case) -> float:
    """Seconds one case may run before its worker is killed (the rest of its cases go to a fresh worker)."""
    return max(60.0, 4 * case.est_s) if case is not None else math.inf


def _brief(r) -> str:
    if r.get("checks"):
        worst = _worst(r["checks"])
        return f"worst {worst['output']} err {_f(worst['err'])} (bound {worst['bound']:g})"
    if r.get("checked") is not None and r.get("ms") is None:
        return f"{r['checked']} tensors checked (shapes, dtypes, finite); not timed"
    if r.get("us") is not None:
        return f"{r.get('impl', '')} {r['us']:.2f} us, {r['GBps']:.0f} GB/s, {100 * r['copy_frac']:.1f}% of copy"
    if r.get("ms") is not None:
        return f"{r['ms']:.3f} ms/step, {r['tokens_per_s']:.0f} tok/s, {100 * r['roofline_frac']:.1f}% of roofline"
    return (r.get("error") or r.get("skipped") or "")[:200]


def _f(x, fmt=".2e"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


# ============================================================================ goals and markdown


def _find(results, **kw):
    return [r for r in results if all(r.get(k) == v or (r.get("params") or {}).get(k) == v for k, v in kw.items())]


def evaluate_goals(d) -> list[dict]:
    res = d["results"]
    corr = [r for r in res if r.get("section") == "correctness"]

    def correct(kind_prefix):
        rs = [r for r in corr if r["kind"].startswith(kind_prefix)]
        if not rs:
            return "not checked"
        return "all pass" if all(r["status"] == "pass" for r in rs) else \
            f"{sum(r['status'] != 'pass' for r in rs)} of {len(rs)} cases failed or did not run"

    goals = []

    def goal(name, target, measured, ok, margin, correctness, note=""):
        goals.append(dict(goal=name, target=target, measured=measured, result=ok, margin=margin,
                          correctness=correctness, note=note))

    # 1. GDN decode <= 4 us per layer at batch 1
    r = [x for x in _find(res, section="kernels", kind="t_gdn", impl="qcn") if x["params"] == dict(B=1, T=1)]
    if r and r[0].get("us") is not None:
        us = r[0]["us"]
        goal("Gated DeltaNet decode, batch 1", "<= 4.0 us per layer", f"{us:.2f} us", "pass" if us <= 4.0 else "miss",
             f"{4.0 - us:+.2f} us ({us / 4.0:.2f}x the goal)", correct("gdn"))
    else:
        goal("Gated DeltaNet decode, batch 1", "<= 4.0 us per layer", None, "not measured", None, correct("gdn"),
             _why(res, "kernels", "gdn decode B1"))
    # 2. prefill T=4096 no slower than fla
    ours = [x for x in _find(res, section="kernels", kind="t_gdn", impl="qcn") if x["params"] == dict(B=1, T=4096)]
    fla = [x for x in _find(res, section="kernels", kind="t_fla") if x["params"] == dict(B=1, T=4096)]
    if ours and ours[0].get("us") is not None and fla and fla[0].get("us") is not None:
        a, b = ours[0]["us"], fla[0]["us"]
        goal("Gated DeltaNet chunked prefill, T=4096, B=1", "qcn time <= fla time", f"qcn {a:.1f} us, fla {b:.1f} us",
             "pass" if a <= b else "miss", f"qcn/fla = {a / b:.2f}", correct("gdn"),
             "fla timed on its core recurrence only (no conv, no gated norm), so the comparison favours fla")
    else:
        why = (fla[0].get("skipped") or fla[0].get("error")) if fla else _why(res, "kernels", "fla gdn prefill T4096")
        goal("Gated DeltaNet chunked prefill, T=4096, B=1", "qcn time <= fla time",
             f"qcn {ours[0]['us']:.1f} us" if ours and ours[0].get("us") else None, "not measured", None,
             correct("gdn"), why)
    # 3. MoE decode at batch 1 >= 60% of copy bandwidth (each format)
    for fmt in ("fp8", "int4", "dense"):
        r = [x for x in _find(res, section="kernels", kind="t_moe") if x["params"] == dict(fmt=fmt, n=1, path="decode")]
        name = f"MoE decode, batch 1, {fmt} experts (10 routed + shared)"
        if r and r[0].get("copy_frac") is not None:
            f = r[0]["copy_frac"]
            goal(name, ">= 60% of copy bandwidth", f"{100 * f:.1f}% ({r[0]['GBps']:.0f} GB/s, {r[0]['us']:.1f} us)",
                 "pass" if f >= 0.6 else "miss", f"{100 * (f - 0.6):+.1f} points", correct("moe"))
        else:
            goal(name, ">= 60% of copy bandwidth", None, "not measured", None, correct("moe"),
                 _why(res, "kernels", f"moe decode {fmt} N1"))
    # 4. 48-layer decode step, batch 1, 4K, FP8 experts >= 50% of roofline
    r = [x for x in _find(res, section="decode_step", experts="fp8") if x.get("batch") == 1 and x.get("context") == 4096]
    name = "48-layer decode step, batch 1, 4K context, FP8 experts"
    if r and r[0].get("ms") is not None:
        f = r[0]["fp8_roofline_frac"]
        goal(name, ">= 50% of roofline (FP8 weights except router / lm_head, over the copy bandwidth)",
             f"{r[0]['tokens_per_s']:.0f} tok/s, {100 * f:.1f}% of roofline ({r[0]['fp8_roofline_ms']:.3f} ms bound, "
             f"{r[0]['ms']:.3f} ms measured)", "pass" if f >= 0.5 else "miss", f"{100 * (f - 0.5):+.1f} points",
             "step checked: shapes, dtypes, finite" if r[0].get("checked") else "not checked",
             f"projections {r[0]['proj']} ({r[0].get('proj_probe')}); best published single-stream H200: ~211 tok/s")
    else:
        goal(name, ">= 50% of roofline", None, "not measured", None, "", _why(res, "decode_step", "decode fp8 B1 ctx4096"))
    return goals


def _why(res, section, name):
    r = [x for x in res if x.get("name") == name and x.get("section") == section]
    if not r:
        return "did not run (section not reached, or killed at the time limit)"
    return r[0].get("error") or r[0].get("skipped") or f"{r[0]['status']}, not timed"


def render_markdown(d) -> str:
    env = d["env"]
    L = [f"# qcn GPU suite {'(DRY RUN, CPU: nothing timed)' if d['dry_run'] else ''}", "",
         f"started {d['started']}, updated {d['updated']}, {'finished' if d['finished'] else 'NOT finished'}; "
         f"commit {d['commit']}; command `{d['command']}`", "", "## Environment", ""]
    smi = env.get("nvidia_smi") if isinstance(env.get("nvidia_smi"), dict) else {}
    L += [f"- GPU: {env.get('gpu', 'none')} (cc {env.get('capability', '-')}, {env.get('sms', '-')} SMs, "
          f"L2 {_f(env.get('l2_mib'), '.0f')} MiB, {_f(env.get('gpu_mem_gib'), '.1f')} GiB); driver "
          f"{smi.get('driver_version', '-')}; clocks SM {smi.get('clocks.sm', '-')} (max {smi.get('clocks.max.sm', '-')}),"
          f" mem {smi.get('clocks.mem', '-')}",
          f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}",
          f"- Triton {env.get('triton')} from {env.get('triton_path')}: {env.get('triton_source')}",
          f"- Triton API check: {_api_line(env.get('triton_api'))}",
          f"- fla: {env.get('fla')}; carried wheels: {', '.join(env.get('carried_wheels') or []) or 'none'}",
          f"- copy bandwidth (2 GiB device-to-device, read + write): {_f(env.get('copy_GBps'), '.0f')} GB/s", ""]
    L += ["## Goals (issue #15, Part 2)", "", "| goal | target | measured | result | margin | correctness | note |",
          "|---|---|---|---|---|---|---|"]
    for g in d["goals"]:
        L.append(f"| {g['goal']} | {g['target']} | {g['measured'] or '-'} | **{g['result']}** | {g['margin'] or '-'} | "
                 f"{g['correctness']} | {g['note'] or ''} |")
    L += ["", "## Sections", "", "| section | status | cases done | failed | elapsed s | box s | est s | notes |",
          "|---|---|---|---|---|---|---|---|"]
    for n, s in d["sections"].items():
        L.append(f"| {n} | {s['status']} | {s['done']}/{s['cases']} | {s['failed']} | {s.get('elapsed_s', '-')} | "
                 f"{s['box_s']} | {s['estimate_s']} | {'; '.join(s['notes'])} |")
    res = d["results"]
    corr = [r for r in res if r.get("section") == "correctness"]
    if corr:
        L += ["", f"## Correctness ({sum(r['status'] == 'pass' for r in corr)} of {len(corr)} pass)", "",
              "| case | status | worst output | rel err | bound | s |", "|---|---|---|---|---|---|"]
        for r in corr:
            if r.get("checks"):
                w = _worst(r["checks"])
                L.append(f"| {r['name']} | {r['status']} | {w['output']} | {_f(w['err'])} | {w['bound']:g} | "
                         f"{_f(r.get('seconds'), '.1f')} |")
            else:
                err = _cell(r.get("error"), 160)
                L.append(f"| {r['name']} | {r['status']} | {err or '-'} | - | - | {_f(r.get('seconds'), '.1f')} |")
    kr = [r for r in res if r.get("section") == "kernels"]
    if kr:
        L += ["", "## Kernel timings (CUDA graph over rotated inputs; bytes counted by hand)", "",
              "| case | impl | us | GB/s | % of copy | TFLOP/s | MB | note |", "|---|---|---|---|---|---|---|---|"]
        qcn_us = {(r["params"].get("B"), r["params"].get("T")): r.get("us") for r in kr if r["kind"] == "t_gdn"}
        for r in kr:
            note = r.get("note") or r.get("skipped") or r.get("error") or ""
            ours = qcn_us.get((r["params"].get("B"), r["params"].get("T"))) if r["kind"] == "t_fla" else None
            if ours is not None and r.get("us"):
                note = f"qcn/fla {ours / r['us']:.2f}; {note}"
            L.append(f"| {r['name']} | {r.get('impl', '-')} | {_f(r.get('us'), '.2f')} | {_f(r.get('GBps'), '.0f')} | "
                     f"{_f(100 * r['copy_frac'] if r.get('copy_frac') is not None else None, '.1f')} | "
                     f"{_f(r.get('TFLOPs'), '.2f')} | {_f((r.get('bytes') or 0) / 1e6 if r.get('bytes') else None, '.2f')}"
                     f" | {_cell(note, 200)} |")
    dr = [r for r in res if r.get("section") == "decode_step"]
    if dr:
        L += ["", "## Decode step (48 layers unless noted, random weights, CUDA graph)", "",
              "| experts | proj | layers | batch | context | ms/step | tok/s | GB/s | % of copy = % of roofline | "
              "% of FP8 roofline | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dr:
            if r.get("ms") is None and r.get("checked") is not None:
                L.append(f"| {r['experts']} | {r['proj']} | {r['layers']} | {r['batch']} | {r['context']} | - | - | - "
                         f"| - | - | {r['checked']} tensors checked, not timed |")
                continue
            if r.get("ms") is None:
                L.append(f"| {r['params'].get('experts')} | - | - | {r['params'].get('batch')} | "
                         f"{r['params'].get('context')} | - | - | - | - | - | {r['status']}: "
                         f"{_cell(r.get('error'), 160)} |")
                continue
            L.append(f"| {r['experts']} | {r['proj']} | {r['layers']} | {r['batch']} | {r['context']} | {r['ms']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['GBps']:.0f} | {100 * r['roofline_frac']:.1f} | "
                     f"{100 * r['fp8_roofline_frac']:.1f} | build {r['build_s']:.0f}s, "
                     f"{r['mean_routed']:.1f} experts/layer |")
    return "\n".join(L) + "\n"


def _cell(text, n):
    """Text for one markdown table cell: no pipes, no newlines, at most n characters."""
    return (text or "").replace("|", "/").replace("\n", " ")[:n]


def _api_line(a):
    if not isinstance(a, dict):
        return "not run"
    if a.get("error"):
        return a["error"]
    miss = a["missing"]
    return (f"{a['names_checked']} names, {a['keywords_checked']} keywords of the kernel sources checked against "
            f"triton {a['triton']}: " + ("all present" if not miss else "MISSING " + ", ".join(miss)))


# ============================================================================ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="CPU: imports, plan, shapes, code paths at tiny shapes")
    ap.add_argument("--out", default=None, help="summary folder (default $OUT, else ./gpu_suite_out)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds the suite may use (default {DEFAULT_BUDGET_S}; at most {LIMIT_S})")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--iters", type=int, default=50, help="timed graph replays / steps per case")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, if there is git)")
    # worker mode (started by the suite itself)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases-file", help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    ap.add_argument("--copy-bw", type=float, default=float("nan"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [s for s in args.sections.split(",") if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    return args


def _commit(given):
    if given:
        return given
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or "unknown (no git)"
    except Exception:  # noqa: BLE001
        return "unknown (no git)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    t_start = time.time()
    deadline = t_start + args.budget
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    out = Path(args.out or os.environ.get("OUT") or "gpu_suite_out").resolve()
    sections = tuple(s for s in SECTIONS if s in args.sections.split(","))
    report = Report(out, dict(dry_run=args.dry_run, commit=_commit(args.commit),
                              command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
                              budget_s=args.budget))
    print(f"qcn GPU suite{' (dry run)' if args.dry_run else ''}: summary -> {out}/gpu_suite.{{json,md}}", flush=True)

    bad_imports = check_imports()
    for line in bad_imports:
        print(f"import error: {line}", flush=True)
    gpu_plan = build_plan(True, args.budget, sections)
    problems = plan_problems(gpu_plan, args.budget) if not bad_imports else []
    est = ENV_EST_S + sum(s.estimate() for s in gpu_plan)
    report.data["plan"] = dict(estimate_s=round(est, 1), budget_s=args.budget, limit_s=LIMIT_S, problems=problems,
                               sections={s.name: dict(cases=len(s.cases), workers=s.workers, box_s=s.box_s,
                                                      estimate_s=round(s.estimate(), 1)) for s in gpu_plan})
    print(f"plan (GPU): {sum(len(s.cases) for s in gpu_plan)} cases, ~{est:.0f}s estimated of {args.budget:.0f}s "
          f"budget; " + ", ".join(f"{s.name} {len(s.cases)} cases ~{s.estimate():.0f}s (box {s.box_s:.0f}s, "
                                  f"{s.workers} workers)" for s in gpu_plan), flush=True)
    for p in problems:
        print(f"plan problem: {p}", flush=True)
    try:
        report.data["env"] = env_section(args.dry_run)
    except Exception as e:  # noqa: BLE001 -- recorded; the sections may still run
        report.data["env"] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
    e = report.data["env"]
    print(f"env: {e.get('gpu', 'no GPU')}, driver {(e.get('nvidia_smi') or {}).get('driver_version', '-') if isinstance(e.get('nvidia_smi'), dict) else '-'}"
          f", torch {e.get('torch')}, triton {e.get('triton')} ({e.get('triton_source')}), fla {e.get('fla')}; "
          f"copy {_f(e.get('copy_GBps'), '.0f')} GB/s", flush=True)
    print(f"triton API: {_api_line(e.get('triton_api'))}", flush=True)
    report.write()
    if bad_imports or (problems and args.dry_run):
        report.data["finished"] = True
        report.write()
        print("dry run: FAILED (imports / plan)" if args.dry_run else "suite not started: import errors", flush=True)
        return 2
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device here: use --dry-run on a CPU machine", flush=True)
            report.data["finished"] = True
            report.write()
            return 2

    run_plan = gpu_plan if not args.dry_run else build_plan(False, args.budget, sections)
    orch = Orchestrator(args, report, deadline)

    def on_signal(signum, frame):  # killed from outside: stop the workers, keep what finished
        orch.kill_all()
        report.data["interrupted"] = f"signal {signum} at {now_iso()}"
        report.write()
        os._exit(130)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i, s in enumerate(run_plan):
            print(f"== {s.name}: {len(s.cases)} cases, {s.workers} worker(s)", flush=True)
            orch.run_section(s, later_boxes=sum(x.box_s for x in run_plan[i + 1:]))
    finally:
        orch.kill_all()
        shutil.rmtree(orch.tmp, ignore_errors=True)
    report.data["finished"] = True
    report.data["elapsed_s"] = round(time.time() - t_start, 1)
    report.write()
    print("\n" + "\n".join(f"goal: {g['goal']}: {g['result']} ({g['measured'] or g['note']}; margin {g['margin']})"
                           for g in report.data["goals"]), flush=True)
    if args.dry_run:
        ok = not orch.failed
        print(f"dry run: {'ok' if ok else 'FAILED'}: imports, Triton API, GPU plan ~{est:.0f}s of {args.budget:.0f}s, "
              f"shapes checked; every section's code path ran at tiny shapes in {time.time() - t_start:.1f}s",
              flush=True)
        return 0 if ok else 1
    print(f"suite finished in {time.time() - t_start:.0f}s; summary in {out}", flush=True)
    return 1 if orch.failed else 0


if __name__ == "__main__":
    sys.exit(main())
