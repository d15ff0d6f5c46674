"""Continuous batching: one thread owns the :class:`~qcn.runtime.session.Session`.

Every iteration of the loop

1. drops cancelled requests (their slot is released at once),
2. admits waiting requests into free slots (restoring a kept prefix state when one matches),
3. prefills at most ``runtime.prefill_chunk`` tokens: the next chunk of the oldest request
   still prefilling, or several short prompts whole, so a long prompt never stalls the
   running streams for more than one chunk,
4. runs ONE batched decode step over every sequence that has its first token.

Sampling, stop strings, EOS handling and incremental detokenization are the runtime's own
(:class:`qcn.runtime.generate` sequence book-keeping over :mod:`qcn.runtime.sampling` and
:class:`qcn.runtime.tokenizer.IncrementalDecoder`), so a request served here decodes exactly as
``generate()`` / ``qcn-run`` would: the prompt is prefilled from position 0 in the same chunks,
then one token per decode call.

Requests talk to the outside world only through their ``sink`` (called on the scheduler
thread with :class:`Event` values); the HTTP layer forwards them to its event loop.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import QcnError
from ..generate import _Seq
from ..sampling import SamplingParams
from ..session import Session
from ..tokenizer import Tokenizer

__all__ = ["Event", "Request", "Scheduler", "QueueFullError"]

log = logging.getLogger(__name__)


class QueueFullError(QcnError):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""


@dataclass(frozen=True)
class Event:
    """What a request hears from the scheduler.

    kind: "delta" (``text``: new output text), "done" (``finish_reason``: "eos" | "stop" |
    "length"; ``text``: the final text), "cancelled", or "error" (``text``: message).
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None


_ids = itertools.count()


