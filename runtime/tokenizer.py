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

from .errors import ArtifactError, TokenizerError

__all__ = ["Tokenizer", "IncrementalDecoder"]

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


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

    A byte-level BPE token can end in the middle of a UTF-8 character; decoding then ends in
    U+FFFD. Such text is held back until a later token completes it (or :meth:`flush` gives
    up at the end). Decoding uses a short window of previous tokens as context, so each step
    costs O(window), not O(length), and decoders that strip a leading space at the start of a
    string (Metaspace) still produce the right delta.
    """

    def __init__(self, tokenizer: Tokenizer, window: int = 6):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are fully emitted
        self._window = window
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (may be "")."""
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if full.endswith(_REPLACEMENT) or not full.startswith(prefix_text):
            return ""  # incomplete UTF-8 sequence: wait for more bytes
        delta = full[len(prefix_text) :]
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._window)
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of sequence: return whatever is still held back (may contain U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        delta = full[len(prefix_text) :] if full.startswith(prefix_text) else full
        self._read = len(self._ids)
        self.text += delta
        return delta
