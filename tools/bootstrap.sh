#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything
# the demo and the tests need. Sourced by tools/demo.sh and tools/test.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$root/.venv/bin/pip" install --quiet --upgrade pip
  "$root/.venv/bin/pip" install --quiet -e "$root[dev]"
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