class Request:
    """One generation request: token ids in, events out (through ``sink``)."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams | None, sink: Callable[[Event], None], *, ignore_eos: bool = False, internal: bool = False):
        self.id = next(_ids)
        self.internal = internal  # a state-keeping prefill of the scheduler's own (no output)
        self.min_kept = 0  # internal: run only if a kept state covers at least this many tokens
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.sink = sink
        self.ignore_eos = ignore_eos
        self.cancelled = False
        self.finished = False
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens restored from a kept state instead of prefilled
        self.finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _emit(self, ev: Event) -> None:
        try:
            self.sink(ev)
        except Exception:  # a sink must never take the scheduler down
            log.exception("request %d: event sink failed", self.id)


class _Active:
    """A request that holds a slot."""

    def __init__(self, req: Request, handle, seq: _Seq, pos: int):
        self.req = req
        self.handle = handle
        self.seq = seq
        self.pos = pos  # prompt tokens already in the slot's state


class Scheduler:
    """Owns ``session``; ``submit`` / ``cancel`` may be called from any thread.

    ``prefix_cache`` (optional, :class:`~qcn.runtime.serve.prefix_cache.PrefixCache`) keeps
    states by the tokens they cover; a request whose tokens extend a kept key restores it and
    prefills only the rest. A restored request computes bit for bit what prefilling its whole
    prompt from scratch computes, because

    - prompts are prefilled in chunks aligned to absolute positions (multiples of
      ``runtime.prefill_chunk``: from scratch 0, c, 2c, ...; after a restore at k*c the same
      boundaries), and states are kept only at such boundaries. (Measured on qcn-pico with the
      ONNX Runtime backend: splitting a prefill anywhere else changes the logits by up to
      3.8e-6, splitting it at a multiple of the chunk size changes nothing.)
    - only states computed by the prefill graph are kept. A finished request's own state was
      computed by the decode graph, token by token (4.3e-6 max |logit| difference from a
      prefill on qcn-pico), so it is not kept; instead the scheduler prefills prompt + reply on
      top of the kept prompt state as background work when no request is waiting (an internal
      request without output) and keeps that. The next turn of a conversation, which resends
      prompt + reply + a new message, then prefills only the new message (plus less than one
      chunk).
    """

    def __init__(self, session: Session, tokenizer: Tokenizer, *, queue_size: int, metrics=None, prefix_cache=None):
        self.session = session
        self.tokenizer = tokenizer
        self.queue_size = queue_size
        self.metrics = metrics
        self.prefix_cache = prefix_cache
        self.eos = frozenset(session.manifest.tokenizer.eos_token_ids)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[_Active] = []
        # (prompt + reply tokens, prompt length): prefill-computed states still to keep
        self._keep_jobs: deque[tuple[list[int], int]] = deque(maxlen=4 * session.max_batch)
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- public, any thread ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qcn-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, req: Request) -> None:
        """Queue ``req``; raises :class:`QueueFullError` when the waiting queue is full."""
        with self._cond:
            if self._stop:
                raise QueueFullError("the server is shutting down")
            busy = sum(not a.req.internal for a in self._active) >= self.session.max_batch
            if busy and len(self._waiting) >= self.queue_size:
                raise QueueFullError(
                    f"server busy: all {self.session.max_batch} sequence slots are in use and "
                    f"{len(self._waiting)} requests are already waiting (queue size {self.queue_size}); retry later"
                )
            self._waiting.append(req)
            self._gauges()
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` (client went away). Idempotent; a finished request is left alone."""
        with self._cond:
            if req.finished:
                return
            req.cancelled = True
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot (background state-keeping prefills not counted)."""
        return sum(not a.req.internal for a in self._active)

    @property
    def background(self) -> int:
        """State-keeping prefills pending or running."""
        return len(self._keep_jobs) + sum(a.req.internal for a in self._active)

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._active and not self._keep_jobs:
                    self._cond.wait()
                if self._stop:
                    break
                self._drop_cancelled()
                admitted = self._admit()
            try:
                for a in admitted:
                    self._start(a)
                self._prefill_one()
                self._decode_all()
            except Exception as e:  # a failing graph call fails the requests in it, not the server
                log.exception("scheduler step failed")
                with self._cond:
                    for a in list(self._active):
                        self._release(a)
                        self._finish(a.req, Event("error", text=f"generation failed: {e}"))
        with self._cond:
            for a in list(self._active):
                self._release(a)
                self._finish(a.req, Event("cancelled"))
            while self._waiting:
                self._finish(self._waiting.popleft(), Event("cancelled"))

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(queue_depth=len(self._waiting), running=self.running)

    def _finish(self, req: Request, ev: Event) -> None:
        req.finished = True
        if req.internal:
            return
        req.finish_reason = ev.finish_reason
        if self.metrics is not None:
            self.metrics.request_finished(req, ev.kind)
        req._emit(ev)

    def _release(self, a: _Active) -> None:
        if a in self._active:
            self._active.remove(a)
            if a.handle is not None:  # None: it failed before it got its slot
                self.session.release(a.handle)
            self._gauges()

    def _drop_cancelled(self) -> None:
        kept = deque()
        for r in self._waiting:
            if r.cancelled:
                self._finish(r, Event("cancelled"))
            else:
                kept.append(r)
        self._waiting = kept
        for a in list(self._active):
            if a.req.cancelled:
                self._release(a)
                self._finish(a.req, Event("cancelled"))

    def _admit(self) -> list[_Active]:
        out = []
        while self._waiting and len(self._active) < self.session.max_batch:
            req = self._waiting.popleft()
            eos = frozenset() if req.ignore_eos else self.eos
            seq = _Seq(0, req.prompt_ids, req.params, self.tokenizer, eos, lambda _i, d, r=req: self._on_text(r, d))
            a = _Active(req, None, seq, 0)
            self._active.append(a)
            out.append(a)
        while not self._waiting and self._keep_jobs and len(self._active) < self.session.max_batch:
            tokens, n_prompt = self._keep_jobs.popleft()
            if tokens in self.prefix_cache:
                continue
            req = Request(tokens, None, lambda _ev: None, internal=True)
            req.min_kept = n_prompt
            a = _Active(req, None, None, 0)
            self._active.append(a)
            out.append(a)
            break
        self._gauges()
        return out

    def _start(self, a: _Active) -> None:
        """Give ``a`` its slot: a restored kept state, or a fresh one."""
        snap = self.prefix_cache.lookup(a.req.prompt_ids) if self.prefix_cache is not None else None
        if a.req.internal and (snap.tokens if snap is not None else 0) < a.req.min_kept:
            # the prompt's state is gone: recomputing the whole conversation in the background
            # would cost more than it may ever save
            with self._cond:
                self._active.remove(a)
                a.req.finished = True
                self._gauges()
            return
        if snap is not None:
            a.handle = self.session.restore(snap)
            a.pos = snap.tokens
            a.req.cached_tokens = snap.tokens
        else:
            a.handle = self.session.allocate()

    def _on_text(self, req: Request, delta: str) -> None:
        req._emit(Event("delta", text=delta))

    def _accept(self, a: _Active, token: int, now: float) -> None:
        req = a.req
        if req.first_token_at is None:
            req.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - req.arrival)
        elif self.metrics is not None:
            self.metrics.inter_token(now - req.last_token_at)
        req.last_token_at = now
        if self.metrics is not None:
            self.metrics.tokens_generated(1, now)
        a.seq.accept(token)
        req.completion_tokens = len(a.seq.token_ids)
        if a.seq.done:
            n = self.session.prefill_chunk
            whole = req.prompt_ids + a.seq.token_ids
            if self.prefix_cache is not None and not req.cancelled and len(whole) // n > len(req.prompt_ids) // n:
                self._keep_jobs.append((whole[: len(whole) // n * n], len(req.prompt_ids) // n * n))
            with self._cond:
                self._release(a)
                self._finish(req, Event("done", text=a.seq.text, finish_reason=a.seq.finish_reason))

    def _keep_state(self, a: _Active, tokens: list[int]) -> None:
        """Keep the slot's state (prefilled; it covers exactly ``tokens``) for later requests."""
        if self.prefix_cache is None or len(tokens) == 0 or a.req.cancelled:
            return
        if self.session.past_len(a.handle) != len(tokens):
            log.warning("request %d: slot holds %d tokens, expected %d; state not kept", a.req.id, self.session.past_len(a.handle), len(tokens))
            return
        self.prefix_cache.put(tokens, lambda: self.session.snapshot(a.handle))

    def _prefill_one(self) -> None:
        """Prefill chunks worth at most ``prefill_chunk`` tokens in all (at least one chunk):
        one long prompt's next chunk, or the whole of several short ones. Chunks are never
        cut to fit (their boundaries stay at multiples of the chunk size)."""
        todo = [a for a in self._active if a.pos < len(a.req.prompt_ids)]
        todo.sort(key=lambda a: a.req.internal)  # requests before background work (stable)
        n = self.session.prefill_chunk
        budget = n
        for a in todo:
            ids = a.req.prompt_ids
            chunk = ids[a.pos : min(len(ids), (a.pos // n + 1) * n)]  # aligned to multiples of n
            if len(chunk) > budget and budget < n:
                break
            budget -= len(chunk)
            self._prefill_chunk(a, chunk)
            if budget <= 0:
                break

    def _prefill_chunk(self, a: _Active, chunk: list[int]) -> None:
        ids = a.req.prompt_ids
        n = self.session.prefill_chunk
        logits = self.session.prefill(a.handle, chunk)
        a.pos += len(chunk)
        if a.pos == len(ids) // n * n:  # the last chunk boundary of the prompt
            self._keep_state(a, ids[: a.pos])
        if a.pos == len(ids):
            if a.req.internal:
                with self._cond:
                    self._release(a)
                    a.req.finished = True
            else:
                self._accept(a, a.seq.sampler(logits), time.perf_counter())

    def _decode_all(self) -> None:
        live = [a for a in self._active if not a.req.internal and a.pos == len(a.req.prompt_ids) and a.seq.token_ids and not a.seq.done]
        if not live:
            return
        logits = self.session.decode([a.handle for a in live], [a.seq.token_ids[-1] for a in live])
        now = time.perf_counter()
        for a, row in zip(live, logits):
            self._accept(a, a.seq.sampler(row), now)
