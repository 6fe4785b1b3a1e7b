"""DINOv2 conditioning against the official COM4D `encode_image` (fixture case `dinov2_features`).

Real transformers `Dinov2Model` with the fixture's tiny weights; the image size, token counts,
sample strides and tolerances come from the sidecar's `params`, `tensors` and `suggested_tolerance`
and from the encoder's config.json.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from com4d.conditioning import (
    ImageEncoder,
    mask_onto_white,
    resize_frame,
    resize_mask,
    to_pixel_values,
)
from com4d.errors import InputError, WeightsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import load_case, parity_dir  # noqa: E402

DEVICE = "cpu"


@pytest.fixture(scope="module")
def case():
    return load_case("dinov2_features")


@pytest.fixture(scope="module")
def triposg() -> Path:
    return parity_dir() / "weights" / "TripoSG"


@pytest.fixture(scope="module")
def encoder(case, triposg) -> ImageEncoder:
    sidecar, _ = case
    return ImageEncoder.from_pretrained(
        triposg, DEVICE, torch.float32, size=sidecar["params"]["conditioning_size"]
    )


@pytest.fixture(scope="module")
def images(case) -> dict[str, np.ndarray]:
    """The case's frame and object image at the conditioning size, made as the official code does."""
    sidecar, _ = case
    params = sidecar["params"]
    cases = parity_dir() / "cases"
    frame_png, mask_png = Image.open(cases / "dinov2_input.png"), Image.open(cases / "dinov2_mask.png")
    assert frame_png.size == mask_png.size == (params["image_width"], params["image_height"])
    frame = resize_frame(frame_png, params["conditioning_size"])
    mask = resize_mask(mask_png, params["conditioning_size"])
    return {"frame": frame, "mask": mask, "object": mask_onto_white(frame, mask)}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, sidecar: dict) -> None:
    tol = sidecar["suggested_tolerance"]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu(), expected, atol=tol["atol"], rtol=tol["rtol"])


def test_pixel_values_match_the_official_processor(case, encoder, images):
    sidecar, tensors = case
    size = sidecar["params"]["conditioning_size"]
    pixels = encoder.pixel_values([images["frame"]])[0]  # (3, S, S)
    assert pixels.shape == (3, size, size)
    sampled_shape = sidecar["tensors"]["pixel_values_stride7"]["shape"]
    stride = size // sampled_shape[-1]
    assert math.ceil(size / stride) == sampled_shape[-1] == sampled_shape[-2]
    # the README: manual (u8/255 − mean)/std in float32 equals the processor exactly
    assert torch.equal(pixels[:, ::stride, ::stride], tensors["pixel_values_stride7"])
    assert list(pixels[:, 0].shape) == sidecar["tensors"]["pixel_values_row0"]["shape"]
    assert torch.equal(pixels[:, 0], tensors["pixel_values_row0"])


def test_mean_and_std_come_from_the_preprocessor_config(encoder, triposg):
    raw = json.loads((triposg / "feature_extractor_dinov2" / "preprocessor_config.json").read_text())
    assert encoder.mean == tuple(raw["image_mean"]) and encoder.std == tuple(raw["image_std"])


