"""What a `submit` must satisfy, as plain functions of its fields, its files and the server's limits.

Two steps, so that nothing slow runs on the socket thread:

- `check_submit` / `check_resubmit` look only at the message (field types, input form, file names,
  object count, parameters): microseconds, done before the server answers anything.
- `inspect_inputs` reads what is on disk once the inputs are stored (the video's header, each
  image's header, objects.json) and checks frame and pixel counts before any frame is decoded. It
  runs on the server's intake thread.

Every refusal is a `Rejected` with a wire error code and a sentence that names the problem; no
sentence holds a path of the server's own store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend import protocol
from backend.store import plain
from backend.worker import check_params
from com4d.errors import COM4DError
from com4d.params import ModelLimits
from com4d.plan import InputSummary, plan_reconstruction
from com4d.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, list_frame_files, probe_video

MASK_FOLDERS = ("frames", "frames_no_bg", "masks")
MAX_OBJECTS_JSON_BYTES = 1 << 20
MAX_OBJECTS_JSON_DEPTH = 8  # {"dynamic": [{"id": 0, "name": "dog", ...}]} is 3 deep


class Rejected(Exception):
    """A request the server answers with an `error` (code + sentence)."""

    def __init__(self, code: str, message: str, advice: str | None = None):
        super().__init__(message)
        self.code = code
        self.advice = advice


@dataclass(frozen=True)
class SubmitLimits:
    """What a job may ask of this server."""

    paths_allowed: bool = True  # file paths in `submit` (a loopback server only)
    max_objects: int = 32
    max_frames: int = 1024  # selected frames
    max_video_bytes: int = 2 << 30
    max_frame_pixels: int = 4096 * 4096  # one image, read from its header
    max_job_pixels: int = 1 << 30  # all images a job decodes together (`inspect_inputs`)
    model: ModelLimits | None = None  # what the loaded model bounds (objects per grid, window frames)


# -- step 1: the message ---------------------------------------------------------------------------


def check_submit(fields: dict[str, Any], files: dict[str, Any], limits: SubmitLimits) -> dict[str, Any]:
    """The request description stored in job.json for a fresh submit (no `resubmit`)."""
    video, masks, prompts = fields.get("video"), fields.get("masks"), fields.get("prompts")
    if (video is None) == (masks is None):
        raise Rejected("bad_field", "give exactly one input: `video` (with `prompts`), `masks` or `resubmit`")
    if video is not None and prompts is None:
        raise Rejected("bad_field", "a video needs `prompts` (the prompts.json object)")
    if masks is not None and prompts is not None:
        raise Rejected("bad_field", "`prompts` go with a video; a masks folder already holds the masks")
    for name in files:
        if not protocol.safe_file_name(name):
            raise Rejected(
                "bad_field",
                f"file name {name!r:.80} is not allowed (use e.g. 'video', "
                "'video/000000.png', 'masks/000000_object_000.png')",
            )
    request: dict[str, Any] = {"video": None, "masks": None, "prompts": None}
    if video is not None:
        request["video"] = _check_video(video, files, limits)
        request["prompts"] = _check_prompts(prompts, limits)
    else:
        request["masks"] = _check_masks(masks, files, limits)
    request["params"] = checked_params(fields.get("params") or {}, limits)
    return request


def check_resubmit(
    fields: dict[str, Any], files: dict[str, Any], stored: dict[str, Any], source: str, limits: SubmitLimits
) -> dict[str, Any]:
    """The request of a `resubmit` of job `source`, whose stored request is `stored`."""
    extra = [k for k in ("video", "masks", "prompts") if fields.get(k) is not None]
    if extra or files:
        what = ", ".join(f"`{k}`" for k in extra) or "uploaded files"
        raise Rejected("bad_field", f"`resubmit` runs a stored job's inputs again; it takes no {what}")
    request = dict(stored)
    if not request:
        raise Rejected("bad_input", f"job {source} has no stored request to run again")
    if any("path" in (request.get(k) or {}) for k in ("video", "masks")) and not limits.paths_allowed:
        raise Rejected("forbidden", "that job reads a file path, which a non-loopback backend refuses")
    if fields.get("params") is not None:
        request["params"] = checked_params(fields["params"], limits)
    request["resubmitted_from"] = source
    return request


def checked_params(params: Any, limits: SubmitLimits) -> dict[str, Any]:
    """The params map as stored, once the parameter schema (com4d/params.py) and the model accept it."""
    if not isinstance(params, dict):
        raise Rejected("bad_field", "`params` must be a map of parameter names to values")
    try:
        check_params(params, limits.model)
    except COM4DError as exc:
        raise Rejected(exc.code, str(exc)) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise Rejected("bad_parameter", f"params: {exc}") from None
    return plain(params)


def _check_path(given: Any, what: str, limits: SubmitLimits) -> str:
    if not limits.paths_allowed:
        raise Rejected(
            "forbidden",
            f"this backend is not on a loopback address, so it takes no file paths; upload the {what} instead",
        )
    if not isinstance(given, str) or not given or "\0" in given:
        raise Rejected("bad_field", f"the {what} path must be a non-empty string")
    if not Path(given).is_absolute():
        raise Rejected("bad_field", f"the {what} path must be absolute, got {given!r:.200}")
    return given


def _check_video(video: dict[str, Any], files: dict[str, Any], limits: SubmitLimits) -> dict[str, Any]:
    if ("path" in video) == ("filename" in video):
        raise Rejected(
            "bad_field",
            "`video` needs exactly one of `path` (same machine) or `filename` "
            "(with the file uploaded as blob 'video' or frames as 'video/NAME')",
        )
    foreign = [n for n in files if n != "video" and not n.startswith("video/")]
    if foreign:
        raise Rejected("bad_field", f"unexpected files {foreign[:3]} for a video submit")
    if "path" in video:
        path = _check_path(video["path"], "video", limits)
        if files:
            raise Rejected("bad_field", "give the video as a path or as uploaded files, not both")
        return {"path": path}
    filename = video["filename"]
    if not isinstance(filename, str):
        raise Rejected("bad_field", "`video.filename` must be a string")
    frames = [n for n in files if n.startswith("video/")]
    if "video" in files and frames:
        raise Rejected("bad_field", "upload a video file ('video') or frames ('video/NAME'), not both")
    if "video" in files:
        suffix = Path(filename).suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise Rejected(
                "bad_input", f"video {filename!r:.80} has an unknown type; use one of {', '.join(VIDEO_SUFFIXES)}"
            )
        return {"stored": f"inputs/video{suffix}"}
    if not frames:
        raise Rejected("bad_field", "`video.filename` needs a blob 'video' or frames 'video/NAME'")
    bad = [n for n in frames if Path(n).suffix.lower() not in IMAGE_SUFFIXES]
    if bad:
        raise Rejected("bad_input", f"frames must be png or jpg files, not {bad[0]!r:.80}")
    return {"stored": "inputs/video"}


def _check_masks(masks: dict[str, Any], files: dict[str, Any], limits: SubmitLimits) -> dict[str, Any]:
    if "path" in masks:
        if files:
            raise Rejected("bad_field", "give the masks folder as a path or as uploaded files, not both")
        return {"path": _check_path(masks["path"], "masks folder", limits)}
    allowed = tuple(f"{d}/" for d in MASK_FOLDERS)
    foreign = [n for n in files if n != "objects.json" and not n.startswith(allowed)]
    if foreign:
        raise Rejected(
            "bad_field",
            f"unexpected files {foreign[:3]} for a masks submit "
            "(allowed: frames/, frames_no_bg/, masks/, objects.json)",
        )
    if not any(n.startswith("frames/") for n in files) or not any(n.startswith("masks/") for n in files):
        raise Rejected(
            "bad_input",
            "a masks upload needs frames ('frames/NNNNNN.png') and masks ('masks/NNNNNN_object_XXX.png')",
        )
    _check_object_count([n.split("/", 1)[1] for n in files if n.startswith("masks/")], limits)
    return {"stored": "inputs/masks"}


def _check_object_count(mask_names: list[str], limits: SubmitLimits) -> None:
    ids = {n.split("_object_", 1)[1] for n in mask_names if "_object_" in n}
    if len(ids) > limits.max_objects:
        raise Rejected("too_large", f"{len(ids)} objects in the masks; the limit is {limits.max_objects}")


def _check_prompts(prompts: Any, limits: SubmitLimits) -> dict[str, Any]:
    from com4d.segment.prompts import parse_prompts

    objects = prompts.get("objects")
    if isinstance(objects, list) and len(objects) > limits.max_objects:
        raise Rejected("too_large", f"{len(objects)} objects in the prompts; the limit is {limits.max_objects}")
    try:
        parse_prompts(prompts)
    except COM4DError as exc:
        raise Rejected(exc.code, f"prompts: {exc}") from None
    return prompts


# -- step 2: the stored inputs ------------------------------------------------------------------------


def planned_frames(
    available: int,
    dynamic: list[str],
    static: list[str],
    params: dict[str, Any],
    limits: SubmitLimits,
    segmented: bool = False,
) -> int:
    """How many frames the job runs on, by the library's own plan (com4d/plan.py) of `available`
    frames and these objects; the plan's refusals (frame range, stage-A frame, objects or window
    against the model) become the submit's. `segmented`: a video with prompts, whose segmentation
    reads only the selected frames, planned then as the pipeline does (`preselected`)."""
    checked = check_params(params)
    summary = InputSummary(frame_numbers=range(available), dynamic_names=dynamic, static_names=static)
    try:
        plan = plan_reconstruction(summary, checked, limits.model)
        if segmented:
            summary = InputSummary(plan.frame_numbers, dynamic, static, preselected=True)
            plan = plan_reconstruction(summary, checked, limits.model)
    except COM4DError as exc:
        raise Rejected(exc.code, str(exc)) from None
    return len(plan.frames)


def _prompt_objects(request: dict[str, Any], job_dir: Path) -> tuple[list[str], list[str]]:
    """(dynamic, static) object names of a video job's stored prompts."""
    from com4d.segment.prompts import parse_prompts

    prompts = request["prompts"]
    if isinstance(prompts, str):  # stored: inputs/prompts.json
        prompts = json.loads((job_dir / prompts).read_text(encoding="utf-8"))
    parsed = parse_prompts(prompts)
    return [o.name for o in parsed.dynamic], [o.name for o in parsed.static]


