"""`qcn-compile RECIPE`: compile a Qwen3-Next checkpoint as the recipe says."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .export.config import CheckpointError
from .recipe import RecipeError, load_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcn-compile",
        description="Compile a Qwen3-Next (Qwen3-Coder-Next) HF checkpoint into an artifact directory "
                    "(ONNX graphs + manifest.json) as a YAML recipe says.")
    p.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/tiny_cpu.yaml (the embedded CPU default)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="HF checkpoint directory; overrides the recipe's `checkpoint`")
    p.add_argument("--out", type=Path, default=None, help="artifact directory; overrides the recipe's `output`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    from .pipeline import compile_recipe  # heavy imports (torch, onnx) after argument parsing

    try:
        recipe = load_recipe(args.recipe, checkpoint=args.checkpoint, output=args.out)
        out = compile_recipe(recipe, progress=not args.quiet)
    except (RecipeError, CheckpointError, FileNotFoundError) as e:
        print(f"qcn-compile: error: {e}", file=sys.stderr)
        return 2
    print(f"qcn-compile: wrote {out} (recipe {recipe.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
