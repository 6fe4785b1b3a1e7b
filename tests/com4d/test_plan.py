"""The plan of a reconstruction: frames, objects, windows and output files, without a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from com4d.errors import InputError, ParameterError
from com4d.params import ModelLimits, ReconstructionParams
from com4d.plan import InputSummary, plan_reconstruction, plan_windows

ROOT = Path(__file__).resolve().parents[2]


def summary(frames=10, dynamic=("ball",), static=()):
    return InputSummary(frame_numbers=list(range(100, 100 + frames)), dynamic_names=list(dynamic),
                        static_names=list(static))


def test_importable_without_torch():
    code = "import sys, com4d.plan; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_teaser_windows():
    # 41 frames (0::2 of 81), block 6, memory 8: history = the previous block trimmed to 8 - 6 frames
    wins = plan_windows(41, 6, 8)
    assert [w.new for w in wins[:2]] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert wins[0].history == [] and wins[0].initial_history and wins[0].columns == 7
    assert wins[1].history == [4, 5] and not wins[1].initial_history and wins[1].columns == 8
    assert wins[-1].new == [36, 37, 38, 39, 40] and wins[-1].history == [33, 34, 35]
    assert len(wins) == 7


def test_block_larger_than_memory_keeps_no_history_like_the_official_code():
    # official: total = new + history + 1 > memory + 1 -> history trimmed, then the stage-A column dropped
    wins = plan_windows(10, 6, 5)
    assert [(w.history, w.new, w.initial_history) for w in wins] == [
        ([], [0, 1, 2, 3, 4, 5], False),
        ([5], [6, 7, 8, 9], False),
    ]


def test_no_stage_a_means_no_initial_history_column():
    wins = plan_windows(4, 2, 3, initial_history=False)
    assert [(w.history, w.new, w.initial_history) for w in wins] == [([], [0, 1], False), ([1], [2, 3], False)]


def test_plan_selects_frames_objects_and_outputs():
    params = ReconstructionParams(frame_start=1, frame_end=8, frame_stride=3, stage_a_frame=4,
                                  dynamic_ar_block_size=2, dynamic_max_memory_frames=3, scene_steps=7,
                                  dynamic_steps=5)
    plan = plan_reconstruction(summary(static=["table", "table"]), params)
    assert plan.frames == [1, 4, 7] and plan.frame_numbers == [101, 104, 107]
    assert plan.stage_a == 4 and plan.stage_a_frame_number == 104
    assert plan.static_names == ["table", "table.001"] and plan.dynamic_names == ["ball"]
    assert [w.new for w in plan.windows] == [[0, 1], [2]]
    # 7 stage-A steps + 2 windows x 5 steps + meshes: 2 statics + 1 stage-A ball + 3 ball frames
    assert plan.total_units == 7 + 10 + 6
    assert plan.outputs() == [
        "static/table.glb", "static/table.001.glb", "dynamic/ball/stage_a.glb",
        "dynamic/ball/frame_000101.glb", "dynamic/ball/frame_000104.glb", "dynamic/ball/frame_000107.glb",
    ]


def test_default_static_parts_are_the_named_statics_else_one():
    assert plan_reconstruction(summary(), ReconstructionParams()).static_names == ["static_000"]
    assert plan_reconstruction(summary(static=["a", "b"]), ReconstructionParams()).num_static == 2


def test_zero_static_parts_skips_stage_a():
    plan = plan_reconstruction(summary(frames=4), ReconstructionParams(scene_num_parts=0, frame_stride=1,
                                                                     dynamic_ar_block_size=2))
    assert plan.stage_a is None and plan.stage_a_frame_number is None and plan.num_static == 0
    assert not any(w.initial_history for w in plan.windows)
    assert plan.outputs() == [f"dynamic/ball/frame_{n:06d}.glb" for n in (100, 101, 102, 103)]
    with pytest.raises(InputError, match="nothing to reconstruct"):
        plan_reconstruction(summary(dynamic=()), ReconstructionParams(scene_num_parts=0))


def test_preselected_inputs_use_every_frame_and_find_the_stage_a_frame_by_number():
    inputs = InputSummary(frame_numbers=[10, 12, 14], dynamic_names=["ball"], preselected=True)
    plan = plan_reconstruction(inputs, ReconstructionParams(frame_start=10, frame_stride=2, stage_a_frame=12))
    assert plan.frames == [0, 1, 2] and plan.stage_a == 1
    with pytest.raises(ParameterError, match="stage_a_frame 13 is not among the segmented frames"):
        plan_reconstruction(inputs, ReconstructionParams(frame_start=10, stage_a_frame=13))


def test_plan_errors_name_the_problem():
    with pytest.raises(InputError, match="selects no frame of the 10"):
        plan_reconstruction(summary(), ReconstructionParams(frame_start=20))
    with pytest.raises(InputError, match="stage_a_frame 12 is outside the 10"):
        plan_reconstruction(summary(), ReconstructionParams(stage_a_frame=12))
    limits = ModelLimits(part_rows=3, frame_rows=6)
    with pytest.raises(ParameterError, match="3 static parts \\+ 1 dynamic objects exceed the model's 3"):
        plan_reconstruction(summary(), ReconstructionParams(scene_num_parts=3), limits)
    with pytest.raises(ParameterError, match="window of 8 frames exceeds the model.s 6"):
        plan_reconstruction(summary(), ReconstructionParams(frame_stride=1), limits)  # 2 history + 6 new
    ok = plan_reconstruction(summary(frames=3), ReconstructionParams(frame_stride=1), limits)
    assert ok.max_columns == 4  # few frames: the window is small enough
