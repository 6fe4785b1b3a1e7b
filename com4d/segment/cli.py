"""`com4d segment`: the segmentation step on the command line (also `python -m com4d.segment`)."""

from __future__ import annotations

import argparse
import sys

from com4d.errors import COM4DError
from com4d.events import Event, Progress, WarningEvent

DESCRIPTION = "Turn clicks/boxes on objects (prompts.json) into per-frame masks with SAM."
EXAMPLE = """example:
  com4d segment clip.mp4 --prompts prompts.json --sam sam_vit_h_4b8939.pth --out clip_masks
  then look at clip_masks/preview/contact_sheet.png before reconstructing.
exit codes: 0 masks written; 1 an error (one line on stderr saying what and where)."""


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("video", help="video file (mp4/mov/mkv/avi/webm) or folder of png/jpg frames")
    parser.add_argument("--prompts", required=True, help="prompts.json (see docs/segmentation.md)")
    parser.add_argument("--sam", required=True, help="segment-anything checkpoint (vit_h, vit_l or vit_b)")
    parser.add_argument("--out", required=True, help="output folder (official masks layout)")
    parser.add_argument("--size", type=int, default=768, help="side of the square output frames (768)")
    parser.add_argument("--start", type=int, default=0, help="first source frame (0)")
    parser.add_argument("--end", type=int, default=None, help="stop before this source frame (all)")
    parser.add_argument("--stride", type=int, default=1, help="take every n-th frame (1)")
    parser.add_argument("--device", default="auto", help="torch device for SAM: auto, cpu, cuda, cuda:1")
    parser.add_argument("--allow-lost", action="store_true",
                        help="write masks even if an object is lost on some frames (left empty there)")
    parser.add_argument("--no-center", action="store_true",
                        help="do not shift frames so the objects sit in the image centre")
    parser.add_argument("--no-previews", action="store_true", help="skip the overlay pictures")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_segment)
    return parser


def add_segment_parser(subparsers) -> argparse.ArgumentParser:
    """Register `segment` on the `com4d` command's subparsers."""
    parser = subparsers.add_parser(
        "segment", help=DESCRIPTION, description=DESCRIPTION, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return configure_parser(parser)


def run_segment(args: argparse.Namespace) -> int:
    """Run the step for parsed arguments; prints one line and returns 1 on a COM4DError."""
    from com4d.segment.pipeline import segment_clip_to_folder

    bar = _ProgressBar(disabled=args.quiet)
    try:
        result = segment_clip_to_folder(
            args.video, args.prompts, args.sam, args.out, size=args.size, on_event=bar, device=args.device,
            start=args.start, end=args.end, stride=args.stride, center=not args.no_center,
            on_lost="warn" if args.allow_lost else "error", previews=not args.no_previews,
        )
    except COM4DError as err:
        bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 1
    bar.close()
    print(
        f"wrote {len(result.frame_numbers)} frames, {len(result.dynamic)} dynamic and {len(result.static)} "
        f"static object(s) (scene_num_parts={result.scene_num_parts}) to {result.out_dir}"
    )
    if not args.no_previews:
        print(f"check the masks: {result.contact_sheet}")
    return 0


class _ProgressBar:
    """tqdm bar driven by Progress events (unit: frames); warnings printed above it."""

    def __init__(self, disabled: bool):
        self.disabled = disabled
        self._bar = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, WarningEvent):
            self._write(f"warning: {event.message}")
        elif isinstance(event, Progress) and not self.disabled and event.total:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=event.total, unit="frame", desc="segment", file=sys.stderr)
            self._bar.total = event.total
            self._bar.n = event.done
            self._bar.set_postfix_str(event.message, refresh=False)
            self._bar.refresh()

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m com4d.segment", description=DESCRIPTION, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    args = configure_parser(parser).parse_args(argv)
    return args.func(args)
