#!/usr/bin/env bash
# The main job on the embedded CPU default: tiny Qwen3-Next checkpoint (made once, then reused)
# -> qcn-compile recipes/tiny_cpu.yaml -> qcn-run generates from a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
qcn-tiny-checkpoint build/checkpoints/qcn-tiny
qcn-compile recipes/tiny_cpu.yaml
qcn-run build/artifacts/tiny_cpu --prompt "${1:-def fibonacci(n):}" --max-new-tokens 48 --seed 0
