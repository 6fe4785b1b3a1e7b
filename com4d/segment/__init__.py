"""Segmentation step: a video and the user's clicks -> per-object, per-frame masks (SAM).

`segment_clip_to_folder` is the one-call entry; the modules are the steps: `prompts` (prompts.json),
`sam` (checkpoint -> model, predictor), `propagate` (following objects through the clip),
`preprocess` (square pad, resize, background removal), `preview` (overlays, contact sheet).
"""

from com4d.segment.pipeline import SegmentationResult, segment_clip_to_folder
from com4d.segment.prompts import FramePrompt, ObjectPrompts, SegmentationPrompts, load_prompts, parse_prompts
from com4d.segment.propagate import LostFrame, MaskPredictor, TrackingConfig, TrackingResult, track_objects

__all__ = [
    "FramePrompt",
    "LostFrame",
    "MaskPredictor",
    "ObjectPrompts",
    "SegmentationPrompts",
    "SegmentationResult",
    "TrackingConfig",
    "TrackingResult",
    "load_prompts",
    "parse_prompts",
    "segment_clip_to_folder",
    "track_objects",
]
