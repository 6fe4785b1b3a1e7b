"""Fixtures of the segmentation tests (all named seg_*): a tiny SAM checkpoint, clips of moving
shapes whose true masks are known, an oracle stand-in for SAM that answers from those shapes, and a
PyAV video writer."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------------
# Clips of moving shapes with known masks


@dataclass
class SegShape:
    """A flat-coloured disc or square; `center(t)` gives its centre on frame t (None = absent)."""

    name: str
    kind: str  # "disc" | "square"
    radius: float
    color: tuple[int, int, int]
    center: Callable[[int], tuple[float, float] | None]
    radius_at: Callable[[int], float] | None = None

    def mask(self, t: int, height: int, width: int) -> np.ndarray:
        c = self.center(t)
        if c is None:
            return np.zeros((height, width), dtype=bool)
        r = self.radius_at(t) if self.radius_at else self.radius
        yy, xx = np.mgrid[0:height, 0:width]
        px, py = xx + 0.5, yy + 0.5
        if self.kind == "disc":
            return (px - c[0]) ** 2 + (py - c[1]) ** 2 <= r * r
        return (np.abs(px - c[0]) <= r) & (np.abs(py - c[1]) <= r)


@dataclass
class SegShapeClip:
    """Frames and true visible masks; shapes later in the list are drawn over earlier ones."""

    frames: list[np.ndarray]
    truth: dict[str, list[np.ndarray]]  # name -> visible mask per frame
    width: int
    height: int
    frame_numbers: list[int] = field(default_factory=list)


def make_shape_clip(shapes: list[SegShape], n_frames: int, width: int = 96, height: int = 64,
                    background=(235, 235, 225)) -> SegShapeClip:
    frames, truth = [], {s.name: [] for s in shapes}
    for t in range(n_frames):
        img = np.empty((height, width, 3), dtype=np.uint8)
        img[:] = background
        # A little texture so frames are distinct images even where shapes stand still.
        img[t % height, :, :] = np.array(background) - 20
        occupied = np.full((height, width), -1)
        for k, s in enumerate(shapes):
            m = s.mask(t, height, width)
            img[m] = s.color
            occupied[m] = k
        for k, s in enumerate(shapes):
            truth[s.name].append(occupied == k)
        frames.append(img)
    return SegShapeClip(frames, truth, width, height, list(range(n_frames)))


# ---------------------------------------------------------------------------------------------------
# Oracle: answers SAM's predictor calls from the known shapes


class SegOraclePredictor:
    """Implements the MaskPredictor protocol from true masks: the object a prompt points at wins.

    Scoring is SAM-like: positive clicks on an object count for it, negative clicks against it, a
    box votes for the object most of whose area lies inside it, and an input mask for the object it
    overlaps. If nothing is pointed at, the answer is an empty mask. Logits are higher for a
    better-supported answer, like SAM's.
    """

    def __init__(self, frames: list[np.ndarray], truth: dict[str, list[np.ndarray]]):
        self._by_image = {}
        for t, frame in enumerate(frames):
            self._by_image[self._digest(frame)] = [truth[name][t] for name in truth]
        self._current: list[np.ndarray] | None = None
        self.set_image_calls = 0
        self.predict_calls = 0

    @staticmethod
    def _digest(image: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        self.set_image_calls += 1
        self._current = self._by_image[self._digest(image)]

    def predict(self, point_coords, point_labels, box, mask_input, multimask_output):
        assert self._current is not None, "set_image must come first"
        self.predict_calls += 1
        h, w = self._current[0].shape
        best, best_score = None, 0.0
        for m in self._current:
            area = m.sum()
            if area == 0:
                continue
            score = 0.0
            if point_coords is not None:
                for (x, y), label in zip(point_coords, point_labels):
                    xi, yi = int(np.floor(x)), int(np.floor(y))
                    if 0 <= xi < w and 0 <= yi < h and m[yi, xi]:
                        score += 2.0 if label == 1 else -2.0
            if box is not None:
                x0, y0, x1, y1 = (int(round(v)) for v in box)
                score += m[max(0, y0):y1, max(0, x0):x1].sum() / area
            if mask_input is not None:
                prev = mask_input[0] > 0
                score += (prev & m).sum() / max(1, (prev | m).sum())
            if score > best_score + 1e-9:
                best, best_score = m, score
        if best is None or best_score < 0.5:
            logits = np.full((h, w), -8.0, dtype=np.float32)
        else:
            logits = np.where(best, 2.0 + best_score, -8.0).astype(np.float32)
        c = 3 if multimask_output else 1
        scores = np.linspace(0.9, 0.7, c).astype(np.float32)
        return np.repeat(logits[None], c, 0), scores, np.repeat(logits[None], c, 0)


# ---------------------------------------------------------------------------------------------------
# Video files


def write_video(path: Path, frames: list[np.ndarray], fps: int = 12, codec: str = "ffv1") -> Path:
    """Encode RGB frames with PyAV; ffv1 (in .mkv) is lossless, libx264/mpeg4 are not."""
    import av

    pix_fmt = {"ffv1": "bgr0", "libx264": "yuv420p", "mpeg4": "yuv420p", "libvpx-vp9": "yuv420p"}[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------------
# Tiny SAM, built from segment-anything's own modules


def build_tiny_sam(seed: int = 0):
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, out_chans=32,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=8),
            transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=24,
        ),
    )
    # Rel-pos tables start at zero; give them values so a wrong load would show in the outputs.
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.1)
    return sam.eval()


@pytest.fixture(scope="session")
def seg_tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """A tiny SAM saved like Meta's .pth files (a plain state dict)."""
    import torch

    path = tmp_path_factory.mktemp("seg_sam") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    return path


@pytest.fixture
def seg_build_tiny_sam():
    return build_tiny_sam


@pytest.fixture
def seg_make_clip():
    return make_shape_clip


@pytest.fixture
def seg_shape():
    return SegShape


@pytest.fixture
def seg_oracle():
    return SegOraclePredictor


@pytest.fixture
def seg_write_video():
    return write_video
