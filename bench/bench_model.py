"""Benchmark: one COM4D denoising step (with CFG) and one dense VAE decode at the real sizes.

    python bench/bench_model.py                  # CUDA, bf16 and fp16, real configs, random weights
    python bench/bench_model.py --tiny           # CPU smoke run with tiny configs

Prints median time, peak memory, achieved TFLOP/s and the analytic FLOP count (the floor), and on
CUDA the relative error of each half-precision path against float32 on the same weights/inputs.
Weights are random (the real configs): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from com4d.attention import fuse_projections
from com4d.dit import CellContext, COM4DTransformer, DiTConfig
from com4d.vae import ShapeVAE, VAEConfig


def dit_step_flops(cfg: DiTConfig, rows: int, cols: int, static_rows: int, tokens: int, ctx_tokens: int,
                   cutoff: bool, ctx_sets: dict[str, int]) -> tuple[float, float]:
    """Analytic (GEMM, attention) FLOPs of one guided step of forward_grid, multiply-add = 2 FLOP.

    Both branches run every linear layer except the cross-attention's: the unconditional branch's
    image tokens are zero, so its cross-attention is the output bias (no q, o, K/V or attention).
    What does not depend on the image tokens runs once for both (`forward_grid_guided`): proj_in,
    the timestep MLP (8 D^2 for the one timestep) and block 0's self-attention.
    Per token and block: self q, k, v, o 4 D^2; cross q, o 2 D^2 (conditional only); feed-forward
    8 D^2 (D -> 4D -> D); the long-skip linear 2 D^2 in the blocks after the middle one. Per block,
    cross K/V of each image set the block reads (`ctx_sets` by block kind): 2 * Lc * Dc * D. Plus
    proj_out (T * C * D per cell) in each branch.
    Attention: 4 * Lq * Lk * D per group; spatial blocks join a column (local after the cutoff or
    with one row), temporal blocks join a dynamic row (static rows and one-column grids are local).
    `rows`, `cols` are the rows that are computed (after the cutoff the pipeline leaves static rows
    out, `static_rows` = 0 then).
    """
    D, Dc, NL, C = cfg.width, cfg.cross_attention_dim, cfg.num_layers, cfg.in_channels
    L, cells = tokens + 1, rows * cols
    spatial_ids = set(cfg.spatial_block_ids)
    kinds = ["spatial" if i in spatial_ids else "temporal" for i in range(NL)]
    skips = NL - NL // 2 - 1
    branch = cells * L * (12 * NL - 4) * D * D + cells * L * 2 * D * D * skips + cells * tokens * C * D
    shared = cells * L * 4 * D * D + cells * tokens * C * D + int(D * cfg.mlp_ratio) * D * 2
    cond = cells * L * 2 * D * D * NL + sum(ctx_sets[k] for k in kinds) * ctx_tokens * 2 * Dc * D
    gemm = 2 * (2 * branch + shared + cond)
    dynamic = rows - static_rows
    attention = 0.0
    for i, kind in enumerate(kinds):
        if kind == "spatial" and not cutoff and rows > 1:
            self_attn = cols * 4 * (rows * L) ** 2 * D
        elif kind == "temporal" and cols > 1 and dynamic > 0:
            self_attn = dynamic * 4 * (cols * L) ** 2 * D + static_rows * cols * 4 * L * L * D
        else:
            self_attn = cells * 4 * L * L * D
        attention += (1 if i == 0 else 2) * self_attn + cells * 4 * L * ctx_tokens * D
    return gemm, attention


def vae_decode_flops(cfg: VAEConfig, points: int, tokens: int) -> float:
    """Per query: proj_query, cross q/k-free (q, o), attention over `tokens` keys, FF, proj_out."""
    D = cfg.width_decoder
    per_point = 2 * (cfg.embed_dim * D + 2 * D * D + 8 * D * D + D) + 4 * tokens * D
    trunk = tokens * 2 * (12 * D * D) * cfg.num_layers_decoder + tokens * 2 * 2 * D * D  # + cross K/V
    return points * per_point + trunk


def timed(fn, device: torch.device, repeat: int) -> tuple[float, int]:
    """Median seconds of `repeat` calls after one warm-up, and peak bytes allocated."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return statistics.median(times), peak


