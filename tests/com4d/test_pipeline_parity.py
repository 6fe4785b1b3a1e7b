"""The whole official inference (fixture case h, `pipeline_tiny`) reproduced by our pipeline.

Inputs, parameters, noise and tolerances all come from the fixture set (COM4D_PARITY_DIR); the
recorded official noise is injected through `COM4DPipeline.sample(noise=...)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case, parity_dir  # noqa: E402

from com4d.inputs import load_inputs  # noqa: E402
from com4d.pipeline import COM4DPipeline, ReconstructionParams  # noqa: E402


def block_ids(ids: str) -> list[int]:
    """The official `--scene_attn_ids` / `--dynamic_attn_ids` value ("0,2,4") as a list."""
    return [int(i) for i in ids.replace(" ", ",").split(",") if i]


def per_call_tolerance() -> dict:
    """A traced call is one `forward_matrix`: held to the single-forward tolerance of that function's own case."""
    side, _ = load_case("com4d_matrix")
    return {"atol": side["suggested_tolerance"]["atol"], "rtol": side["suggested_tolerance"]["rtol"]}


def params_from_sidecar(side: dict, tensors: dict) -> ReconstructionParams:
    entry = side["params"]["infer_json_entry"]
    cli = side["params"]["cli"]
    return ReconstructionParams(
        num_tokens=entry["num_tokens"],
        stage_a_frame=entry["first_frame_idx"],
        frame_start=entry["frames_start_idx"],
        frame_end=entry["frames_end_idx"],
        frame_stride=entry["frame_stride"],
        scene_num_parts=entry["scene_num_parts"],
        dynamic_ar_block_size=entry["dynamic_ar_block_size"],
        dynamic_max_memory_frames=entry["dynamic_max_memory_frames"],
        scene_mix_cutoff=entry["scene_mix_cutoff"],
        dynamic_mix_cutoff=entry["dynamic_mix_cutoff"],
        # The official __call__ ignores --scene_steps (quirk 1): the steps it really ran are the
        # recorded stage-A calls.
        scene_steps=tensors["stageA_x_in"].shape[0],
        dynamic_steps=cli["dynamic_steps"],
        scene_guidance=cli["scene_guidance"],
        dynamic_guidance=cli["dynamic_guidance"],
        seed=cli["seed"],
        image_size=cli["image_size"],
        spatial_block_ids=block_ids(cli["scene_attn_ids"]),
        temporal_block_ids=block_ids(cli["dynamic_attn_ids"]),
    )


@pytest.fixture(scope="module")
def official():
    return load_case("pipeline_tiny")


@pytest.fixture(scope="module")
def run(official):
    side, t = official
    pipe = COM4DPipeline.from_pretrained(
        parity_dir() / "weights", device="cpu", dtype=side["params"]["cli"]["dtype"]
    )
    inputs = load_inputs(parity_dir() / "cases" / "pipeline_tiny_inputs")
    assert len(inputs.frames) == side["params"]["frames_on_disk"]
    assert len(inputs.dynamic) == side["params"]["infer_json_entry"]["dynamic_num_parts"]
    noise = {
        "stage_a_static": t["noise_0_stageA_static"],
        "stage_a_dynamic": t["noise_1_stageA_dynamic"],
        "stage_b_dynamic": t["noise_2_stageB_dynamic"],
    }
    calls: dict[tuple[str, int, int], tuple] = {}

    def trace(stage, window, step, x, cond, uncond, first_row):
        calls[(stage, window, step)] = (x.clone(), cond.clone(), uncond.clone(), first_row)

    latents = pipe.sample(inputs, params_from_sidecar(side, t), noise=noise, trace=trace)
    return pipe, latents, calls


def test_default_noise_equals_the_recorded_official_draws(official):
    from com4d.pipeline import default_noise

    side, t = official
    entry = side["params"]["infer_json_entry"]
    C = t["noise_0_stageA_static"].shape[-1]
    noise = default_noise(
        entry["scene_num_parts"],
        entry["dynamic_num_parts"],
        entry["num_tokens"],
        C,
        side["params"]["cli"]["seed"],
    )
    torch.testing.assert_close(noise["stage_a_static"], t["noise_0_stageA_static"], atol=0, rtol=0)
    torch.testing.assert_close(noise["stage_a_dynamic"], t["noise_1_stageA_dynamic"], atol=0, rtol=0)
    torch.testing.assert_close(noise["stage_b_dynamic"], t["noise_2_stageB_dynamic"], atol=0, rtol=0)


