"""Shared by the kernel tests: the interpreter check and the ahead-of-time compile run in a
subprocess.

AOT compilation needs Triton without its interpreter, which this session runs under
(tests/conftest.py), so each kernel module's PTX test runs a script in a subprocess without
TRITON_INTERPRET, started when the module's tests start (it overlaps the interpreter tests).
The script gets QCN_AOT_ALL_TARGETS ("1": every kernel for every target) and the tests/
folder (for the tensorrt.plugin stub) as its arguments, and prints its rows as JSON last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def require_interpreter(kernel) -> None:
    """Skip the calling module when ``kernel`` was imported without Triton's interpreter."""
    if not type(kernel).__name__.startswith("Interp"):
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 (tests/conftest.py sets it before any "
                    "import of triton); run these tests on CPU with the interpreter", allow_module_level=True)


class AotRun:
    def __init__(self, script: str, tag: str):
        self.script, self.tag, self.proc = script, tag, None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"qcn_aot_{self.tag}_")
        self.proc = subprocess.Popen([sys.executable, "-c", self.script, os.environ.get("QCN_AOT_ALL_TARGETS", "0"),
                                      str(TESTS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def rows(self, timeout: float) -> list[dict]:
        assert self.proc is not None, "the AOT subprocess was not started"
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err[-4000:]
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def aot_background(script: str, tag: str, test_name: str = "test_aot_ptx_compiles"):
    """A module fixture ``aot_run``: starts ``script`` when the module's ``test_name`` is selected."""

    @pytest.fixture(scope="module", autouse=True, name="aot_run")
    def _fixture(request):
        run = AotRun(script, tag)
        if any(item.name == test_name and item.module is request.module for item in request.session.items):
            run.start()
        yield run
        run.stop()

    return _fixture
