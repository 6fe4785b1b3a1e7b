#!/usr/bin/env bash
# Create .venv and install COM4D for Blender with everything the tests need.
# Usage: bash scripts/setup.sh            (idempotent; re-running only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# torch first, pinned to the build that lies on this machine's disk (CUDA build, runs on CPU too).
"$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VPY" -m pip install -q -e ".[dev,cluster]"
"$VPY" -c "import torch, transformers, safetensors, skimage, trimesh, av, zmq, msgpack, segment_anything, bpy; print('setup ok: torch', torch.__version__, '| bpy', bpy.app.version_string)"