def inspect_inputs(request: dict[str, Any], job_dir: Path, limits: SubmitLimits) -> None:
    """Check the stored (or given) inputs of `request` from their headers; fills in `frames`.

    The pixel budget counts what the library will decode: of a video, the selected frames (it
    keeps no other); of a masks folder, every frame, mask and frames_no_bg image, since
    `com4d.inputs.load_inputs` reads the whole folder before the frames are selected.

    `job_dir` is the job's folder: `stored` entries are relative to it, and its absolute path is
    kept out of every message."""
    try:
        _inspect(request, job_dir, limits)
    except Rejected as exc:
        raise Rejected(exc.code, _hide(str(exc), job_dir), exc.advice) from None


def _inspect(request: dict[str, Any], job_dir: Path, limits: SubmitLimits) -> None:
    source = request.get("video") or request.get("masks")
    if "stored" in source:
        root = job_dir / source["stored"]
    else:
        root = Path(source["path"])
    params = request.get("params") or {}
    if request.get("video") is not None:
        count, frame_pixels = _clip_size(root, limits)
        selected = planned_frames(count, *_prompt_objects(request, job_dir), params, limits, segmented=True)
        decoded = selected * max(frame_pixels)
    else:
        if not (root / "frames").is_dir() or not (root / "masks").is_dir():
            raise Rejected("bad_input", f"{root} is not a masks folder: it needs frames/ and masks/")
        masks = list_frame_files(root / "masks")
        _check_object_count([p.name for p in masks], limits)
        statics = _check_objects_json(root / "objects.json")
        count, frame_pixels = _clip_size(root / "frames", limits)
        ids = sorted({p.stem.split("_object_", 1)[1] for p in masks if "_object_" in p.stem})
        selected = planned_frames(count, [f"object_{i}" for i in ids], statics, params, limits)
        decoded = sum(frame_pixels) + sum(_image_pixels(p, limits) for p in masks)
        if (root / "frames_no_bg").is_dir():
            decoded += sum(_image_pixels(p, limits) for p in list_frame_files(root / "frames_no_bg"))
    if selected > limits.max_frames:
        raise Rejected(
            "too_large",
            f"{selected} frames selected; the limit is {limits.max_frames}",
            "Use a shorter frame range (frame_start/frame_end) or a larger frame_stride.",
        )
    if decoded > limits.max_job_pixels:
        raise Rejected(
            "too_large",
            f"the job would decode {decoded} pixels ({selected} of {count} frames selected); the limit is "
            f"{limits.max_job_pixels} per job",
            "Send fewer or smaller frames: of a video only the selected frames count (frame_end, frame_stride); "
            "a masks folder counts every image it holds.",
        )
    source["frames"] = count


