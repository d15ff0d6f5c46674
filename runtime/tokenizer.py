"""Tokenizer wrapper around ``tokenizers.Tokenizer`` (tokenizer.json), plus incremental
detokenization for streaming.

Prompts are raw text (no chat template is applied). ``encode`` applies tokenizer.json's own
post-processor (what transformers' ``tokenizer(text)`` does; Qwen's adds nothing). The
manifest's ``bos_token_id`` is informational: Qwen configs name a BOS id that Qwen's tokenizer
never prepends, so the runtime does not prepend it either.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import ArtifactError, TokenizerError

__all__ = ["Tokenizer", "IncrementalDecoder"]

log = logging.getLogger(__name__)


class Tokenizer:
    """Text <-> token ids. ``eos_token_ids`` come from the manifest (not from tokenizer.json)."""

    def __init__(self, hf: _HFTokenizer, eos_token_ids: Iterable[int] = (), bos_token_id: int | None = None):
        self._tok = hf
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in eos_token_ids)
        self.bos_token_id = bos_token_id  # informational only, see the module docstring

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token_ids: Iterable[int] = (), bos_token_id: int | None = None) -> "Tokenizer":
        p = Path(path)
        try:
            hf = _HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ArtifactError(f"{p}: cannot load tokenizer: {e}") from None
        return cls(hf, eos_token_ids, bos_token_id)

    @classmethod
    def from_manifest(cls, manifest) -> "Tokenizer":
        manifest.verify_files()
        t = manifest.tokenizer
        return cls.from_file(manifest.path("tokenizer.json"), t.eos_token_ids, t.bos_token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"expected prompt text (str), got {type(text).__name__}")
        check_text(text)
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, emitting only complete text.

    ``tokenizers.decoders.DecodeStream`` does the work: a byte-level BPE token can end in the
    middle of a UTF-8 character, so it holds such tokens back until a later one completes the
    character, decodes against a short window of previous tokens (O(window) per step, and
    decoders that strip a leading space at the start of a string still give the right delta).
    What DecodeStream lacks is the end of a sequence: :meth:`flush` decodes the tokens it still
    holds (possibly ending in U+FFFD) against the same window.
    """

    _CONTEXT = 6  # ids of already emitted text that flush() decodes the held-back tail against

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self._pending: list[int] = []  # pushed ids whose text DecodeStream has not returned yet
        self._context: list[int] = []  # the last few ids whose text was returned
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (may be "")."""
        token_id = int(token_id)
        try:
            delta = self._stream.step(self._tok._tok, token_id)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"cannot decode token id {token_id}: {e}") from None
        self._pending.append(token_id)
        if delta is None:
            return ""  # incomplete UTF-8 sequence (or no text yet): wait for more tokens
        self._context = (self._context + self._pending)[-self._CONTEXT :]
        self._pending = []
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of sequence: return whatever is still held back (may contain U+FFFD)."""
        if not self._pending:
            return ""
        prefix = self._tok.decode(self._context)
        full = self._tok.decode(self._context + self._pending)
        delta = full[len(prefix) :] if full.startswith(prefix) else full
        self._context = (self._context + self._pending)[-self._CONTEXT :]
        self._pending = []
        self._stream = DecodeStream(ids=self._context, skip_special_tokens=False)  # drop what flush emitted
        self.text += delta
        return delta


def check_text(text: str, what: str = "prompt") -> None:
    """TokenizerError unless `text` is valid Unicode: a lone surrogate is what Python makes of
    bytes that were not UTF-8 (argv and file names decode with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        raw = f"byte {ord(ch) - 0xDC00:#04x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"lone surrogate U+{ord(ch):04X}"
        raise TokenizerError(f"{what} is not valid UTF-8 text: {raw} at character {e.start}; "
                             "pass UTF-8 encoded text") from None
