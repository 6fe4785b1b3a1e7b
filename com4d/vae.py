"""The TripoSG shape VAE: point cloud -> latent set -> occupancy field (official `TripoSGVAEModel`).

A shape is a set of T latent tokens x C channels with no positional encoding. The decoder runs its
self-attention trunk once per latent set and then answers any number of query points with one
cross-attention block ("query"), so a mesh is extracted by querying the field on a grid
(`com4d.meshing`). The encoder (training / round trips only) cross-attends from T query points,
picked from the cloud by a seeded random subset plus farthest point sampling, to every point.

Field sign: the decoder returns `-proj_out(...)`, i.e. **positive inside**, surface at 0; the
official extraction treats it as an occupancy logit (sigmoid).

Parameter names follow the official checkpoints (`encoder.blocks.0.attn2.to_q.weight`, ...); the
head-interleaved q/k/v of the checkpoints are permuted into the standard layout at load time
(`weights.heads_first_to_standard`), so attention below is plain multi-head attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from com4d.attention import Attention, FeedForward, FP32AccLayerNorm, fuse_projections, sdpa
from com4d.errors import InputError, WeightsError
from com4d.weights import (
    DIFFUSERS_WEIGHTS,
    find_component,
    heads_first_to_standard,
    load_state_strict,
    load_tensors,
    read_json,
)

# The official decode splits query points into chunks of this many; only the first chunk of the
# first decode after `set_flash_decoder()` uses top-k keys (see `flash_topk_count`).
OFFICIAL_DECODE_CHUNK = 50_000
# Points per cross-attention pass in `ShapeVAE.query`. Any value gives the same field (queries are
# independent); bigger is faster on a GPU. In fp16 a pass holds about chunk * 4 * width * 2 bytes
# of feed-forward activations (1 GiB at the default with width 1024).
DEFAULT_QUERY_CHUNK = 131_072
LOGVAR_RANGE = (-30.0, 20.0)
VAE_CLASS_NAMES = ("TripoSGVAEModel", "Tripo2VAEModel")


@dataclass(frozen=True)
class VAEConfig:
    """Fields and defaults of the official `vae/config.json` (defaults = the released model)."""

    in_channels: int = 3
    latent_channels: int = 64
    num_attention_heads: int = 8
    width_encoder: int = 512
    width_decoder: int = 1024
    num_layers_encoder: int = 8
    num_layers_decoder: int = 16
    embedding_type: str = "frequency"
    embed_frequency: int = 8
    embed_include_pi: bool = False

    @classmethod
    def triposg(cls) -> VAEConfig:
        """The released TripoSG VAE (242,662,017 parameters)."""
        return cls()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | Path = "config") -> VAEConfig:
        """Known fields from an official config dict; unknown keys are ignored, missing ones default."""
        name = raw.get("_class_name")
        if name and name not in VAE_CLASS_NAMES:
            raise WeightsError(f"{source} describes a {name}, not the TripoSG VAE ({VAE_CLASS_NAMES[0]})")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            expected = type(f.default)
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise WeightsError(f"{source}: {f.name} must be an integer, not {value!r}")
            if expected is bool and not isinstance(value, bool):
                raise WeightsError(f"{source}: {f.name} must be true or false, not {value!r}")
            if expected is str and not isinstance(value, str):
                raise WeightsError(f"{source}: {f.name} must be a string, not {value!r}")
            values[f.name] = value
        cfg = cls(**values)
        if cfg.embedding_type != "frequency":
            raise WeightsError(
                f"{source}: embedding_type {cfg.embedding_type!r} is not supported (only 'frequency')"
            )
        for name in ("width_encoder", "width_decoder"):
            if getattr(cfg, name) % cfg.num_attention_heads:
                raise WeightsError(f"{source}: {name} is not a multiple of num_attention_heads")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        return cls.from_dict(read_json(Path(path)), source=path)

    @property
    def embed_dim(self) -> int:
        """Width of the point embedding: xyz + sin + cos per frequency (3 * 17 = 51)."""
        return self.in_channels * (2 * self.embed_frequency + 1)


class FrequencyEmbedding(nn.Module):
    """xyz -> [x, y, z, sin(c * 2^k) for c in xyz for k < F, cos(same order)] (3 -> 51 for F = 8).

    The frequencies are exact powers of two (no pi in the released model), computed on the fly in
    the input's dtype, so the module has no state.
    """

    def __init__(self, num_freqs: int, include_pi: bool = False):
        super().__init__()
        self.num_freqs = num_freqs
        self.include_pi = include_pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = 2.0 ** torch.arange(self.num_freqs, dtype=torch.float32, device=x.device)
        if self.include_pi:
            freqs = freqs * math.pi
        angles = (x[..., None] * freqs.to(x.dtype)).flatten(-2)  # (..., 3 * F), per coordinate then frequency
        return torch.cat([x, angles.sin(), angles.cos()], dim=-1)  # (..., 3 * (2F + 1))


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention + exact-GELU feed-forward (norm1 / attn1 / norm3 / ff)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = FP32AccLayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads)
        self.norm3 = FP32AccLayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, 4.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn1(self.norm1(h))  # (B, L, D)
        return h + self.ff(self.norm3(h))  # (B, L, D)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (LayerNorm `norm_cross` on the context) + feed-forward.

    `attend` takes the context's keys/values precomputed (`attn2.keys_values`) so that the decoder
    computes them once per latent set rather than once per chunk of query points.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm2 = FP32AccLayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, context_dim=dim, context_norm=True)
        self.norm3 = FP32AccLayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, 4.0)

    def attend(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int = 0) -> torch.Tensor:
        """h (B, P, D) queries; k, v (B, H, T, hd). topk > 0: the official flash top-k key selection."""
        if topk:
            q = self.attn2.query(self.norm2(h)).transpose(1, 2)  # (B, H, P, hd)
            k, v = select_topk_keys(q, k, v, topk)  # (B, H, topk, hd)
            B, H, P, hd = q.shape
            h = h + self.attn2.to_out[0](sdpa(q, k, v).transpose(1, 2).reshape(B, P, H * hd))  # (B, P, D)
        else:
            h = h + self.attn2.attend(self.norm2(h), k, v)  # (B, P, D)
        return h + self.ff(self.norm3(h))  # (B, P, D)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.attn2.keys_values(context)  # (B, H, L, hd)
        return self.attend(h, k, v)


def flash_topk_count(num_keys: int) -> int:
    """Keys kept by the official flash processor: 1024 of 3072, 256 of 512, else a third."""
    if num_keys == 3072:
        return 1024
    if num_keys == 512:
        return 256
    return num_keys // 3


def select_topk_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the `count` keys with the highest mean q.k over every 100th query (official quirk).

    q (B, H, P, hd), k/v (B, H, T, hd) -> k, v (B, H, count, hd).
    """
    score = (q[:, :, ::100] @ k.transpose(-1, -2)).mean(-2)  # (B, H, T)
    index = score.topk(count, dim=-1).indices[..., None].expand(-1, -1, -1, v.shape[-1])  # (B, H, count, hd)
    return k.gather(2, index), v.gather(2, index)


