"""Every GPU measurement of issue 11 in one run, raw JSON into a folder.

    python bench/gpu_session.py --out bench/results/gpu_session            # CUDA, real sizes, fp16
    python bench/gpu_session.py --device cpu --tiny --out /tmp/gs          # CPU smoke run (tiny configs)

Writes `<out>/gpu_session.json` with:

* `versions`: torch, CUDA, cuDNN, device name, and the attention backends that run here;
* `ceilings`: the GEMM rate (fp16 n x n x n) and the copy bandwidth (device to device), measured;
* `steps`: each step shape (stage A, stage B mixing, stage B after the cutoff with dynamic rows
  only, the dense VAE decode) timed with CUDA events (perf_counter on the CPU), median of
  `--repeat`, with peak memory, and one profiler pass grouping device time by kernel kind;
* `attention`: every attention shape of those steps (recorded through `com4d.attention`) timed
  under each available backend, and the kernel PyTorch's automatic choice runs;
* `compiled`: eager vs `torch.compile` (`COM4DTransformer.compile_blocks`) on the post-cutoff
  step: compile time, step time and the relative difference to eager;
* `mesh`: one mesh split into dense decode, band refinement, host copy, marching cubes and GLB
  export;
* `job`: the teaser job extrapolated from those parts (50 stage-A steps; 7 windows of 21 mixing
  and 29 post-cutoff steps; 86 meshes whose GPU half stalls sampling, the CPU half not), with the
  peak memory seen.

Weights are random (the real configs; `--weights` loads the released ones instead): speed does not
depend on their values, but the mesh refinement band does, so its point count is only
representative with real weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from com4d import attention, meshing
from com4d.dit import CellContext, COM4DTransformer, DiTConfig
from com4d.vae import ShapeVAE, VAEConfig

S, K, FRAMES = 4, 2, 8  # the teaser's 4 static + 2 dynamic objects, 8-column windows
TEASER = {"stage_a_steps": 50, "windows": 7, "mixing_steps": 21, "cutoff_steps": 29, "meshes": 86}


class Clock:
    """Seconds of a callable: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, repeat: int) -> dict:
        fn()  # warm-up
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        return {"median_s": statistics.median(times), "runs": len(times), "peak_gib": peak}


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_attn")):
        return "attention"
    gemm_names = ("gemm", "matmul", "cutlass", "sm80_xmma", "sm90_xmma", "nvjet", "addmm", "aten::mm", "bmm")
    if any(k in n for k in gemm_names):
        return "gemm"
    if "norm" in n:
        return "norm"
    if any(k in n for k in ("copy", "cat", "memcpy", "memset", "index", "gather", "scatter")):
        return "copy"
    return "elementwise"


