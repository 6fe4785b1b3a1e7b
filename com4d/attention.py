"""Attention, norms and feed-forward shared by the DiT and the shape VAE, and the one attention seam.

Module and parameter names follow the official checkpoints (`to_q`, `to_out.0`, `norm_q`,
`norm_cross`, `ff.net.0.proj`, ...) so that state dicts load without renaming. The q/k/v weights
must have been permuted into the standard per-head layout first (`weights.heads_first_to_standard`).

Every attention call of the DiT and the VAE goes through `sdpa` with a named backend:

* `auto` — PyTorch's own choice (`F.scaled_dot_product_attention` unrestricted, the default);
* `cudnn`, `flash`, `efficient` — that fused kernel only (an error if it cannot run the call);
* `math` — PyTorch's unfused reference implementation.

Select one for a region with `with use_backend("flash"): ...`, or per call with `backend=`.
`record_kernels()` records which kernel each attention shape runs (what `auto` picks on a GPU).

Self-attention can run *grouped*: groups of consecutive cells (latent sets) attend jointly, given
as `routing.Segment`s. A group is a view of the cell batch (no gather): the cells must already be
laid out so that each group is contiguous (see `com4d.routing`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from com4d.routing import Segment

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_NAMES = {int(v): k for k, v in _KERNELS.items()}
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("com4d_attention_backend", default="auto")
_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("com4d_attention_record", default=None)
_available: dict[tuple[str, str, torch.dtype], bool] = {}


class BackendUnavailable(RuntimeError):
    """The named attention backend cannot run here (the message lists those that can)."""


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends that run a small attention call on `device` in `dtype` (tried once, cached)."""
    device = torch.device(device)
    names = []
    for name in BACKENDS:
        key = (device.type, name, dtype)
        if key not in _available:
            q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
            try:
                with _kernel_scope(name):
                    F.scaled_dot_product_attention(q, q, q)
                _available[key] = True
            except RuntimeError:
                _available[key] = False
        if _available[key]:
            names.append(name)
    return names


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every attention call inside the block with backend `name` (see the module docstring)."""
    token = _backend.set(check_backend(name))
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def _kernel_scope(name: str):
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([_KERNELS[name]])


def kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel PyTorch's automatic choice runs for these inputs: cudnn, flash, efficient or math."""
    return _NAMES.get(int(torch._fused_sdp_choice(q, k, v)), "math")


