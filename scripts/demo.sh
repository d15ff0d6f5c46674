#!/usr/bin/env bash
# The main job on the embedded CPU default: models/qcn-pico (a small Qwen3-Next trained on the
# Python standard library, shipped in the repo) -> qcn-compile recipes/pico_cpu.yaml -> qcn-run
# completes a prompt: greedy by default; qcn-run flags after the prompt replace that, e.g.
#   bash scripts/demo.sh $'class Stack:\n' --temperature 0.7 --top-k 40 --seed 0
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
qcn-compile recipes/pico_cpu.yaml
default_prompt=$'def fibonacci(n):\n'  # end prompts with the newline (models/qcn-pico/README.md)
prompt="${1:-$default_prompt}"
shift || true
[ $# -gt 0 ] || set -- --greedy
qcn-run build/artifacts/pico_cpu --prompt "$prompt" --max-new-tokens 64 "$@"
