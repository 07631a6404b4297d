#!/usr/bin/env bash
# Run N cooperating training processes on this machine (127.0.0.1), each with its own simulated
# CPU devices: the stand-in for a multi-host cluster used by the tests.
#
#   launch/local.sh N CONFIG [dotted.key=value ...]
#
# Environment: DEVICES_PER_PROCESS (default 4), PORT (default: a free one), IMITATION_JAX (the CLI command,
# default .venv/bin/imitation-jax or imitation-jax on PATH), LOG_DIR (default: stdout/stderr of
# process 0 pass through; the others go to LOG_DIR/process-<i>.log, default a temp dir).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [dotted.key=value ...]" >&2
  exit 2
fi
n=$1; config=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
cli=${IMITATION_JAX:-}
if [ -z "$cli" ]; then
  if [ -x "$here/.venv/bin/imitation-jax" ]; then cli="$here/.venv/bin/imitation-jax"; else cli=imitation-jax; fi
fi
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${DEVICES_PER_PROCESS:-4}
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = n - 1; i >= 0; i--)); do
  # shellcheck disable=SC2086  # $cli is split on purpose: IMITATION_JAX may be a command with arguments
  env XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
    $cli train "$config" distributed.initialization_timeout=60 distributed.heartbeat_timeout=10 "$@" \
    > >(if [ "$i" = 0 ]; then cat; else cat > "$log_dir/process-$i.log"; fi) \
    2> >(if [ "$i" = 0 ]; then cat >&2; else cat > "$log_dir/process-$i.err"; fi) &
  pids+=($!)
done

status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
[ "$status" = 0 ] || echo "launch/local.sh: a process failed (exit $status); logs of processes 1..$((n-1)) in $log_dir" >&2
exit "$status"
