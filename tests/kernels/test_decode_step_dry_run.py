"""benchmarks/decode_step.py --dry-run: the whole-model decode step at tiny shapes on CPU.

Runs the script in a subprocess (it sets TRITON_INTERPRET=1 itself before importing triton)
and checks that it exits 0 and reports every step's shapes/dtypes right and outputs finite.
No GPU is needed; nothing is timed.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_decode_step_dry_run():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_step.py"), "--dry-run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert re.search(r"^dry run: shapes ok \(\d+ tensors", r.stdout, re.M), out[-4000:]
    for experts in ("int4", "fp8", "bf16"):  # every expert format ran a checked step
        assert re.search(rf"experts {experts}\s+proj \w+: \d+ tensors checked .* logits \[2, 128\] bfloat16",
                         r.stdout), out[-4000:]
    assert "4 layers (3 DeltaNet + 1 attention)" in r.stdout
