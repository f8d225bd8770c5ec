# Progress lines for long builds; sourced by build.sh (and by its test, with a fake command).
#
#   step MESSAGE...              one "[controlplane] ..." line on stderr
#   timed COMPONENT COMMAND...   run COMMAND; every $AMPACITY_HEARTBEAT_SECONDS (30) print that
#                                COMPONENT is still building and for how long, then the total
#
# A cold kube-apiserver build is silent for up to half an hour otherwise, which reads as a hang.

step() { printf '[controlplane] %s\n' "$*" >&2; }

timed() {
  local component=$1 started rc=0 ticker
  shift
  started=$(date +%s)
  (
    # Stop with the build: also when the script that started it is killed outright.
    parent=$$
    while sleep "${AMPACITY_HEARTBEAT_SECONDS:-30}"; do
      kill -0 "$parent" 2>/dev/null || exit 0
      step "  still building $component: $(( $(date +%s) - started )) s elapsed"
    done
  ) &
  ticker=$!
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    step "  building $component failed after $(( $(date +%s) - started )) s (exit $rc)"
    return "$rc"
  fi
  step "  $component done in $(( $(date +%s) - started )) s"
}
