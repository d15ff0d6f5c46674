"""``qcn-run``: generate text from a compiled artifact directory, streaming to stdout."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from .errors import QcnError, RequestError, TokenizerError
from .tokenizer import check_text

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcn-run",
        description=(
            "Generate a continuation of a raw text prompt (no chat template) with a qcn artifact "
            "directory (manifest.json + ONNX graphs + tokenizer), streaming the text to stdout. "
            "Sampling defaults come from the artifact's manifest (the model card's values)."
        ),
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact directory written by `qcn-compile` (holds manifest.json)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="prompt text, used verbatim; '-' reads it from standard input")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="stop after N generated tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="softmax temperature; 0 = greedy (default: the manifest's generation.temperature)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: keep the most likely tokens whose probability mass reaches P, in (0, 1]; 1 = off (default: the manifest's)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep only the K most likely tokens; 0 = off (default: the manifest's)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed; the same seed and settings give the same text (default: random)")
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token (same as --temperature 0)")
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S", help="stop when the text contains any of these strings (not printed); may be repeated")
    p.add_argument("--speculative", type=int, default=None, metavar="N",
                   help="MTP speculative decoding with drafts of N tokens (0 = off; the artifact needs its MTP head, "
                        "recipe runtime.speculative); reports acceptance on stderr (default: the artifact's "
                        "speculative.draft_tokens, 0 when it has none)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads per graph (default: one per physical core)")
    p.add_argument("--no-verify-hashes", action="store_true", help="skip the sha256 check of the artifact's files (faster start for large weights)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress to stderr (-vv for debug detail)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed by argparse)
        return int(e.code) if isinstance(e.code, int) else 2

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    qlog = logging.getLogger("qcn")
    old_level = qlog.level
    qlog.addHandler(handler)
    qlog.setLevel({0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG))
    try:
        from .generate import load

        prompt = _read_stdin() if args.prompt == "-" else args.prompt
        check_text(prompt, "--prompt" if args.prompt != "-" else "the prompt on standard input")
        if args.speculative is not None and args.speculative < 0:
            raise RequestError(f"--speculative {args.speculative}: must be an integer >= 0 (draft tokens; 0 = off)")
        gen = load(args.artifact, threads=args.threads, verify_hashes=not args.no_verify_hashes,
                   speculative=args.speculative)
        with gen:
            params = gen.params(
                temperature=0.0 if args.greedy else args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                stop=tuple(args.stop),
            )

            def on_token(_i: int, delta: str) -> None:
                sys.stdout.write(delta)
                sys.stdout.flush()

            (result,) = gen.generate([prompt], params, on_token=on_token)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if result.speculative is not None:
            print(f"qcn-run: {result.speculative.summary()}", file=sys.stderr)
        logging.getLogger("qcn.runtime.cli").info(
            "finish_reason=%s generated_tokens=%d", result.finish_reason, len(result.token_ids)
        )
        return 0
    except QcnError as e:
        print(f"qcn-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqcn-run: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qcn-run ... | head`: the reader left; not an error worth a traceback
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout again at exit
        return 141
    finally:
        qlog.removeHandler(handler)
        qlog.setLevel(old_level)


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"the prompt on standard input is not valid UTF-8 text: byte {data[e.start]:#04x} at "
                             f"offset {e.start}; pass UTF-8 encoded text") from None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


if __name__ == "__main__":
    sys.exit(main())
