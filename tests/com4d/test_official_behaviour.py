"""Official behaviours at the edges, on the tiny parity weights: guidance <= 1, no stage A, the mask
blend, the conditioning source, the routing layouts, the noise modes and the encoder size; and the
speed seams as a job uses them: the attention backend as a job parameter, a cancel reaching the mesher."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import parity_dir  # noqa: E402

from com4d import attention, routing, stages  # noqa: E402
from com4d.dit import CellContext  # noqa: E402
from com4d.errors import Cancelled, ParameterError  # noqa: E402
from com4d.events import CancelToken, MeshReady  # noqa: E402
from com4d.inputs import DynamicObject, SceneInputs, load_inputs  # noqa: E402
from com4d.params import ATTENTION_BACKENDS, OFFICIAL_SPATIAL_BLOCK_IDS, ReconstructionParams  # noqa: E402
from com4d.pipeline import COM4DPipeline, default_noise  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> COM4DPipeline:
    return COM4DPipeline.from_pretrained(parity_dir() / "weights", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def inputs() -> SceneInputs:
    return load_inputs(parity_dir() / "cases" / "pipeline_tiny_inputs")


SMALL = dict(num_tokens=8, scene_steps=3, dynamic_steps=3, dynamic_mix_cutoff=1, frame_stride=1, frame_end=4,
             dynamic_ar_block_size=2, dynamic_max_memory_frames=3, image_size=28)


def test_guidance_one_is_the_conditional_prediction_alone(pipe):
    torch.manual_seed(0)
    M, T, C = 3, 8, pipe.transformer.cfg.in_channels
    noise = torch.randn(M, T, C)
    tokens = torch.randn(M, 5, pipe.transformer.cfg.cross_attention_dim)
    ctx = CellContext.per_cell(tokens)
    zero = CellContext.zeros(M, 5, tokens.shape[-1], noise.device, noise.dtype)
    passes = []
    out = stages.run_stage_a(pipe.transformer, pipe.scheduler, noise, 2, ctx, ctx, zero, steps=3, guidance=1.0,
                             trace=lambda *a: passes.append(a[5]))
    assert passes == [None, None, None]  # no unconditional pass was run
    # the same steps written out: x <- x + (sigma_i - sigma_i+1) * cond
    sig, ts = pipe.scheduler.sigmas(3), pipe.scheduler.timesteps(3)
    x = noise[:, None]
    for i in range(3):
        v = pipe.transformer.forward_grid(x, ts[i : i + 1], ctx, ctx, 2)
        x = (x.float() + (float(sig[i]) - float(sig[i + 1])) * v.float()).to(v.dtype)
    torch.testing.assert_close(out, x[:, 0], atol=0, rtol=0)


def test_zero_static_parts_skip_stage_a_and_draw_stage_b_noise_first(pipe, inputs):
    params = ReconstructionParams(**SMALL, scene_num_parts=0)
    seen = []
    latents = pipe.sample(inputs, params, trace=lambda stage, w, i, x, *rest: seen.append((stage, w, x.shape)))
    assert latents.static.shape[0] == 0 and latents.dynamic_stage_a.shape[0] == 0
    assert all(stage == "stage_b" for stage, _, _ in seen)
    # window 0 holds only its new frames: no stage-A history column, no static rows
    assert {shape for stage, w, shape in seen if w == 0} == {(1, 2, 8, pipe.transformer.cfg.in_channels)}
    g = torch.Generator("cpu").manual_seed(params.seed)
    first = torch.randn(1, 8, pipe.transformer.cfg.in_channels, generator=g)
    drawn = default_noise(0, 1, 8, pipe.transformer.cfg.in_channels, params.seed)
    torch.testing.assert_close(drawn["stage_b_dynamic"], first, atol=0, rtol=0)


def test_object_images_blend_with_mask_over_255(pipe):
    frame = np.full((28, 28, 3), (200, 100, 50), np.uint8)
    mask = np.zeros((28, 28), np.uint8)
    mask[:, 14:] = 128  # a soft edge, as a matting tool writes it
    mask[:, 21:] = 255
    scene = SceneInputs(frames=[frame], frame_numbers=[0], dynamic=[DynamicObject("o", 0, [mask])])
    _, objects = pipe.conditioning_images(scene, ReconstructionParams(image_size=28), [0])
    img = objects[0][0].astype(int)
    assert img[0, 0].tolist() == [255, 255, 255]
    assert img[0, 25].tolist() == [200, 100, 50]
    m = np.float32(128) / np.float32(255)  # frame*m + white*(1 - m), float32, truncated to uint8
    expected = [int((np.float32(c) / 255 * m + (1 - m)) * 255) for c in (200, 100, 50)]
    assert img[0, 16].tolist() == expected


def test_frames_no_bg_only_when_asked(pipe):
    red = np.full((28, 28, 3), (255, 0, 0), np.uint8)
    white = np.full((28, 28, 3), 255, np.uint8)
    mask = np.full((28, 28), 255, np.uint8)
    scene = SceneInputs(frames=[red], frame_numbers=[0], dynamic=[DynamicObject("o", 0, [mask])],
                        frames_no_bg=[white])
    full, _ = pipe.conditioning_images(scene, ReconstructionParams(image_size=28), [0])
    assert full[0][0, 0].tolist() == [255, 0, 0]  # official default: frames/
    full, _ = pipe.conditioning_images(scene, ReconstructionParams(image_size=28, use_frames_no_bg=True), [0])
    assert full[0][0, 0].tolist() == [255, 255, 255]


def test_routing_layouts_whose_skip_pairs_differ_are_refused(pipe, inputs):
    routing.check_skip_pairing(21, OFFICIAL_SPATIAL_BLOCK_IDS)  # the released layout
    routing.check_skip_pairing(5, [0, 2, 4])
    with pytest.raises(ValueError, match="block 1 is spatial but block 3"):
        routing.check_skip_pairing(5, [0, 1])
    with pytest.raises(ParameterError, match=r"spatial_block_ids \[0, 1\]"):
        pipe.sample(inputs, ReconstructionParams(**SMALL, spatial_block_ids=[0, 1]))
    assert pipe.transformer.cfg.spatial_block_ids == [0, 2, 4]  # the model's own config is left as it was


def test_routing_ids_reach_the_model(pipe, inputs):
    base = pipe.sample(inputs, ReconstructionParams(**SMALL))
    # block 2 temporal instead of spatial (and 0/4 kept): a different, still skip-consistent layout
    other = pipe.sample(inputs, ReconstructionParams(**SMALL, spatial_block_ids=[0, 4]))
    assert not torch.equal(base.static, other.static)
    again = pipe.sample(inputs, ReconstructionParams(**SMALL))
    assert torch.equal(base.dynamic, again.dynamic)


def test_cuda_noise_mode(pipe):
    if not torch.cuda.is_available():
        # This machine has no GPU: the mode must say so instead of silently drawing on the CPU.
        with pytest.raises(ParameterError, match="cuda_fp16.*none is available"):
            default_noise(1, 1, 4, 2, seed=0, mode="cuda_fp16")
        return
    g = torch.Generator("cuda").manual_seed(3)  # the official draw: randn_tensor on CUDA in fp16
    expected = [torch.randn(n, 4, 2, generator=g, device="cuda", dtype=torch.float16) for n in (2, 1, 1)]
    drawn = default_noise(2, 1, 4, 2, seed=3, mode="cuda_fp16")
    for key, want in zip(("stage_a_static", "stage_a_dynamic", "stage_b_dynamic"), expected):
        assert drawn[key].dtype == torch.float16 and torch.equal(drawn[key], want)


def test_the_encoder_size_is_passed_not_changed(pipe):
    size_before = pipe.image_encoder.size
    tokens = pipe.encode_images([np.zeros((28, 28, 3), np.uint8)], size=28)
    assert tokens.shape[1] == 1 + (28 // 14) ** 2
    assert pipe.image_encoder.size == size_before


def test_a_run_without_stage_a_and_a_block_over_memory_writes_the_planned_files(pipe, inputs, tmp_path):
    events = []
    params = ReconstructionParams(**{**SMALL, "dynamic_ar_block_size": 3, "dynamic_max_memory_frames": 2},
                                  scene_num_parts=0, mesh_dense_depth=4, mesh_final_depth=5, preview=False)
    pipe.reconstruct(inputs, params, tmp_path, on_event=events.append)
    warnings = [e for e in events if e.kind == "warning"]
    assert [w.code for w in warnings] == ["block_exceeds_memory"]
    plan = pipe.plan(inputs, params)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("**/*.glb") if p.parent.name != "frames")
    assert written == sorted(plan.outputs())
    assert not (tmp_path / "static").exists() and not (tmp_path / "stage_a_scene.glb").exists()
    progress = [e for e in events if e.kind == "progress" and e.total]
    assert progress[-1].done == progress[-1].total == plan.total_units


# -- the speed seams as a job uses them ------------------------------------------------------------

SEAMS = dict(num_tokens=8, scene_steps=2, dynamic_steps=2, dynamic_mix_cutoff=1, frame_stride=1, frame_end=3,
             dynamic_ar_block_size=2, dynamic_max_memory_frames=3, image_size=28, mesh_dense_depth=4,
             mesh_final_depth=5, combined_frames=False, preview=False)


def test_the_schema_names_exactly_the_attention_seams_backends():
    assert ATTENTION_BACKENDS == attention.BACKENDS


def test_an_attention_backend_the_device_lacks_is_refused_before_any_work(pipe, inputs, tmp_path):
    missing = [b for b in attention.BACKENDS if b not in attention.available_backends("cpu", pipe.dtype)]
    if not missing:
        pytest.fail("every attention backend runs on this CPU: the refusal cannot be shown")
    with pytest.raises(ParameterError, match=f"attention_backend '{missing[0]}'.*available here: .*math"):
        pipe.reconstruct(inputs, ReconstructionParams(**SEAMS, attention_backend=missing[0]), tmp_path)
    assert not (tmp_path / "scene.json").exists()


def test_the_jobs_attention_backend_runs_every_attention_call(pipe, inputs, tmp_path):
    with attention.record_kernels() as calls:
        pipe.reconstruct(inputs, ReconstructionParams(**SEAMS, attention_backend="math"), tmp_path)
    assert calls, "no attention call was recorded"
    assert {c["backend"] for c in calls} == {"math"}
    assert attention.current_backend() == "auto"  # the job's choice does not leak out of it


def test_a_cancel_while_meshing_ends_the_job_and_keeps_the_finished_mesh(pipe, inputs, tmp_path):
    # Meshes large enough that one takes seconds here; the cancel comes with the first finished mesh,
    # while the next one is being decoded, so only the mesher's own check can end it quickly.
    cancel = CancelToken()
    cancelled_at: list[float] = []

    def on_event(event):
        if isinstance(event, MeshReady) and not cancelled_at:
            cancelled_at.append(time.perf_counter())
            cancel.cancel()

    p = ReconstructionParams(**{**SEAMS, "mesh_dense_depth": 6, "mesh_final_depth": 7}, mesh_workers=0)
    with pytest.raises(Cancelled):
        pipe.reconstruct(inputs, p, tmp_path, on_event=on_event, cancel=cancel)
    elapsed = time.perf_counter() - cancelled_at[0]
    assert elapsed < 5.0, f"the cancel took {elapsed:.1f} s to land"
    scene = json.loads((tmp_path / "scene.json").read_text())
    assert scene["status"] == "cancelled"
    assert any(tmp_path.rglob("*.glb")), "the mesh finished before the cancel was lost"