class ShapeEncoder(nn.Module):
    """proj_in (shared by queries and points) -> one cross-attention block -> self-attention blocks."""

    def __init__(self, in_dim: int, dim: int, heads: int, num_layers: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(dim, heads)] + [SelfAttentionBlock(dim, heads) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """queries (B, T, E + 3), points (B, P, E + 3) embedded xyz + normals -> (B, T, D)."""
        h = self.proj_in(queries)  # (B, T, D)
        context = self.proj_in(points)  # (B, P, D)
        h = self.blocks[0](h, context)  # (B, T, D)
        for block in self.blocks[1:]:
            h = block(h)  # (B, T, D)
        return self.norm_out(h)  # (B, T, D)


class ShapeDecoder(nn.Module):
    """Self-attention trunk over the latent tokens, then one cross-attention block per query point."""

    def __init__(self, embed_dim: int, dim: int, heads: int, num_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [SelfAttentionBlock(dim, heads) for _ in range(num_layers)] + [CrossAttentionBlock(dim, heads)]
        )
        self.proj_query = nn.Linear(embed_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=1e-5)
        self.proj_out = nn.Linear(dim, 1)

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[:-1]:
            h = block(h)  # (B, T, D)
        return h

    def field(self, embedded: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int = 0) -> torch.Tensor:
        """embedded points (B, P, E), cached k/v (B, H, T, hd) -> field (B, P), positive inside."""
        h = self.proj_query(embedded)  # (B, P, D)
        h = self.blocks[-1].attend(h, k, v, topk)  # (B, P, D)
        return -self.proj_out(self.norm_out(h))[..., 0]  # (B, P)


class ShapeVAE(nn.Module):
    """The TripoSG VAE with the official parameter names (`encoder.*`, `decoder.*`, `quant`, `post_quant`)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = FrequencyEmbedding(cfg.embed_frequency, cfg.embed_include_pi)
        E = cfg.embed_dim
        feature_channels = 3  # normals
        self.encoder = ShapeEncoder(E + feature_channels, cfg.width_encoder, cfg.num_attention_heads,
                                    cfg.num_layers_encoder)
        self.decoder = ShapeDecoder(E, cfg.width_decoder, cfg.num_attention_heads, cfg.num_layers_decoder)
        self.quant = nn.Linear(cfg.width_encoder, 2 * cfg.latent_channels)
        self.post_quant = nn.Linear(cfg.latent_channels, cfg.width_decoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant.weight.device

    # -- decoder ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_trunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, T, C) -> kv tokens (B, T, width_decoder). Run once per latent set and reuse."""
        if latents.ndim != 3 or latents.shape[-1] != self.cfg.latent_channels:
            raise InputError(
                f"latents must be (B, T, {self.cfg.latent_channels}), got {tuple(latents.shape)}"
            )
        h = self.post_quant(latents.to(device=self.device, dtype=self.dtype))  # (B, T, D)
        return self.decoder.trunk(h)  # (B, T, D)

    @torch.no_grad()
    def query(
        self,
        kv: torch.Tensor,
        points: torch.Tensor,
        chunk: int = DEFAULT_QUERY_CHUNK,
        flash_first_call: bool = False,
    ) -> torch.Tensor:
        """Field at query points: kv (B, T, D) from `decode_trunk`, points (B, P, 3) -> (B, P).

        Positive inside, surface at 0; returned in the model's dtype. Points are cast to the model's
        dtype first, as the official decode does.

        flash_first_call=True reproduces the official quirk of the first decode after
        `set_flash_decoder()`: the first OFFICIAL_DECODE_CHUNK points attend only to the top-k keys
        (`flash_topk_count`) chosen per head by mean q.k over every 100th of those points; the rest
        use full attention. Off (default) = full attention everywhere, which is what the official
        code does on every later call (the processor resets itself after one call).
        """
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != kv.shape[0]:
            raise InputError(f"points must be (B={kv.shape[0]}, P, 3), got {tuple(points.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        k, v = self.decoder.blocks[-1].attn2.keys_values(kv)  # (B, H, T, hd), once for all chunks
        points = points.to(device=self.device, dtype=self.dtype)
        out = []
        start = 0
        if flash_first_call:
            first = points[:, :OFFICIAL_DECODE_CHUNK]  # (B, P1, 3)
            out.append(self.decoder.field(self.embedder(first), k, v, flash_topk_count(k.shape[2])))
            start = first.shape[1]
        for i in range(start, points.shape[1], chunk):
            out.append(self.decoder.field(self.embedder(points[:, i : i + chunk]), k, v))  # (B, chunk)
        return torch.cat(out, dim=1) if out else points.new_zeros(points.shape[:2])  # (B, P)

    def decode(self, latents: torch.Tensor, points: torch.Tensor, **query_args: Any) -> torch.Tensor:
        """Field of latents (B, T, C) at points (B, P, 3) -> (B, P): `decode_trunk` then `query`."""
        return self.query(self.decode_trunk(latents), points, **query_args)

    def field_fn(
        self,
        latents: torch.Tensor,
        chunk: int = DEFAULT_QUERY_CHUNK,
        flash_first_call: bool = False,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A `points (P, 3) -> field (P,)` function for one latent set (T, C) or (1, T, C).

        The trunk runs once here. With flash_first_call=True the first call of the returned function
        gets the official top-k quirk (as the first decode after `set_flash_decoder()` does); later
        calls use full attention.
        """
        if latents.ndim == 2:
            latents = latents[None]
        if latents.shape[0] != 1:
            raise InputError(f"field_fn takes one latent set, got a batch of {latents.shape[0]}")
        kv = self.decode_trunk(latents)  # (1, T, D)
        first = [flash_first_call]

        def field(points: torch.Tensor) -> torch.Tensor:
            flash, first[0] = first[0], False
            return self.query(kv, points.reshape(1, -1, 3), chunk=chunk, flash_first_call=flash)[0]  # (P,)

        return field

    # -- encoder ------------------------------------------------------------------------------

    def embed_points(self, points_normals: torch.Tensor) -> torch.Tensor:
        """(B, P, 6) xyz + normals -> (B, P, E + 3) [embed(xyz), normals]."""
        xyz, normals = points_normals[..., :3], points_normals[..., 3:]
        return torch.cat([self.embedder(xyz), normals], dim=-1)

    @torch.no_grad()
    def encode_with_queries(
        self, points_normals: torch.Tensor, query_points_normals: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of a cloud (B, P, 6) from given query points (B, T, 6) or (T, 6).

        Returns (mean, logvar), each (B, T, C), logvar clamped to [-30, 20]. The diffusion latent is
        the mean (no scaling factor).
        """
        x = points_normals.to(device=self.device, dtype=self.dtype)
        queries = query_points_normals.to(device=self.device, dtype=self.dtype)
        if queries.ndim == 2:
            queries = queries[None].expand(x.shape[0], -1, -1)
        if x.ndim != 3 or x.shape[-1] != 6 or queries.shape[-1] != 6 or queries.shape[0] != x.shape[0]:
            raise InputError(
                f"points must be (B, P, 6) and queries (B, T, 6), "
                f"got {tuple(x.shape)} and {tuple(queries.shape)}"
            )
        h = self.encoder(self.embed_points(queries), self.embed_points(x))  # (B, T, We)
        mean, logvar = self.quant(h).chunk(2, dim=-1)  # (B, T, C) each
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(
        self, points_normals: torch.Tensor, num_tokens: int, seed: int | None = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of a cloud (B, P, 6) with `num_tokens` query points picked as the official code does."""
        queries = select_query_points(points_normals, num_tokens, seed)  # (B, T, 6)
        return self.encode_with_queries(points_normals, queries)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ShapeVAE:
        """Load the official VAE from a TripoSG folder (uses its `vae/`) or from the vae folder itself."""
        folder = Path(folder)
        if (folder / "config.json").is_file() and (folder / DIFFUSERS_WEIGHTS).is_file():
            vae_dir = folder
        else:
            vae_dir = find_component(folder, "vae")
        cfg = VAEConfig.from_json(vae_dir / "config.json")
        weights_path = vae_dir / DIFFUSERS_WEIGHTS
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        state = heads_first_to_standard(load_tensors(weights_path), cfg.num_attention_heads)
        load_state_strict(model, state, weights_path)
        return fuse_projections(model.to(device=device, dtype=dtype).eval().requires_grad_(False))


# -- encoder query selection ----------------------------------------------------------------------


def random_subset_indices(num_points: int, num_tokens: int, seed: int | None) -> np.ndarray:
    """The official first step: `default_rng(seed).choice(P, 4T, replace=4T > P)` -> (4T,) int64."""
    rng = np.random.default_rng(seed)
    return rng.choice(num_points, 4 * num_tokens, replace=4 * num_tokens > num_points).astype(np.int64)


def farthest_point_sampling(xyz: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """Greedy farthest point sampling as torch_cluster's `fps(random_start=False)` does on the CPU.

    Start at `start`; then repeatedly take the point with the largest squared distance to the
    chosen set (the first such index on ties). xyz (N, 3) -> (count,) int64 indices into xyz.
    """
    n = xyz.shape[0]
    if not 0 < count <= n:
        raise InputError(f"cannot pick {count} of {n} points")
    chosen = torch.empty(count, dtype=torch.long, device=xyz.device)
    chosen[0] = start
    dist = (xyz - xyz[start]).pow(2).sum(-1)  # (N,) running min squared distance
    for i in range(1, count):
        nxt = dist.argmax()
        chosen[i] = nxt
        dist = torch.minimum(dist, (xyz - xyz[nxt]).pow(2).sum(-1))
    return chosen


def select_query_points(points_normals: torch.Tensor, num_tokens: int, seed: int | None = 0) -> torch.Tensor:
    """The official encoder queries: a seeded random subset of 4T points (the same for every batch
    element), then farthest point sampling (ratio 1/4, start at the subset's first point) per element.

    (B, P, 6) -> (B, T, 6).
    """
    if points_normals.ndim != 3 or points_normals.shape[-1] != 6:
        raise InputError(f"points must be (B, P, 6) xyz + normals, got {tuple(points_normals.shape)}")
    if num_tokens < 1:
        raise InputError(f"num_tokens must be positive, got {num_tokens}")
    subset_index = torch.from_numpy(random_subset_indices(points_normals.shape[1], num_tokens, seed))
    subset = points_normals[:, subset_index.to(points_normals.device)]  # (B, 4T, 6)
    count = math.ceil(subset.shape[1] / 4)
    picked = [s[farthest_point_sampling(s[:, :3], count)] for s in subset]  # B x (T, 6)
    return torch.stack(picked)  # (B, T, 6)
