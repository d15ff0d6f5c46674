"""Console scripts whose code needs an install extra: if the extra is missing, the user gets one
line that names it and how to install it, not a traceback (``pip install qcn`` is the runtime
alone; see pyproject.toml's optional-dependencies)."""

from __future__ import annotations

import sys
from importlib import import_module

# top-level modules that only an extra brings, per extra (pyproject.toml)
EXTRA_MODULES = {
    "compile": frozenset({"torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors", "yaml", "tqdm"}),
    "serve": frozenset({"fastapi", "uvicorn", "jinja2", "prometheus_client"}),
}
_HOW = {"compile": "pip install torch==2.13.0 'qcn[compile]' (torch first: the CPU build, or your CUDA one)",
        "serve": "pip install 'qcn[serve]'"}


def run(prog: str, module: str, extra: str) -> int:
    """Import ``module`` and return its ``main()``; a module of ``extra`` that is not installed
    (at import or later, e.g. a lazy import) becomes one line on stderr and exit status 2."""
    try:
        return import_module(module).main()
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_MODULES[extra]:
            raise
        print(f"{prog}: error: this command needs the {extra!r} extra ({top!r} is not installed): {_HOW[extra]}",
              file=sys.stderr)
        return 2


def qcn_compile() -> int:
    return run("qcn-compile", "qcn.compile.cli", "compile")


def qcn_tiny_checkpoint() -> int:
    return run("qcn-tiny-checkpoint", "qcn.compile.export.tiny", "compile")


def qcn_serve() -> int:
    return run("qcn-serve", "qcn.runtime.serve.cli", "serve")
