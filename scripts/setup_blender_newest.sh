#!/usr/bin/env bash
# Create .venv313: the newest Blender as a Python module (bpy 5.x on Python 3.13) for the add-on tests.
# The library and the backend are not installed here (no torch): the tests run them in .venv's Python.
# Usage: bash scripts/setup_blender_newest.sh      (idempotent; re-running only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
BPY_NEWEST=5.3.0
PY=${PYTHON313:-python3.13}
if ! "$PY" --version >/dev/null 2>&1 && command -v pyenv >/dev/null 2>&1; then
  # a pyenv shim answers only for the selected versions: pick the newest installed 3.13
  PYENV_VERSION=$(pyenv versions --bare | grep -E '^3\.13\.[0-9]+$' | sort -V | tail -1)
  export PYENV_VERSION
fi
if [ ! -x .venv313/bin/python ]; then
  "$PY" -m venv .venv313
fi
VPY=.venv313/bin/python
"$VPY" -m pip install -q "bpy==$BPY_NEWEST" "pytest>=8" "hypothesis>=6.90" "trimesh>=4.0" "av>=12" "pyzmq>=25" "msgpack>=1.0"
"$VPY" -c "import sys, bpy, zmq, msgpack; print('setup ok: Python', sys.version.split()[0], '| bpy', bpy.app.version_string)"
