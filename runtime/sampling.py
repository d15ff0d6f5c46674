"""Token sampling, pure numpy.

Order (as in transformers' warpers): temperature -> top-k -> top-p -> sample.

- temperature 0 means greedy (argmax; ties go to the lowest token id).
- top-k keeps the k highest logits (0 = off). Ties at the boundary are broken by token id
  (lowest id first), so exactly k tokens survive.
- top-p (nucleus) sorts the surviving probabilities in descending order and keeps the smallest
  prefix whose mass is >= top_p (always at least one token); top_p = 1 keeps everything.
- The kept probabilities are renormalised and one token is drawn by inverse CDF with one
  uniform number from the sequence's own ``numpy.random.Generator``.

Seeding is per sequence: every sequence with ``seed=s`` gets ``numpy.random.default_rng(s)``,
so the same seed gives the same tokens whether the sequence runs alone or in a batch. Give
sequences distinct seeds (a list of SamplingParams) to make identical prompts differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from .errors import SamplingParamsError

__all__ = [
    "SamplingParams",
    "Sampler",
    "candidate_mask",
    "distribution",
    "filter_logits",
    "sample_token",
    "params_per_sequence",
    "DEFAULT_MAX_NEW_TOKENS",
]

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Class defaults are the model card's
    (temperature 1.0, top-p 0.95, top-k 40); :meth:`from_manifest` takes the artifact's."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        # normalise sequences to tuples so the dataclass stays immutable/hashable
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t < 0:
            raise SamplingParamsError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise SamplingParamsError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise SamplingParamsError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            raise SamplingParamsError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise SamplingParamsError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError(f"stop strings must be non-empty strings, got {s!r}")
        for i in self.stop_token_ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
                raise SamplingParamsError(f"stop_token_ids must be non-negative token ids, got {i!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_manifest(cls, manifest, **overrides) -> "SamplingParams":
        """The manifest's ``generation`` defaults, with keyword overrides (None = keep default)."""
        g = manifest.generation
        base = dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def _check_row(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise SamplingParamsError(f"expected a 1-D logits row, got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def _kept_sorted(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) that survive top-k and top-p, in descending order."""
    z = _check_row(logits) / temperature
    v = z.size
    if 0 < top_k < v:
        # O(V) partition, then sort only the candidates; ties at the k-th value resolved by id
        kth = np.partition(z, v - top_k)[v - top_k]
        cand = np.flatnonzero(z >= kth)
        order = cand[np.lexsort((cand, -z[cand]))][:top_k]
    else:
        order = np.lexsort((np.arange(v), -z))
    zs = z[order]
    zs = zs - zs[0]
    probs = np.exp(zs)
    probs /= probs.sum()
    if top_p < 1.0:
        cum = np.cumsum(probs)
        n_keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, probs.size)
        order, probs = order[:n_keep], probs[:n_keep]
        probs = probs / probs.sum()
    return order, probs


def candidate_mask(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Boolean mask [V] of tokens that may be sampled (after temperature, top-k, top-p).
    With temperature 0 only the argmax survives."""
    x = _check_row(logits)
    mask = np.zeros(x.size, dtype=bool)
    if temperature == 0:
        mask[int(np.argmax(x))] = True
        return mask
    order, _ = _kept_sorted(x, temperature, top_k, top_p)
    mask[order] = True
    return mask


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Logits / temperature with every filtered-out token set to -inf (float64)."""
    x = _check_row(logits)
    if params.greedy:
        out = np.full(x.size, -np.inf)
        i = int(np.argmax(x))
        out[i] = x[i]
        return out
    mask = candidate_mask(x, params.temperature, params.top_k, params.top_p)
    return np.where(mask, x / params.temperature, -np.inf)


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities [V] (float64) ``sample_token`` draws from: after temperature, top-k and
    top-p, renormalised; greedy is one-hot at the argmax. Speculative rejection sampling
    compares the target's and the draft head's (qcn.runtime.speculative)."""
    x = _check_row(logits)
    out = np.zeros(x.size)
    if params.greedy:
        out[int(np.argmax(x))] = 1.0
        return out
    order, probs = _kept_sorted(x, params.temperature, params.top_k, params.top_p)
    out[order] = probs
    return out


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """Pick one token id from a logits row [V]."""
    if params.greedy:
        return int(np.argmax(_check_row(logits)))
    if rng is None:
        raise SamplingParamsError("sampling with temperature > 0 needs a numpy Generator")
    order, probs = _kept_sorted(logits, params.temperature, params.top_k, params.top_p)
    if order.size == 1:
        rng.random()  # keep the stream position independent of how many tokens survived
        return int(order[0])
    u = rng.random()
    cum = np.cumsum(probs)
    i = min(int(np.searchsorted(cum, u * cum[-1], side="right")), order.size - 1)
    return int(order[i])


@dataclass
class Sampler:
    """One sequence's sampler: its params plus its own random generator."""

    params: SamplingParams
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        return sample_token(logits, self.params, self.rng)


def params_per_sequence(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise SamplingParamsError(f"got {len(plist)} SamplingParams for {n} prompts; pass one, or one per prompt")
    for p in plist:
        if not isinstance(p, SamplingParams):
            raise SamplingParamsError(f"expected SamplingParams, got {type(p).__name__}")
    return plist
