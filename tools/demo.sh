#!/usr/bin/env bash
# The main job on the embedded default: creates .venv, builds the local control
# plane on first use, starts it with fake GPU nodes, installs the CRDs, runs the
# operator, applies examples/ and prints `kubectl get` for everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/bootstrap.sh
exec ampacity demo "$@"
