"""The DiT against the official implementation's numbers (fixture cases a, b, c).

Everything (shapes, counts, timesteps, tolerances) comes from the fixture set named by
COM4D_PARITY_DIR; weights load through the same `from_pretrained` a user calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case, parity_dir  # noqa: E402

from com4d.dit import CellContext, COM4DTransformer, timestep_sinusoid  # noqa: E402

TRIPOSG_DIT = parity_dir() / "weights" / "TripoSG" / "transformer"
COM4D_DIT = parity_dir() / "weights" / "COM4D" / "transformer"


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def record_blocks(model: COM4DTransformer) -> tuple[list[torch.Tensor], list]:
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())) for b in model.blocks]
    return outputs, hooks


@pytest.fixture(scope="module")
def triposg_dit() -> COM4DTransformer:
    return COM4DTransformer.from_pretrained(TRIPOSG_DIT)


@pytest.fixture(scope="module")
def com4d_dit() -> COM4DTransformer:
    return COM4DTransformer.from_pretrained(COM4D_DIT)


def test_plain_triposg_dit_matches_official_forward(triposg_dit):
    side, t = load_case("dit_local")
    tol = side["suggested_tolerance"]
    assert not triposg_dit.cfg.has_tables  # a plain TripoSG transformer loads without COM4D tables
    close(timestep_sinusoid(t["timestep"], triposg_dit.cfg.width), t["timestep_sinusoid"], tol)
    close(triposg_dit.time_proj(t["timestep"]), t["temb"], tol)
    outputs, hooks = record_blocks(triposg_dit)
    out = triposg_dit(t["hidden_states"], t["timestep"], t["encoder_hidden_states"])
    for h in hooks:
        h.remove()
    close(torch.stack(outputs), t["block_outputs"], tol)
    close(out, t["output"], tol)


def grid_call(model, t, x_key, temporal_key, spatial_key, static_rows, cutoff, zero=False):
    x = t[x_key]
    enc_t, enc_s = t[temporal_key], t[spatial_key]
    if zero:
        enc_t, enc_s = torch.zeros_like(enc_t), torch.zeros_like(enc_s)
    return model.forward_grid(x, t["timestep"], enc_t, enc_s, static_rows=static_rows, cutoff=cutoff)


def test_stage_a_scene_mixing_matches_official_forward_matrix(com4d_dit):
    side, t = load_case("com4d_scene_mixing")
    tol = side["suggested_tolerance"]
    S = side["params"]["static_count"]
    M, N = t["hidden_states_matrix"].shape[:2]
    assert (M, N) == (S + side["params"]["dynamic_count"], side["params"]["frames"])
    outputs, hooks = record_blocks(com4d_dit)
    early = grid_call(
        com4d_dit,
        t,
        "hidden_states_matrix",
        "encoder_hidden_states_matrix_temporal",
        "encoder_hidden_states_matrix_temporal",
        S,
        cutoff=False,
    )
    for h in hooks:
        h.remove()
    layers = torch.stack(outputs).reshape(t["layer_outputs_cond_early"].shape)
    close(layers, t["layer_outputs_cond_early"], tol)
    close(early, t["output_cond_early"], tol)
    late = grid_call(
        com4d_dit,
        t,
        "hidden_states_matrix",
        "encoder_hidden_states_matrix_temporal",
        "encoder_hidden_states_matrix_spatial_late",
        S,
        cutoff=False,
    )
    close(late, t["output_cond_late"], tol)
    uncond = grid_call(
        com4d_dit,
        t,
        "hidden_states_matrix",
        "encoder_hidden_states_matrix_temporal",
        "encoder_hidden_states_matrix_spatial_late",
        S,
        cutoff=False,
        zero=True,
    )
    close(uncond, t["output_uncond"], tol)


@pytest.mark.parametrize("mode", ["mix", "cutoff"])
def test_stage_b_objects_by_frames_matrix_matches_official(com4d_dit, mode):
    side, t = load_case("com4d_matrix")
    tol = side["suggested_tolerance"]
    S = side["params"]["static_count"]
    params = side["params"]
    assert t["hidden_states_matrix"].shape[:2] == (S + params["dynamic_count"], params["frames"])
    spatial = f"encoder_hidden_states_matrix_spatial_{mode}"
    cutoff = mode == "cutoff"
    outputs, hooks = record_blocks(com4d_dit)
    cond = grid_call(
        com4d_dit, t, "hidden_states_matrix", "encoder_hidden_states_matrix_temporal", spatial, S, cutoff
    )
    for h in hooks:
        h.remove()
    close(cond, t[f"output_cond_{mode}"], tol)
    if mode == "mix":
        layers = torch.stack(outputs).reshape(t["layer_outputs_cond_mix"].shape)
        close(layers, t["layer_outputs_cond_mix"], tol)
    uncond = grid_call(
        com4d_dit,
        t,
        "hidden_states_matrix",
        "encoder_hidden_states_matrix_temporal",
        spatial,
        S,
        cutoff,
        zero=True,
    )
    close(uncond, t[f"output_uncond_{mode}"], tol)


def test_shared_contexts_give_the_same_numbers_as_per_cell_tokens(com4d_dit):
    """The pipeline passes each distinct image once (CellContext with an index); same result."""
    side, t = load_case("com4d_matrix")
    S = side["params"]["static_count"]
    M, N = t["hidden_states_matrix"].shape[:2]
    full, obj = t["dino_full"], t["dino_obj"]  # (N, L, Dc), (K, N, L, Dc)
    feats = torch.cat([full, obj.reshape(-1, *obj.shape[2:])])  # N full frames, then K*N object images
    index = torch.tensor([c if r < S else N + (r - S) * N + c for r in range(M) for c in range(N)])
    temporal = CellContext(feats, index)
    spatial = CellContext(feats, torch.tensor([c for _ in range(M) for c in range(N)]))
    out = com4d_dit.forward_grid(t["hidden_states_matrix"], t["timestep"], temporal, spatial, S, cutoff=False)
    close(out, t["output_cond_mix"], side["suggested_tolerance"])


def test_naive_qkv_split_would_be_wrong(com4d_dit):
    """Guards the head-interleaved conversion: skipping it changes the output by O(1)."""
    from com4d.weights import DIFFUSERS_WEIGHTS, load_state_strict, load_tensors

    side, t = load_case("com4d_matrix")
    naive = COM4DTransformer(com4d_dit.cfg)
    load_state_strict(naive, load_tensors(COM4D_DIT / DIFFUSERS_WEIGHTS), COM4D_DIT)
    S = side["params"]["static_count"]
    out = grid_call(
        naive.eval(),
        t,
        "hidden_states_matrix",
        "encoder_hidden_states_matrix_temporal",
        "encoder_hidden_states_matrix_spatial_mix",
        S,
        False,
    )
    ref = t["output_cond_mix"]
    assert (out - ref).abs().max() > 100 * side["suggested_tolerance"]["atol"] * max(1.0, ref.abs().max())
