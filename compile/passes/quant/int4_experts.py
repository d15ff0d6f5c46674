"""INT4 g128 weights of one qcn::MoE layer (routed experts and the shared expert), RTN or AWQ.

Layouts are the op's (docs/OPS.md): gate_up [E, 2I, H] (gate rows first), down [E, H, I],
shared_gate_up [2Is, H], shared_down [H, Is]; K (the reduction) is the last axis of each.
Storage (weight_format "int4", compile/plugins/moe/quant.py's numbers): q int8 [..., R, K] in
[-8, 7] (ONNX INT4 initializers in the graph) and scales [..., R, ceil(K/128)] in the
activation dtype; W[..., r, k] ~= q[..., r, k] * scale[..., r, k // 128].

AWQ here (what is exact without new ops): the down projection of every expert (and of the
shared expert) gets per-input-channel scales s [I] searched on its calibration inputs
h = silu(gate x) * up x, and 1/s is folded into the up rows of the same expert's gate_up
(h is linear in up x, so down(h) is unchanged in float). gate_up itself is RTN: its input x
is shared by the router, the shared-expert gate and all experts, so a per-expert s has no
exact place to go (documented in docs/QUANTIZATION.md).

Statistics: every calibration token is sent through every expert (statistics only: the routed
output is not changed), so every expert's down projection has an input Gram matrix. An expert
that the router sent fewer than ``min_tokens`` calibration tokens keeps RTN (its statistics
describe inputs it does not see in use), with a warning that names it. Each expert's AWQ
result is then checked as a whole (gate_up with the folded 1/s and down, both INT4) on up to
``SAMPLE`` kept calibration rows against RTN; it is kept only if its output error is lower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...plugins.moe.quant import quantize_int4_groupwise, unpack_int4
from ...plugins.moe.reference import route_reference
from .awq import AwqStats, awq_search
from .int4 import GROUP

log = logging.getLogger(__name__)

MIN_TOKENS = 16   # routed calibration tokens an expert needs for AWQ (else RTN, with a warning)
SAMPLE = 2048     # calibration rows of x kept to check each expert's AWQ result against RTN
MATRICES = ("gate_up", "down", "shared_gate_up", "shared_down")


@dataclass
class MoeWeights:
    router: torch.Tensor          # [E, H]
    gate_up: torch.Tensor         # [E, 2I, H]
    down: torch.Tensor            # [E, H, I]
    shared_gate_up: torch.Tensor  # [2Is, H]
    shared_down: torch.Tensor     # [H, Is]
    top_k: int
    norm_topk_prob: bool


class MoeStats:
    """Calibration statistics of one MoE layer, fed batches of its input x [N, H]."""

    def __init__(self, w: MoeWeights):
        self.w = w
        e, i2, _ = w.gate_up.shape
        self.down = [AwqStats(i2 // 2) for _ in range(e)]
        self.shared_down = AwqStats(w.shared_gate_up.shape[0] // 2)
        self.routed = torch.zeros(e, dtype=torch.int64)
        self.sample: list[torch.Tensor] = []
        self._kept = 0

    def add(self, x: torch.Tensor) -> None:
        w = self.w
        x = x.reshape(-1, x.shape[-1]).float()
        if self._kept < SAMPLE:
            self.sample.append(x[:SAMPLE - self._kept].clone())
            self._kept += self.sample[-1].shape[0]
        _, ids = route_reference(x, w.router.float(), w.top_k, w.norm_topk_prob, compute_dtype=torch.float32)
        self.routed += torch.bincount(ids.reshape(-1), minlength=self.routed.numel())
        gu = torch.einsum("nh,erh->ern", x, w.gate_up.float())       # every token through every expert
        inter = gu.shape[1] // 2
        h = F.silu(gu[:, :inter]) * gu[:, inter:]                     # [E, I, N]
        for e, st in enumerate(self.down):
            st.add(h[e].T)
        sgu = x @ w.shared_gate_up.float().T
        si = sgu.shape[1] // 2
        self.shared_down.add(F.silu(sgu[:, :si]) * sgu[:, si:])


@dataclass
class MoeInt4:
    """INT4 storage of one layer: name -> (q int8 [.., R, K], scale [.., R, G]), plus the report."""

    q: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def dequantized(self, name: str) -> torch.Tensor:
        k = self.q[name].shape[-1]
        return self.q[name].float() * self.scale[name].float().repeat_interleave(GROUP, dim=-1)[..., :k]


def _rk(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., R, K] -> (q int8 [.., R, K], scale [.., R, G]) RTN."""
    packed, s = quantize_int4_groupwise(w.float(), GROUP, scale_dtype=scale_dtype)
    return unpack_int4(packed, w.shape[-1]), s


