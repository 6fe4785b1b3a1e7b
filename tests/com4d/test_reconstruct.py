"""The reconstruction as users run it: CLI, output folder, events, cancellation, bad input.

Runs the real pipeline on the bundled demo clip and tiny weights with small settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from com4d.cli import main as cli_main
from com4d.demo import DEMO_PARAMS, demo_paths
from com4d.errors import Cancelled, InputError, ParameterError, WeightsError
from com4d.events import CancelToken
from com4d.pipeline import COM4DPipeline, ReconstructionParams, ReconstructionRequest
from com4d.scene import load_scene

FAST = {**DEMO_PARAMS, "num_tokens": 16, "scene_steps": 4, "dynamic_steps": 3, "dynamic_mix_cutoff": 1,
        "mesh_dense_depth": 4, "mesh_final_depth": 5, "frame_end": 6, "dynamic_ar_block_size": 3,
        "dynamic_max_memory_frames": 4}


@pytest.fixture(scope="module")
def pipe() -> COM4DPipeline:
    return COM4DPipeline.from_pretrained(demo_paths()[0])


@pytest.fixture()
def clip(tmp_path) -> Path:
    dst = tmp_path / "clip"
    shutil.copytree(demo_paths()[1], dst)
    return dst


def test_demo_command_writes_a_complete_scene(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--quiet"]) == 0
    scene = load_scene(out)
    assert scene["status"] == "complete"
    weights, clip = demo_paths()
    n_frames = len(list((clip / "frames").iterdir()))
    assert scene["frames"] == list(range(n_frames))
    roles = {o["name"]: o["role"] for o in scene["objects"]}
    assert roles == {"box": "static", "ball": "dynamic"}  # names from the clip's objects.json
    ball = next(o for o in scene["objects"] if o["name"] == "ball")
    assert [f["frame"] for f in ball["frames"]] == scene["frames"]
    for f in ball["frames"]:
        mesh = trimesh.load(out / f["mesh"], force="mesh")
        assert len(mesh.faces) > 0
        assert np.abs(mesh.vertices).max() <= 1.006  # inside the canonical cube
    assert (out / next(o for o in scene["objects"] if o["role"] == "static")["mesh"]).is_file()
    assert len(list((out / "frames").glob("frame_*.glb"))) == n_frames
    preview = Image.open(out / "preview.png")
    assert preview.size[0] > preview.size[1] > 100
    assert len(np.unique(np.asarray(preview).reshape(-1, 3), axis=0)) > 20  # something was drawn


def test_events_stream_every_mesh_and_progress_adds_up(pipe, clip, tmp_path):
    events = []
    result = pipe.reconstruct(ReconstructionRequest(frames_dir=clip), ReconstructionParams.from_dict(FAST),
                              tmp_path / "out", on_event=events.append)
    meshes = [e for e in events if e.kind == "mesh"]
    scene = load_scene(tmp_path / "out")
    assert len(meshes) == 1 + len(scene["frames"])  # one static + the ball per frame
    assert all(e.vertices.dtype == np.float32 and e.faces.dtype == np.int32 for e in meshes)
    assert all((tmp_path / "out" / e.path).is_file() for e in meshes)
    progress = [e for e in events if e.kind == "progress" and e.total]
    dones = [e.done for e in progress]
    assert dones == sorted(dones) and dones[-1] == progress[-1].total
    assert events[-1].kind == "done" and result.frames == scene["frames"]
    # the official stage-A outputs: every moving object's stage-A mesh and all stage-A meshes in one GLB
    ball = next(o for o in scene["objects"] if o["role"] == "dynamic")
    assert ball["stage_a_mesh"] == "dynamic/ball/stage_a.glb" and (tmp_path / "out" / ball["stage_a_mesh"]).is_file()
    stage_a = trimesh.load(tmp_path / "out" / scene["stage_a_scene"])
    assert sorted(stage_a.geometry) == sorted(o["name"] for o in scene["objects"])


def test_cancel_stops_within_one_step_and_keeps_finished_meshes(pipe, clip, tmp_path):
    cancel = CancelToken()
    seen = []

    def on_event(e):
        seen.append(e)
        if e.kind == "mesh" and e.role == "dynamic":
            cancel.cancel()

    with pytest.raises(Cancelled):
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip), ReconstructionParams.from_dict(FAST),
                         tmp_path / "out", on_event=on_event, cancel=cancel)
    scene = load_scene(tmp_path / "out")
    assert scene["status"] == "cancelled"
    finished = [e for e in seen if e.kind == "mesh"]
    assert all((tmp_path / "out" / e.path).is_file() for e in finished)
    # nothing ran after the cancel beyond the step in flight: no further mesh and no more progress
    after = seen[next(i for i, e in enumerate(seen) if e.kind == "mesh" and e.role == "dynamic") + 1:]
    assert not any(e.kind == "mesh" for e in after)
    assert sum(1 for e in after if e.kind == "progress" and e.steps) <= 1


def test_stage_a_frame_and_frame_range_select_the_right_source_frames(pipe, clip, tmp_path):
    params = ReconstructionParams.from_dict({**FAST, "frame_start": 1, "frame_end": 6, "frame_stride": 2,
                                             "stage_a_frame": 3})
    pipe.reconstruct(ReconstructionRequest(frames_dir=clip), params, tmp_path / "out")
    scene = load_scene(tmp_path / "out")
    assert scene["frames"] == [1, 3, 5] and scene["stage_a_frame"] == 3


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shutil.rmtree(d / "masks"), "no masks folder"),
        (lambda d: (d / "masks" / "000003_object_000.png").unlink(), "frames and masks do not match"),
        (lambda d: Image.new("L", (10, 10)).save(d / "masks" / "000002_object_000.png"), "10x10"),
        (lambda d: (d / "frames" / "000004.png").write_bytes(b"not a png"), "cannot read image"),
        (lambda d: Image.new("L", (96, 96)).save(d / "masks" / "000001_object_001.png"),
         "object 001 has masks for other frames"),
    ],
)
def test_bad_inputs_are_named(pipe, clip, tmp_path, breakage, message):
    breakage(clip)
    with pytest.raises(InputError, match=message):
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip), ReconstructionParams.from_dict(FAST), tmp_path / "o")


def test_bad_parameters_are_named(pipe, clip, tmp_path):
    with pytest.raises(InputError, match="selects no frame"):
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip),
                         ReconstructionParams.from_dict({**FAST, "frame_start": 50, "frame_end": None}), tmp_path / "o")
    with pytest.raises(ParameterError, match=r"scene_num_parts must be in \[0, 8\]"):
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip),
                         ReconstructionParams.from_dict({**FAST, "scene_num_parts": 9}), tmp_path / "o")
    with pytest.raises(ParameterError, match="8 static parts \\+ 1 dynamic objects exceed the model's 8 objects"):
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip),
                         ReconstructionParams.from_dict({**FAST, "scene_num_parts": 8}), tmp_path / "o")
    with pytest.raises(ParameterError, match="unknown parameter 'tokens'"):
        ReconstructionParams.from_dict({"tokens": 5})
    with pytest.raises(ParameterError, match="num_tokens must be an integer"):
        ReconstructionParams.from_dict({"num_tokens": "many"})


def test_memory_budget_below_the_estimate_is_an_out_of_memory_error(pipe, clip, tmp_path):
    from com4d.errors import OutOfMemory

    with pytest.raises(OutOfMemory, match="fewer tokens"):
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip),
                         ReconstructionParams.from_dict({**FAST, "memory_budget": 1000}), tmp_path / "o")


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, clip):
    code = cli_main(["reconstruct", str(clip), "--weights", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "TripoSG" in err
    code = cli_main(["reconstruct", str(clip / "frames" / "000000.png"), "--weights", str(demo_paths()[0]),
                     "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"])
    assert code == 2 and "--masks" in capsys.readouterr().err


def test_weights_folder_missing_a_component_is_named(tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(demo_paths()[0], weights)
    (weights / "TripoSG" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="vae"):
        COM4DPipeline.from_pretrained(weights)


def test_cli_reconstruct_runs_the_official_folder_layout(tmp_path, clip, capsys):
    out = tmp_path / "o"
    args = ["reconstruct", str(clip), "--weights", str(demo_paths()[0]), "--out", str(out), "--device", "cpu",
            "--quiet", "--frame-end", "4", "--frame-stride", "1", "--num-tokens", "16", "--scene-steps", "3",
            "--dynamic-steps", "2", "--dynamic-mix-cutoff", "0", "--dynamic-ar-block-size", "2",
            "--dynamic-max-memory-frames", "3", "--mesh-dense-depth", "4", "--mesh-final-depth", "5"]
    assert cli_main(args) == 0
    scene = json.loads((out / "scene.json").read_text())
    assert scene["status"] == "complete" and scene["frames"] == [0, 1, 2, 3]
    assert scene["params"]["num_tokens"] == 16


def test_tracked_topology_gives_one_mesh_per_object_with_per_frame_vertices(pipe, clip, tmp_path):
    events = []
    params = ReconstructionParams.from_dict({**FAST, "topology": "tracked"})
    pipe.reconstruct(ReconstructionRequest(frames_dir=clip), params, tmp_path / "out", on_event=events.append)
    tracked = [e for e in events if e.kind == "tracked_mesh"]
    scene = load_scene(tmp_path / "out")
    assert len(tracked) == 1 and tracked[0].frames == scene["frames"]
    ev = tracked[0]
    assert ev.vertices.shape == (len(scene["frames"]), *ev.vertices.shape[1:]) and ev.vertices.shape[2] == 3
    ball = next(o for o in scene["objects"] if o["name"] == "ball")
    assert ball["topology"] == "tracked"
    stored = np.load(tmp_path / "out" / ball["vertices"])
    np.testing.assert_array_equal(stored, ev.vertices)
    base = trimesh.load(tmp_path / "out" / ball["mesh"], force="mesh", process=False)
    assert len(base.faces) == len(ev.faces)
    assert set(ball["fallback_frames"]) == set(ev.fallback_frames) <= set(scene["frames"])
    # every fallback frame keeps its own per-frame mesh in the manifest
    own = {f["frame"] for f in ball["frames"] if f.get("mesh")}
    assert set(ev.fallback_frames) <= own


def test_background_marching_cubes_gives_the_same_scene(pipe, clip, tmp_path):
    outs = {}
    for workers in (0, 1):
        events = []
        params = ReconstructionParams.from_dict({**FAST, "mesh_workers": workers, "preview": False})
        pipe.reconstruct(ReconstructionRequest(frames_dir=clip), params, tmp_path / f"o{workers}",
                         on_event=events.append)
        outs[workers] = [e for e in events if e.kind == "mesh"]
    assert [(e.name, e.frame) for e in outs[0]] == [(e.name, e.frame) for e in outs[1]]
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a.vertices, b.vertices)
        np.testing.assert_array_equal(a.faces, b.faces)


def test_each_frame_glb_is_written_when_its_last_mesh_is_done(pipe, clip, tmp_path):
    out = tmp_path / "out"
    seen = []  # (event, whether that frame's combined GLB existed when the event came)

    def on_event(e):
        if e.kind == "mesh" and e.role == "dynamic":
            seen.append((e, (out / "frames" / f"frame_{e.frame:06d}.glb").is_file()))
        if e.kind == "progress" and e.stage == "export":
            seen.append((e, None))

    pipe.reconstruct(ReconstructionRequest(frames_dir=clip), ReconstructionParams.from_dict(FAST), out,
                     on_event=on_event)
    scene = load_scene(out)
    frames = [e for e, _ in seen if e.kind == "mesh"]
    assert [e.frame for e in frames] == scene["frames"] and seen[-1][0].kind == "progress"
    # the ball is the one moving object: its mesh of a frame completes that frame, before the export
    assert all(written for e, written in seen if e.kind == "mesh")
    static = trimesh.load(out / next(o for o in scene["objects"] if o["role"] == "static")["mesh"], force="mesh")
    for e in frames:
        combined = trimesh.load(out / "frames" / f"frame_{e.frame:06d}.glb")
        np.testing.assert_array_equal(combined.geometry["ball"].vertices, e.vertices)
        np.testing.assert_array_equal(combined.geometry["ball"].faces, e.faces)
        np.testing.assert_array_equal(combined.geometry["box"].vertices, static.vertices)
