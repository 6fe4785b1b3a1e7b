"""The fast DiT path: guided forward = two plain forwards bit for bit; fused q/k/v keep names and
numbers; layouts and segments cover every cell once; contexts read only the image sets they use."""

from __future__ import annotations

import pytest
import torch

from com4d import attention, routing
from com4d.dit import CellContext, COM4DTransformer, DiTConfig

CFG = DiTConfig(width=64, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32,
                part_rows=8, frame_rows=16, static_embedding=True, dynamic_embedding=True,
                spatial_block_ids=[0, 2, 4], temporal_block_ids=[0, 1, 3, 5])


@pytest.fixture(scope="module")
def model() -> COM4DTransformer:
    torch.manual_seed(0)
    return attention.fuse_projections(COM4DTransformer(CFG).eval().requires_grad_(False))


def window(M: int, N: int, S: int, seed: int = 0):
    """Latents and the shared contexts of a stage-B window (full frames + object images)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, 12, CFG.in_channels, generator=g)
    feats = torch.randn(N + (M - S) * N, 9, CFG.cross_attention_dim, generator=g)
    own = torch.tensor([c if r < S else N + (r - S) * N + c for r in range(M) for c in range(N)])
    frame = torch.tensor([c for _ in range(M) for c in range(N)])
    return x, CellContext(feats, own), CellContext(feats, frame)


@pytest.mark.parametrize("M, N, S, cutoff", [(5, 1, 3, False), (5, 4, 3, False), (5, 4, 3, True), (3, 4, 0, False)])
def test_guided_forward_is_the_two_plain_forwards_bit_for_bit(model, M, N, S, cutoff):
    x, ctx_t, ctx_mix = window(M, N, S)
    spatial = ctx_t if cutoff else ctx_mix
    zero = CellContext.zeros(M * N, 9, CFG.cross_attention_dim, "cpu", torch.float32)
    with torch.no_grad():
        cond, uncond = model.forward_grid_guided(x, 400.0, ctx_t, spatial, zero, S, cutoff)
        assert torch.equal(cond, model.forward_grid(x, 400.0, ctx_t, spatial, S, cutoff))
        assert torch.equal(uncond, model.forward_grid(x, 400.0, zero, zero, S, cutoff))
    assert not torch.equal(cond, uncond)


def test_guided_forward_with_the_static_rows_left_out(model):
    M, N, S = 5, 4, 3
    x, ctx_t, _ = window(M, N, S)
    dyn = torch.arange(S * N, M * N)
    zero = CellContext.zeros(len(dyn), 9, CFG.cross_attention_dim, "cpu", torch.float32)
    with torch.no_grad():
        cond, uncond = model.forward_grid_guided(x[S:], 400.0, ctx_t.subset(dyn), ctx_t.subset(dyn), zero, S, True,
                                                 row_offset=S, total_rows=M)
        full = model.forward_grid(x, 400.0, ctx_t, ctx_t, S, True)
    torch.testing.assert_close(cond, full[S:], atol=1e-6, rtol=1e-6)


def test_fused_projections_keep_names_and_numbers():
    torch.manual_seed(1)
    plain = COM4DTransformer(CFG).eval().requires_grad_(False)
    fused = COM4DTransformer(CFG).eval().requires_grad_(False)
    fused.load_state_dict(plain.state_dict())
    attention.fuse_projections(fused)
    assert list(fused.state_dict()) == list(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], tensor), name
    block = fused.blocks[0].attn1
    assert block.to_q.weight.data_ptr() == block._fused.data_ptr()  # a view, no second copy
    x, ctx_t, ctx_mix = window(5, 4, 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_grid(x, 300.0, ctx_t, ctx_mix, 3),
                                   plain.forward_grid(x, 300.0, ctx_t, ctx_mix, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M, N, S", [(6, 8, 4), (1, 5, 0), (4, 1, 2), (3, 3, 3)])
def test_layouts_and_segments_cover_every_cell_once(M, N, S):
    grid = routing.Grid(M, N, S)
    cells = torch.arange(M * N).reshape(M * N, 1)
    cols = routing.relayout(cells, grid, routing.ROWS, routing.COLS)
    assert cols[:, 0].tolist() == routing.cell_order(grid, routing.COLS)
    assert torch.equal(routing.relayout(cols, grid, routing.COLS, routing.ROWS), cells)
    for segments, layout in ((routing.temporal_segments(grid), routing.ROWS),
                             (routing.spatial_segments(grid), routing.block_layout(grid, "spatial"))):
        order = routing.cell_order(grid, layout)
        groups = [[order[b] for b in range(s.start + g * s.size, s.start + (g + 1) * s.size)]
                  for s in segments or [routing.Segment(0, M * N, 1)] for g in range(s.groups)]
        assert sorted(c for g in groups for c in g) == list(range(M * N))
        if segments is not None and layout == routing.ROWS and S < M and N > 1:  # a dynamic row is one group
            assert [r * N + c for c in range(N) for r in [M - 1]] in groups
        if segments is not None and layout == routing.COLS:  # a column is one group
            assert sorted(groups[0]) == [r * N for r in range(M)]


def test_contexts_compute_keys_values_only_for_the_sets_they_read():
    x, ctx_t, ctx_mix = window(5, 4, 3)
    assert ctx_mix.used_features().shape[0] == 4  # the 4 full frames, not the 12 sets
    assert ctx_t.used_features().shape[0] == 12
    dyn = ctx_t.subset(torch.arange(12, 20))
    assert torch.equal(dyn.used_features(), ctx_t.features[4:])


def test_segments_from_counts_merge_equal_neighbours():
    assert routing.segments_from_counts([2, 2, 3, 1]) == [routing.Segment(0, 2, 2), routing.Segment(4, 1, 3),
                                                           routing.Segment(7, 1, 1)]
    assert routing.segments_from_counts([1, 1]) is None
