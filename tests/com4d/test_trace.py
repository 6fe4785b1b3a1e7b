"""bench/trace_step.py on tiny configs: the fields, and FLOPs that agree with the analytic count."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def traced() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load("trace_step").main(["--tiny", "--json"])
    return json.loads(out.getvalue())


def test_json_has_every_step_with_exactly_the_fields(traced):
    assert set(traced) == {"stage_a", "stage_b_mixing", "stage_b_cutoff", "vae_dense_16"}
    for entry in traced.values():
        assert set(entry) == {"tflop_gemm", "tflop_attention", "non_gemm_gb", "kernels"}
        assert entry["tflop_gemm"] > 0 and entry["tflop_attention"] > 0 and entry["non_gemm_gb"] > 0
        assert isinstance(entry["kernels"], int) and entry["kernels"] > 0


@pytest.mark.parametrize(
    "step, rows, cols, static_rows, cutoff, sets",
    [
        # stage A: statics read the one full frame, each dynamic object its masked image
        ("stage_a", 6, 1, 4, False, {"spatial": 1, "temporal": 3}),
        # mixing: spatial blocks read the 8 full frames, temporal ones those and 2 x 8 object images
        ("stage_b_mixing", 6, 8, 4, False, {"spatial": 8, "temporal": 24}),
        # after the cutoff only the 2 dynamic rows run, each cell reading its own object image
        ("stage_b_cutoff", 2, 8, 0, True, {"spatial": 16, "temporal": 16}),
    ],
)
def test_traced_flops_match_the_analytic_count(traced, step, rows, cols, static_rows, cutoff, sets):
    trace_step, bench_model = load("trace_step"), load("bench_model")
    dit_cfg, _, sizes = trace_step.tiny_configs()
    gemm, attention = bench_model.dit_step_flops(
        dit_cfg, rows, cols, static_rows, sizes["tokens"], sizes["ctx_tokens"], cutoff, sets
    )
    assert traced[step]["tflop_gemm"] * 1e12 == pytest.approx(gemm, rel=1e-9)
    assert traced[step]["tflop_attention"] * 1e12 == pytest.approx(attention, rel=1e-9)


def test_leaving_out_the_static_rows_after_the_cutoff_costs_less(traced):
    mixing, cutoff = traced["stage_b_mixing"], traced["stage_b_cutoff"]
    assert cutoff["tflop_gemm"] < mixing["tflop_gemm"] / 2
    assert cutoff["non_gemm_gb"] < mixing["non_gemm_gb"]


def test_gpu_session_runs_end_to_end_on_the_cpu(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = load("gpu_session").main(
            ["--device", "cpu", "--tiny", "--out", str(tmp_path), "--repeat", "1", "--no-compile"]
        )
    written = json.loads((tmp_path / "gpu_session.json").read_text())
    assert set(written) >= {"versions", "ceilings", "steps", "attention", "mesh", "job"}
    assert set(written["steps"]) == {"stage_a", "stage_b_mixing", "stage_b_cutoff", "vae_dense_16"}
    assert "math" in written["versions"]["attention_backends"]
    assert all(row["math"] > 0 for row in written["attention"])
    job = report["job"]
    assert job["total_s"] == pytest.approx(job["sampling_s"] + job["mesh_stall_s"])
