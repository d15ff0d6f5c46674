"""Shared test setup.

- tests/ on sys.path for the small helpers (op_harness, runtime_fixture, trt_stub), tools/ for
  the qcn-pico training package (tools/pico).
- Triton's interpreter for the whole session: Triton fixes a kernel's mode when its module is
  imported (``@triton.jit`` reads TRITON_INTERPRET), so the mode is set here, before any test
  module imports triton, and never by reloading modules (results cannot depend on test order).
  Tests that compile real PTX do it in a subprocess without the variable.
- qcn's checkpoint-hash cache (``$XDG_CACHE_HOME/qcn``) goes to a per-session temporary folder,
  never the user's home (subprocesses inherit it; tests that check the cache set their own).
- ``trt_stub``: the one stub of ``tensorrt.plugin`` (tests/trt_stub.py), installed for one test.
- ``art`` / ``art_copy`` / ``logits``: the hand-made fixture artifact (tests/runtime_fixture.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "tools"))
os.environ.setdefault("TRITON_INTERPRET", "1")

from trt_stub import make_trt_stub  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def trt_stub(monkeypatch):
    """The stub installed for one test; the once-per-process plugin registration state is reset.
    Returns the registry (plugin id -> {"desc", "autotune", "aot"} -> function)."""
    trt, trtp, reg = make_trt_stub()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    from qcn.compile.build import plugins as build_plugins
    from qcn.compile.plugins.gated_deltanet import trt_plugin as gdn_tp

    monkeypatch.setattr(gdn_tp, "_registered", None)
    monkeypatch.setattr(build_plugins, "_REGISTERED", {})
    return reg


# -- the hand-made fixture artifact (tests/runtime_fixture.py), written through qcn.artifact --
import dataclasses  # noqa: E402
import shutil  # noqa: E402



@pytest.fixture(scope="session")
def _fixture_artifacts(tmp_path_factory):
    """logits mode -> FixtureArtifact, each written once per test session (read-only)."""
    import runtime_fixture as rf

    made = {}

    def get(logits: str):
        if logits not in made:
            made[logits] = rf.write_fixture_artifact(tmp_path_factory.mktemp(f"art_{logits}"), logits=logits)
        return made[logits]

    return get


@pytest.fixture(scope="module")
def logits() -> str:
    """The fixture artifact's logits mode; a module that tests both overrides this fixture with
    ``@pytest.fixture(scope="module", params=LOGITS_MODES)``."""
    return "last"


@pytest.fixture(scope="module")
def art(_fixture_artifacts, logits):
    """The fixture artifact (shared: never modify it; use ``art_copy`` to edit or break one)."""
    return _fixture_artifacts(logits)


@pytest.fixture()
def art_copy(art, tmp_path):
    """A private copy of ``art`` that the test may edit or break."""
    path = tmp_path / "art"
    shutil.copytree(art.path, path)
    return dataclasses.replace(art, path=path)
