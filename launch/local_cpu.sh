#!/usr/bin/env bash
# Runs doc2atom_jax on 8 simulated CPU devices, as one process or as several local processes (multi-host JAX on
# one machine: the same code path as a pod, for debugging sharding and jax.distributed without accelerators).
#
#   bash launch/local_cpu.sh --config configs/tiny.py --workdir runs/tiny_mesh -- --config.train.mesh='(2,4,1)'
#   bash launch/local_cpu.sh --processes 2 --config configs/tiny.py --workdir runs/tiny_2proc
#
# --processes N starts N processes on localhost with 8/N devices each, jax.distributed's coordinator on a free
# port, waits for all of them, and stops the others (SIGTERM, then SIGKILL) as soon as one fails or on Ctrl-C.
set -euo pipefail

me=launch/local_cpu.sh
usage() {
  cat <<'EOF'
usage: bash launch/local_cpu.sh --config FILE[:ARG] --workdir DIR [options] [-- FLAGS...]

Runs `python -m doc2atom_jax.main --config=FILE[:ARG] --workdir=DIR FLAGS...` on simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, JAX_PLATFORMS=cpu), from the repository root.

required:
  --config FILE[:ARG]   config file relative to the repository root, e.g. configs/tiny.py
  --workdir DIR         output folder (relative paths: relative to the repository root)

options:
  --devices N           simulated CPU devices in all (default 8)
  --processes P         local processes, each with N/P devices (default 1); P > 1 sets DOC2ATOM_DISTRIBUTED=1 and
                        --config.distributed.{coordinator_address=localhost:PORT,num_processes=P,process_id=i}
  --port PORT           the coordinator's port (default: a free one)
  --dry-run             print the commands instead of running them
  -h, --help            this text
  -- FLAGS...           everything after -- is passed to doc2atom_jax.main

environment: VENV (virtualenv, default .venv); XLA_FLAGS is kept, its device count replaced.
Exit status: 0 when every process exits 0, else the first failure's status (130 after Ctrl-C).
EOF
}
# die, quote, quote_words, take: shared with the other launchers.
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

config="" workdir="" devices=8 processes=1 port="" dry_run=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config|--config=*) take "$@"; config=$val; shift "$used" ;;
    --workdir|--workdir=*) take "$@"; workdir=$val; shift "$used" ;;
    --devices|--devices=*) take "$@"; devices=$val; shift "$used" ;;
    --processes|--processes=*) take "$@"; processes=$val; shift "$used" ;;
    --port|--port=*) take "$@"; port=$val; shift "$used" ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (flags for doc2atom_jax.main go after --)" ;;
  esac
done
missing=()
[ -n "$config" ] || missing+=(--config)
[ -n "$workdir" ] || missing+=(--workdir)
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive integer, not '$devices'"
[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, not '$processes'"
(( devices % processes == 0 )) || die "--devices $devices is not divisible by --processes $processes"
[ -z "$port" ] || [[ $port =~ ^[1-9][0-9]*$ && $port -lt 65536 ]] || die "--port must be a port number, not '$port'"

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ -f "${config%%:*}" ] || die "--config: no file ${config%%:*} in $repo (give it relative to the repository root)"
python=${VENV:-.venv}/bin/python
[ "$dry_run" = 1 ] || [ -x "$python" ] ||
  die "no virtualenv at ${VENV:-.venv} in $repo: run 'bash launch/install.sh' first"

per_process=$((devices / processes))
xla_flags=$(printf '%s' "${XLA_FLAGS:-}" |
            sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g; s/  +/ /g; s/^ //; s/ $//')
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$per_process"
main=("$python" -m doc2atom_jax.main "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})

if [ "$processes" = 1 ]; then
  if [ "$dry_run" = 1 ]; then
    echo "cd $(quote "$repo")"
    echo "XLA_FLAGS=$(quote "$xla_flags") JAX_PLATFORMS=cpu $(quote_words "${main[@]}")"
    exit 0
  fi
  XLA_FLAGS=$xla_flags JAX_PLATFORMS=cpu exec "${main[@]}"
fi

if [ -z "$port" ]; then  # a free port, as the kernel hands them out
  for finder in python3 "$python"; do
    port=$("$finder" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])' \
           2>/dev/null) || true
    [[ $port =~ ^[0-9]+$ ]] && break
  done
  [[ $port =~ ^[0-9]+$ ]] || die "could not find a free port (no python3?): give one with --port"
fi
commands=()
for ((i = 0; i < processes; i++)); do
  commands+=("$(printf 'XLA_FLAGS=%s JAX_PLATFORMS=cpu DOC2ATOM_DISTRIBUTED=1 %s' "$(quote "$xla_flags")" \
    "$(quote_words "${main[@]}" "--config.distributed.coordinator_address=localhost:$port" \
       "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$i")")")
done
if [ "$dry_run" = 1 ]; then
  echo "cd $(quote "$repo")"
  echo "# $processes processes at once, $per_process devices each; coordinator localhost:$port"
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
# stop GRACE: SIGTERM to the processes still running (the trainer saves and exits), SIGKILL after GRACE seconds.
stop() {
  local grace=$1 pid tick alive
  for pid in "${pids[@]}"; do [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true; done
  for ((tick = 0; tick < grace * 5; tick++)); do
    alive=0
    for pid in "${pids[@]}"; do if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
    [ "$alive" = 1 ] || return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true; done
}
interrupted() {
  trap 'stop 0; exit 130' INT TERM  # a second Ctrl-C: kill at once
  echo "$me: interrupted; stopping the processes (Ctrl-C again to kill them)" >&2
  stop 120
  exit 130
}
trap interrupted INT TERM
echo "$me: $processes processes x $per_process CPU devices, coordinator localhost:$port" >&2
for ((i = 0; i < processes; i++)); do  # what the dry run prints, from the same words
  XLA_FLAGS=$xla_flags JAX_PLATFORMS=cpu DOC2ATOM_DISTRIBUTED=1 "${main[@]}" \
    "--config.distributed.coordinator_address=localhost:$port" "--config.distributed.num_processes=$processes" \
    "--config.distributed.process_id=$i" &
  pids+=("$!")
done
running=$processes
while [ "$running" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null; then continue; fi
    status=0
    wait "$pid" || status=$?
    pids[i]=""
    running=$((running - 1))
    if [ "$status" != 0 ]; then
      echo "$me: process $i exited with status $status; stopping the others" >&2
      stop 10
      exit "$status"
    fi
  done
  [ "$running" = 0 ] || sleep 0.2
done
echo "$me: all $processes processes exited 0" >&2
