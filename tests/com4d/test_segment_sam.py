"""SAM checkpoints: architecture read from tensor shapes, strict loading, the per-frame predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from com4d.errors import WeightsError
from com4d.segment.sam import SamFramePredictor, build_sam, infer_sam_config, load_sam, read_sam_state_dict

# What segment-anything's build_sam.py passes for each released size.
RELEASED = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_sizes_are_recognised_from_their_tensor_shapes(name):
    with torch.device("meta"):  # shapes only: no 2.5 GB allocation
        state = sam_model_registry[name]().state_dict()
    config = infer_sam_config(state)
    embed, depth, heads, global_idx = RELEASED[name]
    assert config.name == name
    assert (config.encoder_embed_dim, config.encoder_depth, config.encoder_num_heads) == (embed, depth, heads)
    assert config.encoder_global_attn_indexes == global_idx
    assert (config.img_size, config.patch_size, config.encoder_window_size) == (1024, 16, 14)
    assert (config.prompt_embed_dim, config.decoder_mlp_dim, config.mask_in_chans) == (256, 2048, 16)
    with torch.device("meta"):
        rebuilt = build_sam(config).state_dict()
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_tiny_checkpoint_loads_through_the_user_path_with_identical_outputs(
    seg_tiny_sam_checkpoint, seg_build_tiny_sam
):
    model, config = load_sam(seg_tiny_sam_checkpoint)
    assert config.name.startswith("custom") and config.img_size == 64 and config.encoder_depth == 3
    assert config.encoder_global_attn_indexes == (1,) and config.encoder_window_size == 4
    reference = seg_build_tiny_sam()  # same seed: the model that was saved
    image = np.random.default_rng(0).integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    ours = SamFramePredictor(model)
    theirs = SamPredictor(reference)
    ours.set_image(image, key=0)
    theirs.set_image(image)
    points, labels, box = np.array([[20.0, 15.0]]), np.array([1]), np.array([5.0, 4.0, 40.0, 30.0])
    logits, scores, low = ours.predict(points, labels, box, None, False)
    want_logits, want_scores, want_low = theirs.predict(points, labels, box, None, False, return_logits=True)
    assert logits.shape == (1, 40, 56)
    assert low.shape == (1, ours.low_res_size, ours.low_res_size) == (1, 32, 32)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    # The low-res logits go back in as the next prompt's mask input.
    again, _, _ = ours.predict(points, labels, box, low, False)
    want_again, _, _ = theirs.predict(points, labels, box, want_low, False, return_logits=True)
    np.testing.assert_allclose(again, want_again, rtol=1e-5, atol=1e-5)


def test_the_predictor_embeds_each_frame_once(seg_tiny_sam_checkpoint):
    model, _ = load_sam(seg_tiny_sam_checkpoint)
    predictor = SamFramePredictor(model, cache_size=2)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, size=(32, 48, 3), dtype=np.uint8) for _ in range(3)]
    point = (np.array([[10.0, 10.0]]), np.array([1]), None, None, True)
    predictor.set_image(frames[0], key=0)
    first = predictor.predict(*point)[0]
    predictor.set_image(frames[1], key=1)
    predictor.set_image(frames[0], key=0)  # cached: no new embedding
    assert predictor.embeddings_computed == 2
    np.testing.assert_array_equal(predictor.predict(*point)[0], first)
    predictor.set_image(frames[2], key=2)  # evicts frame 1 (least recently used)
    predictor.set_image(frames[1], key=1)
    assert predictor.embeddings_computed == 4


def test_safetensors_and_wrapped_checkpoints_load_too(tmp_path, seg_build_tiny_sam):
    from safetensors.torch import save_file

    state = seg_build_tiny_sam().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sam.safetensors")
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    for name in ("sam.safetensors", "wrapped.pth"):
        model, _ = load_sam(tmp_path / name)
        key = "mask_decoder.iou_token.weight"
        assert torch.equal(model.state_dict()[key], state[key])


class NotATensor:
    """An arbitrary pickled object: a checkpoint holding one is refused, never unpickled."""


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, seg_build_tiny_sam):
    with pytest.raises(WeightsError, match="SAM checkpoint not found: .*missing.pth"):
        load_sam(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(WeightsError, match="cannot read SAM checkpoint .*garbage.pth"):
        load_sam(garbage)
    state = seg_build_tiny_sam().state_dict()

    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": NotATensor()}, evil)
    with pytest.raises(WeightsError, match="evil.pth"):
        load_sam(evil)
    sam2 = tmp_path / "sam2.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1)}}, sam2)
    with pytest.raises(WeightsError, match="SAM 2 checkpoint"):
        load_sam(sam2)
    dino = tmp_path / "other.pth"
    torch.save({"embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 14, 14)}, dino)
    with pytest.raises(WeightsError, match="not a segment-anything .SAM v1. checkpoint"):
        load_sam(dino)
    broken = dict(state)
    broken["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="broken.pth does not match"):
        load_sam(tmp_path / "broken.pth")


def test_read_state_dict_refuses_a_non_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_sam_state_dict(path)