def _mlp(x, gate_up, down):
    inter = gate_up.shape[0] // 2
    return (F.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T)) @ down.T


def _rt(w: torch.Tensor, scale_dtype) -> torch.Tensor:
    """The INT4 round trip of w [.., R, K]."""
    q, s = _rk(w, scale_dtype)
    return q.float() * s.float().repeat_interleave(GROUP, dim=-1)[..., :w.shape[-1]]


def _expert_mse(x, gate_up, down, s, scale_dtype) -> tuple[float, float]:
    """The expert's output MSE on x with RTN and with AWQ scale s on down (1/s in the up rows)."""
    ref = _mlp(x, gate_up, down)
    inter = gate_up.shape[0] // 2
    gu = gate_up.clone()
    gu[inter:] = gu[inter:] / s[:, None]
    rtn = float((_mlp(x, _rt(gate_up, scale_dtype), _rt(down, scale_dtype)) - ref).pow(2).mean())
    awq = float((_mlp(x, _rt(gu, scale_dtype), _rt(down * s[None, :], scale_dtype)) - ref).pow(2).mean())
    return rtn, awq


def _awq_down(down: torch.Tensor, stats: AwqStats, scale_dtype) -> tuple[torch.Tensor, dict]:
    """down [H, I] (rows out, K = I) -> (s [I] or None, report row)."""
    res = awq_search(stats, {"down": down.float().T}, scale_dtype=scale_dtype)
    return (res.scale if res.alpha > 0 else None), {"alpha": res.alpha, "calib_mse_rtn": res.err_rtn["down"],
                                                    "calib_mse_awq": res.err_awq["down"]}


def quantize_moe(name: str, w: MoeWeights, method: str, stats: MoeStats | None, scale_dtype: torch.dtype,
                 min_tokens: int = MIN_TOKENS) -> MoeInt4:
    """INT4 weights of the layer ``name`` (RTN, or AWQ on the down projections with ``stats``)."""
    gate_up, down = w.gate_up.float().clone(), w.down.float().clone()
    sgu, sdown = w.shared_gate_up.float().clone(), w.shared_down.float().clone()
    out = MoeInt4(report={"layer": name, "method": method, "experts": []})
    if method == "awq":
        if stats is None:
            raise ValueError(f"{name}: AWQ needs calibration statistics")
        inter = gate_up.shape[1] // 2
        xs = torch.cat(stats.sample) if stats.sample else torch.zeros(0, gate_up.shape[-1])
        few = [e for e in range(gate_up.shape[0]) if int(stats.routed[e]) < min_tokens]
        if few:
            log.warning("%s: experts %s saw fewer than %d routed calibration tokens (%s); they use RTN",
                        name, few, min_tokens, [int(stats.routed[e]) for e in few])
        for e in range(gate_up.shape[0]):
            row = {"expert": e, "routed_tokens": int(stats.routed[e])}
            if e in few:
                row.update(method="rtn", why=f"fewer than {min_tokens} routed calibration tokens")
            else:
                s, info = _awq_down(down[e], stats.down[e], scale_dtype)
                if s is not None:   # the whole expert (gate_up with 1/s folded, down), on the kept rows
                    info["expert_mse_rtn"], info["expert_mse_awq"] = _expert_mse(xs, gate_up[e], down[e], s, scale_dtype)
                    if info["expert_mse_awq"] > info["expert_mse_rtn"]:
                        s, info["why"] = None, "AWQ did not lower the expert's calibration output error"
                row.update(method="awq" if s is not None else "rtn", **info)
                if s is not None:
                    down[e] = down[e] * s[None, :]
                    gate_up[e, inter:] = gate_up[e, inter:] / s[:, None]
            out.report["experts"].append(row)
        s, info = _awq_down(sdown, stats.shared_down, scale_dtype)
        if s is not None:
            info["expert_mse_rtn"], info["expert_mse_awq"] = _expert_mse(xs, sgu, sdown, s, scale_dtype)
            if info["expert_mse_awq"] > info["expert_mse_rtn"]:
                s, info["why"] = None, "AWQ did not lower the shared expert's calibration output error"
        if s is not None:
            si = sgu.shape[0] // 2
            sdown = sdown * s[None, :]
            sgu[si:] = sgu[si:] / s[:, None]
        out.report["shared_down"] = {"method": "awq" if s is not None else "rtn", **info}
        out.report["fallback_rtn"] = few
    for key, m in (("gate_up", gate_up), ("down", down), ("shared_gate_up", sgu), ("shared_down", sdown)):
        out.q[key], out.scale[key] = _rk(m, scale_dtype)
    return out


__all__ = ["MIN_TOKENS", "MATRICES", "MoeWeights", "MoeStats", "MoeInt4", "quantize_moe"]
