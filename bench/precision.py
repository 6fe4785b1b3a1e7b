"""Relative error of the half-precision paths against float32, on the CPU with the tiny parity weights.

    PYTHONPATH=$PWD python bench/precision.py [--json OUT]

Runs the stage-B grid forward (the `com4d_matrix` parity case: mixing, guided pair of branches)
and a VAE decode (the `vae_decode` case) in float32, float16 and bfloat16 on the same weights and
inputs, and prints ||half - fp32|| / ||fp32|| per path. Every rounding change of the fast path is
measured with this against the same numbers of the code before it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from com4d.dit import CellContext, COM4DTransformer
from com4d.vae import ShapeVAE

PARITY = Path(os.environ.get("COM4D_PARITY_DIR", Path(__file__).resolve().parents[2] / "shared/fixtures/parity"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dit_outputs(dtype: torch.dtype) -> torch.Tensor:
    side = json.loads((PARITY / "cases/com4d_matrix.json").read_text())
    t = load_file(str(PARITY / "cases/com4d_matrix.safetensors"))
    model = COM4DTransformer.from_pretrained(PARITY / "weights/COM4D/transformer", dtype=dtype)
    S = side["params"]["static_count"]
    x = t["hidden_states_matrix"].to(dtype)
    temporal = t["encoder_hidden_states_matrix_temporal"].to(dtype)
    spatial = t["encoder_hidden_states_matrix_spatial_mix"].to(dtype)
    M, N = x.shape[:2]
    zero = CellContext.zeros(M * N, *temporal.shape[-2:], "cpu", dtype)
    with torch.no_grad():
        cond = model.forward_grid(x, t["timestep"], temporal, spatial, S)
        uncond = model.forward_grid(x, t["timestep"], zero, zero, S)
    return (uncond + 7.0 * (cond - uncond)).float()


def vae_outputs(dtype: torch.dtype) -> torch.Tensor:
    t = load_file(str(PARITY / "cases/vae_decode.safetensors"))
    vae = ShapeVAE.from_pretrained(PARITY / "weights/TripoSG", dtype=dtype)
    latents = next(v for k, v in t.items() if "latent" in k)
    points = next(v for k, v in t.items() if "point" in k or "quer" in k)
    with torch.no_grad():
        return vae.decode(latents.reshape(1, *latents.shape[-2:]), points.reshape(1, -1, 3)).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    results = {}
    for name, fn in (("dit_stage_b_mixing_guided", dit_outputs), ("vae_decode", vae_outputs)):
        ref = fn(torch.float32)
        results[name] = {dt: rel(fn(getattr(torch, dt)), ref) for dt in ("float16", "bfloat16")}
        print(name, results[name])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
