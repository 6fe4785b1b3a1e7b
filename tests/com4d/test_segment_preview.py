"""Overlay pictures and the contact sheet."""

from __future__ import annotations

import numpy as np

from com4d.segment.preview import LOST_RED, ContactSheet, MaskLayer, object_color, overlay


def test_overlay_tints_only_the_masked_pixels_and_outlines_them():
    frame = np.full((128, 128, 3), 100, dtype=np.uint8)
    mask = np.zeros((128, 128), dtype=bool)
    mask[60:100, 60:100] = True
    color = object_color(0)
    out = overlay(frame, [MaskLayer("dog", mask, color)], alpha=0.5)
    assert out.shape == frame.shape and out.dtype == np.uint8
    inside = out[70:90, 70:90].reshape(-1, 3)
    want = np.round(0.5 * 100 + 0.5 * np.array(color)).astype(int)
    assert np.abs(inside.astype(int) - want).max() <= 1
    assert (out[60, 70] == color).all(), "the mask's edge is drawn in the object's colour"
    assert (out[110:, :] == 100).all() and (out[:, 110:] == 100).all(), "outside the mask nothing changes"
    assert (out[20:50, 60:100] != 100).any(), "the name label is drawn above the mask"


def test_overlay_lists_lost_objects_in_red():
    frame = np.full((96, 96, 3), 255, dtype=np.uint8)
    empty = np.zeros((96, 96), dtype=bool)
    out = overlay(frame, [MaskLayer("cat", empty, object_color(1), lost=True)], title="frame 3")
    red = (out[..., 0] > 200) & (out[..., 1] < 80) & (out[..., 2] < 80)
    assert red[:40].any()


def test_contact_sheet_keeps_lost_frames_and_frames_them_in_red():
    sheet = ContactSheet(tile=32, max_tiles=6)
    for t in range(20):
        sheet.add(t, np.full((64, 64, 3), 10 * t, dtype=np.uint8), lost=t in (7, 13))
    chosen = [t for t, _, _ in sheet._chosen()]
    assert 7 in chosen and 13 in chosen and 0 in chosen and 19 in chosen and len(chosen) <= 6
    image = sheet.render([("cat", "dynamic", object_color(1)), ("sofa", "static", object_color(2))])
    assert image.ndim == 3 and image.shape[2] == 3
    red = (image == np.array(LOST_RED, dtype=np.uint8)).all(axis=2)
    assert red.sum() > 4 * 32 * 2, "two red frames around the lost tiles"


def test_contact_sheet_grid_grows_with_the_clip():
    small, large = ContactSheet(tile=24), ContactSheet(tile=24)
    for t in range(3):
        small.add(t, np.zeros((24, 24, 3), dtype=np.uint8), lost=False)
    for t in range(20):
        large.add(t, np.zeros((24, 24, 3), dtype=np.uint8), lost=False)
    legend = [("a", "dynamic", object_color(0))]
    assert large.render(legend).shape[0] > small.render(legend).shape[0]
