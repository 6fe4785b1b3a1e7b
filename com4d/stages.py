"""The COM4D sampling algorithm: stage A (first-frame scene) and stage B (dynamic objects over time).

Pure tensor code: image tokens in, clean latents out. No files, no meshing. The pipeline
(`com4d.pipeline`) prepares the tokens and turns latents into meshes.

Stage A denoises S static latents and K dynamic latents of one frame jointly in a one-column grid.
Stage B walks the selected frames in autoregressive windows: each window's grid holds the clean
static latents (rows 0..S-1, repeated over the columns) and, per dynamic object, clean history
frames followed by the new frames being denoised (diffusion forcing at inference).

Reference §4.5 / §4.6; the official quirks reproduced here are listed in docs/algorithm.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from com4d.dit import CellContext, COM4DTransformer
from com4d.plan import Window
from com4d.scheduler import RectifiedFlowScheduler

# Called once per denoising step: (stage, window, step, steps).
StepCallback = Callable[[str, int, int, int], None]
# Called with every step's model outputs for tracing/testing: (stage, window, step, x_in, out_cond,
# out_uncond, first_row). The outputs cover the grid rows first_row.. of x_in (after the stage-B cutoff
# only the dynamic rows are computed); out_uncond is None when guidance <= 1 skips that pass.
TraceCallback = Callable[[str, int, int, torch.Tensor, torch.Tensor, torch.Tensor | None, int], None]


def _predict(
    model: COM4DTransformer,
    guidance: float,
    x: torch.Tensor,
    t: torch.Tensor,
    ctx_temporal: CellContext,
    ctx_spatial: CellContext,
    ctx_zero: CellContext,
    **grid,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conditional, unconditional) predictions of one step; guidance <= 1 skips the unconditional
    pass, as the official `do_classifier_free_guidance = guidance > 1`. With guidance, both branches
    run through `forward_grid_guided`, which computes what they share once (bit-identical)."""
    if guidance > 1.0:
        return model.forward_grid_guided(x, t, ctx_temporal, ctx_spatial, ctx_zero, **grid)
    return model.forward_grid(x, t, ctx_temporal, ctx_spatial, **grid), None


def _velocity(
    sched: RectifiedFlowScheduler, guidance: float, cond: torch.Tensor, uncond: torch.Tensor | None
) -> torch.Tensor:
    """The guided velocity; the conditional prediction alone when there is no unconditional one."""
    return cond if uncond is None else sched.guidance(uncond, cond, guidance)


@torch.no_grad()
def run_stage_a(
    model: COM4DTransformer,
    sched: RectifiedFlowScheduler,
    noise: torch.Tensor,
    static_rows: int,
    ctx_temporal: CellContext,
    ctx_spatial: CellContext,
    ctx_zero: CellContext,
    steps: int = 50,
    guidance: float = 7.0,
    full_image_from_step: int = 5,
    on_step: StepCallback | None = None,
    trace: TraceCallback | None = None,
) -> torch.Tensor:
    """Joint first-frame scene: (S+K, T, C) noise -> (S+K, T, C) clean latents.

    `ctx_temporal` gives statics the full frame and dynamic objects their masked image;
    `ctx_spatial` gives every row the full frame. The official pipeline uses the masked images in
    the spatial blocks too for the first `full_image_from_step` steps (hard-coded 5).
    """
    sigmas = sched.sigmas(steps)
    timesteps = sched.timesteps(steps)
    x = noise[:, None]  # (M, 1, T, C)
    for i in range(steps):
        spatial = ctx_spatial if i >= full_image_from_step else ctx_temporal
        t = timesteps[i : i + 1].to(x.device)
        cond, uncond = _predict(
            model, guidance, x, t, ctx_temporal, spatial, ctx_zero, static_rows=static_rows
        )  # (M, 1, T, C) each
        if trace is not None:
            trace("stage_a", 0, i, x, cond, uncond, 0)
        v = _velocity(sched, guidance, cond, uncond)
        x = sched.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        if on_step is not None:
            on_step("stage_a", 0, i, steps)
    return x[:, 0]


@dataclass
class StageBContexts:
    """Image tokens for stage B, one entry per selected frame.

    full: (F, Lc, Dc) tokens of the full frames; objects: (K, F, Lc, Dc) tokens of each dynamic
    object's masked frames. Windows pick their columns from these.
    """

    full: torch.Tensor
    objects: torch.Tensor


def window_contexts(
    tokens: StageBContexts, columns: list[int], static_rows: int
) -> tuple[CellContext, CellContext, CellContext]:
    """CellContexts (temporal, spatial-mixing, spatial-cutoff) for a window whose column c shows
    selected frame `columns[c]`. Static rows read the full frame; dynamic rows their masked image
    (temporal, cutoff) or the full frame (spatial while mixing)."""
    K = tokens.objects.shape[0]
    N = len(columns)
    full = tokens.full[columns]  # (N, Lc, Dc)
    objs = tokens.objects[:, columns].reshape(K * N, *tokens.full.shape[1:])  # (K*N, Lc, Dc)
    feats = torch.cat([full, objs])  # (N + K*N, Lc, Dc)
    rows = static_rows + K
    own = [c if r < static_rows else N + (r - static_rows) * N + c for r in range(rows) for c in range(N)]
    frame = [c for _ in range(rows) for c in range(N)]
    dev = feats.device
    temporal = CellContext(feats, torch.tensor(own, device=dev))
    spatial_mix = CellContext(feats, torch.tensor(frame, device=dev))
    return temporal, spatial_mix, temporal


