"""The `com4d` command line: reconstruct, segment, demo.

Exit codes: 0 done; 1 unexpected failure; 2 a problem with the input, weights or parameters
(one line says what); 130 interrupted (finished meshes stay on disk).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from com4d.errors import COM4DError, ParameterError
from com4d.official_config import load_entry
from com4d.params import ReconstructionParams, add_arguments, from_namespace
from com4d.segment.cli import add_segment_parser

RECONSTRUCT_EXAMPLE = """examples:
  com4d reconstruct clip/ --weights ~/weights --out out/          # clip/ has frames/ and masks/
  com4d reconstruct clip.mp4 --masks clip/ --weights ~/weights --out out/
  com4d reconstruct clip.mp4 --prompts prompts.json --sam sam_vit_h.pth --weights ~/weights --out out/
  com4d reconstruct clip/ --weights ~/weights --out out/ --frame-end 81 --num-tokens 1024 --topology tracked
  com4d reconstruct assets/teaser --config infer.json:teaser2048 --weights ~/weights --out out/  # official entry

~/weights holds TripoSG/ (hf download VAST-AI/TripoSG) and COM4D/ (hf download INSAIT-Institute/COM4D).
"""

DEMO_EXAMPLE = """example:
  com4d demo --out demo_out/     # tiny bundled weights + synthetic clip, CPU, well under a minute
