"""Text generation over a :class:`Session`: prefill each prompt alone, then decode all live
sequences together until EOS, a stop string/token, or max_new_tokens.

Result conventions:

- ``token_ids`` are the generated ids, including the final EOS / stop token when generation
  ended on one; ``text`` never contains EOS or stop-token text.
- A stop string ends generation as soon as the text contains it; ``text`` is cut right before
  it. Streaming never emits text that could turn out to be the start of a stop string, so the
  streamed deltas always concatenate to ``Result.text``.
- ``on_token(seq_index, text_delta)`` is called with every non-empty piece of new text, in
  generation order; incomplete UTF-8 is held back until it is complete.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


from .errors import ContextLengthError, CapacityError, RequestError, TokenizerError
from .manifest import Manifest, load_manifest
from .sampling import Sampler, SamplingParams, params_per_sequence
from .session import SeqHandle, Session
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["Result", "generate", "Generator", "load", "FINISH_REASONS"]

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length")
OnToken = Callable[[int, str], None]


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_token_ids: list[int] = field(default_factory=list)
    speculative: object | None = None  # SpeculativeStats of the generate() call, when it speculated


class _Seq:
    """Book-keeping of one sequence during generate()."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer | None, eos: frozenset[int], on_token: OnToken | None):
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampler = Sampler(params)
        self.decoder: IncrementalDecoder | None = tokenizer.incremental_decoder() if tokenizer is not None else None
        self.eos = eos
        self.stop_ids = frozenset(params.stop_token_ids)
        self.stops = params.stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.on_token = on_token
        self.handle: SeqHandle | None = None
        self.token_ids: list[int] = []
        self.text = ""  # final text once finished
        self.emitted = 0  # chars of the decoded text already streamed
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, upto_text: str) -> None:
        delta = upto_text[self.emitted :]
        if delta:
            self.emitted = len(upto_text)
            if self.on_token is not None:
                self.on_token(self.index, delta)

    def _find_stop(self, text: str, search_from: int) -> int:
        best = -1
        for s in self.stops:
            i = text.find(s, max(0, search_from - len(s) + 1))
            if i >= 0 and (best < 0 or i < best):
                best = i
        return best

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(self.max_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _finish(self, reason: str) -> None:
        text = self.decoder.text if self.decoder is not None else ""
        if self.decoder is not None:
            before = len(text)
            self.decoder.flush()
            text = self.decoder.text
            if self.stops:
                pos = self._find_stop(text, before)
                if pos >= 0:
                    text, reason = text[:pos], "stop"
        self.text = text
        self._emit(text)
        self.finish_reason = reason

    def accept(self, token: int) -> None:
        """Append a sampled token and update text, streaming and the finish state."""
        self.token_ids.append(token)
        if token in self.eos:
            return self._finish("eos")
        if token in self.stop_ids:
            return self._finish("stop")
        if self.decoder is not None:
            before = len(self.decoder.text)
            self.decoder.push(token)
            text = self.decoder.text
            if self.stops:
                pos = self._find_stop(text, before)
                if pos >= 0:
                    self.text = text[:pos]
                    self._emit(self.text)
                    self.finish_reason = "stop"
                    return
            if len(self.token_ids) < self.params.max_new_tokens:
                self._emit(text[: len(text) - self._held_back(text)] if self.stops else text)
        if len(self.token_ids) >= self.params.max_new_tokens:
            self._finish("length")

    def result(self, speculative=None) -> Result:
        return Result(text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason or "length",
                      prompt_token_ids=list(self.prompt_ids), speculative=speculative)


def generate(
    session: Session,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    on_token: OnToken | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    speculative: int = 0,
) -> list[Result]:
    """Generate a continuation for every prompt (text, or a list of token ids).

    ``params``: one SamplingParams for all prompts, one per prompt, or None for the
    manifest's ``generation`` defaults. ``tokenizer`` defaults to ``session.tokenizer``; it is
    needed for text prompts, text results and stop strings. ``speculative`` N > 0: MTP
    speculative decoding with drafts of N tokens (docs/MTP.md; the artifact needs its
    ``speculative`` section): greedy output is the same, sampled output has the same
    distribution; each Result's ``speculative`` holds the call's acceptance statistics.
    """
    if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
        raise RequestError(f"speculative must be an integer >= 0 (draft tokens; 0 = off), got {speculative!r}")
    if speculative and session.manifest.speculative is None:
        raise RequestError(f"speculative decoding needs an artifact compiled with runtime.speculative (an MTP head); "
                           f"{session.manifest.artifact_dir} has none")
    tok = tokenizer if tokenizer is not None else session.tokenizer
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise RequestError("prompts must be a list of strings or a list of token-id lists")
    n = len(prompts)
    if n == 0:
        return []
    if n > session.max_batch:
        raise CapacityError(f"{n} prompts exceed max_batch {session.max_batch} (runtime.max_batch); split them into batches")
    if n > session.free_slots:
        raise CapacityError(f"{n} prompts but only {session.free_slots} of {session.max_batch} sequence slots are free")
    if params is None:
        params = SamplingParams.from_manifest(session.manifest)
    plist = params_per_sequence(params, n)
    eos = frozenset(session.manifest.tokenizer.eos_token_ids)

    seqs: list[_Seq] = []
    for i, (prompt, p) in enumerate(zip(prompts, plist)):
        if isinstance(prompt, str):
            if tok is None:
                raise TokenizerError("text prompts need a tokenizer (open the artifact with qcn.runtime.load)")
            ids = tok.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise RequestError(f"prompt {i}: expected a string or a list of token ids") from None
        if not ids:
            raise RequestError(f"prompt {i} is empty (0 tokens); a prompt needs at least one token")
        if p.stop and tok is None:
            raise TokenizerError("stop strings need a tokenizer")
        total = len(ids) + p.max_new_tokens
        if total > session.max_context:
            raise ContextLengthError(
                f"prompt {i}: {len(ids)} prompt tokens + max_new_tokens {p.max_new_tokens} = {total} "
                f"exceeds max_context {session.max_context}"
            )
        seqs.append(_Seq(i, ids, p, tok, eos, on_token))

    t0 = time.perf_counter()
    if speculative:
        from .speculative import run_speculative

        try:
            for s in seqs:
                s.handle = session.allocate()
            stats = run_speculative(session, seqs, speculative, session.drafter())
        finally:
            for s in seqs:
                if s.handle is not None:
                    session.release(s.handle)
        log.info("generate: %d seqs in %.3fs; %s", n, time.perf_counter() - t0, stats.summary())
        return [s.result(stats) for s in seqs]
    try:
        for s in seqs:
            s.handle = session.allocate()
        n_prompt = 0
        for s in seqs:
            logits = session.prefill(s.handle, s.prompt_ids)
            n_prompt += len(s.prompt_ids)
            s.accept(s.sampler(logits))
        t1 = time.perf_counter()
        steps = 0
        while True:
            live = [s for s in seqs if not s.done]
            if not live:
                break
            logits = session.decode([s.handle for s in live], [s.token_ids[-1] for s in live])
            steps += 1
            for s, row in zip(live, logits):
                s.accept(s.sampler(row))
        t2 = time.perf_counter()
    finally:
        for s in seqs:
            if s.handle is not None:
                session.release(s.handle)
    n_gen = sum(len(s.token_ids) for s in seqs)
    log.info(
        "generate: %d seqs, prefill %d tokens in %.3fs, %d decode steps (%d tokens) in %.3fs",
        n, n_prompt, t1 - t0, steps, n_gen, t2 - t1,
    )
    return [s.result() for s in seqs]


class Generator:
    """Manifest + backend + tokenizer + session, ready to generate."""

    def __init__(self, manifest: Manifest, backend, tokenizer: Tokenizer, *, max_batch: int | None = None,
                 max_context: int | None = None, speculative: int | None = None):
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.session = Session(manifest, backend, tokenizer=tokenizer, max_batch=max_batch, max_context=max_context)
        # draft tokens per cycle: the argument, else the manifest's default (recipe runtime.speculative)
        self.speculative = default_draft_tokens(manifest) if speculative is None else speculative

    def params(self, **overrides) -> SamplingParams:
        """The manifest's sampling defaults with ``overrides`` (None values keep the default)."""
        return SamplingParams.from_manifest(self.manifest, **overrides)

    def generate(self, prompts, params=None, on_token: OnToken | None = None, *,
                 speculative: int | None = None) -> list[Result]:
        n = self.speculative if speculative is None else speculative
        return generate(self.session, prompts, params, on_token, speculative=n)

    def close(self) -> None:
        self.session.close()
        self.backend.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    artifact_dir: str | os.PathLike,
    *,
    threads: int | None = None,
    verify_hashes: bool = True,
    backend: str | None = None,
    max_batch: int | None = None,
    max_context: int | None = None,
    speculative: int | None = None,
    **backend_options,
) -> Generator:
    """Open an artifact directory: manifest (+ sha256 check), backend, tokenizer, session.
    ``speculative``: default draft tokens of MTP speculative decoding (None: the manifest's
    ``speculative.draft_tokens``, 0 where it has none; 0 = off); the verify and mtp graphs are
    loaded when the artifact has them."""
    from .backends import create_backend

    t0 = time.perf_counter()
    manifest = load_manifest(artifact_dir, verify_hashes=verify_hashes)
    if speculative is not None and (isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0):
        raise RequestError(f"speculative must be an integer >= 0 (draft tokens; 0 = off), got {speculative!r}")
    if speculative and manifest.speculative is None:
        raise RequestError(f"{manifest.artifact_dir}: speculative decoding needs an artifact compiled with "
                           "runtime.speculative in its recipe (it exports the MTP head); this one has none")
    manifest.verify_files()
    if manifest.speculative is not None and "graphs" not in backend_options:
        backend_options["graphs"] = tuple(manifest.graphs)  # prefill, decode, verify, mtp
    be = create_backend(manifest, manifest.artifact_dir, backend=backend, threads=threads, **backend_options)
    tok = Tokenizer.from_manifest(manifest)
    log.info("loaded %s (%s backend) in %.2fs", manifest.artifact_dir, backend or manifest.runtime.backend, time.perf_counter() - t0)
    return Generator(manifest, be, tok, max_batch=max_batch, max_context=max_context, speculative=speculative)


def default_draft_tokens(manifest: Manifest) -> int:
    """The artifact's default draft tokens (recipe runtime.speculative.draft_tokens; 0 = off)."""
    return manifest.speculative.draft_tokens if manifest.speculative is not None else 0
