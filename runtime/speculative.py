"""MTP speculative decoding over a :class:`Session` (docs/MTP.md).

One cycle for the live sequences, each with its last token ``x`` not yet consumed and N drafts
``d1..dN`` from the MTP head:

1. **verify**: the target model scores ``[x, d1..dN]`` in one T = N+1 call of the verify graph
   (every token's logits, post-norm hidden states, and the GatedDeltaNet/conv states after every
   token); nothing is committed yet.
2. **accept**: greedy keeps ``d_i`` while it equals the target's argmax after ``d_{i-1}``;
   sampling uses standard speculative rejection sampling (accept ``d_i`` with probability
   ``min(1, p(d_i)/q(d_i))``, else draw from ``norm(max(p - q, 0))`` and stop; after N
   accepts draw a bonus token from the last p), p and q being the target's and the head's
   distributions after the request's temperature / top-k / top-p. Each sequence accepts its
   own count a in 0..N and gets a + 1 new tokens.
3. **commit**: the sequence's carried states become the verify graph's states after token a
   (exact: the same recurrence steps as plain decoding, no replay), past_len advances by a+1;
   K/V written for rejected drafts lie beyond past_len, ignored and later overwritten.
4. **draft**: the MTP head consumes the a+1 new (hidden state, next token) pairs (one call,
   rows padded to the longest, each row's logits taken at its own ``last_index``) and drafts
   d1; d2..dN come from N-1 more one-token calls fed the head's own output hidden state.

Greedy output is token-for-token what plain decoding gives (tests/test_speculative.py); the
first token after the prompt comes from the prefill as in plain decoding.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import SlotError
from .sampling import SamplingParams, distribution

__all__ = ["MtpDrafter", "SpeculativeStats", "accept_drafts", "run_speculative"]

log = logging.getLogger(__name__)


@dataclass
class SpeculativeStats:
    """Counts of one generate() call with speculation (summed over its sequences)."""

    draft_tokens: int
    target_calls: int = 0  # verify calls x sequences in them
    generated: int = 0  # tokens the verify calls added to the sequences (accepted drafts + one per call)
    proposed: list[int] = field(default_factory=list)  # per draft position: drafts scored
    accepted: list[int] = field(default_factory=list)  # per draft position: drafts accepted
    accept_counts: dict[int, int] = field(default_factory=dict)  # a -> sequence-calls that accepted a drafts
    mixed_calls: int = 0  # verify calls whose sequences accepted different counts

    def __post_init__(self):
        self.proposed = self.proposed or [0] * self.draft_tokens
        self.accepted = self.accepted or [0] * self.draft_tokens

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / max(1, sum(self.proposed))

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_target_call(self) -> float:
        return self.generated / max(1, self.target_calls)

    def summary(self) -> str:
        per = ", ".join(f"{r:.2f}" for r in self.acceptance_per_position)
        return (f"speculative N={self.draft_tokens}: acceptance {self.acceptance_rate:.3f} (per position {per}), "
                f"{self.tokens_per_target_call:.2f} tokens per target call ({self.generated} tokens, "
                f"{self.target_calls} sequence-calls)")


class MtpDrafter:
    """The MTP head's own KV cache for every slot of a Session, and its committed length.

    Its past_len equals the target's after every cycle (one MTP pair per consumed target token)."""

    def __init__(self, session):
        m = session.manifest
        spec = session._speculative()
        view = dataclasses.replace(m, state=spec.state, graphs={"mtp": m.graph("mtp")})
        self.session = session
        self.store = session.backend.create_state(slots=session.max_batch, max_context=session.max_context,
                                                  manifest=view)
        self.past_len = np.zeros(session.max_batch, dtype=np.int64)
        self.hidden_size = m.model.hidden_size

    def run(self, slots: list[int], ids: np.ndarray, hidden: np.ndarray, last_index: np.ndarray, past_len: np.ndarray):
        """One mtp call: ids [B, T], hidden [B, T, H], last_index [B] -> (logits [B, V], hidden_out [B, H])."""
        logits, out = self.store.step_with(
            "mtp", slots, ids, past_len,
            inputs={"hidden": np.ascontiguousarray(hidden, dtype=np.float32),
                    "last_index": np.asarray(last_index, dtype=np.int64)},
            outputs=("hidden_out",))
        return logits, out["hidden_out"]

    def consume(self, slots: list[int], ids: list[np.ndarray], hidden: list[np.ndarray]):
        """Commit one pair per token for each slot (``ids[j]`` [n_j], ``hidden[j]`` [n_j, H]);
        rows are padded to the longest: the padding's K/V lands past the committed length.
        Returns the head's (logits [B, V], hidden_out [B, H]) at each row's last real pair."""
        T = max(len(x) for x in ids)
        B = len(slots)
        pad_ids = np.zeros((B, T), dtype=np.int64)
        pad_h = np.zeros((B, T, self.hidden_size), dtype=np.float32)
        for j, (x, h) in enumerate(zip(ids, hidden)):
            pad_ids[j, : len(x)] = x
            pad_h[j, : len(x)] = h
        last = np.asarray([len(x) - 1 for x in ids], dtype=np.int64)
        out = self.run(slots, pad_ids, pad_h, last, self.past_len[slots].copy())
        self.past_len[slots] += last + 1
        return out

    def close(self) -> None:
        self.store.close()


