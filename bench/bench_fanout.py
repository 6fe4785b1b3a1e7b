"""Meshing fan-out on Ray (issue 13): one job's meshes on one worker against the same meshes spread
over N workers, on a local Ray runtime with N logical GPUs (CPU devices, tiny weights).

The final latents come from one run of the sampler (the tiny masks clip, every frame). Each worker
is a `backend.cluster_actor.GPUWorkerActor` holding its own loaded pipeline; `mesh` is the job's own
meshing code (field on the grid, then marching cubes). Both runs must give the same bytes.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_fanout.py --workers 2 --final-depth 7 \\
        --out bench/results/cpu2_fanout.json

On a CPU the speed-up is bounded by the free cores (each worker runs on one torch thread), so this
measures the scheduling, not what GPUs would give.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from parity_utils import parity_dir  # noqa: E402


def final_latents(pipeline, frames_dir: Path, params) -> list:
    """The latents a job meshes: stage A's (static and moving objects) and each frame's moving ones."""
    from com4d.pipeline import ReconstructionRequest

    with tempfile.TemporaryDirectory() as out:
        inputs, preselected = pipeline.prepare_inputs(
            ReconstructionRequest(frames_dir=frames_dir), params, Path(out), lambda e: None, None
        )
        latents: list = []
        pipeline.sample(
            inputs,
            params,
            plan=pipeline.plan(inputs, params, preselected),
            on_stage_a=lambda static, dynamic: latents.extend(x.clone() for x in [*static, *dynamic]),
            on_frame=lambda f, frame_latents: latents.extend(x.clone() for x in frame_latents),
        )
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dense-depth", type=int, default=5)
    parser.add_argument("--final-depth", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from backend.cluster import fan_out_meshes
    from backend.cluster_actor import GPUWorkerActor
    from com4d.params import ReconstructionParams
    from com4d.pipeline import COM4DPipeline

    weights = parity_dir() / "weights"
    frames_dir = parity_dir() / "cases" / "pipeline_tiny_inputs"
    pipeline = COM4DPipeline.from_pretrained(weights, device="cpu", dtype="float32")
    params = ReconstructionParams.from_dict(
        {"num_tokens": 16, "scene_steps": 2, "dynamic_steps": 2, "scene_mix_cutoff": 2, "image_size": 56,
         "dynamic_ar_block_size": 2, "dynamic_max_memory_frames": 2}
    )
    latents = final_latents(pipeline, frames_dir, params)
    del pipeline

    load_before = os.getloadavg()
    ray.init(num_cpus=args.workers, num_gpus=args.workers, include_dashboard=False, logging_level="WARNING")
    try:
        actor_class = ray.remote(GPUWorkerActor).options(num_gpus=1, num_cpus=0)
        actors = [actor_class.remote(str(weights), "cpu", "float32", None) for _ in range(args.workers)]
        ray.get([a.ready.remote() for a in actors])
        fan_out_meshes(actors, latents[: args.workers], args.dense_depth, args.final_depth)  # warm-up

        def timed(workers: list) -> tuple[float, list]:
            best, meshes = float("inf"), []
            for _ in range(args.repeats):
                t = time.perf_counter()
                meshes = fan_out_meshes(workers, latents, args.dense_depth, args.final_depth)
                best = min(best, time.perf_counter() - t)
            return best, meshes

        one_s, one = timed(actors[:1])
        all_s, spread = timed(actors)
    finally:
        ray.shutdown()
    identical = [(v.tobytes(), f.tobytes()) for v, f in one] == [(v.tobytes(), f.tobytes()) for v, f in spread]
    result = {
        "what": "meshing one job's final latents on 1 worker vs fanned out over N workers (Ray, logical GPUs)",
        "command": " ".join(["bench/bench_fanout.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "workers": args.workers,
        "meshes": len(latents),
        "grid": f"{2 ** args.final_depth}^3 (dense {2 ** args.dense_depth}^3)",
        "one_worker_s": round(one_s, 3),
        "fanned_out_s": round(all_s, 3),
        "speedup": round(one_s / all_s, 2),
        "identical_meshes": identical,
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
