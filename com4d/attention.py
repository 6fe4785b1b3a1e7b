"""Attention, norms and feed-forward shared by the DiT and the shape VAE.

Module and parameter names follow the official checkpoints (`to_q`, `to_out.0`, `norm_q`,
`norm_cross`, `ff.net.0.proj`, ...) so that state dicts load without renaming. The q/k/v weights
must have been permuted into the standard per-head layout first (`weights.heads_first_to_standard`).

Self-attention can run *grouped*: several latent sets ("cells") are concatenated along the sequence
and attend jointly. Groups are given as index tensors (G, n) of cells (see `com4d.routing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as the official blocks do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Per-head RMS norm of q or k: x * rsqrt(mean(x^2) + eps) * w, the variance in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return (x * self.weight).to(self.weight.dtype)


class GELUProjection(nn.Module):
    """Linear followed by exact (erf) GELU; named `proj` as in the checkpoints."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear. `net.1` is the (inactive) dropout slot of the checkpoints."""

    def __init__(self, dim: int, mult: float = 4.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GELUProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[torch.Tensor] | None
) -> torch.Tensor:
    """Attention over cells, each group of cells attending jointly.

    q, k, v: (B, H, L, hd) for B cells. `groups` is a list of index tensors (G, n), together covering
    every cell exactly once; cells of one group are concatenated cell-major (all of cell 0, then
    cell 1, ...) and attend as one sequence of n*L tokens. None means every cell alone.
    """
    if groups is None:
        return F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
    B, H, L, hd = q.shape
    out = torch.empty_like(q)
    for idx in groups:
        G, n = idx.shape
        if n == 1:
            flat = idx[:, 0]
            out[flat] = F.scaled_dot_product_attention(q[flat], k[flat], v[flat])
            continue
        qg, kg, vg = (t[idx].permute(0, 2, 1, 3, 4).reshape(G, H, n * L, hd) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qg, kg, vg)  # (G, H, n*L, hd)
        out[idx.reshape(-1)] = o.view(G, H, n, L, hd).permute(0, 2, 1, 3, 4).reshape(G * n, H, L, hd)
    return out


class Attention(nn.Module):
    """Multi-head attention with the official parameter names.

    `context_dim=None` gives self-attention (to_k/to_v read the same tokens as to_q). `qk_norm`
    adds per-head RMS norms (DiT); `context_norm` adds a LayerNorm on the context (`norm_cross`,
    VAE cross-attention).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        qk_norm: bool = False,
        context_norm: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        kv_dim = dim if context_dim is None else context_dim
        if context_norm:
            self.norm_cross = nn.LayerNorm(kv_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        if qk_norm:
            self.norm_q = RMSNorm(self.head_dim)
            self.norm_k = RMSNorm(self.head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.to_q(x))  # (B, H, L, hd)
        return self.norm_q(q) if hasattr(self, "norm_q") else q

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of context tokens (B, Lc, Dc) -> two (B, H, Lc, hd); cacheable per context."""
        if hasattr(self, "norm_cross"):
            context = self.norm_cross(context)
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        if hasattr(self, "norm_k"):
            k = self.norm_k(k)
        return k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        B, H, L, hd = o.shape
        return self.to_out[0](o.transpose(1, 2).reshape(B, L, H * hd))  # (B, L, D)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        groups: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, L, D); context: (B, Lc, Dc) or None for self-attention (optionally grouped)."""
        q = self.query(x)  # (B, H, L, hd)
        k, v = self.keys_values(x if context is None else context)  # (B, H, Lk, hd)
        if context is not None:
            return self.merge(F.scaled_dot_product_attention(q, k, v))
        return self.merge(grouped_sdpa(q, k, v, groups))  # (B, L, D)
