"""Shared test setup: tests/ on sys.path for the small helpers (op_harness, runtime_fixture), and
tools/ for the qcn-pico training package (tools/pico)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))


# -- the hand-made fixture artifact (tests/runtime_fixture.py), written through qcn.artifact --
import dataclasses  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


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
