"""GPU memory budget of a recipe: weights + KV cache + DeltaNet state + workspace, computed from
the checkpoint's config.json, checked before any work is done.

Bytes per parameter of each precision (scales included):
  bfloat16/float16 2, float32 4, fp8 1 + one fp32 scale per 128x128 block,
  int4 0.5 + one bf16 scale per group of 128, fp4 (NVFP4) 0.5 + one fp8 scale per 16.
Embeddings, lm_head, router, norms and the DeltaNet conv/gating vectors stay in the activation
dtype (quantizing them saves little and costs accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qcn.artifact import DTYPES

from ..export.config import ModelConfig
from ..recipe import Recipe, Target

GIB = 1 << 30
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0,
                   "fp8": 1.0 + 4.0 / (128 * 128), "int4": 0.5 + 2.0 / 128, "fp4": 0.5 + 1.0 / 16}
RUNTIME_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS/cuDNN handles, allocator slack (an estimate)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by group (what `quantization.weights` / `.experts` apply to)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    n = {"embeddings+lm_head": V * H * (1 if cfg.tie_word_embeddings else 2), "dense": 0,
         "routed_experts": 0, "kept": 0}
    for i, kind in enumerate(cfg.layer_types):
        if kind == "full_attention":
            D, Hq, KVH = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
            n["dense"] += H * Hq * D * 2 + 2 * H * KVH * D + Hq * D * H  # q(+gate), k, v, o
            n["kept"] += 2 * D + (Hq * D * 2 + 2 * KVH * D + H if cfg.attention_bias else 0)
        else:
            n["dense"] += H * (2 * cfg.key_dim + 2 * cfg.value_dim) + H * 2 * cfg.linear_num_value_heads
            n["dense"] += cfg.value_dim * H  # out_proj
            n["kept"] += cfg.conv_dim * cfg.linear_conv_kernel_dim + 2 * cfg.linear_num_value_heads
            n["kept"] += cfg.linear_value_head_dim
        if cfg.is_moe_layer(i):
            E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
            n["routed_experts"] += E * 3 * I * H
            n["dense"] += 3 * Is * H
            n["kept"] += E * H + H  # router, shared-expert gate
        else:
            n["dense"] += 3 * cfg.intermediate_size * H
        n["kept"] += 2 * H  # the two RMSNorms
    n["kept"] += H  # final norm
    return n


@dataclass(frozen=True)
class BudgetLine:
    item: str
    gib: float
    detail: str


@dataclass(frozen=True)
class Budget:
    target: str
    available_gib: float
    lines: tuple[BudgetLine, ...]

    @property
    def total_gib(self) -> float:
        return sum(line.gib for line in self.lines)

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.available_gib

    def table(self) -> str:
        w = max(len(line.item) for line in self.lines)
        rows = [f"memory budget for one {self.target} GPU ({self.available_gib:.1f} GiB usable):"]
        rows += [f"  {line.item:<{w}}  {line.gib:9.2f} GiB  {line.detail}" for line in self.lines]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"  {'total':<{w}}  {self.total_gib:9.2f} GiB  {verdict} "
                    f"({self.available_gib - self.total_gib:+.2f} GiB headroom)")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"target": self.target, "available_gib": round(self.available_gib, 3),
                "total_gib": round(self.total_gib, 3), "fits": self.fits,
                "lines": [{"item": x.item, "gib": round(x.gib, 4), "detail": x.detail} for x in self.lines]}


def _prec(value: str, act: str) -> str:
    return act if value == "none" else value


def compute_budget(recipe: Recipe, cfg: ModelConfig, target: Target | None = None) -> Budget:
    target = target or recipe.target_info
    act = recipe.export.activation_dtype
    q, rt = recipe.quantization, recipe.runtime
    counts = param_counts(cfg)
    dense_p, expert_p = _prec(q.weights, act), _prec(q.experts, act)
    kv_bytes = 1 if q.kv_cache == "fp8" else DTYPES[act].itemsize
    n_attn = cfg.layer_types.count("full_attention")
    n_lin = cfg.layer_types.count("linear_attention")
    kv_per_token = n_attn * 2 * cfg.num_key_value_heads * cfg.head_dim * kv_bytes
    state_per_slot = n_lin * (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
                              + cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * DTYPES[act].itemsize)
    emb = counts["embeddings+lm_head"] + counts["kept"]
    lines = (
        BudgetLine("routed experts", counts["routed_experts"] * BYTES_PER_PARAM[expert_p] / GIB,
                   f"{counts['routed_experts'] / 1e9:.2f}B params in {expert_p}"),
        BudgetLine("dense weights", counts["dense"] * BYTES_PER_PARAM[dense_p] / GIB,
                   f"{counts['dense'] / 1e9:.2f}B params (attention, DeltaNet, shared experts) in {dense_p}"),
        BudgetLine("embeddings, lm_head, router, norms", emb * BYTES_PER_PARAM[act] / GIB,
                   f"{emb / 1e9:.2f}B params in {act}"),
        BudgetLine("KV cache", kv_per_token * rt.max_context * rt.max_batch / GIB,
                   f"{n_attn} layers x K,V x {cfg.num_key_value_heads} heads x {cfg.head_dim} x {kv_bytes} B = "
                   f"{kv_per_token} B/token x {rt.max_context} tokens x {rt.max_batch} slots"),
        BudgetLine("DeltaNet state (x2, ping-pong)", 2 * state_per_slot * rt.max_batch / GIB,
                   f"{n_lin} layers x (fp32 {cfg.linear_num_value_heads}x{cfg.linear_key_head_dim}x"
                   f"{cfg.linear_value_head_dim} + conv {cfg.conv_dim}x{cfg.linear_conv_kernel_dim - 1}) = "
                   f"{state_per_slot / 2**20:.2f} MiB/slot x {rt.max_batch} slots"),
        BudgetLine("TensorRT workspace", recipe.build.workspace_gib, "build.workspace_gib (activations, tactics)"),
        BudgetLine("runtime overhead", RUNTIME_OVERHEAD_GIB, "CUDA context, library handles, slack (estimate)"),
    )
    return Budget(target.name, (target.memory_gib or 0.0) - target.reserved_gib, lines)


def fixes(recipe: Recipe, cfg: ModelConfig) -> list[str]:
    """Ways to make a recipe that does not fit fit, cheapest first: fewer slots or a shorter
    context (free), an FP8 KV cache (little accuracy), INT4 experts (some accuracy), more GPUs
    (money; qcn builds for one GPU today)."""
    out: list[str] = []
    rt = recipe.runtime

    def fits(**runtime) -> bool:
        r = replace(recipe, runtime=replace(rt, **runtime))
        return compute_budget(r, cfg).fits

    if rt.max_batch > 1:
        best = max((b for b in range(1, rt.max_batch) if fits(max_batch=b)), default=None)
        if best:
            out.append(f"fewer slots: runtime.max_batch: {best} (keeps max_context {rt.max_context})")
    lo, hi = max(rt.prefill_chunk, 4096), rt.max_context - 1
    if lo <= hi and fits(max_context=lo):
        while lo < hi:  # largest context that fits, to a multiple of 1024
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(max_context=mid) else (lo, mid - 1)
        ctx = lo // 1024 * 1024 or lo
        out.append(f"shorter context: runtime.max_context: {ctx} (keeps max_batch {rt.max_batch})")
    q = recipe.quantization
    if q.kv_cache != "fp8" and "fp8" in recipe.target_info.precisions:
        r = replace(recipe, quantization=replace(q, kv_cache="fp8"))
        if compute_budget(r, cfg).fits:
            out.append("FP8 KV cache: quantization.kv_cache: fp8 (half of a 16-bit cache; calibrated, gated)")
    if q.experts not in ("int4", "fp4") and "int4" in recipe.target_info.precisions:
        r = replace(recipe, quantization=replace(q, experts="int4"))
        if compute_budget(r, cfg).fits:
            out.append("INT4 experts: quantization.experts: int4")
    b = compute_budget(recipe, cfg)
    weights = sum(x.gib for x in b.lines[:3])
    rest = b.total_gib - weights
    if b.available_gib > rest:
        gpus = max(2, math.ceil(weights / (b.available_gib - rest)))
        out.append(f"more GPUs: {gpus} x {recipe.target} with the weights split across them "
                   "(qcn has no multi-GPU build yet)")
    return out