def build_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> COM4DTransformer:
    torch.manual_seed(seed)
    with torch.device(device):
        model = COM4DTransformer(cfg)
    return fuse_projections(model.to(dtype).eval().requires_grad_(False))


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.tiny:
        dcfg = DiTConfig(width=48, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32,
                         part_rows=8, frame_rows=16, static_embedding=True, dynamic_embedding=True,
                         spatial_block_ids=[0, 2, 4], temporal_block_ids=[0, 1, 3, 5])
        vcfg = VAEConfig(latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=32,
                         num_layers_encoder=2, num_layers_decoder=3)
        tokens, ctx, grid_n = 64, 1370, 64
    else:
        dcfg, vcfg = DiTConfig.com4d(), VAEConfig.triposg()
        tokens, ctx, grid_n = args.tokens, 1370, args.grid
    dtypes = ["float32"] if device.type == "cpu" else args.dtypes
    shapes = {  # name: (rows, cols, static_rows, cutoff)
        "stage_a (4 static + 2 dynamic, 1 frame)": (6, 1, 4, False),
        "stage_b window (6 rows x 8 frames, mixing)": (6, 8, 4, False),
        "stage_b window (6 rows x 8 frames, cutoff)": (6, 8, 4, True),
    }
    # Distinct image sets read by the spatial and temporal blocks (per-cell tokens here).
    results = []
    ref_out: dict[str, torch.Tensor] = {}
    order = ["float32", *[d for d in dtypes if d != "float32"]] if device.type == "cuda" else dtypes
    if args.no_ref and device.type == "cuda":
        order = [d for d in order if d != "float32"]
    for dt_name in order:
        dtype = getattr(torch, dt_name)
        model = build_dit(dcfg, device, dtype)
        for name, (M, N, S, cutoff) in shapes.items():
            g = torch.Generator(device="cpu").manual_seed(1)
            x = torch.randn(M, N, tokens, dcfg.in_channels, generator=g).to(device, dtype)
            enc = torch.randn(M, N, ctx, dcfg.cross_attention_dim, generator=g).to(device, dtype)
            zero = CellContext.zeros(M * N, ctx, dcfg.cross_attention_dim, device, dtype)

            def step(x=x, enc=enc, zero=zero, M=M, N=N, S=S, cutoff=cutoff, model=model):
                with torch.no_grad():
                    c, u = model.forward_grid_guided(x, 500.0, enc, enc, zero, S, cutoff)
                    return u + 7.0 * (c - u)

            flops = sum(dit_step_flops(dcfg, M, N, S, tokens, ctx, cutoff, {"spatial": M * N, "temporal": M * N}))
            if dt_name == "float32" and device.type == "cuda" and not args.time_fp32:
                ref_out[name] = step().float()
                continue
            sec, peak = timed(step, device, args.repeat)
            row = {"what": f"DiT step+CFG {name}", "dtype": dt_name, "tokens": tokens, "median_s": sec,
                   "peak_GiB": peak / 2**30, "TFLOP": flops / 1e12, "TFLOP/s": flops / sec / 1e12}
            if name in ref_out:
                out = step().float()
                row["rel_err_vs_fp32"] = ((out - ref_out[name]).norm() / ref_out[name].norm()).item()
            results.append(row)
            print(json.dumps(row))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # VAE dense decode
        torch.manual_seed(0)
        with torch.device(device):
            vae = ShapeVAE(vcfg)
        vae = vae.to(dtype).eval()
        z = torch.randn(1, tokens, vcfg.latent_channels, device=device, dtype=dtype)
        axis = torch.linspace(-1.005, 1.005, grid_n, device=device)
        pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)

        def decode(vae=vae, z=z, pts=pts):
            with torch.no_grad():
                return vae.decode(z, pts)

        flops = vae_decode_flops(vcfg, pts.shape[1], tokens)
        if dt_name == "float32" and device.type == "cuda" and not args.time_fp32:
            ref_out["vae"] = decode().float()
        else:
            sec, peak = timed(decode, device, max(1, args.repeat // 2))
            row = {"what": f"VAE dense decode {grid_n}^3", "dtype": dt_name, "tokens": tokens, "median_s": sec,
                   "peak_GiB": peak / 2**30, "TFLOP": flops / 1e12, "TFLOP/s": flops / sec / 1e12}
            if "vae" in ref_out:
                out = decode().float()
                row["rel_err_vs_fp32"] = ((out - ref_out["vae"]).norm() / ref_out["vae"].norm()).item()
            results.append(row)
            print(json.dumps(row))
        del vae, pts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--grid", type=int, default=256, help="points per axis of the dense decode (256)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--time-fp32", action="store_true", help="also time the float32 reference")
    p.add_argument("--no-ref", action="store_true", help="skip the float32 reference (no error column)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.device == "cpu":
        args.repeat = min(args.repeat, 2)
    results = run(args)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        print("device:", torch.cuda.get_device_name())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
