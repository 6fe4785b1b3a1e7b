"""Trace one denoising step (with guidance) and one dense VAE decode on PyTorch's meta device.

    python bench/trace_step.py                 # real sizes: DiTConfig.com4d(), VAEConfig.triposg(), fp16
    python bench/trace_step.py --json          # one JSON object keyed by step name
    python bench/trace_step.py --tiny --json   # small configs (the test uses these)

No GPU and no weights are needed: the models are built on the meta device (shapes only) and the
real code path runs under two interception modes. Steps:

* `stage_a`: the stage-A step, 4 static + 2 dynamic objects in one column, conditional and
  unconditional branch through `forward_grid_guided` (embeddings and block 0's self-attention
  computed once for both);
* `stage_b_mixing`: a stage-B window of 6 rows x 8 frames before the mixing cutoff, both branches;
* `stage_b_cutoff`: the same window after the cutoff, dynamic rows only (`forward_grid(...,
  row_offset=S, total_rows=S+K)`, as the pipeline runs it once static rows are skipped);
* `vae_dense_256`: the 256^3 dense pass of the mesh extraction (`meshing.dense_field` over the VAE's
  `field_fn`, trunk included).

How each number is obtained:

* `tflop_gemm`: every aten matrix product (`mm`, `addmm`, `bmm`, `baddbmm`) that reaches the
  dispatcher, 2 FLOP per multiply-add (M*N*K*2).
* `tflop_attention`: every attention call is intercepted *before* PyTorch decomposes it
  (`F.scaled_dot_product_attention` under a TorchFunctionMode) and counted as the fused kernel the
  GPU runs (flash / cuDNN / efficient): 4 * B * H * Lq * Lk * hd FLOP (QK^T and PV). Its output is
  laid out as those kernels write it (tokens, then heads), so the head merge after it is a view.
* `F.rms_norm` is intercepted the same way and counted as PyTorch's fused CUDA kernel
  (`aten::_fused_rms_norm`): one kernel reading x and the weight and writing the result (plus a
  copy when x is not contiguous). Everything else runs as the aten ops PyTorch dispatches.
* `non_gemm_gb`: bytes read + written by every other kernel. A kernel reads each input tensor's
  distinct elements once (a broadcast/expanded input counts its real extent, a gather counts the
  gathered elements) and writes its outputs. Attention counts its own q, k, v in and o out (what a
  fused kernel moves). GEMM operands are not counted here (they belong to the GEMMs). Views
  (view, reshape without copy, transpose, permute, expand, slice, ...) and allocations
  (`empty`) move nothing and are no kernel.
* `kernels`: the number of ops that would launch a kernel: GEMMs, attention calls and every
  non-view aten op.

Fusion by `torch.compile` is not modelled: this traces the eager path, op by op, as it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from com4d import meshing
from com4d.attention import fuse_projections
from com4d.dit import CellContext, COM4DTransformer, DiTConfig
from com4d.vae import ShapeVAE, VAEConfig

aten = torch.ops.aten

GEMM_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten.mm.out, aten.addmm.out, aten.bmm.out, aten.baddbmm.out}
ADD_GEMMS = {aten.addmm.default, aten.baddbmm.default, aten.addmm.out, aten.baddbmm.out}  # (c, a, b)
# Ops that return a view or allocate without writing: no kernel, no traffic.
FREE_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze.dims, aten.as_strided.default, aten.alias.default, aten.detach.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.lift_fresh.default, aten._reshape_alias.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.narrow.default, aten.view_as.default, aten.expand_as.default, aten.movedim.int,
    aten.diagonal.default, aten.new_empty.default, aten.new_empty_strided.default,
}
# Gathers read only the elements they return (plus the index).
GATHER_OPS = {aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.embedding.default}


def extent(t: torch.Tensor) -> int:
    """Distinct elements a kernel reads from t (stride-0 dims count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n if t.dim() else 1


def nbytes(t: torch.Tensor) -> int:
    return extent(t) * t.element_size()


def tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class Tally:
    def __init__(self) -> None:
        self.gemm_flop = 0
        self.attention_flop = 0
        self.bytes = 0
        self.kernels = 0
        self.by_op: Counter[str] = Counter()
        self.gb_by_op: Counter[str] = Counter()

    def as_dict(self) -> dict[str, float | int]:
        return {
            "tflop_gemm": self.gemm_flop / 1e12,
            "tflop_attention": self.attention_flop / 1e12,
            "non_gemm_gb": self.bytes / 1e9,
            "kernels": self.kernels,
        }


class FusedCounter(TorchFunctionMode):
    """Counts the calls that are one fused kernel on a GPU before PyTorch decomposes them on meta.

    * `F.scaled_dot_product_attention`: flash / cuDNN / efficient attention. Returns an empty
      output laid out as those kernels write it, (..., Lq, H, hd) in memory, viewed as (..., H, Lq, hd).
    * `F.rms_norm`: PyTorch's fused CUDA RMS-norm kernel (`aten::_fused_rms_norm`, float32 math).
      A non-contiguous input is counted as copied first.
    """

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tally = self.tally
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            *batch, lq, hd = q.shape
            lk, hv = k.shape[-2], v.shape[-1]
            n = 1
            for b in batch:
                n *= b
            tally.attention_flop += 2 * n * lq * lk * (hd + hv)
            out = torch.empty(*batch[:-1], lq, batch[-1], hv, dtype=q.dtype, device=q.device).transpose(-2, -3)
            tally.bytes += sum(nbytes(t) for t in (q, k, v)) + nbytes(out)
            tally.kernels += 1
            tally.by_op["attention"] += 1
            return out
        if func is F.rms_norm:
            x, weight = args[0], args[2] if len(args) > 2 else kwargs.get("weight")
            if not x.is_contiguous():
                tally.bytes += 2 * nbytes(x)
                tally.kernels += 1
                tally.by_op["rms_norm_input_copy"] += 1
            tally.bytes += 2 * nbytes(x) + (0 if weight is None else nbytes(weight))
            tally.kernels += 1
            tally.by_op["rms_norm"] += 1
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """GEMM FLOPs, non-GEMM bytes and kernel launches of every aten op."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func in FREE_OPS:
            return out
        tally = self.tally
        tally.kernels += 1
        tally.by_op[str(packet)] += 1
        if func in GEMM_OPS:
            a, b = (args[1], args[2]) if func in ADD_GEMMS else args[:2]
            batch = a.shape[0] if a.dim() == 3 else 1
            tally.gemm_flop += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            if func in ADD_GEMMS:  # the bias (or accumulated matrix) read
                tally.bytes += nbytes(args[0])
            return out
        outs = tensors(out)
        ins = tensors((args, kwargs))
        if func in GATHER_OPS:
            src, *index = ins
            read = sum(nbytes(o) for o in outs) + sum(nbytes(i) for i in index)
        elif func in (aten.index_put_.default, aten.index_put.default):
            dst, *rest = ins
            outs = []  # written = the values read in
            read = 2 * sum(nbytes(t) for t in rest)
        else:
            read = sum(nbytes(t) for t in ins)
        moved = read + sum(nbytes(o) for o in outs)
        tally.bytes += moved
        tally.gb_by_op[str(packet)] += moved / 1e9
        return out


def trace(fn) -> Tally:
    tally = Tally()
    with torch.no_grad(), FusedCounter(tally), OpCounter(tally):
        fn()
    return tally


def tiny_configs() -> tuple[DiTConfig, VAEConfig, dict]:
    dit = DiTConfig(width=64, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32,
                    part_rows=8, frame_rows=16, static_embedding=True, dynamic_embedding=True,
                    spatial_block_ids=[0, 2, 4], temporal_block_ids=[0, 1, 3, 5])
    vae = VAEConfig(latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=32,
                    num_layers_encoder=2, num_layers_decoder=3)
    return dit, vae, {"tokens": 16, "ctx_tokens": 10, "grid": 16}


def real_configs(tokens: int) -> tuple[DiTConfig, VAEConfig, dict]:
    return DiTConfig.com4d(), VAEConfig.triposg(), {"tokens": tokens, "ctx_tokens": 1370, "grid": 256}


def grid_contexts(features: torch.Tensor, static_rows: int, rows: int, cols: int) -> tuple[CellContext, ...]:
    """The contexts `stages.window_contexts` builds (temporal, spatial mixing), index kept on the CPU.

    features: (cols + (rows - static_rows) * cols, Lc, Dc): the full frames then each dynamic object's
    masked frames. Static rows read the full frame; dynamic rows their own masked frame (temporal)
    or the full frame (spatial while mixing).
    """
    own = [c if r < static_rows else cols + (r - static_rows) * cols + c for r in range(rows) for c in range(cols)]
    frame = [c for _ in range(rows) for c in range(cols)]
    return CellContext(features, torch.tensor(own)), CellContext(features, torch.tensor(frame))


def step_fns(dcfg: DiTConfig, vcfg: VAEConfig, sizes: dict, dtype: torch.dtype) -> dict:
    meta = torch.device("meta")
    with torch.device(meta):
        model = fuse_projections(COM4DTransformer(dcfg).to(dtype).eval())
        vae = fuse_projections(ShapeVAE(vcfg).to(dtype).eval())
    T, C, Lc, Dc = sizes["tokens"], dcfg.in_channels, sizes["ctx_tokens"], dcfg.cross_attention_dim
    S, K = 4, 2

    def guided(M: int, N: int, static_rows: int, cutoff: bool, row_offset: int = 0) -> None:
        rows = M - row_offset
        x = torch.empty(rows, N, T, C, device=meta, dtype=dtype)
        feats = torch.empty(N + K * N, Lc, Dc, device=meta, dtype=dtype)
        ctx_t, ctx_mix = grid_contexts(feats, static_rows, M, N)
        cells = torch.arange(row_offset * N, M * N)
        ctx_t, ctx_mix = ctx_t.subset(cells), ctx_mix.subset(cells)
        ctx_zero = CellContext.zeros(rows * N, Lc, Dc, meta, dtype)
        spatial = ctx_t if cutoff else ctx_mix
        extra = {"row_offset": row_offset, "total_rows": M} if row_offset else {}
        model.forward_grid_guided(x, 500.0, ctx_t, spatial, ctx_zero, static_rows, cutoff, **extra)

    def dense() -> None:
        latents = torch.empty(1, T, vcfg.latent_channels, device=meta, dtype=dtype)
        meshing.dense_field(vae.field_fn(latents), sizes["grid"], device=meta)

    return {
        "stage_a": lambda: guided(S + K, 1, S, False),
        "stage_b_mixing": lambda: guided(S + K, 8, S, False),
        "stage_b_cutoff": lambda: guided(S + K, 8, S, True, row_offset=S),
        f"vae_dense_{sizes['grid']}": dense,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small configs (fast; for tests)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by step name")
    p.add_argument("--by-op", action="store_true", help="also print the kernel count per aten op")
    args = p.parse_args(argv)
    dcfg, vcfg, sizes = tiny_configs() if args.tiny else real_configs(args.tokens)
    results = {}
    for name, fn in step_fns(dcfg, vcfg, sizes, getattr(torch, args.dtype)).items():
        tally = trace(fn)
        results[name] = tally.as_dict()
        if args.by_op:
            print(name, "kernels", dict(tally.by_op.most_common()), file=sys.stderr)
            print(name, "GB", {k: round(v, 1) for k, v in tally.gb_by_op.most_common()}, file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    else:
        for name, r in results.items():
            print(f"{name:16s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
