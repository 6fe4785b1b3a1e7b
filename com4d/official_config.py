"""Read an entry of the official `infer.json` (e.g. `teaser2048`) as our reconstruction parameters.

The official `src/inference_com4d.py --config_key KEY` takes the entry's keys through a fixed table
(`key_map`) onto its command-line arguments and ignores every other key. `OFFICIAL_KEYS` below is that
table mapped onto our parameter names (com4d/params.py). What the official script reads and we do
not take as a parameter is handled explicitly:

- `LOCATION_KEYS` say where the official script finds its files (`data_dir`, `transformer_dir`, ...).
  Here the input folder, `--weights` and `--out` are command-line arguments, so these keys are
  accepted and not used.
- `dynamic_num_parts` is the number of moving objects (rows of the matrix). Ours is the number of
  moving objects in the input's masks, so the entry's value is returned for the caller to check
  against the input (`OfficialEntry.dynamic_objects`).
- `scene_block_size` is in every released entry, but the official `key_map` reads `scene_ar_block_size`
  instead, so the official script never applies it; it is accepted and ignored in the same way.
- Settings of options we do not have are refused unless they hold the official default.

Any other key is an error that names it: a typo must not pass silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from com4d.errors import ParameterError

# official infer.json key -> our parameter (com4d/params.py)
OFFICIAL_KEYS = {
    "num_tokens": "num_tokens",
    "first_frame_idx": "stage_a_frame",
    "frames_start_idx": "frame_start",
    "frames_end_idx": "frame_end",
    "frame_stride": "frame_stride",
    "scene_num_parts": "scene_num_parts",
    "dynamic_ar_block_size": "dynamic_ar_block_size",
    "dynamic_max_memory_frames": "dynamic_max_memory_frames",
    "scene_mix_cutoff": "scene_mix_cutoff",
    "dynamic_mix_cutoff": "dynamic_mix_cutoff",
    "seed": "seed",
    "scene_attn_ids": "spatial_block_ids",
    "dynamic_attn_ids": "temporal_block_ids",
    "image_size": "image_size",
}
LOCATION_KEYS = ("tag", "data_dir", "transformer_dir", "base_weights_dir", "output_dir")
IGNORED_BY_OFFICIAL = ("scene_block_size",)
# options of the official script we do not implement: only their official default is accepted
FIXED_KEYS = {
    "history_mode": "fixed",
    "use_dino_multi": 0,
    "use_latents_with_timesteps": 0,
    "scene_ar_block_size": 1,
    "insert_rotation_every": None,  # rendering of the official GIF: no effect on the meshes
}
DYNAMIC_PARTS_KEY = "dynamic_num_parts"


@dataclass
class OfficialEntry:
    """One infer.json entry as our parameter values plus the moving-object count it expects."""

    name: str
    params: dict[str, Any]
    dynamic_objects: int | None


def _block_ids(key: str, value: Any) -> list[int]:
    """Official ids come as "0,2,4" or "0 2 4" (its _parse_id_string) or as a JSON list."""
    try:
        if isinstance(value, str):
            return [int(t) for t in value.replace(",", " ").split()]
        return [int(v) for v in value]
    except (TypeError, ValueError) as err:
        raise ParameterError(f"infer.json key {key!r}: expected block ids such as \"0,2,4\", got {value!r}") from err


def parse_entry(config: dict[str, Any], name: str, source: str = "infer.json") -> OfficialEntry:
    """Map the entry `name` of a parsed infer.json onto our parameter names."""
    if name not in config:
        known = ", ".join(sorted(config)) or "none"
        raise ParameterError(f"{source} has no entry {name!r} (entries: {known})")
    entry = config[name]
    if not isinstance(entry, dict):
        raise ParameterError(f"{source} entry {name!r} is not an object of settings")
    params: dict[str, Any] = {}
    dynamic_objects = None
    for key, value in entry.items():
        if value is None or key in LOCATION_KEYS or key in IGNORED_BY_OFFICIAL:
            continue  # the official script skips None values too
        if key in OFFICIAL_KEYS:
            ours = OFFICIAL_KEYS[key]
            params[ours] = _block_ids(key, value) if ours.endswith("_block_ids") else value
        elif key == DYNAMIC_PARTS_KEY:
            dynamic_objects = int(value)
        elif key in FIXED_KEYS:
            if FIXED_KEYS[key] is not None and value != FIXED_KEYS[key]:
                raise ParameterError(
                    f"{source} entry {name!r}: {key}={value!r} is not supported (only the official default "
                    f"{FIXED_KEYS[key]!r}); remove the key or set it to the default"
                )
        else:
            raise ParameterError(f"{source} entry {name!r}: unknown key {key!r}")
    return OfficialEntry(name, params, dynamic_objects)


def load_entry(spec: str) -> OfficialEntry:
    """`FILE:ENTRY` (e.g. `infer.json:teaser2048`) -> the entry's parameters."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise ParameterError(f"--config must be FILE:ENTRY, e.g. infer.json:teaser2048 (got {spec!r})")
    path = Path(path_text).expanduser()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ParameterError(f"cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise ParameterError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ParameterError(f"{path} is not an infer.json (expected an object of named entries)")
    return parse_entry(config, name, source=str(path))
