"""The submit checks of backend/submit.py as plain functions: no socket, no server, no model.

Step 1 looks at the message only; step 2 (`inspect_inputs`) reads headers of what is stored. Images
here are real PNG files; the oversized ones are written header-only (a valid IHDR chunk, no pixel
data), which is exactly what a decode bomb is, and what the checks must refuse without decoding."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from backend_helpers import masks_dir, png_header_only

from backend.submit import Rejected, SubmitLimits, check_resubmit, check_submit, inspect_inputs
from com4d.params import ModelLimits

LIMITS = SubmitLimits(model=ModelLimits(part_rows=8, frame_rows=16))
MASK_FILES = {"frames/000000.png": b"x", "masks/000000_object_000.png": b"x"}


def rejected(call, *args) -> Rejected:
    with pytest.raises(Rejected) as info:
        call(*args)
    return info.value


def stored_masks(tmp_path: Path, frames: dict[str, bytes] | None = None, objects_json: bytes | None = None) -> Path:
    """A job folder whose inputs/masks holds the tiny case's masks and `frames` (default: its frames)."""
    job_dir = tmp_path / "job"
    root = job_dir / "inputs" / "masks"
    shutil.copytree(masks_dir() / "masks", root / "masks")
    if frames is None:
        shutil.copytree(masks_dir() / "frames", root / "frames")
    else:
        (root / "frames").mkdir(parents=True)
        for name, data in frames.items():
            (root / "frames" / name).write_bytes(data)
    if objects_json is not None:
        (root / "objects.json").write_bytes(objects_json)
    return job_dir


def masks_request(params: dict | None = None) -> dict:
    return check_submit({"masks": {}, "params": params or {"frame_stride": 1}}, MASK_FILES, LIMITS)


# -- step 1: the message ---------------------------------------------------------------------------


def test_exactly_one_input_form_masks_plus_resubmit_is_refused():
    stored = {"video": None, "masks": {"stored": "inputs/masks"}, "prompts": None, "params": {}}
    err = rejected(check_resubmit, {"resubmit": "j", "masks": {}}, {}, stored, "j", LIMITS)
    assert err.code == "bad_field" and "`masks`" in str(err)
    err = rejected(check_resubmit, {"resubmit": "j"}, MASK_FILES, stored, "j", LIMITS)
    assert err.code == "bad_field" and "uploaded files" in str(err)
    err = rejected(check_submit, {"masks": {}, "video": {"filename": "a.mp4"}}, MASK_FILES, LIMITS)
    assert err.code == "bad_field"


@pytest.mark.parametrize(
    "params",
    [
        {"scene_guidance": math.nan},
        {"dynamic_guidance": math.inf},
        {"num_tokens": 2**63},
        {"mesh_workers": -1},
        {"scene_num_parts": -1},
        {"scene_num_parts": 1_000_000},  # above the model's part table (8 here)
        {"memory_budget": -5},
        {"frame_stride": 0},
        {"no_such_parameter": 1},
    ],
)
def test_every_out_of_range_parameter_is_refused_at_submit(params):
    err = rejected(check_submit, {"masks": {}, "params": params}, MASK_FILES, LIMITS)
    assert err.code == "bad_parameter", str(err)
    assert next(iter(params)) in str(err)


def test_params_that_are_not_a_map_are_a_bad_field():
    assert rejected(check_submit, {"masks": {}, "params": [1, 2]}, MASK_FILES, LIMITS).code == "bad_field"


def test_too_many_objects_in_the_mask_names():
    files = {"frames/000000.png": b"x", **{f"masks/000000_object_{i:03d}.png": b"x" for i in range(40)}}
    err = rejected(check_submit, {"masks": {}}, files, SubmitLimits(max_objects=32))
    assert err.code == "too_large" and "40 objects" in str(err)


def test_file_paths_are_refused_off_loopback():
    err = rejected(check_submit, {"masks": {"path": "/data/clip"}}, {}, SubmitLimits(paths_allowed=False))
    assert err.code == "forbidden"


# -- step 2: the stored inputs ------------------------------------------------------------------------


def test_the_tiny_case_passes_and_its_frame_count_is_recorded(tmp_path):
    request = masks_request()
    inspect_inputs(request, stored_masks(tmp_path), LIMITS)
    assert request["masks"]["frames"] == len(list((masks_dir() / "frames").glob("*.png")))


def test_a_png_declaring_ten_billion_pixels_is_bad_input_not_internal(tmp_path):
    job_dir = stored_masks(tmp_path, frames={"000000.png": png_header_only(100_000, 100_000)})
    err = rejected(inspect_inputs, masks_request(), job_dir, LIMITS)
    assert err.code == "bad_input" and "000000.png" in str(err)


def test_a_9000_square_frame_is_refused_from_its_header_alone(tmp_path):
    # 81 megapixels: under PIL's own bomb limit, over the server's frame limit; nothing is decoded.
    job_dir = stored_masks(tmp_path, frames={f"{i:06d}.png": png_header_only(9000, 9000) for i in range(10)})
    err = rejected(inspect_inputs, masks_request(), job_dir, LIMITS)
    assert err.code == "bad_input" and "9000x9000" in str(err)


