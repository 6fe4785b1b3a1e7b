"""Attention routing: which latent sets attend to each other in each DiT block.

COM4D's idea in one place. A latent set ("cell") is one object at one frame. Cells form a grid of
M object rows (static rows first, then dynamic rows) by N frame columns. In each block a cell either
attends only to itself (local) or jointly with other cells (global):

* a *spatial* block joins the cells of one column: all objects of one frame (learnt on static
  multi-object scenes);
* a *temporal* block joins the cells of one dynamic row: all frames of one moving object (learnt on
  deforming objects). Static rows stay local there.

Stage B's "cutoff" makes the spatial blocks local too. Training batches use the same idea with
groups given by counts (parts of one scene, or frames of one object), see `segments_from_counts`.

A routing is a list of `Segment`s: runs of consecutive cells cut into equal groups, so that every
group is a view of the cell batch (`attention.grouped_sdpa`), never a gather. For that the grid is
laid out per block: row-major ("rows", cell (r, c) at r * N + c) in temporal blocks, where a
dynamic row is contiguous, and column-major ("cols", cell (r, c) at c * M + r) in spatial blocks,
where a column is contiguous; `relayout` is the one transpose between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


@dataclass(frozen=True)
class Segment:
    """Cells start .. start + groups * size - 1: `groups` groups of `size` consecutive cells."""

    start: int
    groups: int
    size: int

    @property
    def cells(self) -> int:
        return self.groups * self.size


Segments = list[Segment]
ROWS, COLS = "rows", "cols"


def spatial_segments(grid: Grid, cutoff: bool = False) -> Segments | None:
    """In the column-major layout: one group per column (every object of one frame). `cutoff` (or
    a single row) -> None (every cell alone)."""
    if cutoff or grid.rows == 1:
        return None
    return [Segment(0, grid.cols, grid.rows)]


def temporal_segments(grid: Grid) -> Segments | None:
    """In the row-major layout: one group per dynamic row (every frame of one object); static rows
    and 1-column grids local (None = every cell alone)."""
    if grid.cols == 1 or grid.static_rows == grid.rows:
        return None
    dynamic = Segment(grid.static_rows * grid.cols, grid.rows - grid.static_rows, grid.cols)
    return ([Segment(0, grid.static_rows * grid.cols, 1)] if grid.static_rows else []) + [dynamic]


def block_layout(grid: Grid, kind: str, cutoff: bool = False) -> str:
    """The layout a block runs in: column-major only for spatial blocks that join the cells of a
    column of a multi-column grid (otherwise both layouts are the same or nothing is joined)."""
    joint = kind == "spatial" and not cutoff and grid.rows > 1 and grid.cols > 1
    return COLS if joint else ROWS


def relayout(h: torch.Tensor, grid: Grid, src: str, dst: str) -> torch.Tensor:
    """Cells (M*N, ...) from layout `src` to `dst` (one transposing copy; none if they agree)."""
    if src == dst:
        return h
    first, second = (grid.rows, grid.cols) if src == ROWS else (grid.cols, grid.rows)
    return h.view(first, second, *h.shape[1:]).transpose(0, 1).reshape(h.shape)


def as_rows(h: torch.Tensor, grid: Grid, layout: str) -> torch.Tensor:
    """Cells (k*M, ...) of whole columns in `layout` as a row-major-ordered view (M, k, ...), no copy.

    In the row-major layout it is h itself (any number of cells)."""
    if layout == ROWS:
        return h
    return h.view(-1, grid.rows, *h.shape[1:]).transpose(0, 1)


def rows_slice(out: torch.Tensor, grid: Grid, layout: str, start: int, count: int) -> torch.Tensor:
    """The part of a row-major (M*N, ...) tensor that holds cells start .. start+count of `layout`
    (whole columns for the column-major layout), shaped like `as_rows` of those cells."""
    if layout == ROWS:
        return out[start : start + count]
    return out.view(grid.rows, grid.cols, *out.shape[1:])[:, start // grid.rows : (start + count) // grid.rows]


def cell_order(grid: Grid, layout: str) -> list[int]:
    """Row-major cell index of each position in `layout`."""
    M, N = grid.rows, grid.cols
    if layout == ROWS:
        return list(range(M * N))
    return [r * N + c for c in range(N) for r in range(M)]


def segments_from_counts(counts: Sequence[int]) -> Segments | None:
    """Consecutive groups of a packed batch: counts [2, 3] -> cells {0,1} and {2,3,4}."""
    if all(n == 1 for n in counts):
        return None
    segments: Segments = []
    start = 0
    for n in counts:
        if segments and segments[-1].size == n:
            last = segments[-1]
            segments[-1] = Segment(last.start, last.groups + 1, n)
        else:
            segments.append(Segment(start, 1, n))
        start += n
    return segments


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