def _clip_size(path: Path, limits: SubmitLimits) -> tuple[int, list[int]]:
    """(frame count, pixels of each frame) of a video file or a frames folder, from headers only
    (a video's frames all have its size: one entry)."""
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise Rejected("bad_input", f"{path} is not a video file ({', '.join(VIDEO_SUFFIXES)})")
        size = path.stat().st_size
        if size > limits.max_video_bytes:
            raise Rejected("too_large", f"{path} is {size} bytes; the limit is {limits.max_video_bytes}")
        if not os.access(path, os.R_OK):
            raise Rejected("bad_input", f"{path} is not readable by the server")
        try:
            info = probe_video(path)
        except COM4DError as exc:
            raise Rejected(exc.code, str(exc)) from None
        except OSError as exc:
            raise Rejected("bad_input", f"cannot read {path}: {exc.strerror or exc}") from None
        pixels = info.width * info.height
        if pixels > limits.max_frame_pixels:
            raise Rejected(
                "bad_input", f"{path} is {info.width}x{info.height}; the limit is {limits.max_frame_pixels} pixels"
            )
        return info.frame_count, [pixels]
    if not path.is_dir():
        raise Rejected("bad_input", f"no readable video file or frames folder at {path}")
    files = list_frame_files(path)
    if not files:
        raise Rejected("bad_input", f"{path} holds no png/jpg frames")
    return len(files), [_image_pixels(p, limits) for p in files]