"""


def add_reconstruction_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "reconstruction (one flag per parameter of com4d/params.py; defaults follow the official sh/infer.sh, "
        "except the stage-A frame and static parts, which the official teaser entry sets to 5 and 4)"
    )
    add_arguments(g)


def params_from_args(args: argparse.Namespace, base: dict | None = None) -> ReconstructionParams:
    """Flags given on the command line over `base` (an infer.json entry or the demo's settings)."""
    return from_namespace(args, base)


class ProgressBar:
    """Turns pipeline events into one tqdm bar (work units: steps + meshes) and short messages."""

    def __init__(self, quiet: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=1, unit="unit", dynamic_ncols=True, disable=quiet, file=sys.stderr)
        self.quiet = quiet

    def __call__(self, event) -> None:
        kind = event.kind
        if kind == "progress":
            if event.total:
                self.bar.total = event.total
                self.bar.n = event.done
            label = event.stage
            if event.stage == "stage_b":
                label = f"stage B window {event.window}/{event.windows}"
            elif event.stage == "stage_a":
                label = "stage A"
            if event.steps:
                label += f" step {event.step}/{event.steps}"
            self.bar.set_description(label, refresh=False)
            self.bar.refresh()
        elif kind == "warning" and not self.quiet:
            self.bar.write(f"warning: {event.message}")

    def close(self) -> None:
        self.bar.close()


def run_reconstruct(args: argparse.Namespace, weights: Path, request, params, out: Path) -> int:
    from com4d.events import CancelToken
    from com4d.pipeline import COM4DPipeline

    started = time.perf_counter()
    pipe = COM4DPipeline.from_pretrained(weights, device=args.device, dtype=args.dtype,
                                         sam_checkpoint=getattr(args, "sam", None))
    bar = ProgressBar(quiet=args.quiet)
    cancel = CancelToken()
    try:
        result = pipe.reconstruct(request, params, out, on_event=bar, cancel=cancel)
    except KeyboardInterrupt:
        cancel.cancel()
        bar.close()
        print(f"interrupted; finished meshes are in {out}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if not args.quiet:
        print(f"wrote {result.scene_path} ({len(result.frames)} frames) in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from com4d.pipeline import ReconstructionRequest

    source = Path(args.input)
    request = ReconstructionRequest()
    if args.prompts:
        import json

        if not args.sam:
            raise COM4DError("--prompts needs --sam CKPT (a segment-anything checkpoint)", code="bad_parameter")
        try:
            request.prompts = json.loads(Path(args.prompts).read_text())
        except (OSError, ValueError) as err:
            raise COM4DError(f"cannot read prompts file {args.prompts}: {err}", code="bad_input") from err
        request.video = source
    elif args.masks:
        request.video, request.frames_dir = source, Path(args.masks)
    elif source.is_dir():
        request.frames_dir = source
    else:
        raise COM4DError(
            f"{source} is a file: give --masks DIR (a folder with masks/) or --prompts FILE --sam CKPT",
            code="bad_input",
        )
    base = None
    if args.config:
        entry = load_entry(args.config)
        check_dynamic_objects(entry.name, entry.dynamic_objects, request)
        base = entry.params
    params = params_from_args(args, base)
    return run_reconstruct(args, Path(args.weights), request, params, Path(args.out))


def check_dynamic_objects(entry: str, expected: int | None, request) -> None:
    """An infer.json entry's dynamic_num_parts must be the number of moving objects in the masks."""
    from com4d.inputs import read_mask_sets

    if expected is None or request.frames_dir is None:
        return  # with --prompts the objects come from the prompts, not from an official masks folder
    found = len(read_mask_sets(Path(request.frames_dir) / "masks"))
    if found != expected:
        raise ParameterError(
            f"infer.json entry {entry!r} sets dynamic_num_parts={expected}, but "
            f"{Path(request.frames_dir) / 'masks'} holds {found} moving object(s); "
            "set dynamic_num_parts to the number of objects in masks/"
        )


def cmd_demo(args: argparse.Namespace) -> int:
    from com4d.demo import DEMO_PARAMS, demo_paths
    from com4d.pipeline import ReconstructionRequest

    weights, clip = demo_paths()
    params = params_from_args(args, base=DEMO_PARAMS)
    code = run_reconstruct(args, weights, ReconstructionRequest(frames_dir=clip), params, Path(args.out))
    if code == 0 and not args.quiet:
        print(f"preview: {Path(args.out) / 'preview.png'}  (tiny random weights: blobs, not a real reconstruction)")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="com4d", description="COM4D: turn a video into a compositional 4D scene of meshes.",
        epilog="run 'com4d COMMAND --help' for a command's options and examples",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, device_default: str) -> None:
        p.add_argument("--device", default=device_default, help=f"cpu or cuda (default {device_default})")
        p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="model precision (default float16 on cuda, float32 on cpu)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    rec = sub.add_parser("reconstruct", help="frames + masks (or video + prompts) -> 4D scene",
                         epilog=RECONSTRUCT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("input", help="input folder (frames/ + masks/), or a video file / frames folder")
    rec.add_argument("--weights", required=True, help="folder with TripoSG/ and COM4D/")
    rec.add_argument("--out", required=True, help="output folder (scene.json + GLBs)")
    rec.add_argument("--masks", help="folder with masks/ (when INPUT is a video)")
    rec.add_argument("--prompts", help="prompts.json to segment INPUT with SAM first (needs --sam)")
    rec.add_argument("--sam", help="segment-anything checkpoint (vit_h, vit_l or vit_b)")
    rec.add_argument("--config", metavar="FILE:ENTRY",
                     help="take the settings of an official infer.json entry, e.g. infer.json:teaser2048 "
                          "(flags given here override it)")
    common(rec, "cuda")
    add_reconstruction_options(rec)
    rec.set_defaults(func=cmd_reconstruct)

    demo = sub.add_parser("demo", help="run the whole method on the bundled tiny clip and weights (CPU)",
                          epilog=DEMO_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default="com4d_demo", help="output folder (default com4d_demo/)")
    common(demo, "cpu")
    add_reconstruction_options(demo)
    demo.set_defaults(func=cmd_demo)

    add_segment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "dtype", "x") is None:
        args.dtype = "float16" if str(getattr(args, "device", "cpu")).startswith("cuda") else "float32"
    try:
        return int(args.func(args) or 0)
    except COM4DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
