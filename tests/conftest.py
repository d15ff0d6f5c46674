"""Shared test setup: tests/ on sys.path for the small helpers (op_harness, runtime_fixture)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
