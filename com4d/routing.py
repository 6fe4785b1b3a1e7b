"""Attention routing: which latent sets attend to each other in each DiT block.

COM4D's idea in one place. A latent set ("cell") is one object at one frame. Cells form a grid of
M object rows (static rows first, then dynamic rows) by N frame columns. In each block a cell either
attends only to itself (local) or jointly with other cells (global):

* a *spatial* block joins the cells of one column: all objects of one frame (learnt on static
  multi-object scenes);
* a *temporal* block joins the cells of one dynamic row: all frames of one moving object (learnt on
  deforming objects). Static rows stay local there.

Stage B's "cutoff" makes the spatial blocks local too. Training batches use the same idea with
groups given by counts (parts of one scene, or frames of one object), see `groups_from_counts`.

A routing is a list of index tensors (G, n): G groups of n cells each, grouped by size so that
each size runs as one batched attention call (`attention.grouped_sdpa`). Cell (r, c) has flat index
r * N + c, matching a (M, N, ...) tensor flattened to (M * N, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Groups = list[torch.Tensor]


@dataclass(frozen=True)
class Grid:
    """An objects-by-frames matrix of latent sets: `rows` objects (first `static_rows` static)."""

    rows: int
    cols: int
    static_rows: int

    def __post_init__(self) -> None:
        if not (0 <= self.static_rows <= self.rows) or self.cols < 1 or self.rows < 1:
            raise ValueError(f"invalid grid {self}")

    @property
    def cells(self) -> int:
        return self.rows * self.cols


def _bucket(groups: list[list[int]], device: torch.device | None) -> Groups:
    """Group lists of cell indices by length into (G, n) tensors."""
    by_size: dict[int, list[list[int]]] = {}
    for g in groups:
        by_size.setdefault(len(g), []).append(g)
    return [torch.tensor(v, dtype=torch.long, device=device) for _, v in sorted(by_size.items())]


def spatial_groups(grid: Grid, cutoff: bool = False, device: torch.device | None = None) -> Groups | None:
    """One group per column: every object of one frame. `cutoff` (or a single row) -> local."""
    if cutoff or grid.rows == 1:
        return None
    return _bucket([[r * grid.cols + c for r in range(grid.rows)] for c in range(grid.cols)], device)


def temporal_groups(grid: Grid, device: torch.device | None = None) -> Groups | None:
    """One group per dynamic row (every frame of one object); static rows and 1-column grids local."""
    if grid.cols == 1 or grid.static_rows == grid.rows:
        return None
    groups = []
    for r in range(grid.rows):
        row = [r * grid.cols + c for c in range(grid.cols)]
        groups.extend([row] if r >= grid.static_rows else [[i] for i in row])
    return _bucket(groups, device)


def groups_from_counts(counts: Sequence[int], device: torch.device | None = None) -> Groups | None:
    """Consecutive groups of a packed batch: counts [2, 3] -> cells {0,1} and {2,3,4}."""
    if all(n == 1 for n in counts):
        return None
    groups, start = [], 0
    for n in counts:
        groups.append(list(range(start, start + n)))
        start += n
    return _bucket(groups, device)


def block_kinds(num_layers: int, spatial_block_ids: Sequence[int]) -> list[str]:
    """'spatial' or 'temporal' per block for the grid forward (spatial ids take precedence)."""
    spatial = set(spatial_block_ids)
    return ["spatial" if i in spatial else "temporal" for i in range(num_layers)]


def check_skip_pairing(num_layers: int, spatial_block_ids: Sequence[int]) -> None:
    """Refuse layouts where one long-skip stack differs from the official per-kind stacks.

    The official grid forward keeps one skip stack per column for spatial blocks and one per row for
    temporal blocks; the DiT here keeps a single stack. Block mid - j pushes what block mid + j
    pops (mid = num_layers // 2), so the two agree exactly when each such pair has the same kind, as
    in every released layout (spatial and temporal blocks alternating).
    """
    kinds = block_kinds(num_layers, spatial_block_ids)
    mid = num_layers // 2
    for j in range(1, mid + 1):
        if mid + j < num_layers and kinds[mid - j] != kinds[mid + j]:
            raise ValueError(
                f"block {mid - j} is {kinds[mid - j]} but block {mid + j}, which reads its long skip, is "
                f"{kinds[mid + j]}; only layouts whose skip pairs have the same kind (e.g. alternating "
                "spatial/temporal blocks, as released) are supported"
            )
