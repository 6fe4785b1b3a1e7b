"""Whole-job benchmark at the teaser's shape: 4 static + 2 dynamic objects, 41 frames, 2048 tokens.

    python bench/bench_job.py                        # CUDA fp16, random real-size weights
    python bench/bench_job.py --steps 5 --frames 13  # a shorter run; totals are extrapolated
    python bench/bench_job.py --tiny                 # CPU smoke run

Runs the real pipeline (conditioning, stage A, stage B, meshing, export) and reports time per
stage, per DiT step, per mesh (decode vs marching cubes), peak GPU memory, and the ratio of the
measured DiT time to its FLOP floor at the card's dense peak. With fewer steps/frames than the
teaser, the full job's time is extrapolated from the per-step and per-mesh costs.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch
from bench_model import dit_step_flops  # noqa: E402  (same folder)
from transformers import Dinov2Config, Dinov2Model

from com4d.conditioning import ImageEncoder
from com4d.dit import COM4DTransformer, DiTConfig
from com4d.inputs import DynamicObject, SceneInputs
from com4d.pipeline import COM4DPipeline, ReconstructionParams
from com4d.plan import plan_windows
from com4d.scheduler import RectifiedFlowScheduler
from com4d.vae import ShapeVAE, VAEConfig

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}  # dense bf16/fp16 spec peaks (SXM)


def synthetic_inputs(frames: int, size: int, dynamic: int, static: int) -> SceneInputs:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(frames)]
    yy, xx = np.mgrid[0:size, 0:size]
    objs = []
    for k in range(dynamic):
        masks = [((xx - size * (0.3 + 0.4 * f / frames)) ** 2 + (yy - size * (0.3 + 0.3 * k)) ** 2 < (size / 8) ** 2)
                 for f in range(frames)]
        objs.append(DynamicObject(name=f"dyn{k}", object_id=k, masks=masks))
    return SceneInputs(frames=imgs, frame_numbers=list(range(frames)), dynamic=objs,
                       static_names=[f"static{i}" for i in range(static)])


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype) -> COM4DPipeline:
    torch.manual_seed(0)
    if tiny:
        dcfg = DiTConfig(width=48, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32, part_rows=8,
                         frame_rows=16, static_embedding=True, dynamic_embedding=True,
                         spatial_block_ids=[0, 2, 4], temporal_block_ids=[0, 1, 3, 5])
        vcfg = VAEConfig(latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=32,
                         num_layers_encoder=2, num_layers_decoder=3)
        dino = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                            image_size=518, patch_size=14)
    else:
        dcfg, vcfg = DiTConfig.com4d(), VAEConfig.triposg()
        dino = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, image_size=518, patch_size=14)
    with torch.device(device):
        dit = COM4DTransformer(dcfg)
        vae = ShapeVAE(vcfg)
        # Random weights make a field with no structure; damp the output so a surface exists.
        torch.nn.init.normal_(vae.decoder.proj_out.weight, std=0.02)
    encoder = ImageEncoder(Dinov2Model(dino).to(device))
    return COM4DPipeline(dit.to(dtype).eval(), vae.to(dtype).eval(), ImageEncoder(encoder.model.to(dtype)),
                         RectifiedFlowScheduler())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per stage/window (50)")
    p.add_argument("--frames", type=int, default=41, help="selected frames (41 = teaser 0..80 stride 2)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--mesh-depth", default="8:9")
    p.add_argument("--meshes", type=int, default=None,
                   help="extract only the first N meshes (the rest are skipped and extrapolated)")
    p.add_argument("--mesh-workers", type=int, default=None, help="marching-cubes processes (default: auto)")
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.dtype)
    tokens = 32 if args.tiny else args.tokens
    dense, final = (int(x) for x in args.mesh_depth.split(":"))
    if args.tiny:
        dense, final = 5, 6
    pipe = build_pipeline(args.tiny, device, dtype)
    S, K = 4, 2
    inputs = synthetic_inputs(args.frames, 256, K, S)
    params = ReconstructionParams(num_tokens=tokens, scene_steps=args.steps, dynamic_steps=args.steps,
                                  frame_stride=1, dynamic_mix_cutoff=min(20, args.steps * 2 // 5),
                                  mesh_dense_depth=dense, mesh_final_depth=final, preview=False,
                                  combined_frames=False, memory_budget=1 << 50, mesh_workers=args.mesh_workers)
    if args.meshes is not None:
        from com4d.mesher import Mesher

        real_submit, count = Mesher.submit, [0]

        def limited(self, field_fn, payload):
            count[0] += 1
            if count[0] <= args.meshes:
                return real_submit(self, field_fn, payload)
            self.finish(payload, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))

        Mesher.submit = limited
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks: dict[str, list[float]] = defaultdict(list)
    last = [time.perf_counter()]

    def on_event(e) -> None:
        if e.kind != "progress" or e.stage not in ("stage_a", "stage_b", "meshing"):
            return
        sync()
        now = time.perf_counter()
        key = e.stage if e.stage != "stage_b" else ("stage_b_mix" if e.step - 1 <= params.dynamic_mix_cutoff
                                                    else "stage_b_cutoff")
        marks[key].append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = pipe.reconstruct(inputs, params, out, on_event=on_event)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0

    # One extra extraction split into decode and marching cubes.
    from com4d import meshing
    z = torch.randn(tokens, pipe.transformer.cfg.in_channels, device=device, dtype=dtype)
    fn = pipe.vae.field_fn(z)
    sync()
    t = time.perf_counter()
    grid, counts = meshing.hierarchical_field(fn, dense_depth=dense, final_depth=final, device=device)
    sync()
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    meshing.marching_cubes(grid.float().cpu().numpy(), meshing.DEFAULT_BOUNDS, final)
    mc_s = time.perf_counter() - t
    del grid

    windows = plan_windows(args.frames, params.dynamic_ar_block_size, params.dynamic_max_memory_frames)
    if args.meshes is not None:
        marks["meshing"] = marks["meshing"][: args.meshes]
    med = {k: float(np.median(v)) for k, v in marks.items() if v}
    cfg = pipe.transformer.cfg
    flops_a = dit_step_flops(cfg, S + K, 1, tokens, 1370, False, S + K)
    flops_mix = dit_step_flops(cfg, S + K, 8, tokens, 1370, False, 48)
    flops_cut = dit_step_flops(cfg, S + K, 8, tokens, 1370, True, 48)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), math.nan)
    full_steps, full_windows = 50, len(plan_windows(41, 6, 8))
    n_mix = min(21, full_steps)
    extrapolated = (
        full_steps * med.get("stage_a", 0)
        + full_windows * (n_mix * med.get("stage_b_mix", 0) + (full_steps - n_mix) * med.get("stage_b_cutoff", 0))
        + (S + K * 41) * med.get("meshing", 0)
    )
    report = {
        "device": name, "dtype": str(dtype), "tokens": tokens, "steps": args.steps, "frames": args.frames,
        "windows": len(windows), "total_s": total, "timings": result.timings, "peak_GiB": peak,
        "median_step_s": med, "mesh_decode_s": decode_s, "mesh_marching_cubes_s": mc_s,
        "mesh_queries": counts,
        "flop_floor_s": {k: f / (peak_tflops * 1e12) for k, f in
                         (("stage_a", flops_a), ("stage_b_mix", flops_mix), ("stage_b_cutoff", flops_cut))},
        "teaser_extrapolated_s": extrapolated,
    }
    report["ratio_to_floor"] = {k: med[k] / v for k, v in report["flop_floor_s"].items() if k in med and v}
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