def _image_pixels(path: Path, limits: SubmitLimits) -> int:
    """Width x height from an image's header (nothing decoded); Rejected above the frame limit."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError:
        raise Rejected("bad_input", f"{path} declares more pixels than any frame may have") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Rejected("bad_input", f"{path} is not a readable png/jpg image ({type(exc).__name__})") from None
    if width * height > limits.max_frame_pixels:
        raise Rejected("bad_input", f"{path} is {width}x{height}; the limit is {limits.max_frame_pixels} pixels")
    return width * height


def _check_objects_json(path: Path) -> list[str]:
    """objects.json must be a small, shallow map: the pipeline reads names from it. Returns the
    static objects' names it lists."""
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_OBJECTS_JSON_BYTES:
        raise Rejected("bad_input", f"objects.json is over {MAX_OBJECTS_JSON_BYTES} bytes")
    too_deep = Rejected("bad_input", f"objects.json is nested deeper than {MAX_OBJECTS_JSON_DEPTH} levels")
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise Rejected("bad_input", f"objects.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise Rejected("bad_input", "objects.json must be a JSON object")
    level, depth = [data], 0
    while level:  # breadth first: no recursion however deep the file
        depth += 1
        if depth > MAX_OBJECTS_JSON_DEPTH:
            raise too_deep
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
    statics = data.get("static", [])
    if not isinstance(statics, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in statics
    ):
        raise Rejected("bad_input", 'objects.json: "static" must be a list of objects with a "name"')
    return [o["name"] for o in statics]


def _hide(text: str, job_dir: Path) -> str:
    """`text` with the job folder's absolute path cut off (`inputs/video.mp4` stays)."""
    return text.replace(f"{job_dir}/", "").replace(str(job_dir), "the job folder")
