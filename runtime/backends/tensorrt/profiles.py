"""Which optimization profile a call uses and whether its shapes fit it. Pure Python."""

from __future__ import annotations

from typing import Mapping, Sequence

from ...errors import BackendError
from .engine import EngineInfo, Profile

__all__ = ["select_profile", "check_profile"]


def select_profile(info: EngineInfo, graph: str) -> Profile:
    try:
        index = info.graph_profile[graph]
    except KeyError:
        raise BackendError(f"no optimization profile for graph {graph!r}; profiles: {dict(info.graph_profile)}") from None
    return info.profiles[index]


def check_profile(profile: Profile, shapes: Mapping[str, Sequence[int]]) -> None:
    """Every bound input shape must lie inside the profile's [min, max]."""
    for name, shape in shapes.items():
        if name not in profile.shapes:
            continue  # static input
        lo, _, hi = profile.shapes[name]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise BackendError(f"{name!r} shape {list(shape)} is outside optimization profile {profile.name!r} "
                               f"(min {list(lo)}, max {list(hi)}); rebuild with a larger runtime.prefill_chunk / "
                               "max_batch / max_context or send smaller calls")