def test_features_match_last_hidden_state(case, encoder, images):
    sidecar, tensors = case
    shape = sidecar["tensors"]["features"]["shape"]
    config = json.loads((parity_dir() / "weights/TripoSG/image_encoder_dinov2/config.json").read_text())
    size = sidecar["params"]["conditioning_size"]
    assert shape[1] == encoder.num_tokens == 1 + (size // config["patch_size"]) ** 2
    assert shape[2] == encoder.hidden_size == config["hidden_size"]
    features = encoder.encode([images["frame"]])
    assert_matches(features, tensors["features"], sidecar)


def test_features_before_the_final_layernorm_match(case, encoder, images):
    sidecar, tensors = case
    n = sidecar["tensors"]["features_pre_final_layernorm_first16"]["shape"][1]
    pixels = encoder.pixel_values([images["frame"]]).to(DEVICE)
    with torch.no_grad():
        hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert_matches(hidden[:, :n], tensors["features_pre_final_layernorm_first16"], sidecar)
    # and encode() does return the normed state, not this one
    assert not torch.allclose(encoder.encode([images["frame"]])[:, :n], hidden[:, :n], atol=1e-2)


def test_masked_object_features_match(case, encoder, images):
    sidecar, tensors = case
    n = sidecar["tensors"]["features_masked_first64"]["shape"][1]
    features = encoder.encode([images["object"]])
    assert_matches(features[:, :n], tensors["features_masked_first64"], sidecar)
    assert_matches(features.abs().sum().reshape(1), tensors["features_masked_sum_abs"], sidecar)


def test_batches_give_the_same_tokens_as_single_images(case, encoder, images):
    sidecar, tensors = case
    n = sidecar["tensors"]["features_masked_first64"]["shape"][1]
    batch = [images["frame"], images["object"], images["frame"]]
    one_at_a_time = encoder.encode(batch, batch_size=1)
    together = encoder.encode(batch, batch_size=2)
    assert together.shape == (3, *sidecar["tensors"]["features"]["shape"][1:])
    assert_matches(together[0:1], tensors["features"], sidecar)
    assert_matches(together[1:2, :n], tensors["features_masked_first64"], sidecar)
    assert_matches(together, one_at_a_time, sidecar)


def test_object_image_is_white_outside_the_mask(images):
    frame, mask, obj = images["frame"], images["mask"], images["object"]
    outside, inside = mask == 0, mask == 255
    assert outside.any() and inside.any()
    assert np.all(obj[outside] == 255)
    # inside, float32 x/255*255 truncated to uint8 may lose one level, as in the official code
    diff = frame[inside].astype(int) - obj[inside].astype(int)
    assert diff.min() >= 0 and diff.max() <= 1


def test_soft_mask_blends_towards_white():
    frame = np.zeros((2, 2, 3), np.uint8)
    mask = np.array([[0, 64], [128, 255]], np.uint8)
    out = mask_onto_white(frame, mask)[..., 0]
    assert out[0, 0] == 255 and out[1, 1] == 0
    assert out[0, 0] > out[0, 1] > out[1, 0] > out[1, 1]


def test_bool_masks_equal_0_255_masks(images):
    mask = images["mask"]
    assert np.array_equal(mask_onto_white(images["frame"], mask == 255), images["object"])
    assert np.array_equal(resize_mask(mask == 255, 64), resize_mask(mask, 64))


def test_resize_ignores_the_aspect_ratio():
    wide = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert resize_frame(wide, 100).shape == (100, 100, 3)
    assert resize_mask(wide[..., 0], 100).shape == (100, 100)
    gray = resize_frame(wide[..., 0], 10)  # grayscale becomes RGB
    assert gray.shape == (10, 10, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_images_of_the_wrong_size_or_type_are_refused(encoder, images):
    with pytest.raises(InputError, match="resize_frame"):
        encoder.encode([images["frame"][:-1]])
    with pytest.raises(InputError, match="uint8"):
        to_pixel_values([images["frame"].astype(np.float32)], encoder.size)
    with pytest.raises(InputError, match="list of images"):
        encoder.encode(images["frame"])
    with pytest.raises(InputError, match="no images"):
        encoder.encode([])
    with pytest.raises(InputError, match="same size"):
        mask_onto_white(images["frame"], images["mask"][:10])
    with pytest.raises(InputError, match="uint8"):
        resize_frame(np.zeros((4, 4, 3), np.float64))


# -- loading ---------------------------------------------------------------------------------------


def test_component_folder_and_transformers4_config_load_the_same_model(case, triposg, tmp_path, images):
    """The real HF config.json is in transformers-4 format (`torch_dtype`, no backbone keys)."""
    sidecar, tensors = case
    folder = tmp_path / "image_encoder_dinov2"
    shutil.copytree(triposg / "image_encoder_dinov2", folder)
    raw = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "out_features", "out_indices", "stage_names", "apply_layernorm", "use_mask_token"):
        raw.pop(key, None)
    raw.update(torch_dtype="float32", transformers_version="4.38.0")
    (folder / "config.json").write_text(json.dumps(raw))
    encoder = ImageEncoder.from_pretrained(folder, size=sidecar["params"]["conditioning_size"])
    assert encoder.mean == (0.485, 0.456, 0.406)  # no preprocessor config beside it: ImageNet values
    assert_matches(encoder.encode([images["frame"]]), tensors["features"], sidecar)


def test_missing_weights_file_is_named(triposg, tmp_path):
    shutil.copytree(triposg / "image_encoder_dinov2", tmp_path / "image_encoder_dinov2")
    (tmp_path / "image_encoder_dinov2" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"image_encoder_dinov2/model\.safetensors"):
        ImageEncoder.from_pretrained(tmp_path)


def test_folder_of_another_model_is_refused_naming_the_file(triposg):
    with pytest.raises(WeightsError, match=r"vae/model\.safetensors"):
        ImageEncoder.from_pretrained(triposg / "vae")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        ImageEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=r"config\.json"):
        ImageEncoder.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_name_the_file(triposg, tmp_path):
    folder = tmp_path / "image_encoder_dinov2"
    shutil.copytree(triposg / "image_encoder_dinov2", folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "hidden_size": raw["hidden_size"] * 2}))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*wrong shape"):
        ImageEncoder.from_pretrained(folder)


def test_config_of_another_model_type_is_refused(triposg, tmp_path):
    folder = tmp_path / "image_encoder_dinov2"
    shutil.copytree(triposg / "image_encoder_dinov2", folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "vit"}))
    with pytest.raises(WeightsError, match=r"config\.json.*'vit'"):
        ImageEncoder.from_pretrained(folder)
