"""The parity tests hold for any fixture set, not only the one they were written against.

tests/fixtures/parity_alt is a second set made by the official code with other dimensions, object counts,
attention routing, step counts and conditioning size (its README lists them). The parity test files run
again, unchanged, in a child pytest with COM4D_PARITY_DIR pointing at it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import ENV_VAR, FIXTURES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALT = FIXTURES / "parity_alt"
PARITY_FILES = ["test_dit_parity.py", "test_dit.py", "test_vae_parity.py", "test_meshing.py",
                "test_scheduler_parity.py", "test_conditioning_parity.py", "test_pipeline_parity.py"]


def config(fixture_set: Path, model: str) -> dict:
    return json.loads((fixture_set / "weights" / model / "transformer" / "config.json").read_text())


def test_second_set_really_differs_from_the_first():
    first, second = config(FIXTURES / "parity", "COM4D"), config(ALT, "COM4D")
    for key in ("width", "num_layers", "in_channels", "cross_attention_dim", "spatial_global_attn_block_ids"):
        assert first[key] != second[key], key


def pipeline_params(fixture_set: Path) -> dict:
    return json.loads((fixture_set / "cases" / "pipeline_tiny.json").read_text())["params"]


def test_second_full_inference_has_several_objects_of_each_kind_and_other_windows():
    first, second = pipeline_params(FIXTURES / "parity"), pipeline_params(ALT)
    assert second["infer_json_entry"]["scene_num_parts"] > 1 and second["infer_json_entry"]["dynamic_num_parts"] > 1
    for key in ("num_tokens", "first_frame_idx", "scene_num_parts", "dynamic_num_parts", "dynamic_ar_block_size",
                "dynamic_max_memory_frames", "dynamic_mix_cutoff"):
        assert first["infer_json_entry"][key] != second["infer_json_entry"][key], key
    for key in ("scene_attn_ids", "dynamic_attn_ids", "dynamic_steps", "seed", "image_size"):
        assert first["cli"][key] != second["cli"][key], key
    assert first["fields_grid_points_per_axis"] != second["fields_grid_points_per_axis"]


def test_parity_tests_pass_unchanged_on_the_second_fixture_set():
    env = {**os.environ, ENV_VAR: str(ALT), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                     os.environ.get("PYTHONPATH")]))}
    files = [str(Path(__file__).parent / name) for name in PARITY_FILES]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
