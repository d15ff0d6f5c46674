"""`qcn-compile RECIPE`: compile a Qwen3-Next checkpoint as the recipe says."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from ..errors import QcnError
from .artifacts import Terminated, interrupt_on_signals
from .recipe import describe_targets, load_recipe

STAGES = ("export", "passes", "build")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcn-compile",
        description="Compile a Qwen3-Next (Qwen3-Coder-Next) HF checkpoint as a YAML recipe says: "
                    "export (ONNX) -> passes -> build (TensorRT engine, GPU targets).")
    p.add_argument("recipe", type=Path, nargs="?",
                   help="YAML recipe, e.g. recipes/tiny_cpu.yaml (the embedded CPU default) or recipes/h100_fp8.yaml")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="HF checkpoint directory; overrides the recipe's `checkpoint`")
    p.add_argument("--out", type=Path, default=None, help="artifact directory; overrides the recipe's `output`")
    p.add_argument("--until", choices=STAGES, default="build",
                   help="last stage to run (default: build; the cpu target has no build: its artifact is the passes directory)")
    p.add_argument("--force", action="store_true",
                   help="redo every stage even when its inputs did not change, and let the output replace whatever "
                        "is at its path (never the checkpoint); without it only a directory qcn wrote is replaced")
    p.add_argument("--check", action="store_true",
                   help="only validate the recipe: print the memory budget and every problem, build nothing")
    p.add_argument("--targets", action="store_true", help="print the target table and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _interrupted(argv: list[str] | None, code: int) -> int:
    """The exit of an interrupted compile. Run as a program (argv None) the process ends here, with
    `code`: further Ctrl-C / SIGTERM are ignored, the standard streams flushed, and the interpreter's
    own shutdown skipped (`os._exit`). The temporary directories are gone by now and nothing else
    needs finalizing; a normal shutdown after an unwound KeyboardInterrupt ended a CI run with
    -SIGINT instead of 130, after the message was printed (1 test run in ~700; the cause inside
    the interpreter was not pinned down). Called in-process with argv, the code is returned and
    the caller's handlers are kept."""
    if argv is not None:
        return code
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.targets:
        print(describe_targets())
        return 0
    if args.recipe is None:
        parser.error("the recipe argument is required (or --targets)")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        with interrupt_on_signals():
            return _compile(args)
    except QcnError as e:  # every error qcn raises on purpose (compile and runtime): one line
        print(f"qcn-compile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqcn-compile: interrupted (Ctrl-C); nothing was written, temporary files removed", file=sys.stderr)
        return _interrupted(argv, 130)
    except Terminated as e:
        name = signal.Signals(e.signum).name
        print(f"qcn-compile: stopped by {name}; nothing was written, temporary files removed", file=sys.stderr)
        return _interrupted(argv, 128 + e.signum)
    except OSError as e:  # the machine, not qcn: disk full, permissions, I/O errors (-v: traceback)
        if args.verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"qcn-compile: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def _compile(args) -> int:
    # heavy imports (torch, onnx, TensorRT) after argument parsing
    from .build.preflight import PreflightError, preflight
    from .pipeline import run_pipeline

    recipe = load_recipe(args.recipe, checkpoint=args.checkpoint, output=args.out)
    report = preflight(recipe, check_module=args.check or args.until == "build", force=args.force)
    if recipe.target_info.is_gpu or args.check:
        print(report.text(), file=sys.stderr if not args.check else sys.stdout)
    if args.check:
        return 0 if report.ok else 2
    if report.problems:
        if len(report.problems) == 1:
            raise PreflightError(report.problems[0], report)
        raise PreflightError(f"recipe {recipe.name!r} cannot be built: " + "; ".join(report.problems), report)
    result = run_pipeline(recipe, until=args.until, force=args.force, progress=not args.quiet,
                          preflight_report=report)
    done = ", ".join([f"{s} (ran)" for s in result.ran] + [f"{s} (up to date)" for s in result.skipped])
    accuracy = result.dirs["passes"] / "accuracy.json" if "passes" in result.dirs else None
    if accuracy is not None and accuracy.is_file() and recipe.quantization.active:
        import json

        from .passes.quant.accuracy import report_text

        print(f"qcn-compile: {report_text(json.loads(accuracy.read_text()))}")
    print(f"qcn-compile: wrote {result.output} (recipe {recipe.name}; {done})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
