"""Official infer.json entries as our parameters (`com4d reconstruct DIR --config infer.json:ENTRY`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from com4d.cli import main as cli_main
from com4d.demo import demo_paths
from com4d.errors import ParameterError
from com4d.official_config import load_entry, parse_entry
from com4d.params import ReconstructionParams
from com4d.scene import load_scene

# The teaser2048 entry as the official repository's infer.json (insait-institute/COM4D @ ee0bde9) has it, but
# for transformer_dir, an absolute path on the authors' machine, replaced by another absolute path.
TEASER2048 = {
    "tag": "teaser2048", "data_dir": "assets/teaser", "transformer_dir": "/ckpts/com4d_final",
    "num_tokens": 2048, "first_frame_idx": 5, "frames_start_idx": 0, "frames_end_idx": 100, "frame_stride": 2,
    "scene_num_parts": 4, "dynamic_num_parts": 2, "scene_block_size": 16, "dynamic_ar_block_size": 6,
    "dynamic_max_memory_frames": 8, "scene_mix_cutoff": 50, "dynamic_mix_cutoff": 20,
}


def test_teaser_entry_maps_onto_our_parameters():
    entry = parse_entry({"teaser2048": TEASER2048}, "teaser2048")
    assert entry.params == {
        "num_tokens": 2048, "stage_a_frame": 5, "frame_start": 0, "frame_end": 100, "frame_stride": 2,
        "scene_num_parts": 4, "dynamic_ar_block_size": 6, "dynamic_max_memory_frames": 8, "scene_mix_cutoff": 50,
        "dynamic_mix_cutoff": 20,
    }
    assert entry.dynamic_objects == 2
    params = ReconstructionParams.from_dict(entry.params)  # every mapped value is a valid parameter
    assert (params.stage_a_frame, params.scene_num_parts, params.frame_stride) == (5, 4, 2)


def test_attention_ids_are_read_as_the_official_script_parses_them():
    entry = parse_entry({"e": {"scene_attn_ids": "0,2 4", "dynamic_attn_ids": [0, 1, 3]}}, "e")
    assert entry.params == {"spatial_block_ids": [0, 2, 4], "temporal_block_ids": [0, 1, 3]}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"num_tokenz": 16}, "unknown key 'num_tokenz'"),
        ({"history_mode": "soft"}, "history_mode='soft' is not supported"),
        ({"use_dino_multi": 1}, "use_dino_multi=1 is not supported"),
        ({"scene_attn_ids": "0,two"}, "scene_attn_ids"),
    ],
)
def test_bad_entries_are_named(entry, message):
    with pytest.raises(ParameterError, match=message):
        parse_entry({"e": entry}, "e")


def test_missing_entry_lists_the_entries(tmp_path):
    path = tmp_path / "infer.json"
    path.write_text(json.dumps({"teaser2048": TEASER2048, "teaser1024": TEASER2048}))
    with pytest.raises(ParameterError, match=r"no entry 'teaser512' \(entries: teaser1024, teaser2048\)"):
        load_entry(f"{path}:teaser512")
    with pytest.raises(ParameterError, match="FILE:ENTRY"):
        load_entry(str(path))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ParameterError, match="not valid JSON"):
        load_entry(f"{tmp_path / 'broken.json'}:x")


TINY_ENTRY = {
    "tag": "tiny", "data_dir": "somewhere/else", "num_tokens": 16, "first_frame_idx": 2, "frames_start_idx": 1,
    "frames_end_idx": 6, "frame_stride": 2, "scene_num_parts": 1, "dynamic_num_parts": 1, "scene_block_size": 16,
    "dynamic_ar_block_size": 2, "dynamic_max_memory_frames": 3, "scene_mix_cutoff": 50, "dynamic_mix_cutoff": 0,
}
FAST = ["--scene-steps", "2", "--dynamic-steps", "2", "--mesh-dense-depth", "4", "--mesh-final-depth", "5",
        "--device", "cpu", "--quiet", "--no-preview"]


def write_config(tmp_path: Path, entry: dict) -> Path:
    path = tmp_path / "infer.json"
    path.write_text(json.dumps({"tiny": entry}))
    return path


def test_cli_runs_an_official_entry_and_flags_override_it(tmp_path):
    config = write_config(tmp_path, TINY_ENTRY)
    out = tmp_path / "out"
    code = cli_main(["reconstruct", str(demo_paths()[1]), "--config", f"{config}:tiny", "--weights",
                     str(demo_paths()[0]), "--out", str(out), "--frame-end", "4", *FAST])
    assert code == 0
    scene = load_scene(out)
    assert scene["frames"] == [1, 3]  # start 1 and stride 2 from the entry, end 4 from the flag
    assert scene["params"]["num_tokens"] == 16 and scene["params"]["stage_a_frame"] == 2
    assert scene["params"]["frame_end"] == 4


def test_cli_refuses_an_entry_whose_moving_objects_differ_from_the_masks(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY_ENTRY, "dynamic_num_parts": 3})
    code = cli_main(["reconstruct", str(demo_paths()[1]), "--config", f"{config}:tiny", "--weights",
                     str(demo_paths()[0]), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "dynamic_num_parts=3" in err and "holds 1 moving object" in err