@contextlib.contextmanager
def record_kernels() -> Iterator[list[dict]]:
    """Record every attention call in the block: shapes, dtype, backend asked for and kernel run.

    The kernel is the named backend, or for `auto` what PyTorch's dispatcher picks (`kernel_for`).
    """
    calls: list[dict] = []
    token = _recorder.set(calls)
    try:
        yield calls
    finally:
        _recorder.reset(token)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Attention (..., Lq, hd) x (..., Lk, hd) -> (..., Lq, hd) with the selected backend."""
    name = check_backend(backend) if backend is not None else _backend.get()
    calls = _recorder.get()
    if calls is not None:
        kernel = kernel_for(q, k, v) if name == "auto" else name
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "dtype": str(q.dtype).removeprefix("torch."),
                      "backend": name, "kernel": kernel})
    try:
        with _kernel_scope(name):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as err:
        if name == "auto" or "No viable backend" not in str(err) and "No available kernel" not in str(err):
            raise
        usable = available_backends(q.device, q.dtype)
        raise BackendUnavailable(
            f"attention backend {name!r} cannot run {tuple(q.shape)} {q.dtype} on {q.device.type}; "
            f"available there: {', '.join(usable)}"
        ) from err


class FP32AccLayerNorm(nn.LayerNorm):
    """LayerNorm accumulated in float32, stored in the input's dtype.

    The official blocks cast to float32, normalise and cast back; PyTorch's kernel already
    accumulates half inputs in float32 and rounds once on output, so the casts (two extra passes
    over the tensor) are left out. In float32 it is the same computation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """Per-head RMS norm of q or k: x * rsqrt(mean(x^2) + eps) * w, accumulated in float32.

    `F.rms_norm` (one fused kernel on CUDA) computes in float32 and rounds once; the official code
    rounds to half after the rsqrt and again after the weight. Same in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[Segment] | None
) -> list[tuple[slice, torch.Tensor]]:
    """Self-attention over cells, groups of consecutive cells attending jointly; no gathers.

    q, k, v: (B, L, H, hd) views of the projections (token-major). Each segment's cells form
    `groups` groups of `size` consecutive cells, attending as one sequence of size*L tokens.
    None: every cell alone. Returns [(cells, output (n, L, H*hd))] per segment, token-major.
    """
    B, L, H, hd = q.shape
    if segments is None:
        segments = [Segment(0, B, 1)]
    parts = []
    for s in segments:
        part = slice(s.start, s.start + s.cells)
        qg, kg, vg = (t[part].reshape(s.groups, s.size * L, H, hd).transpose(1, 2) for t in (q, k, v))
        o = sdpa(qg, kg, vg)  # (G, H, n*L, hd)
        parts.append((part, o.transpose(1, 2).reshape(s.cells, L, H * hd)))  # a view after flash/cuDNN
    return parts


def project_parts(linear: nn.Linear, parts: list[tuple[slice, torch.Tensor]], cells: int) -> torch.Tensor:
    """`linear` over each (cells, x (n, L, Din)) part, written straight into one (cells, L, Dout) result."""
    if len(parts) == 1 and parts[0][1].shape[0] == cells:
        return linear(parts[0][1])
    first = parts[0][1]
    out = first.new_empty(cells, first.shape[1], linear.out_features)
    for part, x in parts:
        if torch.is_grad_enabled() or linear.bias is None:
            out[part] = linear(x)
        else:  # the GEMM writes its rows of the result (no copy)
            torch.addmm(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(),
                        out=out[part].view(-1, linear.out_features))
    return out


class Attention(nn.Module):
    """Multi-head attention with the official parameter names.

    `context_dim=None` gives self-attention (to_k/to_v read the same tokens as to_q). `qk_norm`
    adds per-head RMS norms (DiT); `context_norm` adds a LayerNorm on the context (`norm_cross`,
    VAE cross-attention). After `fuse_projections()` the projections that read the same tokens
    (q/k/v, or k/v of a context) run as one GEMM.
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
        self.is_self = context_dim is None
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
        self._fused: torch.Tensor | None = None

    def fuse_projections(self) -> None:
        """Stack q/k/v (self-attention) or k/v (cross) into one (n, D, Din) weight, the parameters
        becoming views of it, so that they run as one batched GEMM whose n outputs are each
        contiguous (the RMS norms then read them without a copy).

        Parameter names and values are unchanged (state dicts still have to_q/to_k/to_v). Call it
        after the last `.to()`: moving the module afterwards unfuses it (it still computes the same).
        """
        parts = [self.to_q, self.to_k, self.to_v] if self.is_self else [self.to_k, self.to_v]
        fused = torch.stack([p.weight.detach() for p in parts])  # (n, D, Din)
        for i, p in enumerate(parts):
            p.weight = nn.Parameter(fused[i], requires_grad=p.weight.requires_grad)
        self._fused = fused

    def _project(self, x: torch.Tensor, parts: list[nn.Linear]) -> list[torch.Tensor]:
        """x (B, L, Din) through bias-free projections -> n x (B, L, D); one GEMM when fused."""
        f = self._fused
        if f is None or parts[0].weight.data_ptr() != f.data_ptr():
            return [p(x) for p in parts]
        B, L, Din = x.shape
        flat = x.reshape(1, B * L, Din).expand(f.shape[0], B * L, Din)  # the same rows for every weight
        out = torch.bmm(flat, f.transpose(1, 2))  # (n, B*L, D)
        return list(out.view(f.shape[0], B, L, f.shape[1]).unbind(0))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> q (B, L, H, hd), normed."""
        B, L, _ = x.shape
        q = self.to_q(x).view(B, L, self.heads, self.head_dim)
        return self.norm_q(q) if hasattr(self, "norm_q") else q

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention projections (B, L, D) -> q, k, v (B, L, H, hd), q and k normed."""
        B, L, _ = x.shape
        projected = self._project(x, [self.to_q, self.to_k, self.to_v])
        q, k, v = (t.view(B, L, self.heads, self.head_dim) for t in projected)
        if hasattr(self, "norm_q"):
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of context tokens (B, Lc, Dc) -> two (B, H, Lc, hd); computed once per context."""
        if hasattr(self, "norm_cross"):
            context = self.norm_cross(context)
        B, Lc, _ = context.shape
        k, v = (t.view(B, Lc, self.heads, self.head_dim) for t in self._project(context, [self.to_k, self.to_v]))
        if hasattr(self, "norm_k"):
            k = self.norm_k(k)  # normed while contiguous
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, H, Lc, hd)

    def forward(self, x: torch.Tensor, segments: Sequence[Segment] | None = None) -> torch.Tensor:
        """Self-attention x (B, L, D) -> (B, L, D), grouped by `segments` (None: every cell alone)."""
        q, k, v = self.project_qkv(x)  # (B, L, H, hd) each
        return project_parts(self.to_out[0], grouped_sdpa(q, k, v, segments), x.shape[0])  # (B, L, D)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention of x (B, L, D) to precomputed k, v (B, H, Lc, hd) -> (B, L, D)."""
        q = self.query(x).transpose(1, 2)  # (B, H, L, hd)
        B, H, L, hd = q.shape
        return self.to_out[0](sdpa(q, k, v).transpose(1, 2).reshape(B, L, H * hd))  # (B, L, D)


def fuse_projections(module: nn.Module) -> nn.Module:
    """`Attention.fuse_projections` on every attention layer of `module` (after its last `.to()`)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fuse_projections()
    return module
