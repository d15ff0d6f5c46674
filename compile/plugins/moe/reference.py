"""Naive PyTorch reference of qcn::MoE (docs/OPS.md), the yardstick for the Triton kernels.

Written for clarity, not speed: a per-expert loop in a chosen compute dtype (float64 by
default). Quantized weight formats are compared against this reference run on the
dequantized weights (see ``quant.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["route_reference", "moe_reference", "dequantize_fp8_blocks"]

FP8_BLOCK = 128


def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """qcn::MoE weight_format "fp8" (docs/OPS.md): q float8_e4m3fn [..., R, K], scale fp32
    [..., R, G] with G = 1 (one scale per output row) or G = ceil(K / 128) (1x128 blocks along K)
    -> float32 [..., R, K]: ``W[..., r, k] = float(q[..., r, k]) * scale[..., r, k // B]``,
    B = K when G == 1, else 128."""
    K, G = q.shape[-1], scale.shape[-1]
    B = K if G == 1 else FP8_BLOCK
    if G != -(-K // B):
        raise ValueError(f"fp8 scale has {G} blocks along K = {K}; expected 1 or {-(-K // FP8_BLOCK)}")
    return q.float() * scale.float().repeat_interleave(B, dim=-1)[..., :K]


def route_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    compute_dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of qcn::MoE.

    x [N, H], router_weight [E, H] -> (weights [N, top_k], ids [N, top_k] int64). compute_dtype
    None is the op's own precision (the torch op's, transformers'): logits in x's dtype, softmax
    and renormalisation in fp32, weights cast to x's dtype; otherwise everything in compute_dtype
    (at least fp32).
    logits = x @ router_weight^T, softmax over E (at least fp32), top-k with exact ties going to
    the lowest expert index (ONNX TopK's rule; a stable sort, because torch.topk on CPU does not
    promise it), renormalised to sum 1 when ``norm_topk_prob``.
    """
    if compute_dtype is None:
        probs = torch.softmax(x @ router_weight.T, dim=-1, dtype=torch.float32)
    else:
        cdt = compute_dtype if compute_dtype == torch.float64 else torch.float32
        probs = torch.softmax(x.to(cdt) @ router_weight.to(cdt).T, dim=-1)
    # stable descending sort: ties -> lowest expert index
    vals, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :top_k], ids[:, :top_k]
    if norm_topk_prob:
        vals = vals / vals.sum(dim=-1, keepdim=True)
    return (vals.to(x.dtype) if compute_dtype is None else vals), ids


def _mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x); gate_up [2I, H] gate rows first, down [H, I]."""
    inter = gate_up.shape[0] // 2
    g = x @ gate_up[:inter].T
    u = x @ gate_up[inter:].T
    return (F.silu(g) * u) @ down.T


def moe_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    shared_gate_up: torch.Tensor,
    shared_down: torch.Tensor,
    shared_gate: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    compute_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """y [N, H] = sum_k p_k * expert_k(x) + sigmoid(x . shared_gate) * shared_expert(x).

    x [N, H]; router_weight [E, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I];
    shared_gate_up [2Is, H]; shared_down [H, Is]; shared_gate [1, H]. All weights dense
    (dequantize first). Returns compute_dtype; None: the op's own precision (x's dtype, router
    softmax in fp32), which is what the qcn::moe torch op computes.
    """
    cdt = x.dtype if compute_dtype is None else compute_dtype
    xc = x.to(cdt)
    weights, ids = route_reference(x, router_weight, top_k, norm_topk_prob, compute_dtype)
    weights = weights.to(cdt)
    y = torch.zeros_like(xc)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        out = _mlp(xc[tok], gate_up[e].to(cdt), down[e].to(cdt))
        y.index_add_(0, tok, out * weights[tok, slot, None])
    gate = torch.sigmoid(xc @ shared_gate.to(cdt).reshape(-1, 1))
    return y + gate * _mlp(xc, shared_gate_up.to(cdt), shared_down.to(cdt))
