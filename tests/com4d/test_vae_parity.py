"""The shape VAE against the official implementation's numbers (fixture cases d `vae_decode`, e `vae_encode`).

Arguments and shapes come from the sidecars' `params` / `tensors` blocks and tolerances from their
`suggested_tolerance`; weights load through the same `ShapeVAE.from_pretrained` a user calls.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case, parity_dir  # noqa: E402

from com4d.errors import WeightsError  # noqa: E402
from com4d.meshing import dense_field  # noqa: E402
from com4d.vae import (  # noqa: E402
    ShapeVAE,
    VAEConfig,
    farthest_point_sampling,
    random_subset_indices,
    select_query_points,
)

TRIPOSG = parity_dir() / "weights" / "TripoSG"
VAE_DIR = TRIPOSG / "vae"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def check_shapes(side: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The fixture's tensors are what its sidecar says (guards against a mixed-up fixture set)."""
    for name, spec in side["tensors"].items():
        assert tuple(tensors[name].shape) == tuple(spec["shape"]), name


@pytest.fixture(scope="module")
def vae() -> ShapeVAE:
    return ShapeVAE.from_pretrained(TRIPOSG)


@pytest.fixture(scope="module")
def decode_case() -> tuple[dict, dict[str, torch.Tensor]]:
    side, t = load_case("vae_decode")
    check_shapes(side, t)
    return side, t


@pytest.fixture(scope="module")
def encode_case() -> tuple[dict, dict[str, torch.Tensor]]:
    side, t = load_case("vae_encode")
    check_shapes(side, t)
    return side, t


def test_config_is_read_from_the_official_config_file(vae):
    raw = json.loads((VAE_DIR / "config.json").read_text())
    for name in ("latent_channels", "num_attention_heads", "width_encoder", "width_decoder",
                 "num_layers_encoder", "num_layers_decoder", "embed_frequency", "embed_include_pi"):
        assert getattr(vae.cfg, name) == raw[name], name
    assert len(vae.decoder.blocks) == raw["num_layers_decoder"] + 1
    assert len(vae.encoder.blocks) == raw["num_layers_encoder"] + 1


def test_decode_field_at_query_points_matches_official(vae, decode_case):
    side, t = decode_case
    p = side["params"]
    assert t["latents"].shape[1] == p["num_tokens"] and t["query_points"].shape[1] == p["num_points"]
    field = vae.decode(t["latents"], t["query_points"])  # (B, P)
    close(field, t["field"][..., 0], side["suggested_tolerance"])


def test_field_is_independent_of_the_query_chunk_size(vae, decode_case):
    side, t = decode_case
    kv = vae.decode_trunk(t["latents"])
    small = vae.query(kv, t["query_points"], chunk=side["params"]["num_points"] // 7 + 1)
    close(small, t["field"][..., 0], side["suggested_tolerance"])


def test_grid_field_matches_official(vae, decode_case):
    side, t = decode_case
    p = side["params"]
    grid = dense_field(vae.field_fn(t["latents"]), p["grid_points_per_axis"], tuple(p["bounds"]))
    close(grid, t[f"grid{p['grid_points_per_axis']}_field"], side["suggested_tolerance"])


def test_flash_first_call_quirk_matches_official_and_only_hits_the_first_call(vae, decode_case):
    side, t = decode_case
    tol = side["suggested_tolerance"]
    # The quirk must actually change the numbers, or this test could not tell it from full attention.
    assert (t["field_flash_first_call"] - t["field"]).abs().max() > 100 * tol["atol"]
    kv = vae.decode_trunk(t["latents"])
    close(vae.query(kv, t["query_points"], flash_first_call=True), t["field_flash_first_call"][..., 0], tol)
    field = vae.field_fn(t["latents"], flash_first_call=True)
    points = t["query_points"][0]
    close(field(points), t["field_flash_first_call"][0, :, 0], tol)
    close(field(points), t["field"][0, :, 0], tol)  # the processor resets itself after one call


def test_numpy_choice_reproduces_official_subset(encode_case):
    side, t = encode_case
    p = side["params"]
    idx = random_subset_indices(p["num_points"], p["num_tokens"], p["encode_seed"])
    assert idx.tolist() == t["rng_choice_indices"].tolist()


def test_farthest_point_sampling_reproduces_official_indices(encode_case):
    side, t = encode_case
    subset = t["points_normals"][0, t["rng_choice_indices"]]  # (4T, 6)
    fps = farthest_point_sampling(subset[:, :3], side["params"]["num_tokens"])
    assert fps.tolist() == t["fps_indices"].tolist()
    p = side["params"]
    queries = select_query_points(t["points_normals"], p["num_tokens"], p["encode_seed"])
    torch.testing.assert_close(queries[0], t["query_points_normals"], atol=0, rtol=0)


def test_encode_from_given_queries_matches_official_posterior(vae, encode_case):
    side, t = encode_case
    mean, logvar = vae.encode_with_queries(t["points_normals"], t["query_points_normals"])
    close(mean, t["posterior_mean"], side["suggested_tolerance"])
    close(logvar, t["posterior_logvar"], side["suggested_tolerance"])


def test_encode_with_official_query_selection_matches_official_posterior(vae, encode_case):
    side, t = encode_case
    p = side["params"]
    mean, logvar = vae.encode(t["points_normals"], p["num_tokens"], p["encode_seed"])
    close(mean, t["posterior_mean"], side["suggested_tolerance"])
    close(logvar, t["posterior_logvar"], side["suggested_tolerance"])


def test_released_size_has_the_official_parameter_count():
    with torch.device("meta"):
        model = ShapeVAE(VAEConfig.triposg())
    assert sum(p.numel() for p in model.parameters()) == 242_662_017
    assert len(model.state_dict()) == 356


def test_vae_folder_itself_loads_like_the_triposg_folder(vae, decode_case):
    _, t = decode_case
    direct = ShapeVAE.from_pretrained(VAE_DIR)
    torch.testing.assert_close(direct.decode(t["latents"], t["query_points"]),
                               vae.decode(t["latents"], t["query_points"]), atol=0, rtol=0)


def test_folder_without_a_vae_gives_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="vae"):
        ShapeVAE.from_pretrained(tmp_path)


def test_transformer_folder_given_as_vae_is_refused():
    with pytest.raises(WeightsError, match="TripoSGDiTModel"):
        ShapeVAE.from_pretrained(TRIPOSG / "transformer")


def bad_vae_folder(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(VAE_DIR / "config.json", folder / "config.json")
    state = load_file(str(VAE_DIR / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def test_wrong_shaped_tensor_names_file_and_tensor(tmp_path):
    key = "decoder.proj_query.weight"

    def edit(state):
        state[key] = state[key][:, :-1].contiguous()

    folder = bad_vae_folder(tmp_path, edit)
    with pytest.raises(WeightsError) as err:
        ShapeVAE.from_pretrained(folder)
    assert WEIGHTS_FILE in str(err.value) and key in str(err.value)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    key = "encoder.blocks.0.attn2.norm_cross.weight"
    folder = bad_vae_folder(tmp_path, lambda state: state.pop(key))
    with pytest.raises(WeightsError) as err:
        ShapeVAE.from_pretrained(folder)
    assert str(folder / WEIGHTS_FILE) in str(err.value) and key in str(err.value)
