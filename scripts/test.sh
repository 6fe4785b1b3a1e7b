#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and .venv313 (scripts/setup_blender_newest.sh), run the linter, the
# add-on tests in the newest Blender (bpy 5.x, Python 3.13) and then the whole test suite in .venv
# (the oldest supported Blender, bpy 4.5 LTS, Python 3.11).
# Usage: bash scripts/test.sh [extra pytest arguments]   (the arguments go to the whole-suite run)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_blender_newest.sh
.venv/bin/ruff check .
# Blender's Python has no torch: the library and the local backend run in .venv's Python.
COM4D_BACKEND_PYTHON="$PWD/.venv/bin/python" .venv313/bin/python -m pytest -q -p no:cacheprovider tests/addon
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