@torch.no_grad()
def run_stage_b(
    model: COM4DTransformer,
    sched: RectifiedFlowScheduler,
    static_latents: torch.Tensor,
    initial_latents: torch.Tensor | None,
    noise: torch.Tensor,
    tokens: StageBContexts,
    zero_tokens: torch.Tensor,
    windows: list[Window],
    steps: int = 50,
    guidance: float = 7.0,
    mix_cutoff: int = 20,
    static_rows_after_cutoff: bool = False,
    on_step: StepCallback | None = None,
    on_frame: Callable[[int, torch.Tensor], None] | None = None,
    trace: TraceCallback | None = None,
) -> torch.Tensor:
    """Dynamic objects over the selected frames, window by window (`com4d.plan.plan_windows`).

    static_latents (S, T, C) come clean from stage A (S may be 0), initial_latents (K, T, C) too
    (None without a stage A; windows then have no initial-history column); noise (K, T, C) is every
    frame's starting noise (the same for all frames). Returns (K, F, T, C). `on_frame(f, latents
    (K, T, C))` is called as soon as frame f is final, so meshing can start (and free its memory)
    while later windows run.

    Official behaviour reproduced: every cell (clean static/history cells too) gets the same
    timestep; the first window's initial-history column is the stage-A latent with the image
    tokens of selected frame 0; after step `mix_cutoff` (strictly greater) the spatial blocks turn
    local and read the object-masked images.

    After the cutoff every block is local for the static rows, so they cannot change the dynamic
    rows, and only the dynamic rows are computed (the official code computes and discards them).
    `static_rows_after_cutoff=True` computes the whole grid anyway; it exists so that a test can
    show both give bitwise the same latents.
    """
    S = static_latents.shape[0]
    K, T, C = noise.shape
    F = tokens.full.shape[0]
    final = torch.empty(K, F, T, C, dtype=noise.dtype, device=noise.device)
    sigmas = sched.sigmas(steps)
    timesteps = sched.timesteps(steps)
    for w, win in enumerate(windows):
        if win.initial_history and initial_latents is None:
            raise ValueError("the window plan has a stage-A history column but there are no stage-A latents")
        columns = ([0] if win.initial_history else []) + win.history + win.new
        N = len(columns)
        ctx_t, ctx_mix, ctx_cut = window_contexts(tokens, columns, S)
        ctx_zero = CellContext.zeros((S + K) * N, *zero_tokens.shape[-2:], noise.device, zero_tokens.dtype)
        dyn_cells = torch.arange(S * N, (S + K) * N, device=noise.device)
        ctx_cut_dyn, ctx_zero_dyn = ctx_cut.subset(dyn_cells), ctx_zero.subset(dyn_cells)
        statics = static_latents[:, None].expand(S, N, T, C)  # (S, N, T, C)
        clean = [initial_latents[:, None]] if win.initial_history else []
        clean += [final[:, win.history]] if win.history else []
        context = torch.cat(clean, dim=1) if clean else noise.new_zeros(K, 0, T, C)  # (K, H, T, C)
        current = noise[:, None].expand(K, len(win.new), T, C).clone()  # (K, J, T, C)
        for i in range(steps):
            cutoff = i > mix_cutoff
            x = torch.cat([statics, torch.cat([context, current], dim=1)])  # (S+K, N, T, C)
            t = timesteps[i : i + 1].to(x.device)
            if cutoff and not static_rows_after_cutoff:
                first = S  # dynamic rows only, at their places in the whole grid
                cond, uncond = _predict(
                    model, guidance, x[S:], t, ctx_cut_dyn, ctx_cut_dyn, ctx_zero_dyn,
                    static_rows=S, cutoff=True, row_offset=S, total_rows=S + K,
                )  # (K, N, T, C) each
            else:
                first = 0
                cond, uncond = _predict(
                    model, guidance, x, t, ctx_t, ctx_cut if cutoff else ctx_mix, ctx_zero,
                    static_rows=S, cutoff=cutoff,
                )  # (S+K, N, T, C) each
            if trace is not None:
                trace("stage_b", w, i, x, cond, uncond, first)
            v = _velocity(sched, guidance, cond, uncond)[S - first :]  # (K, N, T, C)
            stepped = sched.euler_step(x[S:], v, float(sigmas[i]), float(sigmas[i + 1]))
            current = stepped[:, N - len(win.new) :]  # only the new columns are written back
            if on_step is not None:
                on_step("stage_b", w, i, steps)
        final[:, win.new] = current
        if on_frame is not None:
            for j, f in enumerate(win.new):
                on_frame(f, current[:, j])
    return final
