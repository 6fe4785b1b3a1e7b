#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the embedded default: the bundled clip and tiny weights,
# stage A + stage B + meshing on the CPU. Output: demo_out/ (scene.json, GLBs, preview.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/com4d demo --out "${1:-demo_out}"
