"""The attention seam: every backend available here against the math reference, refusals, recording,
and the DiT/VAE running through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from com4d import attention
from com4d.dit import COM4DTransformer, DiTConfig
from com4d.vae import ShapeVAE, VAEConfig

AVAILABLE = attention.available_backends("cpu", torch.float32)


def tiny_dit() -> COM4DTransformer:
    torch.manual_seed(0)
    cfg = DiTConfig(width=64, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32,
                    part_rows=8, frame_rows=16, static_embedding=True, dynamic_embedding=True,
                    spatial_block_ids=[0, 2, 4], temporal_block_ids=[0, 1, 3, 5])
    return attention.fuse_projections(COM4DTransformer(cfg).eval().requires_grad_(False))


def reference_attention(q, k, v):
    """Softmax(q k^T / sqrt(d)) v written out (not through PyTorch's SDPA)."""
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


def test_math_and_auto_are_always_available_on_the_cpu():
    assert "math" in AVAILABLE and "auto" in AVAILABLE


@pytest.mark.parametrize("name", AVAILABLE)
def test_each_available_backend_matches_written_out_attention(name):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 4, n, 32, generator=g) for n in (50, 70, 70))
    out = attention.sdpa(q, k, v, backend=name)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("name", AVAILABLE)
def test_the_dit_grid_forward_agrees_with_math_under_each_backend(name):
    model = tiny_dit()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 12, 8, generator=g)
    ctx = torch.randn(5, 4, 9, 32, generator=g)
    with torch.no_grad(), attention.use_backend("math"):
        ref = model.forward_grid(x, 300.0, ctx, ctx, static_rows=3)
    with torch.no_grad(), attention.use_backend(name):
        out = model.forward_grid(x, 300.0, ctx, ctx, static_rows=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*auto, cudnn, flash, efficient, math"):
        with attention.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.sdpa(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), backend="xformers")


@pytest.mark.parametrize("name", [b for b in ("cudnn", "efficient", "flash") if b not in AVAILABLE])
def test_an_unavailable_backend_names_those_that_are(name):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(attention.BackendUnavailable, match=f"'{name}' cannot run.*available there: auto"):
        attention.sdpa(q, q, q, backend=name)


def test_every_dit_and_vae_attention_goes_through_the_seam_and_is_recorded():
    model = tiny_dit()
    torch.manual_seed(3)
    vae = attention.fuse_projections(ShapeVAE(VAEConfig(latent_channels=8, num_attention_heads=4, width_encoder=32,
                                                        width_decoder=32, num_layers_encoder=1,
                                                        num_layers_decoder=2)).eval())
    x = torch.randn(3, 2, 12, 8)
    ctx = torch.randn(3, 2, 9, 32)
    calls_made = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls_made.append(args[0].shape)
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad(), attention.record_kernels() as calls:
            model.forward_grid(x, 300.0, ctx, ctx, static_rows=1)
            vae.decode(torch.randn(1, 12, 8), torch.rand(1, 100, 3))
    finally:
        F.scaled_dot_product_attention = original
    assert len(calls) == len(calls_made) > 0
    assert all(c["backend"] == "auto" and c["kernel"] in ("math", "flash", "efficient", "cudnn") for c in calls)
    # 3 rows (1 static) x 2 frames of 13 tokens: spatial blocks join a column (2 groups of 3 cells),
    # temporal ones a dynamic row (2 groups of 2 cells) and leave the 2 static cells alone; the
    # VAE's query attention sees the 100 points.
    assert {tuple(c["q"]) for c in calls} >= {(2, 4, 39, 16), (2, 4, 26, 16), (2, 4, 13, 16), (1, 4, 100, 8)}


def test_use_backend_is_scoped():
    assert attention.current_backend() == "auto"
    with attention.use_backend("math"):
        assert attention.current_backend() == "math"
    assert attention.current_backend() == "auto"
