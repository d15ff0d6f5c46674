"""qcn-run end to end through main([...])."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_fixture as rf  # noqa: E402

from qcn.runtime.cli import build_parser, main  # noqa: E402
from qcn.runtime.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(art):
    return Tokenizer.from_file(art.path / "tokenizer.json", art.eos_token_ids)


def test_greedy_streams_reference_text(art, tok, capsys):
    prompt = "def fibonacci(n):"
    ref = art.model.greedy(tok.encode(prompt), 15, art.eos_token_ids)
    rc = main([str(art.path), "--prompt", prompt, "--greedy", "--max-new-tokens", "15"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == tok.decode([t for t in ref if t not in art.eos_token_ids]) + "\n"
    assert len(out) > 5


def test_sampling_options_and_seed(art, capsys):
    args = [str(art.path), "--prompt", "x", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--max-new-tokens", "12", "--threads", "1"]
    assert main(args) == 0
    a = capsys.readouterr().out
    assert main(args) == 0
    b = capsys.readouterr().out
    assert a == b and a.strip()
    assert main(args[:-6] + ["--seed", "4", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out != a


def test_stop_string(art, tok, capsys):
    assert main([str(art.path), "--prompt", "x", "--greedy", "--max-new-tokens", "20"]) == 0
    full = capsys.readouterr().out[:-1]
    i = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2] and full.find(full[i : i + 2]) == i)
    assert main([str(art.path), "--prompt", "x", "--greedy", "--max-new-tokens", "20", "--stop", "zzz-absent", full[i : i + 2]]) == 0
    assert capsys.readouterr().out == full[:i] + "\n"


def test_help_explains_every_option(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--greedy", "--stop", "--threads", "--no-verify-hashes"):
        assert opt in out
    for action in build_parser()._actions:
        assert action.help, action.dest


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qcn-run: error:") and match in lines[0], err
    return lines[0]


def test_errors_are_one_line_exit_2(art, tmp_path, capsys):
    _one_line_error(capsys, [str(tmp_path / "missing"), "--prompt", "x"], "not an artifact directory")
    _one_line_error(capsys, [str(art.path), "--prompt", "x", "--max-new-tokens", "100"], "exceeds max_context 64")
    _one_line_error(capsys, [str(art.path), "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]")
    bad = tmp_path / "bad"
    rf.write_fixture_artifact(bad)
    rf.rewrite_manifest(bad, format_version=7)
    _one_line_error(capsys, [str(bad), "--prompt", "x"], "supports format_version 1")


def test_usage_error_exit_2(capsys):
    assert main(["--prompt"]) == 2
    assert "usage: qcn-run" in capsys.readouterr().err
