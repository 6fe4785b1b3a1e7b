"""The parameter schema: official defaults, strict validation of untrusted values, CLI round trip."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from com4d.errors import ParameterError
from com4d.params import ModelLimits, ReconstructionParams, add_arguments, from_namespace, param_specs

ROOT = Path(__file__).resolve().parents[2]


def test_importable_without_torch_numpy_or_pil():
    code = "import sys, com4d.params; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_defaults_are_the_official_infer_sh_teaser_settings():
    p = ReconstructionParams()
    # sh/infer.sh + infer.json "teaser2048" + the inference script's defaults
    assert (p.num_tokens, p.scene_steps, p.dynamic_steps) == (2048, 50, 50)
    assert (p.scene_guidance, p.dynamic_guidance) == (7.0, 7.0)
    assert (p.frame_start, p.frame_end, p.frame_stride) == (0, None, 2)
    assert (p.dynamic_ar_block_size, p.dynamic_max_memory_frames) == (6, 8)
    assert (p.dynamic_mix_cutoff, p.scene_mix_cutoff) == (20, 50)
    assert p.spatial_block_ids == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
    assert p.temporal_block_ids == (0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21)
    assert p.use_frames_no_bg is False  # official --load_frames_no_bg defaults to 0
    assert p.image_size == 518 and p.seed == 0 and p.topology == "per_frame"


def test_specs_describe_every_field_and_are_json():
    specs = param_specs()
    names = [s["name"] for s in specs]
    assert names == list(ReconstructionParams().to_dict())
    json.dumps(specs)  # the wire and the docs table need plain values
    for s in specs:
        assert s["help"] and s["type"] in {"int", "float", "bool", "str", "int_list"}
    tokens = next(s for s in specs if s["name"] == "num_tokens")
    assert (tokens["min"], tokens["max"], tokens["default"]) == (1, 4096, 2048)
    topology = next(s for s in specs if s["name"] == "topology")
    assert topology["choices"] == ["per_frame", "tracked"]


def test_round_trip_through_the_wire_form():
    p = ReconstructionParams.from_dict({"num_tokens": 512, "spatial_block_ids": [4, 0, 2], "frame_end": 9})
    assert p.spatial_block_ids == (0, 2, 4)
    again = ReconstructionParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"tokens": 5}, ["unknown parameter 'tokens'"]),
        ({"num_tokens": "many"}, ["num_tokens", "integer"]),
        ({"num_tokens": True}, ["num_tokens", "integer"]),  # bool is not an int
        ({"num_tokens": 2.0}, ["num_tokens", "integer"]),
        ({"num_tokens": 0}, ["num_tokens", "[1, 4096]"]),
        ({"num_tokens": 5000}, ["num_tokens", "[1, 4096]"]),
        ({"scene_guidance": math.nan}, ["scene_guidance", "finite"]),
        ({"dynamic_guidance": math.inf}, ["dynamic_guidance", "finite"]),
        ({"scene_guidance": -1.0}, ["scene_guidance", "[0.0, 100.0]"]),
        ({"mesh_workers": -1}, ["mesh_workers", "[0, 64]"]),
        ({"memory_budget": -5}, ["memory_budget"]),
        ({"scene_num_parts": -1}, ["scene_num_parts"]),
        ({"preview": 1}, ["preview", "true or false"]),
        ({"topology": "rigid"}, ["topology", "per_frame, tracked"]),
        ({"noise_mode": "gpu"}, ["noise_mode", "cpu, cuda_fp16"]),
        ({"image_size": 500}, ["image_size", "multiple of the DINOv2 patch"]),
        ({"mesh_dense_depth": 9, "mesh_final_depth": 8}, ["mesh_dense_depth", "mesh_final_depth"]),
        ({"frame_start": 4, "frame_end": 4}, ["frame_end", "frame_start"]),
        ({"scene_mix_cutoff": 10}, ["scene_mix_cutoff"]),
        ({"spatial_block_ids": "0,2"}, ["spatial_block_ids", "list of integers"]),
        ({"temporal_block_ids": [0, 1, 1]}, ["temporal_block_ids", "twice"]),
        ({"num_tokens": None}, ["num_tokens", "null"]),
    ],
)
def test_bad_values_are_refused_with_the_name_and_range(values, words):
    with pytest.raises(ParameterError) as err:
        ReconstructionParams.from_dict(values)
    for w in words:
        assert w in str(err.value)


def test_not_a_mapping_is_refused():
    with pytest.raises(ParameterError, match="mapping"):
        ReconstructionParams.from_dict([("num_tokens", 5)])


def test_model_limits_bound_the_static_parts():
    limits = ModelLimits(part_rows=8, frame_rows=16)
    assert ReconstructionParams.from_dict({"scene_num_parts": 0}, limits).scene_num_parts == 0
    assert ReconstructionParams.from_dict({"scene_num_parts": 8}, limits).scene_num_parts == 8
    with pytest.raises(ParameterError, match=r"scene_num_parts must be in \[0, 8\]"):
        ReconstructionParams.from_dict({"scene_num_parts": 9}, limits)


def test_cli_flags_come_from_the_schema():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--num-tokens", "1024", "--no-preview", "--use-frames-no-bg",
                            "--spatial-block-ids", "0,2,4", "--scene-guidance", "3.5", "--topology", "tracked"])
    p = from_namespace(ns, base={"num_tokens": 32, "seed": 7})
    assert p.num_tokens == 1024 and p.seed == 7  # flags over base over defaults
    assert p.preview is False and p.use_frames_no_bg is True
    assert p.spatial_block_ids == (0, 2, 4) and p.scene_guidance == 3.5 and p.topology == "tracked"
    assert from_namespace(parser.parse_args([])) == ReconstructionParams()
    with pytest.raises(SystemExit):
        parser.parse_args(["--topology", "rigid"])
    with pytest.raises(ParameterError, match="num_tokens"):
        from_namespace(parser.parse_args(["--num-tokens", "0"]))
