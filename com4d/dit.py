"""The COM4D diffusion transformer: TripoSG's vecset DiT plus COM4D's embedding tables and routing.

One latent set of T tokens x C channels per object per frame ("cell"). The timestep is a token
prepended to every set; 21 pre-norm blocks (self-attention with RMS q/k norm, cross-attention to
DINOv2 tokens, exact-GELU feed-forward) with U-Net long skips; no AdaLN, no positional embedding.
COM4D adds part / frame / static / dynamic embedding tables and runs the blocks over an
objects-by-frames grid with attention routed by `com4d.routing`.

Two forwards:
* `forward_grid` — inference (the official `forward_matrix`): one timestep for every cell.
* `forward` — a packed batch, one timestep per latent, optional groups by counts (training and
  diffusion forcing; with no groups it is the plain TripoSG DiT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from com4d import routing
from com4d.attention import Attention, FeedForward, FP32AccLayerNorm, fuse_projections, project_parts, sdpa
from com4d.errors import WeightsError
from com4d.weights import (
    DIFFUSERS_WEIGHTS,
    heads_first_to_standard,
    load_state_strict,
    load_tensors,
    read_json,
    tensor_shapes,
)

# Tokens per feed-forward slice (see DiTBlock.forward): 32k tokens x 8192 x 2 B = 512 MiB in fp16.
FF_CHUNK_TOKENS = 32768


@dataclass
class DiTConfig:
    width: int = 2048
    num_layers: int = 21
    num_heads: int = 16
    in_channels: int = 64
    cross_attention_dim: int = 1024
    mlp_ratio: float = 4.0
    # COM4D tables (0 rows / False = absent, i.e. a plain TripoSG DiT)
    part_rows: int = 0
    frame_rows: int = 0
    static_embedding: bool = False
    dynamic_embedding: bool = False
    spatial_block_ids: list[int] = field(default_factory=lambda: list(range(0, 21, 2)))
    temporal_block_ids: list[int] = field(default_factory=lambda: [0, *range(1, 22, 2)])

    @classmethod
    def triposg(cls) -> DiTConfig:
        """The released TripoSG DiT (1,439,556,160 parameters)."""
        return cls()

    @classmethod
    def com4d(cls) -> DiTConfig:
        """The released COM4D DiT: TripoSG + tables of 32 parts and 64 frames (1,439.76 M)."""
        return cls(part_rows=32, frame_rows=64, static_embedding=True, dynamic_embedding=True)

    @property
    def has_tables(self) -> bool:
        return bool(self.part_rows or self.frame_rows or self.static_embedding or self.dynamic_embedding)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps (1000 * sigma) -> (B, dim) [sin | cos] features, computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, dim)


class TimestepProjection(nn.Module):
    """Sinusoid -> Linear -> exact GELU -> Linear: the timestep token (`time_proj` in checkpoints)."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.linear_1 = nn.Linear(width, inner)
        self.linear_2 = nn.Linear(inner, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = timestep_sinusoid(t, self.linear_1.in_features).to(self.linear_1.weight.dtype)  # (B, D)
        return self.linear_2(F.gelu(self.linear_1(s)))  # (B, D)


class CellContext:
    """The image tokens each cell cross-attends to.

    `features` (U, Lc, Dc) holds U distinct token sets (e.g. one full frame shared by every static
    row); `index` (B,) says which set cell b (row-major) reads. Each block computes K/V once per
    distinct set that some cell reads (the official code does it once per cell), and cells reading
    consecutive sets run as views of the query batch (no gathers). K/V are not kept across
    denoising steps: that would save under 1 % of a step's FLOPs at the real size but hold
    21 blocks x U x Lc x 2D values (about 8 GiB for a stage-B window in fp16).
    """

    def __init__(self, features: torch.Tensor, index: torch.Tensor | None = None, zero: bool = False):
        self.features = features  # (U, Lc, Dc)
        self.index = torch.arange(features.shape[0]) if index is None else index
        self.zero = zero
        self._used: torch.Tensor | None = None
        self._used_features = features
        self._plans: dict[tuple, list[tuple[int, int, int, int]]] = {}
        self._ids: list[int] | None = None

    @classmethod
    def zeros(cls, cells: int, tokens: int, dim: int, device, dtype) -> CellContext:
        """All-zero image tokens for every cell: the unconditional branch of guidance.

        With zero tokens K = V = 0, so attention returns 0 and the block's cross-attention output
        is exactly `to_out`'s bias; `cross_attention` uses that instead of computing it.
        """
        feats = torch.zeros(1, tokens, dim, device=device, dtype=dtype)
        return cls(feats, torch.zeros(cells, dtype=torch.long), zero=True)

    def subset(self, cells: torch.Tensor) -> CellContext:
        """The same contexts for a subset of the cells."""
        return CellContext(self.features, self.index[cells.to(self.index.device)], self.zero)

    @classmethod
    def per_cell(cls, tokens: torch.Tensor) -> CellContext:
        """(M, N, Lc, Dc) or (B, Lc, Dc) tokens, one set per cell (no sharing)."""
        return cls(tokens.reshape(-1, *tokens.shape[-2:]))

    def _cell_sets(self) -> list[int]:
        """Per row-major cell, its set among the used ones (numbered by first use)."""
        if self._ids is None:
            index = self.index.tolist()
            first: dict[int, int] = {}
            for u in index:
                first.setdefault(u, len(first))
            self._ids = [first[u] for u in index]
            used = list(first)
            self._used_features = self.features
            if used != list(range(self.features.shape[0])):
                self._used = torch.tensor(used, device=self.features.device)
        return self._ids

    def used_features(self) -> torch.Tensor:
        """(U', Lc, Dc): only the sets some cell reads, in order of first use (gathered once)."""
        self._cell_sets()
        if self._used is not None:
            self._used_features = self.features[self._used]
            self._used = None
        return self._used_features

    def keys_values(self, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.keys_values(self.used_features().to(attn.to_k.weight.dtype))  # 2 x (U', H, Lc, hd)

    def plan(self, grid: routing.Grid, layout: str) -> list[tuple[int, int, int, int]]:
        """Pieces (first cell, G, n, first set) in `layout`: G runs of n consecutive cells, run g
        reading set first + g. Every piece is a view of the queries and of K/V."""
        key = (grid.rows, grid.cols, layout)
        if key not in self._plans:
            ids = self._cell_sets()
            if len(ids) != grid.cells:
                raise ValueError(f"context has {len(ids)} cells, the grid {grid.cells}")
            ids = [ids[i] for i in routing.cell_order(grid, layout)]
            runs: list[list[int]] = []  # [first cell, length, set]
            for b, u in enumerate(ids):
                if runs and runs[-1][2] == u and runs[-1][0] + runs[-1][1] == b:
                    runs[-1][1] += 1
                else:
                    runs.append([b, 1, u])
            pieces: list[list[int]] = []  # [first cell, G, n, first set]
            for b, n, u in runs:
                if pieces and pieces[-1][2] == n and pieces[-1][3] + pieces[-1][1] == u:
                    pieces[-1][1] += 1
                else:
                    pieces.append([b, 1, n, u])
            self._plans[key] = [tuple(p) for p in pieces]
        return self._plans[key]


def cross_attention(
    attn: Attention, x: torch.Tensor, ctx: CellContext, grid: routing.Grid, layout: str
) -> torch.Tensor:
    """Per-cell cross-attention, x: (B, L, D) in `layout` -> (B, L, D). Consecutive cells reading the
    same context run as one query sequence (exact: every query attends to the context alone)."""
    if ctx.zero:  # K = V = 0: uniform weights over zero values, so the output is to_out's bias
        bias = attn.to_out[0].bias
        return bias.expand_as(x) if bias is not None else torch.zeros_like(x)
    q = attn.query(x)  # (B, L, H, hd)
    k, v = ctx.keys_values(attn)  # (U', H, Lc, hd)
    B, L, H, hd = q.shape
    parts = []
    for b, G, n, u in ctx.plan(grid, layout):
        qg = q[b : b + G * n].reshape(G, n * L, H, hd).transpose(1, 2)  # (G, H, n*L, hd)
        o = sdpa(qg, k[u : u + G], v[u : u + G])  # (G, H, n*L, hd)
        parts.append((slice(b, b + G * n), o.transpose(1, 2).reshape(G * n, L, H * hd)))
    return project_parts(attn.to_out[0], parts, B)  # (B, L, D)


@dataclass
class BlockRoute:
    """What one block reads: its image context, its self-attention groups and the cell layout."""

    ctx: CellContext
    segments: routing.Segments | None
    layout: str


class DiTBlock(nn.Module):
    """Pre-norm block: [long skip] -> self-attention -> cross-attention -> feed-forward."""

    def __init__(self, cfg: DiTConfig, skip: bool):
        super().__init__()
        D = cfg.width
        if skip:
            # The official order is linear-then-norm (TripoSG trained it that way).
            self.skip_linear = nn.Linear(2 * D, D)
            self.skip_norm = FP32AccLayerNorm(D, eps=1e-5)
        self.norm1 = FP32AccLayerNorm(D, eps=1e-5)
        self.attn1 = Attention(D, cfg.num_heads, qk_norm=True)
        self.norm2 = FP32AccLayerNorm(D, eps=1e-5)
        self.attn2 = Attention(D, cfg.num_heads, context_dim=cfg.cross_attention_dim, qk_norm=True)
        self.norm3 = FP32AccLayerNorm(D, eps=1e-5)
        self.ff = FeedForward(D, cfg.mlp_ratio)

    def forward(
        self,
        h: torch.Tensor,
        route: BlockRoute,
        grid: routing.Grid,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h, skip: (B, L, D) row-major cells -> (B, L, D) row-major. Inside, the block runs in
        `route.layout`: a column-major block pays one transposing copy on the way in (folded into
        the skip concatenation where there is one) and writes its last residual add row-major."""
        return self.finish(self.attend_self(h, route, grid, skip), route, grid)

    def attend_self(
        self, h: torch.Tensor, route: BlockRoute, grid: routing.Grid, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block up to its self-attention residual: (B, L, D) row-major -> (B, L, D) in
        `route.layout`. It does not read the image context."""
        layout = route.layout
        if skip is not None:
            if layout == routing.ROWS:
                cat = torch.cat([skip, h], dim=-1)  # (B, L, 2D)
            else:
                cat = torch.cat([routing.relayout(skip, grid, routing.ROWS, layout).view(skip.shape),
                                 routing.relayout(h, grid, routing.ROWS, layout)], dim=-1)  # (B, L, 2D)
            h = self.skip_norm(self.skip_linear(cat))  # (B, L, D) in layout
        else:
            h = routing.relayout(h, grid, routing.ROWS, layout)  # (B, L, D) in layout
        return h + self.attn1(self.norm1(h), route.segments)  # (B, L, D)

    def finish(self, h: torch.Tensor, route: BlockRoute, grid: routing.Grid) -> torch.Tensor:
        """The rest of the block: cross-attention and feed-forward, (B, L, D) in `route.layout` ->
        (B, L, D) row-major."""
        layout = route.layout
        h = h + cross_attention(self.attn2, self.norm2(h), route.ctx, grid, layout)  # (B, L, D)
        # The feed-forward acts per token: run it on slices of cells so its 4x-wide hidden layer
        # never exists for the whole grid at once (the largest transient of a block). Slices are
        # whole columns in the column-major layout so each lands row-major as a view.
        B = h.shape[0]
        step = max(1, FF_CHUNK_TOKENS // h.shape[1])
        if layout == routing.COLS:
            step = max(grid.rows, step // grid.rows * grid.rows)
        if B <= step and layout == routing.ROWS:
            return h + self.ff(self.norm3(h))  # (B, L, D)
        out = torch.empty_like(h)  # (B, L, D) row-major
        for start in range(0, B, step):
            c = h[start : start + step]
            a, b = routing.as_rows(c, grid, layout), routing.as_rows(self.ff(self.norm3(c)), grid, layout)
            target = routing.rows_slice(out, grid, layout, start, c.shape[0])
            if torch.is_grad_enabled():  # out= does not record gradients
                target.copy_(a + b)
            else:
                torch.add(a, b, out=target)
        return out


class COM4DTransformer(nn.Module):
    """TripoSG DiT with COM4D's tables. Parameter names match the official checkpoints."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.time_proj = TimestepProjection(D, int(D * cfg.mlp_ratio))
        self.proj_in = nn.Linear(cfg.in_channels, D)
        if cfg.part_rows:
            self.part_embedding = nn.Embedding(cfg.part_rows, D)
        if cfg.frame_rows:
            self.frame_embedding = nn.Embedding(cfg.frame_rows, D)
        if cfg.static_embedding:
            self.static_embedding = nn.Embedding(1, D)
        if cfg.dynamic_embedding:
            self.dynamic_embedding = nn.Embedding(1, D)
        mid = cfg.num_layers // 2
        self.blocks = nn.ModuleList([DiTBlock(cfg, skip=i > mid) for i in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(D, eps=1e-5)
        self.proj_out = nn.Linear(D, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Fresh-model init (loading overwrites it): xavier linears, N(0, 0.02) tables."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    # -- shared pieces ------------------------------------------------------------------------

    def embed_tokens(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) latents, t (B,) or (1,) timesteps -> (B, T+1, D), the timestep as token 0."""
        temb = self.time_proj(t)  # (B or 1, D)
        h = self.proj_in(x.to(self.proj_in.weight.dtype))  # (B, T, D)
        return torch.cat([temb[:, None].expand(h.shape[0], 1, -1), h], dim=1)  # (B, T+1, D)

    def run_blocks(
        self,
        h: torch.Tensor,
        routes: Sequence[BlockRoute],
        grid: routing.Grid,
        first_attended: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks with U-Net long skips: blocks < mid push, block mid passes, blocks > mid pop, so
        block L > mid receives the output of block num_layers-1-L of the same cell. h: (B, L, D)
        row-major cells. `first_attended`: block 0's `attend_self` output, already computed (h is
        then not read)."""
        mid = self.cfg.num_layers // 2
        stack = []
        for i, (block, route) in enumerate(zip(self.blocks, routes, strict=True)):
            if i == 0 and first_attended is not None:
                h = block.finish(first_attended, route, grid)  # (B, L, D)
            else:
                h = block(h, route, grid, skip=stack.pop() if i > mid else None)  # (B, L, D)
            if i < mid:
                stack.append(h)
        return h

    def compile_blocks(self, **options) -> None:
        """`torch.compile` every block in place (parameter names unchanged); options go to
        torch.compile. The routing's Python bookkeeping stays eager (graph breaks around it)."""
        for block in self.blocks:
            block.compile(**options)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T+1, D) -> predicted velocity x0 - eps (B, T, C); token 0 is dropped."""
        return self.proj_out(self.norm_out(h[:, 1:]))

    # -- forwards -----------------------------------------------------------------------------

    def forward_grid(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        ctx_temporal: torch.Tensor | CellContext,
        ctx_spatial: torch.Tensor | CellContext,
        static_rows: int,
        cutoff: bool = False,
        row_offset: int = 0,
        total_rows: int | None = None,
    ) -> torch.Tensor:
        """Denoise an objects-by-frames grid (the official `forward_matrix`).

        x: (M, N, T, C) latents, rows = objects (static first), columns = window frames.
        t: one timestep for every cell. ctx_*: (M, N, Lc, Dc) image tokens per cell, or a
        CellContext over the M*N cells; spatial blocks read `ctx_spatial`, the others `ctx_temporal`.
        cutoff: spatial blocks become local (stage B after the mixing cutoff).
        row_offset, total_rows: x holds rows row_offset.. of a grid of total_rows rows (whose first
        static_rows are static). Only valid when the omitted rows cannot interact with the given
        ones (after the cutoff, static rows are local in every block); the tables still use each
        row's place in the whole grid. Returns (M, N, T, C).
        """
        h, grid, routes = self._grid_setup(
            x, t, ctx_temporal, ctx_spatial, static_rows, cutoff, row_offset, total_rows
        )
        return self.head(self.run_blocks(h, routes, grid)).reshape(x.shape)  # (M, N, T, C)

    def forward_grid_guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        ctx_temporal: torch.Tensor | CellContext,
        ctx_spatial: torch.Tensor | CellContext,
        ctx_uncond: CellContext,
        static_rows: int,
        cutoff: bool = False,
        row_offset: int = 0,
        total_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches of guidance: (forward_grid with ctx_*, forward_grid with `ctx_uncond` in
        every block), bit for bit, computing once what does not depend on the image tokens: the
        token and table embeddings and block 0's self-attention. Returns two (M, N, T, C)."""
        h, grid, routes = self._grid_setup(
            x, t, ctx_temporal, ctx_spatial, static_rows, cutoff, row_offset, total_rows
        )
        first = self.blocks[0].attend_self(h, routes[0], grid)  # shared by both branches
        cond = self.head(self.run_blocks(h, routes, grid, first)).reshape(x.shape)
        uncond_routes = [BlockRoute(ctx_uncond, r.segments, r.layout) for r in routes]
        uncond = self.head(self.run_blocks(h, uncond_routes, grid, first)).reshape(x.shape)
        return cond, uncond

    def _grid_setup(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        ctx_temporal: torch.Tensor | CellContext,
        ctx_spatial: torch.Tensor | CellContext,
        static_rows: int,
        cutoff: bool,
        row_offset: int,
        total_rows: int | None,
    ) -> tuple[torch.Tensor, routing.Grid, list[BlockRoute]]:
        """Embedded tokens (B, T+1, D), the grid and each block's route for `forward_grid`."""
        M, N, T, C = x.shape
        total_rows = M if total_rows is None else total_rows
        if row_offset and not (cutoff and row_offset <= static_rows):
            raise ValueError("rows may only be left out after the cutoff, and only static ones")
        grid = routing.Grid(M, N, max(0, static_rows - row_offset))
        ctx_t = ctx_temporal if isinstance(ctx_temporal, CellContext) else CellContext.per_cell(ctx_temporal)
        ctx_s = ctx_spatial if isinstance(ctx_spatial, CellContext) else CellContext.per_cell(ctx_spatial)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)[:1]  # (1,)
        h = self.embed_tokens(x.reshape(M * N, T, C), t)  # (B, T+1, D)
        for term in self.cell_embeddings(grid, row_offset, total_rows):  # one table at a time, official order
            h = h + term.to(h.dtype)[:, None]  # (B, T+1, D)
        kinds = routing.block_kinds(self.cfg.num_layers, self.cfg.spatial_block_ids)
        spatial_layout = routing.block_layout(grid, "spatial", cutoff)
        spatial = BlockRoute(ctx_s, routing.spatial_segments(grid, cutoff), spatial_layout)
        temporal = BlockRoute(ctx_t, routing.temporal_segments(grid), routing.ROWS)
        return h, grid, [spatial if k == "spatial" else temporal for k in kinds]

    def cell_embeddings(
        self, grid: routing.Grid, row_offset: int = 0, total_rows: int | None = None
    ) -> list[torch.Tensor]:
        """The table rows each cell gets, as a list of (M*N, D) terms in the official order.

        Frame row c (position in the window) if N > 1, part row r if the whole grid has more than
        one row, then the static embedding for static rows and the dynamic one for the others.
        """
        M, N = grid.rows, grid.cols
        total_rows = M if total_rows is None else total_rows
        cfg = self.cfg
        terms = []
        if N > 1:
            if N > cfg.frame_rows:
                raise ValueError(f"{N} window frames but the frame table holds {cfg.frame_rows}")
            terms.append(self.frame_embedding.weight[:N][None, :, :].expand(M, N, -1))
        if total_rows > 1:
            if total_rows > cfg.part_rows:
                raise ValueError(f"{total_rows} objects but the part table holds {cfg.part_rows}")
            rows = self.part_embedding.weight[row_offset : row_offset + M]
            terms.append(rows[:, None, :].expand(M, N, -1))
        if cfg.static_embedding or cfg.dynamic_embedding:
            w = self.proj_in.weight
            role = torch.zeros(M, N, cfg.width, dtype=w.dtype, device=w.device)
            if cfg.static_embedding:
                role[: grid.static_rows] = self.static_embedding.weight[0]
            if cfg.dynamic_embedding:
                role[grid.static_rows :] = self.dynamic_embedding.weight[0]
            terms.append(role)
        return [t.reshape(M * N, cfg.width) for t in terms]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | CellContext,
        group_sizes: Sequence[int] | None = None,
        mode: str | None = None,
    ) -> torch.Tensor:
        """A packed batch of latents, one timestep each (training, diffusion forcing, plain TripoSG).

        x: (B, T, C); t: (B,) timesteps; context: (B, Lc, Dc). `group_sizes` splits the batch into
        consecutive groups (parts of one scene when mode="parts", frames of one object when
        mode="frames"); their global blocks attend jointly inside a group and get the tables
        (part+static or frame+dynamic indices 0..n-1), as in the official training forward.
        With mode=None every latent is alone and no table is used (the TripoSG DiT).
        """
        B, T, C = x.shape
        ctx = context if isinstance(context, CellContext) else CellContext.per_cell(context)
        h = self.embed_tokens(x, t.reshape(B))  # (B, T+1, D)
        segments = None
        global_ids: set[int] = set()
        if mode is not None:
            sizes = list(group_sizes or [B])
            if sum(sizes) != B:
                raise ValueError(f"group sizes {sizes} do not add up to the batch of {B}")
            segments = routing.segments_from_counts(sizes)
            if mode == "parts":
                global_ids = set(self.cfg.spatial_block_ids)
            elif mode == "frames":
                global_ids = set(self.cfg.temporal_block_ids)
            else:
                raise ValueError(f"mode must be 'parts', 'frames' or None, not {mode!r}")
            if max(sizes) > 1:
                for term in self.group_embeddings(sizes, mode):
                    h = h + term.to(h.dtype)[:, None]  # (B, T+1, D)
        grid = routing.Grid(B, 1, B)  # a column of cells, row-major = the batch order
        routes = [
            BlockRoute(ctx, segments if i in global_ids else None, routing.ROWS) for i in range(self.cfg.num_layers)
        ]
        h = self.run_blocks(h, routes, grid)  # (B, T+1, D)
        return self.head(h)  # (B, T, C)

    def group_embeddings(self, sizes: Sequence[int], mode: str) -> list[torch.Tensor]:
        """Training-time tables: row = index within the group, then static (parts) or dynamic (frames)."""
        device = self.proj_in.weight.device
        pos = torch.cat([torch.arange(n, device=device) for n in sizes])  # (B,)
        if mode == "parts":
            return [self.part_embedding(pos), self.static_embedding.weight[0].expand(len(pos), -1)]
        return [self.frame_embedding(pos), self.dynamic_embedding.weight[0].expand(len(pos), -1)]

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> COM4DTransformer:
        """Load an official transformer folder (`config.json` + diffusion_pytorch_model.safetensors).

        Works for COM4D's `PartFrameCrafterDiTModel` and TripoSG's `TripoSGDiTModel` (no tables).
        Table sizes come from the safetensors header, not from the config; q/k/v are converted
        from the official head-interleaved layout once here.
        """
        folder = Path(folder)
        config_path = folder / "config.json"
        weights_path = folder / DIFFUSERS_WEIGHTS
        cfg = config_from_files(config_path, weights_path)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        state = heads_first_to_standard(load_tensors(weights_path), cfg.num_heads)
        load_state_strict(model, state, weights_path)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return fuse_projections(model)


def config_from_files(config_path: Path, weights_path: Path) -> DiTConfig:
    """A DiTConfig from an official config.json, with table sizes read from the weights header."""
    raw = read_json(config_path)
    name = raw.get("_class_name", "")
    if name and name not in ("TripoSGDiTModel", "PartFrameCrafterDiTModel", "PartCrafterDiTModel"):
        raise WeightsError(f"{config_path} describes a {name}, not a TripoSG/COM4D transformer")
    if raw.get("use_cross_attention_2"):
        raise WeightsError(f"{config_path}: use_cross_attention_2 is not supported (no release uses it)")
    for flag in ("enable_local_cross_attn", "enable_global_cross_attn"):
        if raw.get(flag, True) is False:
            raise WeightsError(f"{config_path}: {flag}=false is not supported (every release has it on)")
    for flag in ("enable_static_embedding_per_block", "enable_dynamic_embedding_per_block"):
        if raw.get(flag):
            raise WeightsError(f"{config_path}: {flag} is not supported (no released model uses it)")
    shapes = tensor_shapes(weights_path)
    try:
        cfg = DiTConfig(
            width=int(raw.get("width", 2048)),
            num_layers=int(raw.get("num_layers", 21)),
            num_heads=int(raw.get("num_attention_heads", 16)),
            in_channels=int(raw.get("in_channels", 64)),
            cross_attention_dim=int(raw.get("cross_attention_dim", 1024)),
        )
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: bad value ({err})") from err
    cfg.part_rows = shapes.get("part_embedding.weight", (0,))[0]
    cfg.frame_rows = shapes.get("frame_embedding.weight", (0,))[0]
    cfg.static_embedding = "static_embedding.weight" in shapes
    cfg.dynamic_embedding = "dynamic_embedding.weight" in shapes
    n = cfg.num_layers
    spatial = raw.get("spatial_global_attn_block_ids") or raw.get("global_attn_block_ids")
    cfg.spatial_block_ids = [int(i) for i in spatial] if spatial else list(range(0, n, 2))
    temporal = raw.get("temporal_global_attn_block_ids")
    cfg.temporal_block_ids = [int(i) for i in temporal] if temporal else [0, *range(1, n + 1, 2)]
    return cfg
