#!/usr/bin/env bash
# Every check and test, on a fresh machine too: creates .venv, builds the local
# control plane into ~/.cache/ampacity on first use (about 20 min on 2 cores),
# installs Prometheus (apt) when missing, then runs lint, types, CRD drift, unit,
# integration and end-to-end tests.
# Extra arguments go to pytest (e.g. tools/test.sh tests/unit -k planner).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/bootstrap.sh

echo "== prometheus, promtool and debootstrap (Debian's packages; the image test builds a rootfs)" >&2
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v debootstrap >/dev/null; then
  sudo=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus debootstrap >/dev/null
fi
echo "== control plane binaries" >&2
# stdout is only the binaries' folder; progress and the 30 s heartbeat go to stderr.
tools/controlplane/build.sh >/dev/null
echo "== ruff" >&2
ruff check .
ruff format --check .
echo "== import contracts" >&2
lint-imports --no-cache
echo "== mypy" >&2
mypy
echo "== CRDs match the models" >&2
ampacity crds generate --check
echo "== helm lint" >&2
"$(tools/controlplane/build.sh 2>/dev/null)/helm" lint --strict helm/ampacity
echo "== pytest" >&2
pytest "$@"
