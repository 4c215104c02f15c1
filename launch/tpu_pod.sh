#!/usr/bin/env bash
# Runs doc2atom_jax on every worker of a Cloud TPU VM slice (multi-host JAX), from your own machine.
#
#   bash launch/tpu_pod.sh --tpu my-v5e-16 --zone us-west4-a --project my-project \
#       --workdir /mnt/shared/runs/gemma2_2b_it --config configs/gemma2_2b_it.py --detach \
#       -- --config.model.name=hf:/mnt/shared/models/gemma-2-2b-it
#
# Four gcloud commands, each for all workers at once (--worker=all): (1) prepare the remote folder, (2) copy this
# working tree there, (3) create the virtualenv with `launch/install.sh --tpu` where it does not work yet,
# (4) run `python -m doc2atom_jax.main` with the same flags everywhere, with DOC2ATOM_DISTRIBUTED=1 (and
# LIBTPU_INIT_ARGS when it is set here). `--dry-run` prints them. Details: launch/README.md.
set -euo pipefail

me=launch/tpu_pod.sh
usage() {
  cat <<'EOF'
usage: bash launch/tpu_pod.sh --tpu NAME --zone ZONE --workdir DIR --config FILE[:ARG] [options] [-- FLAGS...]

Runs `python -m doc2atom_jax.main --config=FILE[:ARG] --workdir=DIR FLAGS...` on every worker of a Cloud TPU VM
slice, with DOC2ATOM_DISTRIBUTED=1 (jax.distributed.initialize on every worker).

required:
  --tpu NAME            the TPU VM (gcloud compute tpus tpu-vm list --zone ZONE)
  --zone ZONE           its zone, e.g. us-west4-a
  --workdir DIR         absolute path of storage mounted at the same place on every worker (Filestore/NFS, a
                        gcsfuse mount of a bucket): checkpoints, metrics, exports. gs:// URLs are refused: the
                        trainer writes its workdir with local file I/O, so mount the bucket and give the mount path
  --config FILE[:ARG]   config file relative to the repository root, e.g. configs/gemma2_2b_it.py:d2l

options:
  --project PROJECT     Google Cloud project (default: gcloud's configured project)
  --remote-dir DIR      folder on every worker, relative to the home directory or absolute (default: doc2atom_jax);
                        it holds code/ (replaced at every launch), venv/ and logs/
  --python PY           interpreter for a new virtualenv (>= 3.11; default: launch/install.sh's search)
  --apt-python          where the virtualenv is missing and python3.11 is not installed, install python3.11 and
                        python3.11-venv with apt first (TPU VM images on Ubuntu 22.04 ship Python 3.10)
  --reinstall           delete the workers' virtualenv and create it again
  --skip-copy           keep the code already on the workers (no prepare and copy steps)
  --detach              start the run in the background (nohup) and return; the output goes to
                        REMOTE_DIR/logs/run-<UTC time>.log (and logs/latest.log) on every worker
  --env NAME=VALUE      export NAME=VALUE on every worker for the run (repeatable), e.g. DOC2ATOM_CACHE=/mnt/cache
  --internal-ip         reach the workers through their internal IPs (gcloud --internal-ip)
  --dry-run             print the commands instead of running them
  -h, --help            this text
  -- FLAGS...           everything after -- is passed to doc2atom_jax.main (e.g. --config.train.steps=100)

environment: LIBTPU_INIT_ARGS, when set here, is exported on every worker for the run.
Rerunning the same command resumes the run from its newest checkpoint in --workdir.
EOF
}
# die, quote, quote_words, take: shared with the other launchers.
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

tpu="" zone="" project="" workdir="" config="" remote_dir="doc2atom_jax" python="" apt_python=0 reinstall=0
skip_copy=0 detach=0 internal_ip=0 dry_run=0
envs=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu|--tpu=*) take "$@"; tpu=$val; shift "$used" ;;
    --zone|--zone=*) take "$@"; zone=$val; shift "$used" ;;
    --project|--project=*) take "$@"; project=$val; shift "$used" ;;
    --workdir|--workdir=*) take "$@"; workdir=$val; shift "$used" ;;
    --config|--config=*) take "$@"; config=$val; shift "$used" ;;
    --remote-dir|--remote-dir=*) take "$@"; remote_dir=$val; shift "$used" ;;
    --python|--python=*) take "$@"; python=$val; shift "$used" ;;
    --env|--env=*) take "$@"; envs+=("$val"); shift "$used" ;;
    --apt-python) apt_python=1; shift ;;
    --reinstall) reinstall=1; shift ;;
    --skip-copy) skip_copy=1; shift ;;
    --detach) detach=1; shift ;;
    --internal-ip) internal_ip=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (flags for doc2atom_jax.main go after --)" ;;
  esac
done

missing=()
[ -n "$tpu" ] || missing+=(--tpu)
[ -n "$zone" ] || missing+=(--zone)
[ -n "$workdir" ] || missing+=(--workdir)
[ -n "$config" ] || missing+=(--config)
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}"

