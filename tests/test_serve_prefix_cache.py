"""PrefixCache: longest strict prefix wins, LRU eviction by bytes, nothing too big is kept."""

from __future__ import annotations

from dataclasses import dataclass

from qcn.runtime.serve.prefix_cache import PrefixCache


@dataclass(frozen=True)
class Snap:
    tokens: int
    nbytes: int


def put(cache, ids, nbytes=10):
    made = []
    cache.put(ids, lambda: made.append(1) or Snap(len(ids), nbytes))
    return bool(made)


def test_longest_strict_prefix_wins():
    c = PrefixCache(100)
    put(c, [1, 2])
    put(c, [1, 2, 3, 4])
    put(c, [1, 9])
    assert c.lookup([1, 2, 3, 4, 5]).tokens == 4
    assert c.lookup([1, 2, 3, 4]).tokens == 2  # a key equal to the prompt leaves nothing to prefill
    assert c.lookup([1, 2, 3]).tokens == 2
    assert c.lookup([1, 3]) is None and c.lookup([2, 1, 2]) is None
    assert (c.hits, c.misses) == (3, 2)


def test_lru_eviction_by_bytes_and_no_duplicate_snapshots():
    c = PrefixCache(25)
    assert put(c, [1]) and put(c, [2])
    assert not put(c, [1])  # already kept: no second snapshot, but it is now the most recent
    assert put(c, [3])  # 30 bytes > 25: the least recently used ([2]) goes
    assert [1] in c and [3] in c and [2] not in c and c.nbytes == 20
    c.lookup([1, 5])  # a hit refreshes [1]
    put(c, [4])
    assert [1] in c and [3] not in c and len(c) == 2
    assert put(c, [5], nbytes=26) and [5] not in c and c.nbytes == 20  # larger than the whole cache: not kept
