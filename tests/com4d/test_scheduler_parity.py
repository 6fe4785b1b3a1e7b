"""The rectified-flow schedule against the official RectifiedFlowScheduler (fixture case `scheduler`).

Sizes, step counts, the step index and tolerances come from the case sidecar's `params`, `tensors` and
`suggested_tolerance`; the config from the fixture's `weights/TripoSG/scheduler/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from com4d.errors import ParameterError, WeightsError
from com4d.scheduler import RectifiedFlowScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case, parity_dir  # noqa: E402


@pytest.fixture(scope="module")
def case():
    return load_case("scheduler")


@pytest.fixture(scope="module")
def scheduler() -> RectifiedFlowScheduler:
    return RectifiedFlowScheduler.from_pretrained(parity_dir() / "weights" / "TripoSG")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, sidecar: dict, exact: bool = False) -> None:
    """Within the sidecar's tolerance; `exact` for tables built by the same IEEE operations as official."""
    tol = sidecar["suggested_tolerance"]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])
    if exact:  # e.g. train_timesteps are not exactly 1000 − i (up to 3e-5 off), and we must agree
        assert torch.equal(actual, expected)


def test_config_is_read_from_the_scheduler_folder(case, scheduler):
    sidecar, _ = case
    assert scheduler.config.num_train_timesteps == sidecar["params"]["num_train_timesteps"]
    assert scheduler.config.shift == sidecar["params"]["shift"]


def test_train_tables_match_the_official_constructor(case, scheduler):
    sidecar, tensors = case
    for name, table in (
        ("train_sigmas", scheduler.train_sigmas),
        ("train_timesteps", scheduler.train_timesteps),
    ):
        assert list(table.shape) == sidecar["tensors"][name]["shape"]
        assert_matches(table, tensors[name], sidecar, exact=True)


@pytest.mark.parametrize("steps_key", ["steps_long", "steps_short"])
def test_inference_sigmas_and_timesteps_match(case, scheduler, steps_key):
    sidecar, tensors = case
    steps = sidecar["params"][steps_key]
    sigmas, timesteps = scheduler.sigmas(steps), scheduler.timesteps(steps)
    assert list(sigmas.shape) == sidecar["tensors"][f"sigmas_{steps}"]["shape"] == [steps + 1]
    assert list(timesteps.shape) == sidecar["tensors"][f"timesteps_{steps}"]["shape"] == [steps]
    assert_matches(sigmas, tensors[f"sigmas_{steps}"], sidecar, exact=True)
    assert_matches(timesteps, tensors[f"timesteps_{steps}"], sidecar, exact=True)
    assert sigmas[0] == 1 and sigmas[-1] == 0  # from pure noise to clean data


def test_euler_step_at_an_index_matches_official_step(case, scheduler):
    sidecar, tensors = case
    steps, index = sidecar["params"]["steps_short"], sidecar["params"]["step_index"]
    sigmas = scheduler.sigmas(steps)
    # the official step looked its index up from this timestep value
    assert scheduler.timesteps(steps)[index] == tensors["step_timestep"][0]
    prev = scheduler.euler_step(
        tensors["step_sample"], tensors["step_model_output"], sigmas[index], sigmas[index + 1]
    )
    assert list(prev.shape) == sidecar["tensors"]["step_prev_sample"]["shape"]
    assert_matches(prev, tensors["step_prev_sample"], sidecar)


def test_euler_loop_matches_official(case, scheduler):
    sidecar, tensors = case
    steps = sidecar["params"]["loop_steps"]
    n_train = sidecar["params"]["num_train_timesteps"]
    sigmas, timesteps = scheduler.sigmas(steps), scheduler.timesteps(steps)
    x = tensors["step_sample"]
    for i in range(steps):
        v = -x * (timesteps[i] / n_train) + tensors["step_model_output"]  # the sidecar's test velocity
        x = scheduler.euler_step(x, v, sigmas[i], sigmas[i + 1])
    assert_matches(x, tensors[f"loop{steps}_final"], sidecar)


def test_euler_step_upcasts_to_fp32_and_returns_the_model_dtype(case):
    _, tensors = case
    x16 = tensors["step_sample"].half()
    v16 = tensors["step_model_output"].half()
    out = RectifiedFlowScheduler.euler_step(x16, v16, 1.0, 0.5)
    assert out.dtype == torch.float16
    # the official step: float32 sample + float32-scalar * model output, cast to the output's dtype
    assert torch.equal(out, (x16.float() + torch.tensor(0.5) * v16).half())


def test_guidance_is_classifier_free_guidance(case):
    _, tensors = case
    v_u, v_c = tensors["step_sample"], tensors["step_model_output"]
    out = RectifiedFlowScheduler.guidance(v_u, v_c, 7.0)
    torch.testing.assert_close(out, v_u + 7.0 * (v_c - v_u))
    assert torch.equal(RectifiedFlowScheduler.guidance(v_u, v_c, 1.0), v_u + (v_c - v_u))
    assert torch.equal(RectifiedFlowScheduler.guidance(v_u, v_c, 0.0), v_u)


def test_shift_bends_the_schedule_towards_noise(tmp_path):
    shifted = RectifiedFlowScheduler.from_pretrained(_write_config(tmp_path, shift=3.0)).sigmas(10)
    s = 1 - torch.arange(10, dtype=torch.float64) / 10
    torch.testing.assert_close(shifted[:-1], (3 * s / (1 + 2 * s)).float(), atol=1e-7, rtol=0)
    assert torch.all(shifted[1:-1] > RectifiedFlowScheduler().sigmas(10)[1:-1])


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(ParameterError, match="denoising steps"):
        RectifiedFlowScheduler().sigmas(steps)


def test_wrong_scheduler_folder_names_the_file(tmp_path):
    with pytest.raises(WeightsError, match="scheduler_config.json"):
        RectifiedFlowScheduler.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="does not exist"):
        RectifiedFlowScheduler.from_pretrained(tmp_path / "nowhere")
    other = _write_config(tmp_path / "other", _class_name="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(WeightsError, match="FlowMatchEulerDiscreteScheduler"):
        RectifiedFlowScheduler.from_pretrained(other)
    dynamic = _write_config(tmp_path / "dynamic", use_dynamic_shifting=True)
    with pytest.raises(WeightsError, match="use_dynamic_shifting"):
        RectifiedFlowScheduler.from_pretrained(dynamic)


def _write_config(folder: Path, **overrides) -> Path:
    """`folder` holding the fixture's scheduler config with some values changed."""
    raw = json.loads(
        (parity_dir() / "weights" / "TripoSG" / "scheduler" / "scheduler_config.json").read_text()
    )
    raw.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(raw))
    return folder
