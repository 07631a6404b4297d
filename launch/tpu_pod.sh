#!/usr/bin/env bash
# Train on every worker (host) of a Cloud TPU VM slice, from your workstation, with gcloud.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE                       # copy this checkout to every worker, make its venv
#   launch/tpu_pod.sh run   TPU_NAME ZONE CONFIG [key=value ...] # start `imitation-jax train` on every worker,
#                                                               # follow worker 0, then gather every worker's log
#   launch/tpu_pod.sh logs  TPU_NAME ZONE                       # gather the logs again (LOG_DIR/worker-<i>.log)
#   launch/tpu_pod.sh stop  TPU_NAME ZONE                       # SIGTERM: checkpoint at the next step, exit 75
#
# Each worker runs one process that drives the chips of its host; JAX finds the slice's coordinator,
# process count and id from the TPU VM metadata (the run adds distributed.auto_detect=true). Training
# runs detached (nohup) on the workers, so a dropped connection or Ctrl-C here stops only the
# following of the log, never the run; `stop` ends it cleanly, and `run` again resumes it.
#
# Environment (FILL IN what differs from the defaults):
#   PROJECT      gcloud project (default: gcloud's configured one)
#   REMOTE_DIR   checkout on the workers (default: imitation_jax, under the remote home)
#   PYTHON       interpreter on the workers for the venv, 3.11 or newer (default: python3)
#   LOG_DIR      local directory for the gathered logs (default: tpu-logs/TPU_NAME)
#   DETACH=1     `run` starts the workers and returns at once
#   DRY_RUN=1    print the gcloud commands (one a line, shell-quoted) instead of running them;
#                WORKERS (default 1) stands in for the slice's worker count, nothing is packed
# The config's run_dir and data paths must name the same files on every worker: a gcsfuse-mounted
# bucket or an NFS (Filestore) mount at the same path; every process writes its checkpoint shards.
set -euo pipefail

usage() {
  sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 3 ] || usage
action=$1; tpu=$2; zone=$3; shift 3
remote_dir=${REMOTE_DIR:-imitation_jax}
log_dir=${LOG_DIR:-tpu-logs/$tpu}
gcloud_args=(--zone "$zone")
[ -n "${PROJECT:-}" ] && gcloud_args+=(--project "$PROJECT")
dry=${DRY_RUN:-0}
exec 3>&1  # dry-run lines go to the real stdout, also from inside $(...)

gc() {  # gcloud ARGS..., or with DRY_RUN=1 the command line it would be
  if [ "$dry" = 1 ]; then
    local line
    line=$(printf '%q ' gcloud "$@")
    echo "${line% }" >&3
  else
    gcloud "$@"
  fi
}

on_workers() {  # on_workers WORKER COMMAND: run a shell command on one worker or on all of them
  gc compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker="$1" --command "$2"
}

num_workers() {
  if [ "$dry" = 1 ]; then
    gc compute tpus tpu-vm describe "$tpu" "${gcloud_args[@]}" --format=json
    echo "${WORKERS:-1}"
    return
  fi
  gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_args[@]}" --format=json \
    | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))'
}

gather_logs() {
  [ "$dry" = 1 ] || mkdir -p "$log_dir"
  local n i
  n=$(num_workers)
  for ((i = 0; i < n; i++)); do
    gc compute tpus tpu-vm scp "${gcloud_args[@]}" --worker="$i" \
      "$tpu:$remote_dir/logs/train.log" "$log_dir/worker-$i.log" >/dev/null 2>&1 \
      || echo "tpu_pod.sh: no log on worker $i yet" >&2
  done
  echo "tpu_pod.sh: logs of $n worker(s) in $log_dir/"
}

case "$action" in
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    if [ "$dry" = 1 ]; then
      tarball=imitation_jax.tar.gz
    else
      tarball=$(mktemp -t imitation_jax.XXXXXX.tar.gz)
      trap 'rm -f "$tarball"' EXIT
      # Tracked and untracked-but-not-ignored files: what you see in `git status`, no venvs or runs.
      (cd "$here" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$tarball")
    fi
    gc compute tpus tpu-vm scp "${gcloud_args[@]}" --worker=all "$tarball" "$tpu:imitation_jax.tar.gz"
    on_workers all "set -e; mkdir -p $remote_dir && tar -xzf imitation_jax.tar.gz -C $remote_dir && cd $remote_dir \
      && (test -x .venv/bin/python || ${PYTHON:-python3} -m venv .venv) \
      && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]' \
      && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  run)
    [ $# -ge 1 ] || usage
    train=$(printf '%q ' .venv/bin/imitation-jax train "$@" distributed.auto_detect=true)
    # Each worker gets logs/run.sh (a quoted here-document: no second round of shell quoting) and
    # runs it detached (setsid: no hangup when ssh goes); train.pid is the trainer's pid, train.exit
    # its exit code, both next to the log.
    script="PYTHONUNBUFFERED=1 $train &
echo \$! > logs/train.pid
wait \$!
echo \$? > logs/train.exit"
    on_workers all "set -e; cd $remote_dir; mkdir -p logs; rm -f logs/train.exit logs/train.pid
cat > logs/run.sh <<'__RUN__'
$script
__RUN__
nohup setsid bash logs/run.sh > logs/train.log 2>&1 < /dev/null &
sleep 1; echo \"\$(hostname): started pid \$(cat logs/train.pid)\""
    if [ "${DETACH:-0}" = 1 ]; then
      echo "tpu_pod.sh: running detached; follow with: $0 logs $tpu $zone"
      exit 0
    fi
    echo "tpu_pod.sh: following worker 0 (Ctrl-C stops following, not training)"
    on_workers 0 "cd $remote_dir && tail -n +1 -f --pid=\$(cat logs/train.pid) logs/train.log; sleep 2" || true
    gather_logs
    read_exit="cat $remote_dir/logs/train.exit 2>/dev/null || echo running"
    if [ "$dry" = 1 ]; then on_workers 0 "$read_exit"; exit 0; fi
    code=$(on_workers 0 "$read_exit" | tail -n 1)
    echo "tpu_pod.sh: worker 0 exit: $code"
    [ "$code" = 0 ]
    ;;
  logs)
    gather_logs
    ;;
  stop)
    on_workers all "cd $remote_dir && test -f logs/train.pid && kill -TERM \$(cat logs/train.pid) 2>/dev/null \
      && echo \"\$(hostname): SIGTERM sent\" || echo \"\$(hostname): not running\""
    ;;
  *)
    usage
    ;;
esac
