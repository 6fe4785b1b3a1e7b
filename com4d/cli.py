"""The `com4d` command line: reconstruct, segment, demo.

Exit codes: 0 done; 1 unexpected failure; 2 a problem with the input, weights or parameters
(one line says what); 130 interrupted (finished meshes stay on disk).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from com4d.errors import COM4DError
from com4d.segment.cli import add_segment_parser

RECONSTRUCT_EXAMPLE = """examples:
  com4d reconstruct clip/ --weights ~/weights --out out/          # clip/ has frames/ and masks/
  com4d reconstruct clip.mp4 --masks clip/ --weights ~/weights --out out/
  com4d reconstruct clip.mp4 --prompts prompts.json --sam sam_vit_h.pth --weights ~/weights --out out/
  com4d reconstruct clip/ --weights ~/weights --out out/ --frames 0:81:2 --tokens 1024 --topology tracked

~/weights holds TripoSG/ (hf download VAST-AI/TripoSG) and COM4D/ (hf download INSAIT-Institute/COM4D).
"""

DEMO_EXAMPLE = """example:
  com4d demo --out demo_out/     # tiny bundled weights + synthetic clip, CPU, well under a minute
"""


def _frames(spec: str) -> tuple[int, int | None, int]:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError("frames must be START:END or START:END:STRIDE (END may be empty)")
    try:
        start = int(parts[0] or 0)
        end = int(parts[1]) if parts[1] else None
        stride = int(parts[2]) if len(parts) == 3 and parts[2] else 2
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad frame range {spec!r}") from err
    return start, end, stride


def _depths(spec: str) -> tuple[int, int]:
    try:
        dense, final = (int(x) for x in spec.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError("mesh depth must be DENSE:FINAL, e.g. 8:9") from err
    return dense, final


def add_reconstruction_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reconstruction (defaults: the official teaser settings)")
    g.add_argument("--frames", type=_frames, default=None, metavar="START:END[:STRIDE]",
                   help="frames to reconstruct, as indices into the clip (default 0::2)")
    g.add_argument("--stage-a-frame", type=int, default=None, help="frame index of the scene stage (default START)")
    g.add_argument("--tokens", type=int, default=None, help="latent tokens per object (2048; 1024 is faster)")
    g.add_argument("--scene-steps", type=int, default=None, help="denoising steps of stage A (50)")
    g.add_argument("--dynamic-steps", type=int, default=None, help="denoising steps per stage-B window (50)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance, both stages (7)")
    g.add_argument("--static-parts", type=int, default=None,
                   help="number of static latents (default: the static objects named in the input, else 1)")
    g.add_argument("--block-size", type=int, default=None, help="new frames per stage-B window (6)")
    g.add_argument("--memory-frames", type=int, default=None, help="frames per stage-B window incl. history (8)")
    g.add_argument("--mix-cutoff", type=int, default=None, help="stage-B step after which objects stop mixing (20)")
    g.add_argument("--seed", type=int, default=None, help="noise seed (0)")
    g.add_argument("--topology", choices=["per_frame", "tracked"], default=None,
                   help="per_frame: a mesh per frame (official); tracked: one deforming mesh per object")
    g.add_argument("--mesh-depth", type=_depths, default=None, metavar="DENSE:FINAL",
                   help="octree depths of mesh extraction (8:9 = 256^3 then 512^3)")
    g.add_argument("--no-preview", action="store_true", help="skip preview.png")
    g.add_argument("--allow-lost", action="store_true",
                   help="with --prompts: keep going when segmentation loses an object on some frames")


def params_from_args(args: argparse.Namespace, base: dict | None = None):
    from com4d.pipeline import ReconstructionParams

    values = dict(base or {})
    if args.frames is not None:
        values["frame_start"], values["frame_end"], values["frame_stride"] = args.frames
    mapping = {
        "stage_a_frame": args.stage_a_frame, "num_tokens": args.tokens, "scene_steps": args.scene_steps,
        "dynamic_steps": args.dynamic_steps, "scene_num_parts": args.static_parts,
        "dynamic_ar_block_size": args.block_size, "dynamic_max_memory_frames": args.memory_frames,
        "dynamic_mix_cutoff": args.mix_cutoff, "seed": args.seed, "topology": args.topology,
    }
    values.update({k: v for k, v in mapping.items() if v is not None})
    if args.guidance is not None:
        values["scene_guidance"] = values["dynamic_guidance"] = args.guidance
    if args.mesh_depth is not None:
        values["mesh_dense_depth"], values["mesh_final_depth"] = args.mesh_depth
    if args.no_preview:
        values["preview"] = False
    if getattr(args, "allow_lost", False):
        values["allow_lost"] = True
    return ReconstructionParams.from_dict(values)


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
    params = params_from_args(args)
    return run_reconstruct(args, Path(args.weights), request, params, Path(args.out))


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
