"""Time the mesh extractors on synthetic fields (CPU) and check their meshes are identical.

    PYTHONPATH=$PWD python bench/bench_extractors.py [--n 256] [--json OUT]

Fields: a sphere (mostly empty volume, like one object in its box), high-frequency blobs (surface
everywhere) and a lattice field with many exact zeros. Median of 3 runs each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from com4d import meshing


def fields(n: int) -> dict[str, np.ndarray]:
    ax = np.linspace(-1, 1, n, dtype=np.float32)
    X, Y, Z = np.meshgrid(ax, ax, ax, indexing="ij")
    return {
        "sphere": (0.6 - np.sqrt(X**2 + Y**2 + Z**2)).astype(np.float32),
        "blobs": (np.sin(7 * X) * np.cos(5 * Y) * np.sin(3 * Z + 1) - 0.2).astype(np.float32),
        "exact_zeros": (np.round((0.5 - np.abs(X) - np.abs(Y * Z)) * 8) / 8).astype(np.float32),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args()
    results = {}
    for name, volume in fields(args.n).items():
        row, meshes = {}, {}
        for extractor in meshing.EXTRACTORS:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                meshes[extractor] = meshing.get_extractor(extractor)(volume)
                times.append(time.perf_counter() - t)
            row[f"{extractor}_s"] = statistics.median(times)
        a, b = meshes["lewiner"], meshes["lewiner_masked"]
        row["identical"] = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
        row["faces"] = len(a[1])
        results[name] = row
        print(name, row)
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "fields": results}, indent=1))


if __name__ == "__main__":
    main()
