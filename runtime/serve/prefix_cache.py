"""Exact multi-turn state reuse: sequence states kept by the token prefix they cover.

An agent resends the whole conversation every turn. The scheduler keeps the state of a slot
(recurrent + conv states and the KV prefix, as a ``Session.snapshot``) at the end of each
prompt and of each finished request, keyed by exactly the tokens that state has consumed. A
new request whose tokens strictly extend a kept key restores that state and prefills only the
rest. Recurrent state cannot be truncated, so only a whole key can be reused: the longest kept
key that is a prefix of the new prompt wins.

Bounded by bytes (the snapshots' ``nbytes``), least recently used first out. Used only by the
scheduler thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Sequence

__all__ = ["PrefixCache"]

log = logging.getLogger(__name__)


class PrefixCache:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens) -> bool:
        return tuple(tokens) in self._entries

    def lookup(self, ids: Sequence[int]):
        """The snapshot of the longest kept key that is a strict prefix of ``ids`` (None if none)."""
        ids = tuple(ids)
        best = None
        for key in self._entries:
            if len(key) < len(ids) and (best is None or len(key) > len(best)) and ids[: len(key)] == key:
                best = key
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best)
        return self._entries[best]

    def put(self, tokens: Sequence[int], make_snapshot: Callable[[], object]) -> None:
        """Keep the state covering ``tokens`` (``make_snapshot`` is called only if it is new)."""
        key = tuple(int(t) for t in tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        snap = make_snapshot()
        size = int(snap.nbytes)
        if size > self.capacity_bytes:
            log.debug("state of %d tokens (%d bytes) exceeds the prefix cache (%d bytes); not kept", len(key), size, self.capacity_bytes)
            return
        self._entries[key] = snap
        self.nbytes += size
        while self.nbytes > self.capacity_bytes:
            old, s = self._entries.popitem(last=False)
            self.nbytes -= int(s.nbytes)