repo=$(cd "$(dirname "$0")/.." && pwd)
case "$workdir" in
  gs://*) die "--workdir $workdir: the trainer writes its workdir with local file I/O and cannot write gs:// URLs;" \
              "mount the bucket on every worker (gcsfuse) or use Filestore, and give the mounted path" ;;
  *://*) die "--workdir $workdir: give a path mounted on every worker, not a URL" ;;
  /*) ;;
  *) die "--workdir $workdir must be an absolute path on storage every worker mounts (a relative path would" \
         "land on each worker's own disk)" ;;
esac
config_file=${config%%:*}
[ -f "$repo/$config_file" ] || die "--config: no file $config_file in $repo (give it relative to the repository root)"
[[ $remote_dir =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir '$remote_dir': use letters, digits and _ . / - only"
[[ $tpu =~ ^[a-z0-9-]+$ ]] || die "--tpu '$tpu' is not a TPU VM name"
for assignment in ${envs[@]+"${envs[@]}"}; do
  [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$assignment': expected NAME=VALUE"
done
[ "$dry_run" = 1 ] || command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI)"

gcloud_flags=(--zone "$zone")
[ -z "$project" ] || gcloud_flags+=(--project "$project")
gcloud_flags+=(--worker=all)
[ "$internal_ip" = 0 ] || gcloud_flags+=(--internal-ip)
ssh_all() { commands+=("$(quote_words gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --command "$1")"); }
remote=$(quote "$remote_dir")
commands=()  # each one a printed command line, run with bash -c (it is what --dry-run prints)

# 1. prepare: refuse while a detached run is still going, then drop the old code (the virtualenv stays).
if [ "$skip_copy" = 0 ]; then
  ssh_all "set -e; mkdir -p $remote/logs; pid_file=$remote/logs/run.pid;\
 if [ -f \"\$pid_file\" ] && kill -0 \"\$(cat \"\$pid_file\")\" 2>/dev/null; then\
 echo \"\$(hostname): a detached run is still going (pid \$(cat \"\$pid_file\")); stop it first\" >&2; exit 1; fi;\
 rm -rf $remote/code"
  # 2. copy: the staging folder holds git's tracked and untracked (not ignored) files: no .venv, no runs/.
  stage_src='STAGE/code'
  if [ "$dry_run" = 0 ]; then
    stage=$(mktemp -d "${TMPDIR:-/tmp}/doc2atom_jax-stage.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    stage_src=$stage/code
  fi
  commands+=("$(quote_words gcloud compute tpus tpu-vm scp --recurse "$stage_src" "$tpu:$remote_dir/" \
                "${gcloud_flags[@]}")")
fi

# 3. install where the virtualenv is missing or broken.
install="set -e; cd $remote;"
[ "$reinstall" = 0 ] || install+=" rm -rf venv;"
install+=" if venv/bin/python -c 'import doc2atom_jax, jax' 2>/dev/null;"
install+=" then echo \"\$(hostname): reusing $remote/venv\";"
install+=" else"
py_env=""
[ -z "$python" ] || py_env="PYTHON=$(quote "$python") "
if [ "$apt_python" = 1 ]; then
  install+=" if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq &&"
  install+=" sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; fi;"
  [ -n "$python" ] || py_env="PYTHON=python3.11 "
fi
install+=" ${py_env}VENV=\"\$PWD/venv\" bash code/launch/install.sh --tpu; fi"
ssh_all "$install"

# 4. run: the same command on every worker.
run="set -e; cd $remote/code; export DOC2ATOM_DISTRIBUTED=1;"
if [ -n "${LIBTPU_INIT_ARGS+set}" ]; then run+=" export LIBTPU_INIT_ARGS=$(quote "$LIBTPU_INIT_ARGS");"; fi
for assignment in ${envs[@]+"${envs[@]}"}; do run+=" export ${assignment%%=*}=$(quote "${assignment#*=}");"; done
main=$(quote_words ../venv/bin/python -m doc2atom_jax.main "--config=$config" "--workdir=$workdir" \
         ${extra[@]+"${extra[@]}"})
if [ "$detach" = 1 ]; then
  log="run-$(date -u +%Y%m%d-%H%M%S).log"
  run+=" nohup $main > ../logs/$log 2>&1 < /dev/null & echo \$! > ../logs/run.pid; ln -sfn $log ../logs/latest.log;"
  run+=" echo \"\$(hostname): started pid \$(cat ../logs/run.pid), log $remote/logs/$log\""
else
  run+=" exec $main"
fi
ssh_all "$run"

if [ "$dry_run" = 1 ]; then
  if [ "$skip_copy" = 0 ]; then
    echo "# STAGE: a temporary copy of $repo (git's tracked and untracked, not ignored, files)" \
         "plus the bundled QA samples"
  fi
  printf '%s\n' "${commands[@]}"
  exit 0
fi

if [ "$skip_copy" = 0 ]; then
  mkdir "$stage/code"
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
       | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
       | tar --null -T - -cf -) | tar -xf - -C "$stage/code"
  else
    tar -C "$repo" --exclude=./.git --exclude='./.venv*' --exclude=./runs --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -xf - -C "$stage/code"
  fi
  # The bundled QA samples (shared/data/qa above the package, or $DOC2ATOM_QA_DIR), where the code looks for them.
  qa=${DOC2ATOM_QA_DIR:-}
  if [ -z "$qa" ]; then
    dir=$repo
    while [ "$dir" != / ]; do
      if [ -d "$dir/shared/data/qa" ]; then qa=$dir/shared/data/qa; break; fi
      dir=$(dirname "$dir")
    done
  fi
  if [ -n "$qa" ] && [ ! -d "$stage/code/shared/data/qa" ]; then
    mkdir -p "$stage/code/shared/data"
    cp -R "$qa" "$stage/code/shared/data/qa"
  fi
fi
for command in "${commands[@]}"; do
  echo "+ $command" >&2
  bash -c "$command"
done
if [ "$detach" = 1 ]; then
  echo "started on every worker of $tpu; follow process 0 with:" >&2
  echo "  $(quote_words gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project:+--project "$project"} \
        --worker=0 --command "tail -f $remote/logs/latest.log")" >&2
fi
