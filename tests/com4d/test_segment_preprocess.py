"""Square padding, resizing, centring and background removal (reference §4.1)."""

from __future__ import annotations

import numpy as np
import pytest

from com4d.errors import ParameterError
from com4d.segment.preprocess import (
    centring_shift,
    close_mask,
    pad_and_resize_frame,
    pad_and_resize_mask,
    remove_background,
    shift_image,
    square_transform,
)


@pytest.mark.parametrize("width,height,size", [(160, 90, 64), (90, 160, 64), (100, 100, 50), (63, 40, 96)])
def test_a_source_pixel_lands_where_the_transform_says(width, height, size):
    t = square_transform(width, height, size)
    assert t.side == max(width, height)
    assert t.pad_left + t.pad_right + width == t.side and t.pad_top + t.pad_bottom + height == t.side
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, r = int(width * 0.3), int(height * 0.6), 4
    frame[y0 - r : y0 + r, x0 - r : x0 + r] = 255  # a bright square centred on (x0, y0)
    out = pad_and_resize_frame(frame, t)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    # Padding is white, so measure inside the source area only.
    sx0, sy0 = t.map_point(0, 0)
    sx1, sy1 = t.map_point(width, height)
    inner = out[int(np.ceil(sy0)) + 1 : int(sy1) - 1, int(np.ceil(sx0)) + 1 : int(sx1) - 1, 0].astype(float)
    ys, xs = np.mgrid[0 : inner.shape[0], 0 : inner.shape[1]]
    cx = (xs * inner).sum() / inner.sum() + int(np.ceil(sx0)) + 1 + 0.5
    cy = (ys * inner).sum() / inner.sum() + int(np.ceil(sy0)) + 1 + 0.5
    want = t.map_point(x0, y0)
    assert abs(cx - want[0]) < 0.75 and abs(cy - want[1]) < 0.75


def test_padding_is_white_and_masks_keep_their_area():
    t = square_transform(120, 60, 60)
    frame = np.full((60, 120, 3), 10, dtype=np.uint8)
    out = pad_and_resize_frame(frame, t)
    assert (out[:10] == 255).all() and (out[-10:] == 255).all() and (out[20:40] == 10).all()
    mask = np.zeros((60, 120), dtype=bool)
    mask[10:50, 20:100] = True
    small = pad_and_resize_mask(mask, t)
    assert small.dtype == bool and small.shape == (60, 60)
    assert small.sum() == pytest.approx(mask.sum() * t.scale**2, rel=0.05)
    assert t.to_dict() == {"source_size": [120, 60], "size": 60, "pad": [0, 30, 0, 30], "scale": 0.5,
                           "shift": [0, 0]}


def test_too_small_output_size_is_refused():
    with pytest.raises(ParameterError, match="at least 16"):
        square_transform(100, 100, 8)


def test_centring_moves_the_union_box_to_the_middle_and_the_mapping_follows():
    union = np.zeros((64, 64), dtype=bool)
    union[5:21, 40:60] = True
    dx, dy = centring_shift(union)
    moved = shift_image(union, dx, dy, False)
    rows, cols = np.flatnonzero(moved.any(1)), np.flatnonzero(moved.any(0))
    assert abs((rows[0] + rows[-1] + 1) / 2 - 32) <= 0.5 and abs((cols[0] + cols[-1] + 1) / 2 - 32) <= 0.5
    assert moved.sum() == union.sum()
    assert centring_shift(np.zeros((8, 8), dtype=bool)) == (0, 0)
    t = square_transform(64, 64, 64).with_shift(dx, dy)
    assert t.map_point(50, 13) == (50 + dx, 13 + dy)


def test_shift_fills_uncovered_pixels():
    image = np.arange(25, dtype=np.uint8).reshape(5, 5)
    out = shift_image(image, 2, -1, 99)
    np.testing.assert_array_equal(out[:4, 2:], image[1:, :3])
    assert (out[:, :2] == 99).all() and (out[4] == 99).all()
    assert (shift_image(image, 9, 0, 7) == 7).all()


def test_closing_fills_small_gaps_only_and_spares_the_border():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:15, 0:12] = True
    mask[5:15, 14:24] = True  # 2-pixel gap: closed by radius 3
    mask[25:35, 0:10] = True
    mask[25:35, 20:30] = True  # 10-pixel gap: stays open
    closed = close_mask(mask, 3)
    assert closed[6:14, 12:14].all()  # (the disk rounds the outer corners off)
    assert not closed[30, 12:18].any()
    assert closed[5:15, 0].all(), "the image border must not eat into a mask that touches it"
    assert (closed | ~mask).all(), "closing never removes mask pixels"


def test_background_removal_paints_outside_the_union_white():
    frame = np.full((30, 30, 3), 50, dtype=np.uint8)
    union = np.zeros((30, 30), dtype=bool)
    union[10:20, 10:20] = True
    out = remove_background(frame, union)
    assert (out[union] == 50).all()
    assert (out[:5] == 255).all() and (out[:, 25:] == 255).all()
    assert (frame == 50).all(), "the input frame is left alone"
