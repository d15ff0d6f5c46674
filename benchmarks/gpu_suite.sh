#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/README.md, "gpu_suite"): installs the wheels carried in .whl/
# (if any) into /tmp/site, prints the exact versions that will run, then runs benchmarks/gpu_suite.py with
# its output teed to $OUT/gpu_suite.log. Arguments go to gpu_suite.py (e.g. --sections kernels --budget 200).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
{
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_suite.sh: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ wheels: running with the machine's packages only (fla comparison will be skipped)"
  fi
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, platform
print(f"python {platform.python_version()} at {__import__('sys').executable}")
for mod, dist in (("torch", "torch"), ("triton", "triton"), ("fla", "fla-core"), ("einops", "einops")):
    try:
        m = importlib.import_module(mod)
        print(f"{dist} {md.version(dist)} from {m.__file__}")
    except Exception as e:  # noqa: BLE001
        print(f"{dist}: not importable ({type(e).__name__}: {e})")
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
} 2>&1 | tee "$OUT/gpu_suite.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
if compgen -G ".whl/*.whl" >/dev/null; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
"$PY" benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_suite.log"
exit "${PIPESTATUS[0]}"
