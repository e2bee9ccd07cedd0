#!/usr/bin/env bash
# Install BitLab and everything its tests need on a fresh machine (idempotent, quiet when done already).
# torch comes first as the pinned CPU build this machine keeps on disk, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${BITLAB_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
# The example third-party plugin, installed so its entry point is real (tests use it).
"$PY" -m pip install -q -e examples/bitlab_example_plugin
