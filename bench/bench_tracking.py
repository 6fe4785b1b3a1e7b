"""Tracking cost per frame against the cost of meshing that frame (issue 7).

A capsule bends from straight to a quarter circle over the clip. Every frame is meshed by the
pipeline's own extraction (`com4d.meshing.extract_mesh`: dense grid, one refinement, marching cubes)
and then tracked (`com4d.topology.SequenceTracker`), both calling the same field function. With
`--decoder` (CUDA) every field call also runs the real-size TripoSG VAE decoder (random weights, fp16,
2048 latent tokens) on the same points and discards its output, so the timings carry the decoder's true
cost per point while the geometry stays the analytic capsule whose answer is known.

    .venv/bin/python bench/bench_tracking.py                       # CPU, 128^3 and 256^3
    .venv/bin/python bench/bench_tracking.py --device cuda --depths 8 9 --decoder

Columns: grid = final extraction resolution; V = tracked vertices; mesh = seconds and field points of
meshing one frame; track = seconds of tracking one frame (prealign + field iterations + check), of
which field = seconds inside the field function, and its field points; iters = field calls per frame.
Means over frames 1.. (frame 0 relaxes the base once and is listed on its own line).
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from com4d.meshing import extract_mesh
from com4d.topology import SequenceTracker, TrackingConfig

BOUNDS = (-1.005, -1.005, -1.005, 1.005, 1.005, 1.005)


def bent_capsule(bend: float, sharpness: float, radius: float = 0.16, length: float = 1.2,
                 segments: int = 24):
    """Positive inside: sharpness · (radius − distance to a centreline bent by `bend` radians)."""
    s = np.linspace(0.0, length, segments + 1)
    if abs(bend) < 1e-9:
        line = np.stack([s - length / 2, 0 * s, 0 * s], axis=1)
    else:
        r = length / bend
        line = np.stack([r * np.sin(s / r) - length / 2, r * (1 - np.cos(s / r)), 0 * s], axis=1)

    def field(p: torch.Tensor) -> torch.Tensor:
        a = torch.tensor(line[:-1], dtype=torch.float32, device=p.device)  # (S, 3)
        ab = torch.tensor(line[1:] - line[:-1], dtype=torch.float32, device=p.device)
        out = torch.empty(len(p), dtype=torch.float32, device=p.device)
        for i in range(0, len(p), 1 << 19):  # bound the (P, S, 3) temporaries
            ap = p[i : i + (1 << 19), None, :].float() - a  # (P, S, 3)
            t = ((ap * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)
            distance = (ap - t[..., None] * ab).norm(dim=-1).min(dim=1).values
            out[i : i + (1 << 19)] = sharpness * (radius - distance)
        return out

    return field


class TimedField:
    """Counts points and seconds spent in a field function (synchronising CUDA around each call)."""

    def __init__(self, field_fn, decoder_fn=None):
        self.field_fn = field_fn
        self.decoder_fn = decoder_fn
        self.points = 0
        self.seconds = 0.0

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        _sync(points.device)
        start = time.perf_counter()
        out = self.field_fn(points)
        if self.decoder_fn is not None:
            self.decoder_fn(points)  # the real decoder's cost; its values are not used
        _sync(points.device)
        self.seconds += time.perf_counter() - start
        self.points += len(points)
        return out

    def reset(self) -> None:
        self.points, self.seconds = 0, 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_decoder(device: str, tokens: int):
    from com4d.vae import ShapeVAE, VAEConfig

    torch.manual_seed(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32  # fp16 as the pipeline on GPU
    vae = ShapeVAE(VAEConfig.triposg()).to(device=device, dtype=dtype).eval()
    latents = torch.randn(1, tokens, vae.cfg.latent_channels, device=device, dtype=dtype)
    return vae.field_fn(latents)


def run(depth: int, frames: int, device: str, sharpness: float, decoder_fn,
        config: TrackingConfig) -> list[dict]:
    bends = [i * (math.pi / 2) / max(frames - 1, 1) for i in range(frames)]
    tracker = None
    rows = []
    for index, bend in enumerate(bends):
        field = TimedField(bent_capsule(bend, sharpness), decoder_fn)
        _sync(torch.device(device))
        start = time.perf_counter()
        meshed = extract_mesh(field, BOUNDS, dense_depth=depth - 1, final_depth=depth, device=device)
        mesh_seconds = time.perf_counter() - start
        mesh_points = field.points
        vertices, faces = np.asarray(meshed.mesh.vertices), np.asarray(meshed.mesh.faces)
        if tracker is None:
            tracker = SequenceTracker(vertices, faces, config, device=device)
        field.reset()
        start = time.perf_counter()
        result = tracker.add_frame(field, vertices, faces, frame=index)
        track_seconds = time.perf_counter() - start
        rows.append({
            "frame": index, "grid": 2**depth, "V": len(tracker.results[0].vertices),
            "mesh_s": mesh_seconds, "mesh_points": mesh_points, "track_s": track_seconds,
            "field_s": field.seconds, "prealign_s": result.prealign_seconds, "check_s": result.check_seconds,
            "track_points": field.points, "iterations": result.stats.iterations,
            "accepted": result.accepted, "chamfer_excess": result.chamfer - result.chamfer_floor,
        })
    return rows


def print_header() -> None:
    header = (f"{'grid':>5} {'frames':>7} {'V':>8} | {'mesh s':>8} {'mesh Mpts':>9} | {'track s':>8} "
              f"{'field s':>8} {'prealign':>8} {'check':>7} {'track Mpts':>10} {'iters':>5} | "
              f"{'track/mesh':>10} {'CD-floor':>8}")
    print(header)
    print("-" * len(header), flush=True)


def print_rows(rows: list[dict]) -> None:
    """Frame 0 (relaxes the base) on its own line, then the mean over the other frames."""
    for label, subset in (("0 (base)", rows[:1]), (f"1-{len(rows) - 1}", rows[1:])):
        if not subset:
            continue
        mean = {k: float(np.mean([r[k] for r in subset])) for k in subset[0] if k != "accepted"}
        print(f"{subset[0]['grid']:>5} {label:>7} {subset[0]['V']:>8} | {mean['mesh_s']:>8.3f} "
              f"{mean['mesh_points'] / 1e6:>9.2f} | {mean['track_s']:>8.3f} {mean['field_s']:>8.3f} "
              f"{mean['prealign_s']:>8.3f} {mean['check_s']:>7.3f} {mean['track_points'] / 1e6:>10.2f} "
              f"{mean['iterations']:>5.1f} | {mean['track_s'] / mean['mesh_s']:>10.3f} "
              f"{max(r['chamfer_excess'] for r in subset):>8.4f}", flush=True)
    if not all(r["accepted"] for r in rows):
        print(f"  (fallback on frames {[r['frame'] for r in rows if not r['accepted']]})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: bench_tracking.py --device cuda --depths 8 9 --decoder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--depths", type=int, nargs="+", default=[7, 8],
                        help="final extraction depths: 7 = 128^3, 8 = 256^3, 9 = 512^3 (the official)")
    parser.add_argument("--frames", type=int, default=5, help="frames of the bending clip (default 5)")
    parser.add_argument("--sharpness", type=float, default=20.0, help="field slope at the surface")
    parser.add_argument("--decoder", action="store_true", help="add the real-size VAE decoder's cost (CUDA)")
    parser.add_argument("--tokens", type=int, default=2048, help="decoder latent tokens (default 2048)")
    parser.add_argument("--gradient", default="finite_difference",
                        help="tracking gradient: finite_difference (as with the VAE, which runs without "
                             "autograd) or autograd")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    decoder_fn = make_decoder(args.device, args.tokens) if args.decoder else None
    config = TrackingConfig(gradient=args.gradient)
    decoder_label = f"TripoSG size, {args.tokens} tokens" if args.decoder else "none"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"decoder {decoder_label}, "
          f"gradient {args.gradient}, frames {args.frames}")
    print_header()
    for depth in args.depths:
        print_rows(run(depth, args.frames, args.device, args.sharpness, decoder_fn, config))


if __name__ == "__main__":
    main()