def test_a_masks_folder_counts_every_image_it_holds_against_the_job_pixel_limit(tmp_path):
    # com4d.inputs.load_inputs decodes the whole folder, selected or not: every frame counts.
    frames = {f"{i:06d}.png": png_header_only(2000, 2000) for i in range(40)}
    limits = SubmitLimits(max_job_pixels=10 * 2000 * 2000)  # room for 10 such frames
    for stride in (1, 4):
        err = rejected(
            inspect_inputs,
            masks_request({"frame_stride": stride}),
            stored_masks(tmp_path / str(stride), frames),
            limits,
        )
        assert err.code == "too_large" and "pixels" in str(err) and err.advice


def test_a_video_counts_only_its_selected_frames_against_the_job_pixel_limit(tmp_path):
    from backend_helpers import many_packet_video

    prompts = {"objects": [{"name": "a", "role": "dynamic", "prompts": [{"frame": 0, "points": [[8, 8, 1]]}]}]}
    limits = SubmitLimits(max_job_pixels=10 * 1024 * 1024)  # room for 10 frames of 1024 x 1024
    job_dir = tmp_path / "job"
    (job_dir / "inputs").mkdir(parents=True)
    many_packet_video(job_dir / "inputs" / "video.mkv", packets=40, size=1024)

    def request(stride: int) -> dict:
        fields = {"video": {"filename": "clip.mkv"}, "prompts": prompts, "params": {"frame_stride": stride}}
        return check_submit(fields, {"video": b""}, limits)

    err = rejected(inspect_inputs, request(1), job_dir, limits)
    assert err.code == "too_large" and "40 of 40 frames" in str(err)
    accepted = request(4)
    inspect_inputs(accepted, job_dir, limits)  # 10 selected frames: within the limit
    assert accepted["video"] == {"stored": "inputs/video.mkv", "frames": 40}


def test_the_selected_frame_count_is_limited(tmp_path):
    err = rejected(inspect_inputs, masks_request(), stored_masks(tmp_path), SubmitLimits(max_frames=2))
    assert err.code == "too_large" and "frame" in str(err) and err.advice


@pytest.mark.parametrize("depth", [50, 100_000])
def test_a_deeply_nested_objects_json_is_bad_input(tmp_path, depth):
    deep = b'{"dynamic": ' + b"[" * depth + b"]" * depth + b"}"
    err = rejected(inspect_inputs, masks_request(), stored_masks(tmp_path, objects_json=deep), LIMITS)
    assert err.code == "bad_input" and "objects.json" in str(err)


def test_an_ordinary_objects_json_passes(tmp_path):
    objects = {"dynamic": [{"id": 0, "name": "dog", "color": [1, 0, 0]}], "static": [{"name": "table"}]}
    inspect_inputs(masks_request(), stored_masks(tmp_path, objects_json=json.dumps(objects).encode()), LIMITS)


def test_messages_about_stored_inputs_hold_no_server_path(tmp_path):
    job_dir = stored_masks(tmp_path, frames={"000000.png": b"not a png at all"})
    err = rejected(inspect_inputs, masks_request(), job_dir, LIMITS)
    assert err.code == "bad_input" and "000000.png" in str(err)
    assert str(tmp_path) not in str(err) and "/job/" not in str(err)


@pytest.mark.parametrize(
    ("params", "code", "words"),
    [
        ({"frame_start": 50}, "bad_input", "selects no frame of the 40"),
        ({"stage_a_frame": 99}, "bad_input", "stage_a_frame"),
        ({"dynamic_ar_block_size": 40, "dynamic_max_memory_frames": 40}, "bad_parameter", "window"),
        ({"scene_num_parts": 8}, "bad_parameter", "exceed the model's 8 objects"),  # 8 static + 1 moving
    ],
)
def test_the_librarys_plan_refuses_at_submit_what_would_fail_in_the_job(tmp_path, params, code, words):
    frames = {f"{i:06d}.png": png_header_only(64, 64) for i in range(40)}
    err = rejected(inspect_inputs, masks_request(params), stored_masks(tmp_path, frames), LIMITS)
    assert err.code == code and words in str(err)


def test_a_video_with_prompts_is_planned_as_the_pipeline_plans_it(tmp_path):
    # Segmentation reads only the selected frames, so the stage-A frame must be one of them.
    from backend_helpers import many_packet_video

    prompts = {"objects": [{"name": "a", "role": "dynamic", "prompts": [{"frame": 0, "points": [[8, 8, 1]]}]}]}
    job_dir = tmp_path / "job"
    (job_dir / "inputs").mkdir(parents=True)
    many_packet_video(job_dir / "inputs" / "video.mkv", packets=12)
    fields = {"video": {"filename": "clip.mkv"}, "prompts": prompts, "params": {"frame_stride": 2, "stage_a_frame": 3}}
    err = rejected(inspect_inputs, check_submit(fields, {"video": b""}, LIMITS), job_dir, LIMITS)
    assert err.code == "bad_parameter" and "stage_a_frame 3" in str(err)
    fields["params"]["stage_a_frame"] = 4
    request = check_submit(fields, {"video": b""}, LIMITS)
    inspect_inputs(request, job_dir, LIMITS)
    assert request["video"]["frames"] == 12
