"""The speed seams as a reconstruction uses them, on the tiny parity weights: the attention backend
is a job parameter (refused up front where it cannot run), and a cancel reaches the mesher."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import parity_dir  # noqa: E402

from com4d import attention, params  # noqa: E402
from com4d.errors import Cancelled, ParameterError  # noqa: E402
from com4d.events import CancelToken, MeshReady  # noqa: E402
from com4d.inputs import SceneInputs, load_inputs  # noqa: E402
from com4d.params import ReconstructionParams  # noqa: E402
from com4d.pipeline import COM4DPipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> COM4DPipeline:
    return COM4DPipeline.from_pretrained(parity_dir() / "weights", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def inputs() -> SceneInputs:
    return load_inputs(parity_dir() / "cases" / "pipeline_tiny_inputs")


SMALL = dict(num_tokens=8, scene_steps=2, dynamic_steps=2, dynamic_mix_cutoff=1, frame_stride=1, frame_end=3,
             dynamic_ar_block_size=2, dynamic_max_memory_frames=3, image_size=28, mesh_dense_depth=4,
             mesh_final_depth=5, combined_frames=False, preview=False)


def test_the_schema_names_exactly_the_attention_seams_backends():
    assert params.ATTENTION_BACKENDS == attention.BACKENDS


def test_an_attention_backend_the_device_lacks_is_refused_before_any_work(pipe, inputs, tmp_path):
    missing = [b for b in attention.BACKENDS if b not in attention.available_backends("cpu", pipe.dtype)]
    if not missing:
        pytest.fail("every attention backend runs on this CPU: the refusal cannot be shown")
    with pytest.raises(ParameterError, match=f"attention_backend '{missing[0]}'.*available here: .*math"):
        pipe.reconstruct(inputs, ReconstructionParams(**SMALL, attention_backend=missing[0]), tmp_path)
    assert not (tmp_path / "scene.json").exists()


def test_the_jobs_attention_backend_runs_every_attention_call(pipe, inputs, tmp_path):
    with attention.record_kernels() as calls:
        pipe.reconstruct(inputs, ReconstructionParams(**SMALL, attention_backend="math"), tmp_path)
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

    p = ReconstructionParams(**{**SMALL, "mesh_dense_depth": 6, "mesh_final_depth": 7}, mesh_workers=0)
    with pytest.raises(Cancelled):
        pipe.reconstruct(inputs, p, tmp_path, on_event=on_event, cancel=cancel)
    elapsed = time.perf_counter() - cancelled_at[0]
    assert elapsed < 5.0, f"the cancel took {elapsed:.1f} s to land"
    scene = json.loads((tmp_path / "scene.json").read_text())
    assert scene["status"] == "cancelled"
    assert any(tmp_path.rglob("*.glb")), "the mesh finished before the cancel was lost"
