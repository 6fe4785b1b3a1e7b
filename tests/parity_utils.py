"""Locate and load the golden parity fixtures (official COM4D/TripoSG numbers).

The fixture folder comes from the environment variable ``COM4D_PARITY_DIR``; without it the default is the
copy kept in the repository, ``tests/fixtures/parity`` (found relative to this file, not to the working
directory), so a fresh clone needs nothing beside it and tests give the same answer wherever pytest starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENV_VAR = "COM4D_PARITY_DIR"


def parity_dir() -> Path:
    """The parity fixture folder (holds README.md, cases/, weights/)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser().resolve()
    return FIXTURES / "parity"


def state_dict_keys_file() -> Path:
    """The official checkpoint key list (names and shapes of every tensor), kept in tests/fixtures/."""
    return FIXTURES / "com4d_state_dict_keys.txt"


def load_case(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (sidecar JSON dict, tensors dict) of ``cases/<name>``.

    Raises FileNotFoundError naming the missing file and the environment variable to set.
    """
    cases = parity_dir() / "cases"
    sidecar_path = cases / f"{name}.json"
    tensors_path = cases / f"{name}.safetensors"
    for path in (sidecar_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"parity fixture {path} not found (set {ENV_VAR} to the fixture folder)")
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    return sidecar, load_file(str(tensors_path))
