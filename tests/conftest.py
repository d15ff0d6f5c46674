"""Shared test setup: tests/ on sys.path for the small helpers (op_harness, runtime_fixture), and
tools/ for the qcn-pico training package (tools/pico)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