def test_stage_a_trace_matches_every_official_call(official, run):
    _, t = official
    _, _, calls = run
    tol = per_call_tolerance()
    steps = t["stageA_x_in"].shape[0]
    for i in range(steps):
        x, _, _, _ = calls[("stage_a", 0, i)]
        torch.testing.assert_close(x, t["stageA_x_in"][i], **tol, msg=f"x_in step {i}")
    for j, i in enumerate(t["stageA_trace_steps"].tolist()):
        _, cond, uncond, first = calls[("stage_a", 0, i)]
        assert first == 0
        torch.testing.assert_close(cond, t["stageA_out_cond"][j], **tol, msg=f"cond step {i}")
        torch.testing.assert_close(uncond, t["stageA_out_uncond"][j], **tol, msg=f"uncond step {i}")


def test_stage_b_windows_match_every_official_call(official, run):
    side, t = official
    _, _, calls = run
    static = side["params"]["infer_json_entry"]["scene_num_parts"]
    cutoff = side["params"]["infer_json_entry"]["dynamic_mix_cutoff"]
    tol = per_call_tolerance()
    windows = t["stageB_timesteps"].shape[0]
    for w in range(windows):
        for i in range(t[f"stageB_window{w}_x_in"].shape[0]):
            x, cond, uncond, first = calls[("stage_b", w, i)]
            where = f"window {w} step {i}"
            torch.testing.assert_close(x, t[f"stageB_window{w}_x_in"][i], **tol, msg=where)
            # after the cutoff only the dynamic rows are computed (the static ones cannot affect them)
            assert first == (static if i > cutoff else 0), where
            torch.testing.assert_close(cond, t[f"stageB_window{w}_out_cond"][i][first:], **tol, msg=where)
            torch.testing.assert_close(uncond, t[f"stageB_window{w}_out_uncond"][i][first:], **tol, msg=where)


def test_final_latents_match_within_the_pipeline_tolerance(official, run):
    side, t = official
    _, latents, _ = run
    tol = side["suggested_tolerance"]["latents"]
    torch.testing.assert_close(latents.static, t["stageA_static_latents"], **tol)
    torch.testing.assert_close(latents.dynamic_stage_a, t["stageA_dynamic_latents"], **tol)
    torch.testing.assert_close(latents.dynamic, t["stageB_dynamic_latents"], **tol)


def test_fields_of_the_final_latents_match(official, run):
    side, t = official
    pipe, latents, _ = run
    n = side["params"]["fields_grid_points_per_axis"]
    axis = torch.linspace(-1.005, 1.005, n)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
    # official order: static parts, each moving object at the stage-A frame, then every moving object's
    # frames, object-major
    order = [*latents.static, *latents.dynamic_stage_a, *latents.dynamic.flatten(0, 1)]
    fields = torch.stack([pipe.vae.decode(z[None], grid)[0].reshape(n, n, n) for z in order])
    # the fields are a decode of the final latents, so they are held to the latents' tolerance
    torch.testing.assert_close(fields, t[f"fields_grid{n}"], **side["suggested_tolerance"]["latents"])


def test_skipping_the_static_rows_after_the_cutoff_is_bitwise_the_full_grid(official, run):
    side, t = official
    pipe, latents, _ = run
    inputs = load_inputs(parity_dir() / "cases" / "pipeline_tiny_inputs")
    noise = {
        "stage_a_static": t["noise_0_stageA_static"],
        "stage_a_dynamic": t["noise_1_stageA_dynamic"],
        "stage_b_dynamic": t["noise_2_stageB_dynamic"],
    }
    full = pipe.sample(inputs, params_from_sidecar(side, t), noise=noise, static_rows_after_cutoff=True)
    assert t["stageB_window0_x_in"].shape[0] > side["params"]["infer_json_entry"]["dynamic_mix_cutoff"] + 1
    assert torch.equal(full.dynamic, latents.dynamic)
    assert torch.equal(full.static, latents.static)