def accept_drafts(target_logits: np.ndarray, drafts: list[int], draft_probs: list[np.ndarray] | None,
                  params: SamplingParams, rng: np.random.Generator) -> tuple[int, int]:
    """Accept a prefix of ``drafts`` against ``target_logits`` [N+1, V]; returns (accepted
    count a, the token after them). Greedy (``draft_probs`` None): d_i is kept while it equals
    the target's argmax; the next token is the argmax after the last kept one. Sampling:
    standard speculative rejection sampling with the draft distributions ``draft_probs``
    (each [V], the distribution d_i was drawn from); the output follows the target's
    distribution exactly."""
    if params.greedy:
        for i, d in enumerate(drafts):
            best = int(np.argmax(target_logits[i]))
            if best != d:
                return i, best
        return len(drafts), int(np.argmax(target_logits[len(drafts)]))
    for i, d in enumerate(drafts):
        p = distribution(target_logits[i], params)
        q = draft_probs[i]
        if rng.random() * q[d] < p[d]:  # u < p/q without dividing (q[d] > 0: d was drawn from q)
            continue
        resid = np.maximum(p - q, 0.0)
        total = resid.sum()
        if total <= 0:  # p == q: rejection has probability 0; keep the stream well defined
            resid, total = p, p.sum()
        return i, _draw(resid / total, rng)
    return len(drafts), _draw(distribution(target_logits[len(drafts)], params), rng)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cum = np.cumsum(probs)
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), probs.size - 1))


def _propose(logits_row: np.ndarray, params: SamplingParams, rng) -> tuple[int, np.ndarray | None]:
    if params.greedy:
        return int(np.argmax(logits_row)), None
    q = distribution(logits_row, params)
    return _draw(q, rng), q


def run_speculative(session, seqs, n: int, drafter: MtpDrafter) -> SpeculativeStats:
    """Prefill every sequence of ``seqs`` (generate's book-keeping objects with ``handle``,
    ``prompt_ids``, ``params``, ``sampler``, ``accept(token)``, ``done``) and decode them to the
    end with drafts of ``n`` tokens."""
    if n < 1:
        raise SlotError(f"speculative decoding needs draft_tokens >= 1, got {n}")
    stats = SpeculativeStats(draft_tokens=n)
    H = drafter.hidden_size
    drafts: dict[int, list[tuple[int, np.ndarray | None]]] = {}
    for s in seqs:
        slot = session._check(s.handle)
        drafter.past_len[slot] = session.past_len(s.handle)
        logits, pending = None, np.zeros((0, H), dtype=np.float32)
        ids = list(s.prompt_ids)
        pos = 0  # prompt index of pending[0]
        for logits, hid in session.prefill_hidden(s.handle, s.prompt_ids):
            pairs = np.concatenate([pending, hid])  # hidden states of prompt positions pos, pos+1, ...
            k = min(len(pairs), len(ids) - 1 - pos)  # pair t needs token t+1 of the prompt
            if k > 0:
                drafter.consume([slot], [np.asarray(ids[pos + 1: pos + 1 + k])], [pairs[:k]])
            pending, pos = pairs[k:], pos + k
        first = s.sampler(logits)
        s.accept(first)
        if s.done:
            continue
        lg, g = drafter.consume([slot], [np.asarray([first])], [pending])  # the last prompt pair
        drafts[slot] = _chain(session, drafter, [slot], [s], lg, g, n)[0]

    while True:
        live = [s for s in seqs if not s.done]
        if not live:
            return stats
        slots = [session._check(s.handle) for s in live]
        room = min(session.max_context - session.past_len(s.handle) - 1 for s in live)
        k = max(0, min(n, room, *(len(drafts[sl]) for sl in slots)))
        toks = np.asarray([[s.token_ids[-1]] + [d for d, _ in drafts[sl][:k]] for s, sl in zip(live, slots)])
        logits, hidden, per_token = session.verify([s.handle for s in live], toks)
        new_ids, new_h, keep, counts = [], [], [], set()
        for j, (s, sl) in enumerate(zip(live, slots)):
            d = drafts[sl][:k]
            a, nxt = accept_drafts(logits[j], [t for t, _ in d], None if s.params.greedy else [q for _, q in d],
                                   s.params, s.sampler.rng)
            for i in range(k):
                stats.proposed[i] += 1
                stats.accepted[i] += i < a
            stats.target_calls += 1
            stats.accept_counts[a] = stats.accept_counts.get(a, 0) + 1
            counts.add(a)
            session.commit(s.handle, {name: arr[j] for name, arr in per_token.items()}, a)
            emitted = [t for t, _ in d[:a]] + [nxt]
            for t in emitted:
                s.accept(t)
                stats.generated += 1
                if s.done:
                    break
            if not s.done:
                keep.append(j)
                new_ids.append(np.asarray(emitted))
                new_h.append(hidden[j, : a + 1])
        stats.mixed_calls += len(counts) > 1
        if keep:
            ks = [slots[j] for j in keep]
            lg, g = drafter.consume(ks, new_ids, new_h)
            for sl, row in zip(ks, _chain(session, drafter, ks, [live[j] for j in keep], lg, g, n)):
                drafts[sl] = row


def _chain(session, drafter: MtpDrafter, slots, seqs, logits, g, n):
    """Drafts d1..dn per slot from the head's logits after the committed pairs (d1) and n-1
    one-token calls fed back its own hidden state at the next positions."""
    rows = [[_propose(logits[j], s.params, s.sampler.rng)] for j, s in enumerate(seqs)]
    for step in range(1, n):
        ids = np.asarray([[r[-1][0]] for r in rows])
        past = drafter.past_len[slots] + (step - 1)
        if int(past.max()) + 1 > session.max_context:
            break
        logits, g = drafter.run(slots, ids, g[:, None, :], np.zeros(len(slots), dtype=np.int64), past)
        for j, s in enumerate(seqs):
            rows[j].append(_propose(logits[j], s.params, s.sampler.rng))
    return rows
