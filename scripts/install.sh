#!/usr/bin/env bash
# Installs qcn with every extra (compile, gpu, serve) and the test tools, qcn[test], editable, into
# the current Python (idempotent; called by demo.sh/test.sh). The runtime alone is `pip install .`.
# torch comes first and pinned: the CPU build 2.13.0 sits in the local wheel folder that pip's
# find-links points at; asking for a bare range with no torch installed would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.") else 1)' 2>/dev/null; then
  python -m pip install --quiet --only-binary :all: "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test]"
python -c 'import torch; assert torch.version.cuda is None, "a CUDA torch was installed; reinstall torch==2.13.0 (CPU)"'