def profile_kinds(fn, device: torch.device) -> dict:
    """Device (or CPU) time in ms per kernel kind over one call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kinds: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = evt.device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if t and (device.type == "cuda" or evt.key.startswith("aten::")):
            kinds[kernel_kind(evt.key)] += t / 1e3
    return dict(kinds)


def configs(tiny: bool) -> tuple[DiTConfig, VAEConfig, dict]:
    if tiny:
        dit = DiTConfig(width=64, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32,
                        part_rows=8, frame_rows=16, static_embedding=True, dynamic_embedding=True,
                        spatial_block_ids=[0, 2, 4], temporal_block_ids=[0, 1, 3, 5])
        vae = VAEConfig(latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=32,
                        num_layers_encoder=2, num_layers_decoder=3)
        return dit, vae, {"tokens": 16, "ctx_tokens": 10, "dense_depth": 4, "final_depth": 5}
    return DiTConfig.com4d(), VAEConfig.triposg(), {"tokens": 2048, "ctx_tokens": 1370, "dense_depth": 8,
                                                    "final_depth": 9}


def build(args, device: torch.device, dtype: torch.dtype):
    dcfg, vcfg, sizes = configs(args.tiny)
    if args.weights:
        from com4d.weights import resolve_weights_root

        com4d_root, triposg_root = resolve_weights_root(Path(args.weights))
        model = COM4DTransformer.from_pretrained(com4d_root / "transformer", device, dtype)
        vae = ShapeVAE.from_pretrained(triposg_root, device, dtype)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = attention.fuse_projections(COM4DTransformer(dcfg).to(dtype).eval().requires_grad_(False))
            vae = attention.fuse_projections(ShapeVAE(vcfg).to(dtype).eval().requires_grad_(False))
    return model, vae, sizes


def step_fns(model: COM4DTransformer, vae: ShapeVAE, sizes: dict, device, dtype) -> dict:
    cfg = model.cfg
    T, Lc, Dc = sizes["tokens"], sizes["ctx_tokens"], cfg.cross_attention_dim
    g = torch.Generator(device="cpu").manual_seed(1)

    def grid_step(M: int, N: int, cutoff: bool, row_offset: int = 0):
        feats = torch.randn(N + K * N, Lc, Dc, generator=g).to(device, dtype)
        own = [c if r < S else N + (r - S) * N + c for r in range(M) for c in range(N)]
        frame = [c for _ in range(M) for c in range(N)]
        cells = torch.arange(row_offset * N, M * N)
        ctx_t = CellContext(feats, torch.tensor(own)).subset(cells)
        ctx_s = ctx_t if cutoff else CellContext(feats, torch.tensor(frame)).subset(cells)
        zero = CellContext.zeros(len(cells), Lc, Dc, device, dtype)
        x = torch.randn(M - row_offset, N, T, cfg.in_channels, generator=g).to(device, dtype)
        extra = {"row_offset": row_offset, "total_rows": M} if row_offset else {}

        def step():
            with torch.no_grad():
                c, u = model.forward_grid_guided(x, 500.0, ctx_t, ctx_s, zero, S, cutoff, **extra)
                return u + 7.0 * (c - u)

        return step

    latents = torch.randn(1, T, vae.cfg.latent_channels, generator=g).to(device, dtype)
    n = 2 ** sizes["dense_depth"]

    def dense():
        with torch.no_grad():
            return meshing.dense_field(vae.field_fn(latents), n, device=device)

    return {
        "stage_a": grid_step(S + K, 1, False),
        "stage_b_mixing": grid_step(S + K, FRAMES, False),
        "stage_b_cutoff": grid_step(S + K, FRAMES, True, row_offset=S),
        f"vae_dense_{n}": dense,
    }


def ceilings(device: torch.device, dtype: torch.dtype, clock: Clock, tiny: bool) -> dict:
    n = 512 if tiny else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gemm = clock.time(lambda: a @ b, 3 if tiny else 10)
    big = torch.empty(2**22 if tiny else 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)
    copy = clock.time(lambda: dst.copy_(big), 3 if tiny else 10)
    return {"gemm_tflops": 2 * n**3 / gemm["median_s"] / 1e12, "gemm_n": n, "gemm_dtype": str(dtype),
            "copy_gb_s": 2 * big.numel() / copy["median_s"] / 1e9}


def attention_table(fns: dict, device, dtype, clock: Clock, repeat: int) -> list[dict]:
    shapes = {}
    with attention.record_kernels() as calls:
        for fn in fns.values():
            fn()
    for c in calls:
        shapes.setdefault((c["q"], c["k"]), c["kernel"])
    rows = []
    backends = attention.available_backends(device, dtype)
    for (qs, ks), auto_kernel in shapes.items():
        q = torch.randn(qs, device=device, dtype=dtype)
        k = torch.randn(ks, device=device, dtype=dtype)
        row = {"q": qs, "k": ks, "auto_kernel": auto_kernel}
        for name in backends:
            try:
                run = lambda q=q, k=k, name=name: attention.sdpa(q, k, k, backend=name)  # noqa: E731
                row[name] = clock.time(run, repeat)["median_s"]
            except attention.BackendUnavailable:
                row[name] = None
        rows.append(row)
    return rows


def compiled_vs_eager(model: COM4DTransformer, fn, clock: Clock, repeat: int) -> dict:
    """Eager, then `model.compile_blocks()` (stays compiled afterwards)."""
    eager_out = fn()
    eager = clock.time(fn, repeat)
    t = time.perf_counter()
    model.compile_blocks()
    out = fn()  # compiles
    clock.sync()
    compile_s = time.perf_counter() - t
    compiled = clock.time(fn, repeat)
    diff = ((out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
    return {"eager_s": eager["median_s"], "compiled_s": compiled["median_s"], "compile_s": compile_s,
            "rel_diff_vs_eager": diff}


def mesh_split(vae: ShapeVAE, sizes: dict, device, dtype, clock: Clock) -> dict:
    g = torch.Generator(device="cpu").manual_seed(2)
    latents = torch.randn(1, sizes["tokens"], vae.cfg.latent_channels, generator=g).to(device, dtype)
    field = vae.field_fn(latents)
    half = meshing.check_bounds(meshing.DEFAULT_BOUNDS)
    out = {}
    with torch.no_grad():
        t = time.perf_counter()
        grid = meshing.dense_field(field, 2 ** sizes["dense_depth"], device=device)
        clock.sync()
        out["dense_decode_s"] = time.perf_counter() - t
        queried = 0
        t = time.perf_counter()
        for _ in range(sizes["final_depth"] - sizes["dense_depth"]):
            grid, n = meshing.refine_level(field, grid, half, torch.float16, meshing.DEFAULT_CHUNK)
            queried += n
        clock.sync()
        out["refine_s"], out["refine_points"] = time.perf_counter() - t, queried
        t = time.perf_counter()
        volume = meshing.HostGrid(grid).numpy()
        out["host_copy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = meshing.marching_cubes(volume, meshing.DEFAULT_BOUNDS, sizes["final_depth"])
    out["marching_cubes_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if result is not None:
        import trimesh

        trimesh.Trimesh(vertices=result[0], faces=result[1]).export(file_type="glb")
    out["export_s"] = time.perf_counter() - t
    out["faces"] = 0 if result is None else len(result[1])
    out["gpu_stall_s"] = out["dense_decode_s"] + out["refine_s"] + out["host_copy_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_session.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="float16 (GPU default) or float32 (CPU default)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke run)")
    p.add_argument("--weights", help="released weights folder instead of random weights")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    torch.backends.cuda.matmul.allow_tf32 = False
    clock = Clock(device)
    report: dict = {"args": vars(args), "versions": {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention_backends": attention.available_backends(device, dtype)}}
    report["ceilings"] = ceilings(device, dtype, clock, args.tiny)
    model, vae, sizes = build(args, device, dtype)
    fns = step_fns(model, vae, sizes, device, dtype)
    report["steps"] = {}
    for name, fn in fns.items():
        row = clock.time(fn, args.repeat)
        row["by_kind_ms"] = profile_kinds(fn, device)
        report["steps"][name] = row
        print(name, json.dumps(row))
    report["attention"] = attention_table(fns, device, dtype, clock, args.repeat)
    if not args.no_compile:
        report["compiled"] = compiled_vs_eager(model, fns["stage_b_cutoff"], clock, args.repeat)
        print("compiled", json.dumps(report["compiled"]))
    report["mesh"] = mesh_split(vae, sizes, device, dtype, clock)
    steps = report["steps"]
    sampling = (TEASER["stage_a_steps"] * steps["stage_a"]["median_s"]
                + TEASER["windows"] * (TEASER["mixing_steps"] * steps["stage_b_mixing"]["median_s"]
                                       + TEASER["cutoff_steps"] * steps["stage_b_cutoff"]["median_s"]))
    stall = TEASER["meshes"] * report["mesh"]["gpu_stall_s"]
    peaks = [r["peak_gib"] for r in steps.values() if r["peak_gib"] is not None]
    report["job"] = {**TEASER, "sampling_s": sampling, "mesh_stall_s": stall, "total_s": sampling + stall,
                     "stall_per_mesh_s": report["mesh"]["gpu_stall_s"], "peak_gib": max(peaks) if peaks else None}
    print("job", json.dumps(report["job"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_session.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
