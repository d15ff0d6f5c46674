"""AWQ (activation-aware weight quantization, Lin et al. 2023) for INT4 g128 weights.

For one group of projections that read the same input x [T, K] (q/k/v of one attention; a
DeltaNet's in_proj_qkvz + in_proj_ba; one expert's down projection), search per-input-channel
scales s [K] = mean|x|^alpha / sqrt(max * min), alpha on a grid in [0, 1], minimising the
group's calibration output error

    err(s) = mean_t,n ( x W - (x / s) Q(diag(s) W) )^2        (Q: the INT4 g128 round trip)

computed exactly from the Gram matrix of x (:class:`AwqStats`: bounded memory, every
calibration token counts).

alpha = 0 is s = 1, i.e. RTN itself; an alpha is eligible only if no projection of the group
gets a larger calibration error than with RTN, so AWQ never makes a layer worse on the
calibration set (the report shows both errors per weight; the tests check it per layer). The 1/s goes
into the op producing x where that is exact (the norm weight; an expert's up rows), else an
explicit Mul (:mod:`.int4_projection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int4 import GROUP, Int4Weight, fake_quantize_kn, quantize_kn

GRID = 20          # alpha in {0, 1/20, ..., 1}


class AwqStats:
    """Calibration statistics of one input x [.., K] in bounded memory: the Gram matrix
    sum_t x_t x_t^T [K, K] (fp64), sum_t |x_t| [K] and the token count. The output error of any
    weight W_eff against W is tr(D^T G D) / T with D = W - W_eff: exact, without keeping x."""

    def __init__(self, k: int):
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """x [.., K]; ``weight`` [..] per-row weights (e.g. 0/1: routed to this expert)."""
        x = x.reshape(-1, x.shape[-1]).double()
        if weight is not None:
            w = weight.reshape(-1).double()
            keep = w > 0
            x, w = x[keep], w[keep]
            self.gram += (x * w[:, None]).T @ x
            self.abs_sum += (x.abs() * w[:, None]).sum(0)
            self.count += int(keep.sum())
        else:
            self.gram += x.T @ x
            self.abs_sum += x.abs().sum(0)
            self.count += x.shape[0]

    @classmethod
    def of(cls, x: torch.Tensor) -> "AwqStats":
        st = cls(x.shape[-1])
        st.add(x)
        return st

    def mse(self, d: torch.Tensor) -> torch.Tensor:
        """Per output column: mean_t ((x_t D)[n])^2 for D [K, N]."""
        d = d.double()
        return (d * (self.gram @ d)).sum(0) / max(self.count, 1)


@dataclass
class AwqResult:
    scale: torch.Tensor              # s [K] (all ones when alpha == 0)
    alpha: float
    err_rtn: dict[str, float]        # per weight: calibration output MSE with RTN
    err_awq: dict[str, float]        # per weight: with the chosen s (== err_rtn when alpha == 0)
    weights: dict[str, Int4Weight]   # per weight: the INT4 storage of diag(s) W


def _errors(stats, d, widths):
    per_col = stats.mse(d)
    out, c = [], 0
    for n in widths:
        out.append(float(per_col[c:c + n].mean()))
        c += n
    return out, float(per_col.mean())


def awq_search(x: torch.Tensor | AwqStats, weights: dict[str, torch.Tensor], *, group: int = GROUP,
               grid: int = GRID, fold: str | None = None, scale_dtype: torch.dtype = torch.float32) -> AwqResult:
    """x: the group's calibration inputs [..., K] or their :class:`AwqStats`; weights: name -> W [K, N_i]."""
    stats = x if isinstance(x, AwqStats) else AwqStats.of(x)
    names = list(weights)
    w = torch.cat([weights[n].float() for n in names], dim=1)  # groups run along K per column: independent
    widths = [weights[n].shape[1] for n in names]
    if stats.gram.shape[0] != w.shape[0]:
        raise ValueError(f"AWQ: x has {stats.gram.shape[0]} channels, the weights {names} have K = {w.shape[0]}")
    act = (stats.abs_sum / max(stats.count, 1)).float()
    act = act.clamp(min=max(float(act.max()) * 1e-5, 1e-12))   # channels never active: no zero scales
    best = None
    rtn_errs = None
    for i in range(grid + 1):
        alpha = i / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        if alpha == 0:
            s = torch.ones_like(act)
        w_eff = fake_quantize_kn(w * s[:, None], group, scale_dtype) / s[:, None]
        errs, total = _errors(stats, w - w_eff, widths)
        if alpha == 0:
            rtn_errs = errs
        elif any(e > r for e, r in zip(errs, rtn_errs)):
            continue   # every projection of the group must be at least as good as with RTN
        if best is None or total < best[0]:
            best = (total, alpha, s, errs)
    _, alpha, s, errs = best
    out = {}
    for n in names:
        q, sc = quantize_kn(weights[n].float() * s[:, None], group, scale_dtype)
        method = "awq" if alpha > 0 else "rtn"
        out[n] = Int4Weight(n, q, sc, method, input_scale=s if alpha > 0 else None,
                            fold=fold if alpha > 0 else None, group=group)
    return AwqResult(s, alpha, dict(zip(names, rtn_errs)), dict(zip(names, errs)), out)


__all__ = ["GRID", "AwqStats", "AwqResult", "awq_search"]
