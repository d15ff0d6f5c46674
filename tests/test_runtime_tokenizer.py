"""Tokenizer wrapper and incremental (streaming) detokenization."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_fixture as rf  # noqa: E402

from qcn.runtime.errors import ArtifactError  # noqa: E402
from qcn.runtime.manifest import load_manifest  # noqa: E402
from qcn.runtime.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(art):
    return Tokenizer.from_manifest(load_manifest(art.path))


def _byte_ids(tok, text):
    """One token per UTF-8 byte (the byte-level alphabet), so characters split across tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    # GPT-2 byte -> unicode mapping, rebuilt independently
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    mapping = {b: chr(c) for b, c in zip(bs, cs)}
    assert set(mapping.values()) == set(alphabet)
    ids = [tok.token_to_id(mapping[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def test_roundtrip_and_eos(tok, art):
    text = "def f(x):\n    return 'café €5 😀'\n"
    ids = tok.encode(text)
    assert ids and all(0 <= i < art.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == frozenset(art.eos_token_ids)
    assert tok.vocab_size == art.vocab_size


def test_incremental_holds_back_partial_utf8(tok):
    text = "aé€😀b日本"
    ids = _byte_ids(tok, text)
    assert len(ids) == len(text.encode())
    dec = tok.incremental_decoder()
    deltas = [dec.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text and dec.text == text
    # the 4 bytes of the emoji: three pushes give nothing, the fourth gives the character
    start = len("aé€".encode())
    assert deltas[start : start + 4] == ["", "", "", "😀"]
    assert dec.flush() == ""


def test_incremental_matches_full_decode_on_long_sequence(tok):
    text = "".join(rf.CORPUS)
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert out == text == tok.decode(ids)


def test_flush_emits_incomplete_tail(tok):
    ids = _byte_ids(tok, "x€")[:-1]  # cut inside the euro sign
    dec = tok.incremental_decoder()
    assert "".join(dec.push(i) for i in ids) == "x"
    tail = dec.flush()
    assert tail and "\ufffd" in tail and dec.text == tok.decode(ids)


def test_bad_tokenizer_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot load tokenizer"):
        Tokenizer.from_file(p)


def test_incremental_on_the_pico_tokenizer_matches_full_decode():
    """qcn-pico's real byte-level BPE (Qwen's pre-tokenizer and specials) over code, prose, non-ASCII
    and special tokens: the streamed deltas join to the full decode, and none ends mid-character."""
    tok = Tokenizer.from_file(Path(__file__).parent.parent / "models" / "qcn-pico" / "tokenizer.json")
    text = "".join(rf.CORPUS) + "<|im_end|>\n" + (Path(__file__).read_text() * 2)
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    deltas = [dec.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.flush() == tok.decode(ids) == text
