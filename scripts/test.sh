#!/usr/bin/env bash
# The test command: the whole suite on this machine (GPU tests skip where no CUDA device exists).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests "$@"
