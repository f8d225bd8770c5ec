#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: run the node agent's NVML backend against the real device.
# For each GPU (or the one named by GPU_CHECK_INDEX) it reads power, energy, limits and clocks,
# sets a lower power limit and an SM clock lock, reads back what the driver enforces, then
# restores the limit found at start and unlocks the clocks (also on failure), printing it all.
# Needs nvidia-ml-py (`pip install nvidia-ml-py` or the repository's `.[nvml]` extra) and root
# (or CAP_SYS_ADMIN) to set limits and clocks; without them the refusals are printed by NVML name.
#   tools/gpu-check.sh                 # uses ./.venv/bin/python if present, else python3
#   PYTHON=/path/to/python GPU_CHECK_INDEX=0 tools/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" - <<'PY'
import os
import sys
import time

sys.path.insert(0, os.getcwd())
from agents.gpu import GpuError, NvmlBackend, release  # noqa: E402

SETTLE_SECONDS = 2.0  # the driver applies a new limit or lock within a few control periods

try:
    backend = NvmlBackend()
except GpuError as error:
    print(f"cannot open NVML: {error}")
    sys.exit(2)
wanted = os.environ.get("GPU_CHECK_INDEX")
failures = 0
try:
    for gpu in backend.gpus():
        if wanted is not None and gpu.index != int(wanted):
            continue
        print(f"GPU {gpu.index} {gpu.uuid} {gpu.model}")
        print(
            f"  limits: min {gpu.min_limit_watts:.0f} W, max {gpu.max_limit_watts:.0f} W, "
            f"default {gpu.default_limit_watts:.0f} W, at start {gpu.initial_limit_watts:.0f} W"
        )
        print(f"  SM clocks: {gpu.min_clock_mhz}-{gpu.max_clock_mhz} MHz")
        r = backend.read(gpu.uuid)
        print(f"  read: {r.power_watts:.1f} W, energy {r.energy_joules} J, enforced {r.limit_watts:.0f} W, SM {r.clock_mhz} MHz")
        try:
            target = max(gpu.min_limit_watts, round(gpu.initial_limit_watts * 0.8))
            backend.set_power_limit(gpu.uuid, target)
            time.sleep(SETTLE_SECONDS)
            r = backend.read(gpu.uuid)
            ok = abs(r.limit_watts - target) < 1
            failures += not ok
            print(f"  set limit {target:.0f} W -> enforced {r.limit_watts:.0f} W ({'ok' if ok else 'MISMATCH'}), power {r.power_watts:.1f} W")
            if gpu.min_clock_mhz is not None and gpu.max_clock_mhz is not None:
                lock = (gpu.min_clock_mhz + gpu.max_clock_mhz) // 2
                backend.lock_clocks(gpu.uuid, lock)
                time.sleep(SETTLE_SECONDS)
                r = backend.read(gpu.uuid)
                ok = r.clock_mhz is not None and r.clock_mhz <= lock
                failures += not ok
                print(f"  lock SM clock <= {lock} MHz -> SM {r.clock_mhz} MHz ({'ok' if ok else 'ABOVE THE LOCK'}), power {r.power_watts:.1f} W")
            else:
                print("  clock locking: not supported on this GPU")
        except GpuError as error:
            failures += 1
            print(f"  refused: {error} (reason {error.reason})")
        finally:
            try:
                release(backend, gpu)
                time.sleep(SETTLE_SECONDS)
                r = backend.read(gpu.uuid)
                ok = abs(r.limit_watts - gpu.initial_limit_watts) < 1 or abs(r.limit_watts - gpu.default_limit_watts) < 1
                failures += not ok
                print(f"  restored: enforced {r.limit_watts:.0f} W ({'ok' if ok else 'NOT RESTORED'}), SM {r.clock_mhz} MHz")
            except GpuError as error:
                failures += 1
                print(f"  restore refused: {error}")
finally:
    backend.close()
print("gpu-check:", "ok" if not failures else f"{failures} problem(s)")
sys.exit(1 if failures else 0)
PY
