"""Errors a user can act on.

Every error the library raises on purpose is a `COM4DError` with a short machine-readable `code`
(the backend forwards it on the wire) and a message that names the problem in one sentence.
"""

from __future__ import annotations


class COM4DError(Exception):
    """Base class: `code` identifies the kind of problem, `str(err)` says what to do about it."""

    code = "com4d_error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class WeightsError(COM4DError):
    """A weights folder is missing, not in the official layout, or holds unexpected tensors."""

    code = "bad_weights"


class InputError(COM4DError):
    """Frames, masks, prompts or a video that cannot be used as given."""

    code = "bad_input"


class ParameterError(COM4DError):
    """A reconstruction parameter out of range (e.g. more objects than the model's tables hold)."""

    code = "bad_parameter"


class SegmentationError(COM4DError):
    """Segmentation could not follow an object through the clip."""

    code = "segmentation_failed"


class Cancelled(COM4DError):
    """The run was cancelled through its `CancelToken`."""

    code = "cancelled"


class OutOfMemory(COM4DError):
    """The job needs more (GPU) memory than is available or than the memory budget allows."""

    code = "out_of_memory"
