"""Following each marked object through the clip with an image mask predictor (SAM).

SAM segments one image at a time. To follow an object, each frame is prompted with what the previous
frames found: the last mask, moved on at the object's recent speed, gives a box (grown a little) and a
point deep inside it away from the other objects; points deep inside the *other* objects are
negatives (so two objects do not merge or swap); the previous low-resolution mask logits go in as
the mask prompt. On frames where the user clicked, their prompts take over.

A result that does not look like the same object (empty, much bigger or smaller, jumped across the
frame, or sitting on another object's last mask) is not kept: the frame is recorded as lost for that
object with the reason, its mask left empty, and tracking goes on from the last good mask. Nothing here
knows about SAM itself; any object with `set_image` and `predict` (the `MaskPredictor` protocol) works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from scipy import ndimage

from com4d.errors import InputError, ParameterError
from com4d.events import CancelToken
from com4d.segment.preprocess import shift_image
from com4d.segment.prompts import FramePrompt, ObjectPrompts, SegmentationPrompts


class MaskPredictor(Protocol):
    """The part of SAM's predictor that tracking uses (`SamFramePredictor` implements it)."""

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        """Make (H, W, 3) uint8 RGB `image` current; `key` (the frame number) allows caching."""

    def predict(
        self,
        point_coords: np.ndarray | None,  # (N, 2) float32 x, y in image pixels
        point_labels: np.ndarray | None,  # (N,) int32, 1 positive, 0 negative
        box: np.ndarray | None,  # (4,) float32 x0, y0, x1, y1
        mask_input: np.ndarray | None,  # (1, h, w) low-res logits from an earlier `predict`
        multimask_output: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask logits (C, H, W) (> 0 is the object), scores (C,), low-res logits (C, h, w)."""


@dataclass(frozen=True)
class TrackingConfig:
    """How prompts are carried from frame to frame and when a result counts as lost."""

    box_margin: float = 0.15  # the last mask's box grows by this fraction of its size per side
    min_box_margin_px: float = 4.0
    use_box: bool = True
    use_mask_input: bool = True
    use_negative_points: bool = True
    min_area_fraction: float = 1e-4  # a mask smaller than this part of the frame is empty
    max_area_change: float = 3.0  # area may grow or shrink by at most this factor per frame
    max_center_jump: float = 0.2  # centroid may move at most this part of the frame diagonal per frame
    swap_iou: float = 0.5  # IoU with another object's last mask above which a result is a swap

    def __post_init__(self) -> None:
        if self.max_area_change <= 1 or not (0 < self.max_center_jump) or not (0 < self.swap_iou <= 1):
            raise ParameterError(
                "tracking thresholds out of range: need max_area_change > 1, max_center_jump > 0, "
                "0 < swap_iou <= 1"
            )


@dataclass(frozen=True)
class LostFrame:
    """A frame on which an object could not be followed, and why (empty / jump / swap)."""

    frame: int
    reason: str
    detail: str = ""


class ObjectTrack:
    """Masks of one object per frame number, stored one bit per pixel to bound memory."""

    def __init__(self, obj: ObjectPrompts, height: int, width: int):
        self.name = obj.name
        self.role = obj.role
        self.shape = (height, width)
        self.lost: list[LostFrame] = []
        self._packed: dict[int, np.ndarray] = {}

    def set(self, frame: int, mask: np.ndarray) -> None:
        self._packed[frame] = np.packbits(mask.astype(bool), axis=None)

    def get(self, frame: int) -> np.ndarray | None:
        packed = self._packed.get(frame)
        if packed is None:
            return None
        size = self.shape[0] * self.shape[1]
        return np.unpackbits(packed, count=size).reshape(self.shape).astype(bool)

    @property
    def frames(self) -> list[int]:
        return sorted(self._packed)


@dataclass
class TrackingResult:
    """One `ObjectTrack` per object (prompt order) over `frame_numbers`."""

    frame_numbers: list[int]
    tracks: list[ObjectTrack]
    steps: int = 0  # frames processed, over both sweeps (the progress unit)

    def track(self, name: str) -> ObjectTrack:
        for t in self.tracks:
            if t.name == name:
                return t
        raise InputError(f"unknown object {name!r}; tracked: {', '.join(t.name for t in self.tracks)}")

    @property
    def lost(self) -> dict[str, list[LostFrame]]:
        return {t.name: sorted(t.lost, key=lambda lf: lf.frame) for t in self.tracks if t.lost}


ProgressCallback = Callable[[int, int, int], None]  # (steps done, steps in all, frame number)


@dataclass
class _State:
    """What tracking knows of one object: its last good mask and where it was found."""

    mask: np.ndarray | None = None
    low_res: np.ndarray | None = None
    index: int = -1
    area: int = 0
    centroid: tuple[float, float] = (0.0, 0.0)
    velocity: tuple[float, float] = (0.0, 0.0)  # centroid motion in pixels per step between frames read


def track_objects(
    predictor: MaskPredictor,
    frames: Sequence[np.ndarray],
    frame_numbers: Sequence[int],
    prompts: SegmentationPrompts,
    config: TrackingConfig = TrackingConfig(),
    on_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TrackingResult:
    """Masks for every object on every frame, from the user's prompts (see the module docstring).

    Each frame is embedded once for all objects. Objects first marked on a later frame are also
    followed backwards from there to the start of the clip.
    """
    if len(frames) != len(frame_numbers) or not frames:
        raise InputError("tracking needs one frame number per frame and at least one frame")
    height, width = frames[0].shape[:2]
    numbers = list(frame_numbers)
    prompts.check_against_clip(width, height, numbers)
    tracker = _Tracker(predictor, frames, numbers, prompts, config, on_progress, cancel)
    return tracker.run()


class _Tracker:
    def __init__(self, predictor, frames, numbers, prompts, config, on_progress, cancel):
        self.predictor = predictor
        self.frames = frames
        self.numbers = numbers
        self.objects = list(prompts.objects)
        self.config = config
        self.on_progress = on_progress
        self.cancel = cancel
        self.height, self.width = frames[0].shape[:2]
        self.tracks = {o.name: ObjectTrack(o, self.height, self.width) for o in self.objects}
        self.start = {o.name: numbers.index(o.first_frame) for o in self.objects}
        self.states = {o.name: _State() for o in self.objects}
        self.done = 0

    def run(self) -> TrackingResult:
        first = min(self.start.values())
        late = [o for o in self.objects if self.start[o.name] > 0]
        total = len(self.numbers) - first + (max(self.start[o.name] for o in late) if late else 0)
        seeds: dict[str, _State] = {}
        for i in range(first, len(self.numbers)):
            active = [o for o in self.objects if self.start[o.name] <= i]
            self._step(i, active, direction=1, total=total)
            for o in active:
                if i == self.start[o.name] and o in late:
                    seeds[o.name] = replace(self.states[o.name])
        if late:
            for o in late:
                self.states[o.name] = seeds[o.name]
            for i in range(max(self.start[o.name] for o in late) - 1, -1, -1):
                active = [o for o in late if self.start[o.name] > i]
                self._step(i, active, direction=-1, total=total)
        tracks = [self.tracks[o.name] for o in self.objects]
        return TrackingResult(list(self.numbers), tracks, steps=self.done)

    # -- one frame ---------------------------------------------------------------------------------
    def _step(self, i: int, active: list[ObjectPrompts], direction: int, total: int) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        frame_number = self.numbers[i]
        self.predictor.set_image(self.frames[i], key=frame_number)
        active_names = {o.name for o in active}
        expected = self._expected_masks(i, active_names)
        blank = np.zeros((self.height, self.width), dtype=bool)
        logits: list[np.ndarray] = []
        low_res: list[np.ndarray | None] = []
        from_user: list[bool] = []
        for obj in active:
            user = obj.prompt_at(frame_number)
            by_user = user is not None and (user.has_positive or i == self.start[obj.name])
            from_user.append(by_user)
            if not by_user and expected[obj.name] is None:
                # Lost since its first frame: nothing to carry over until the user clicks again.
                logits.append(np.full((self.height, self.width), -1.0, dtype=np.float32))
                low_res.append(None)
                continue
            coords, labels, box, mask_input = self._prompts_for(obj, i, user, by_user, expected)
            single_click = box is None and mask_input is None and coords is not None and len(coords) == 1
            out_logits, scores, out_low = self.predictor.predict(
                coords, labels, box, mask_input, single_click
            )
            best = int(np.argmax(scores))
            logits.append(np.asarray(out_logits[best], dtype=np.float32))
            low_res.append(np.asarray(out_low[best : best + 1], dtype=np.float32))

        final = [n for n in self.tracks if n not in active_names and expected.get(n) is not None]
        taken = np.logical_or.reduce([expected[n] for n in final]) if final else blank
        masks = [(lg > 0) & ~taken for lg in logits]
        verdicts = self._settle_conflicts(active, masks, from_user, expected)
        masks = _split_overlaps(logits, masks, [v is None for v in verdicts])
        for k, obj in enumerate(active):
            verdict = verdicts[k] or self._check(obj, i, masks[k], from_user[k], expected)
            self._accept(obj, i, masks[k], low_res[k], from_user[k], verdict)
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, total, frame_number)

    def _expected_masks(self, i: int, active_names: set[str]) -> dict[str, np.ndarray | None]:
        """Where each object should be on frame `i`: its final mask if it already has one here
        (backward sweep), else its last good mask moved on at its last velocity; None if unknown."""
        frame_number = self.numbers[i]
        out: dict[str, np.ndarray | None] = {}
        for name, state in self.states.items():
            known = None if name in active_names else self.tracks[name].get(frame_number)
            if known is not None:
                out[name] = known if known.any() else None
            elif state.mask is None:
                out[name] = None
            else:
                steps = i - state.index
                dx, dy = (round(v * steps) for v in state.velocity)
                out[name] = shift_image(state.mask, dx, dy, False)
                if not out[name].any():
                    out[name] = state.mask
        return out

    def _prompts_for(self, obj, i, user: FramePrompt | None, by_user: bool, expected):
        """Point coords/labels, box and mask input for `obj` on frame index `i`."""
        if by_user:
            return user.point_coords(), user.point_labels(), user.box_array(), None
        cfg = self.config
        state = self.states[obj.name]
        own = expected[obj.name]
        others = [m for n, m in expected.items() if n != obj.name and m is not None]
        covered = np.logical_or.reduce(others) if others else np.zeros_like(own)
        free = own & ~covered  # a click here is unlikely to land on a neighbour that moved in front
        points: list[tuple[float, float]] = [_deepest_point(free if free.any() else own)]
        labels: list[int] = [1]
        if cfg.use_negative_points:
            for other in others:
                region = other & ~own
                if region.any():
                    points.append(_deepest_point(region))
                    labels.append(0)
        if user is not None:  # negative-only clicks on this frame: add them to the carried prompts
            points += list(user.points)
            labels += list(user.labels)
        box = _grown_box(own, cfg, self.width, self.height) if cfg.use_box else None
        mask_input = state.low_res if cfg.use_mask_input and abs(i - state.index) == 1 else None
        return np.asarray(points, dtype=np.float32), np.asarray(labels, dtype=np.int32), box, mask_input

    def _settle_conflicts(self, active, masks, from_user, expected) -> list[tuple[str, str] | None]:
        """Two objects whose results are the same region: the one that explains it worse loses it.

        The user's own prompt wins; otherwise the object whose expected mask matches the region
        better. The loser is recorded as a swap, never given the other object's mask.
        """
        verdicts: list[tuple[str, str] | None] = [None] * len(active)

        def fit(k: int) -> float:
            own = expected[active[k].name]
            return (2.0 if from_user[k] else 0.0) + (_iou(masks[k], own) if own is not None else 0.0)

        for a in range(len(active)):
            for b in range(a + 1, len(active)):
                if verdicts[a] or verdicts[b] or not masks[a].any() or not masks[b].any():
                    continue
                if _iou(masks[a], masks[b]) > self.config.swap_iou:
                    loser, winner = (b, a) if fit(a) >= fit(b) else (a, b)
                    verdicts[loser] = ("swap", f"its mask is the region of object {active[winner].name!r}")
        return verdicts

    def _accept(self, obj, i, mask, low, by_user: bool, verdict: tuple[str, str] | None) -> None:
        """Keep `mask` as the object's mask on frame `i`, or record the frame as lost."""
        frame_number = self.numbers[i]
        track, state = self.tracks[obj.name], self.states[obj.name]
        if verdict is None:
            centroid = _centroid(mask)
            if state.mask is None or by_user:
                state.velocity = (0.0, 0.0)  # a click may move the object anywhere: start afresh
            else:
                steps = i - state.index
                limit = self.config.max_center_jump * float(np.hypot(self.width, self.height))
                v = ((centroid[0] - state.centroid[0]) / steps, (centroid[1] - state.centroid[1]) / steps)
                speed = float(np.hypot(*v))
                state.velocity = v if speed <= limit else (v[0] * limit / speed, v[1] * limit / speed)
            state.mask, state.low_res, state.index = mask, low, i
            state.area, state.centroid = int(mask.sum()), centroid
            track.set(frame_number, mask)
        else:
            track.lost.append(LostFrame(frame_number, *verdict))
            track.set(frame_number, np.zeros_like(mask))

    def _check(self, obj, i, mask, by_user: bool, expected) -> tuple[str, str] | None:
        """None if `mask` looks like the object followed so far, else (reason, detail)."""
        cfg = self.config
        area = int(mask.sum())
        if area < max(1.0, cfg.min_area_fraction * self.width * self.height):
            return "empty", f"mask has {area} pixels"
        state = self.states[obj.name]
        if by_user or state.mask is None:
            return None
        since = f"since frame {self.numbers[state.index]}"
        steps = i - state.index
        gap = abs(steps)
        ratio = area / max(state.area, 1)
        limit = cfg.max_area_change**gap
        if ratio > limit or ratio < 1 / limit:
            return "jump", f"area changed {ratio:.2f}x {since}"
        cx, cy = _centroid(mask)
        px, py = (c + v * steps for c, v in zip(state.centroid, state.velocity))
        diag = float(np.hypot(self.width, self.height))
        moved = float(np.hypot(cx - px, cy - py))
        if moved > min(1.0, cfg.max_center_jump * gap) * diag:
            return "jump", f"centre {moved:.0f} px away from where it was heading {since}"
        own_iou = _iou(mask, expected[obj.name])
        for name, other in expected.items():
            if name == obj.name or other is None:
                continue
            other_iou = _iou(mask, other)
            if other_iou > cfg.swap_iou and other_iou > own_iou:
                return "swap", f"mask matches object {name!r} (IoU {other_iou:.2f})"
        return None


def _split_overlaps(logits: list[np.ndarray], masks: list[np.ndarray], keep: list[bool]) -> list[np.ndarray]:
    """Each pixel to at most one object: the kept one with the highest logit there."""
    stack = np.stack([np.where(k, lg, -np.inf) for lg, k in zip(logits, keep)])  # (K, H, W)
    winner = np.argmax(stack, axis=0)  # (H, W)
    return [m & (winner == k) if keep[k] else np.zeros_like(m) for k, m in enumerate(masks)]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive, of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _grown_box(mask: np.ndarray, cfg: TrackingConfig, width: int, height: int) -> np.ndarray:
    x0, y0, x1, y1 = _bbox(mask)
    mx = max(cfg.min_box_margin_px, cfg.box_margin * (x1 - x0))
    my = max(cfg.min_box_margin_px, cfg.box_margin * (y1 - y0))
    return np.asarray(
        [max(0.0, x0 - mx), max(0.0, y0 - my), min(float(width), x1 + mx), min(float(height), y1 + my)],
        dtype=np.float32,
    )


def _deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel centre farthest from the mask's edge: a click that surely lands on the object."""
    x0, y0, x1, y1 = _bbox(mask)
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    dist = ndimage.distance_transform_edt(crop)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x0 + x - 1) + 0.5, float(y0 + y - 1) + 0.5


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def describe_lost(lost: dict[str, list[LostFrame]], frame_numbers: Sequence[int] | None = None) -> str:
    """One clause per object: 'dog' lost on frame(s) 12-15 (empty), 20 (jump).

    Runs of consecutive frames of the clip (consecutive in `frame_numbers`, if given) are joined.
    """
    position = {f: k for k, f in enumerate(frame_numbers)} if frame_numbers is not None else None

    def follows(a: int, b: int) -> bool:
        return (position[b] == position[a] + 1) if position is not None else b == a + 1

    parts = []
    for name, frames in lost.items():
        spans: list[str] = []
        run: list[LostFrame] = []
        for lf in frames + [None]:
            if run and (lf is None or lf.reason != run[-1].reason or not follows(run[-1].frame, lf.frame)):
                span = str(run[0].frame) if len(run) == 1 else f"{run[0].frame}-{run[-1].frame}"
                spans.append(f"{span} ({run[0].reason})")
                run = []
            if lf is not None:
                run.append(lf)
        parts.append(f"{name!r} lost on frame(s) {', '.join(spans)}")
    return "; ".join(parts)
