"""The COM4D reconstruction: frames + masks (or a video + prompts) -> a 4D scene of meshes.

`COM4DPipeline` composes the parts — DINOv2 conditioning, the DiT, the flow scheduler, the stage-A/B
sampler (`com4d.stages`), the VAE and meshing — and streams results: every mesh is extracted and
written as soon as its latent is final, its field freed, and an event reported.

    pipe = COM4DPipeline.from_pretrained("weights/", device="cuda")
    pipe.reconstruct(ReconstructionRequest(frames_dir="clip/"), ReconstructionParams(), "out/")
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from com4d import conditioning, stages
from com4d.conditioning import ImageEncoder
from com4d.dit import CellContext, COM4DTransformer
from com4d.errors import COM4DError, InputError, OutOfMemory, ParameterError, WeightsError
from com4d.events import (
    CancelToken,
    Done,
    EventCallback,
    MeshReady,
    Progress,
    TrackedMeshReady,
    ignore_events,
)
from com4d.events import Warning as WarningEvent
from com4d.inputs import SceneInputs, load_inputs
from com4d.mesher import Mesher
from com4d.params import ReconstructionParams
from com4d.scene import SceneWriter, unique_names
from com4d.scheduler import RectifiedFlowScheduler
from com4d.vae import ShapeVAE
from com4d.weights import resolve_weights_root

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ReconstructionRequest:
    """What to reconstruct: an official input folder, or a video/frames folder plus prompts or masks.

    frames_dir: a folder with `masks/` (and `frames/` unless `video` is given).
    video: a video file or frames folder; with `prompts` (prompts.json object, needs a SAM
    checkpoint) or with `frames_dir` holding the masks.
    """

    frames_dir: Path | None = None
    video: Path | None = None
    prompts: dict[str, Any] | None = None


@dataclass
class SceneResult:
    scene_path: Path
    out_dir: Path
    frames: list[int]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Latents:
    """Clean latents of a run: statics (S, T, C), stage-A dynamics (K, T, C), stage B (K, F, T, C)."""

    static: torch.Tensor
    dynamic_stage_a: torch.Tensor
    dynamic: torch.Tensor


@dataclass
class Selection:
    """Which frames a run uses: indices into the input's frame list."""

    frames: list[int]
    stage_a: int


def select_frames(inputs: SceneInputs, params: ReconstructionParams) -> Selection:
    n = len(inputs.frames)
    chosen = list(range(n))[params.frame_start : params.frame_end : params.frame_stride]
    if not chosen:
        raise InputError(
            f"the frame range start={params.frame_start} end={params.frame_end} stride={params.frame_stride} "
            f"selects no frame of the {n} available"
        )
    stage_a = params.frame_start if params.stage_a_frame is None else params.stage_a_frame
    if not 0 <= stage_a < n:
        raise InputError(f"stage_a_frame {stage_a} is outside the {n} available frames")
    return Selection(frames=chosen, stage_a=stage_a)


def default_noise(
    static: int, dynamic: int, tokens: int, channels: int, seed: int
) -> dict[str, torch.Tensor]:
    """The official draws, in the official order, from a CPU generator (same on every device)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return {
        "stage_a_static": torch.randn(static, tokens, channels, generator=g),
        "stage_a_dynamic": torch.randn(dynamic, tokens, channels, generator=g),
        "stage_b_dynamic": torch.randn(dynamic, tokens, channels, generator=g),
    }


class COM4DPipeline:
    """The models of one weights folder, loaded once, and the reconstruction algorithm."""

    def __init__(
        self,
        transformer: COM4DTransformer,
        vae: ShapeVAE,
        image_encoder: ImageEncoder,
        scheduler: RectifiedFlowScheduler,
        sam_checkpoint: Path | None = None,
        weights_dir: Path | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.image_encoder = image_encoder
        self.scheduler = scheduler
        self.sam_checkpoint = sam_checkpoint
        self.weights_dir = weights_dir

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_in.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        sam_checkpoint: str | Path | None = None,
    ) -> COM4DPipeline:
        """Load `weights_dir/TripoSG` (VAE, DINOv2, scheduler) and `weights_dir/COM4D` (transformer)."""
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ParameterError("device 'cuda' was asked for but no CUDA GPU is available")
        triposg, transformer_dir = resolve_weights_root(Path(weights_dir))
        transformer = COM4DTransformer.from_pretrained(transformer_dir, device=device, dtype=dtype)
        if not transformer.cfg.has_tables:
            raise WeightsError(
                f"{transformer_dir} is a plain TripoSG transformer without COM4D's tables; "
                "download INSAIT-Institute/COM4D into the COM4D/ folder"
            )
        vae = ShapeVAE.from_pretrained(triposg, device=device, dtype=dtype)
        encoder = ImageEncoder.from_pretrained(triposg, device=device, dtype=dtype)
        scheduler = RectifiedFlowScheduler.from_pretrained(triposg)
        if sam_checkpoint is not None and not Path(sam_checkpoint).is_file():
            raise WeightsError(f"SAM checkpoint {sam_checkpoint} does not exist")
        return cls(
            transformer,
            vae,
            encoder,
            scheduler,
            Path(sam_checkpoint) if sam_checkpoint else None,
            Path(weights_dir),
        )

    def describe(self) -> dict[str, Any]:
        """What the backend's hello reply reports about the model."""
        cfg = self.transformer.cfg
        info: dict[str, Any] = {
            "model": "COM4D",
            "weights": str(self.weights_dir) if self.weights_dir else None,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "width": cfg.width,
            "layers": cfg.num_layers,
            "max_objects": cfg.part_rows,
            "max_window_frames": cfg.frame_rows,
            "segmentation": self.sam_checkpoint is not None,
        }
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            info["gpu_memory_free"] = int(free)
            info["gpu_memory_total"] = int(total)
            info["gpu_name"] = torch.cuda.get_device_name(self.device)
        return info

    # -- memory -----------------------------------------------------------------------------------

    def estimate_memory(self, num_objects: int, params: ReconstructionParams) -> int:
        """Rough peak bytes of activations for the largest window (weights excluded).

        The biggest live tensors are the DiT's hidden states and skip stack for every cell of a
        window (two guidance branches run one after the other) and the dense meshing grid.
        """
        cells = num_objects * (params.dynamic_max_memory_frames + 1)
        tokens = params.num_tokens + 1
        elt = torch.finfo(self.dtype).bits // 8
        width = self.transformer.cfg.width
        hidden = cells * tokens * width * elt
        dit = hidden * (self.transformer.cfg.num_layers // 2 + 6)  # skip stack + working set + FF
        grid = (2**params.mesh_dense_depth) ** 3 * 4 * 3
        return int(dit + grid)

    def check_memory(self, num_objects: int, params: ReconstructionParams) -> None:
        need = self.estimate_memory(num_objects, params)
        budget = params.memory_budget
        if budget is None and self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0])
        if budget is not None and need > budget:
            raise OutOfMemory(
                f"this job needs about {need / 2**30:.1f} GiB but only {budget / 2**30:.1f} GiB are "
                "available; "
                "use fewer tokens (num_tokens), fewer objects or a smaller window (dynamic_max_memory_frames)"
            )

    # -- the algorithm ----------------------------------------------------------------------------

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.image_encoder.encode(images).to(self.dtype)  # (B, Lc, Dc)

    def conditioning_images(
        self, inputs: SceneInputs, params: ReconstructionParams, indices: list[int]
    ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """Full frames and per-object masked frames at the conditioning size, for frame indices."""
        source = inputs.frames_no_bg if (params.use_frames_no_bg and inputs.frames_no_bg) else inputs.frames
        size = params.image_size
        full = [conditioning.resize_frame(source[i], size) for i in indices]
        objects = []
        for obj in inputs.dynamic:
            masked = []
            for j, i in enumerate(indices):
                mask = conditioning.resize_mask(obj.masks[i].astype(np.uint8) * 255, size)
                masked.append(conditioning.mask_onto_white(full[j], mask))
            objects.append(masked)
        return full, objects

    def sample(
        self,
        inputs: SceneInputs,
        params: ReconstructionParams,
        noise: dict[str, torch.Tensor] | None = None,
        on_step: stages.StepCallback | None = None,
        on_stage_a: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        on_frame: Callable[[int, torch.Tensor], None] | None = None,
        trace: stages.TraceCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> Latents:
        """Stage A then stage B; returns all clean latents (the meshing-free core of the method).

        `noise` overrides the random draws (keys of `default_noise`), e.g. to reproduce recorded
        official noise. `on_stage_a(static, dynamic)` and `on_frame(f, latents)` fire as soon as
        latents are final.
        """
        sel = select_frames(inputs, params)
        S = self.scene_parts(inputs, params)
        K = len(inputs.dynamic)
        C = self.transformer.cfg.in_channels
        self.image_encoder.size = params.image_size
        T = params.num_tokens
        if S + K > self.transformer.cfg.part_rows:
            raise ParameterError(
                f"{S} static parts + {K} dynamic objects exceed the "
                f"model's {self.transformer.cfg.part_rows} objects"
            )
        columns = min(params.dynamic_max_memory_frames, len(sel.frames)) + 1
        if columns > self.transformer.cfg.frame_rows:
            raise ParameterError(
                f"a window of {columns} frames exceeds the model's {self.transformer.cfg.frame_rows}; "
                "lower dynamic_max_memory_frames"
            )
        noise = noise or default_noise(S, K, T, C, params.seed)
        for key, shape in (
            ("stage_a_static", (S, T, C)),
            ("stage_a_dynamic", (K, T, C)),
            ("stage_b_dynamic", (K, T, C)),
        ):
            if tuple(noise[key].shape) != shape:
                raise ParameterError(f"noise[{key!r}] must have shape {shape}, got {tuple(noise[key].shape)}")
        dev, dt = self.device, self.dtype

        def step_hook(stage: str, window: int, step: int, steps: int) -> None:
            if cancel is not None:
                cancel.raise_if_cancelled()
            if on_step is not None:
                on_step(stage, window, step, steps)

        # Stage A: the scene at one frame (statics: full image; dynamics: their masked image).
        full_a, objects_a = self.conditioning_images(inputs, params, [sel.stage_a])
        tokens_a = self.encode_images(full_a + [o[0] for o in objects_a])  # (1 + K, Lc, Dc)
        index_t = torch.tensor([0] * S + list(range(1, K + 1)), device=dev)
        ctx_t = CellContext(tokens_a, index_t)
        ctx_s = CellContext(tokens_a, torch.zeros(S + K, dtype=torch.long, device=dev))
        ctx_0 = CellContext.zeros(S + K, *tokens_a.shape[-2:], dev, tokens_a.dtype)
        x0 = torch.cat([noise["stage_a_static"], noise["stage_a_dynamic"]]).to(dev, dt)
        clean_a = stages.run_stage_a(
            self.transformer,
            self.scheduler,
            x0,
            S,
            ctx_t,
            ctx_s,
            ctx_0,
            steps=params.scene_steps,
            guidance=params.scene_guidance,
            full_image_from_step=params.scene_full_image_from_step,
            on_step=step_hook,
            trace=trace,
        )
        static, dyn_a = clean_a[:S], clean_a[S:]
        del ctx_t, ctx_s, ctx_0, tokens_a
        if on_stage_a is not None:
            on_stage_a(static, dyn_a)
        if K == 0:
            return Latents(static, dyn_a, dyn_a.new_zeros(0, len(sel.frames), T, C))

        # Stage B: every selected frame's full image and object images.
        full_b, objects_b = self.conditioning_images(inputs, params, sel.frames)
        F = len(sel.frames)
        tokens_full = self.encode_images(full_b)  # (F, Lc, Dc)
        tokens_obj = torch.stack([self.encode_images(o) for o in objects_b])  # (K, F, Lc, Dc)
        tokens = stages.StageBContexts(full=tokens_full, objects=tokens_obj)
        dyn = stages.run_stage_b(
            self.transformer,
            self.scheduler,
            static,
            dyn_a,
            noise["stage_b_dynamic"].to(dev, dt),
            tokens,
            torch.zeros_like(tokens_full[:1]),
            block_size=params.dynamic_ar_block_size,
            max_memory=params.dynamic_max_memory_frames,
            steps=params.dynamic_steps,
            guidance=params.dynamic_guidance,
            mix_cutoff=params.dynamic_mix_cutoff,
            on_step=step_hook,
            on_frame=on_frame,
            trace=trace,
        )
        assert dyn.shape[1] == F
        return Latents(static, dyn_a, dyn)

    @staticmethod
    def scene_parts(inputs: SceneInputs, params: ReconstructionParams) -> int:
        if params.scene_num_parts is not None:
            return params.scene_num_parts
        return max(1, len(inputs.static_names))

    # -- the whole job ----------------------------------------------------------------------------

    def prepare_inputs(
        self,
        request: ReconstructionRequest,
        params: ReconstructionParams,
        out_dir: Path,
        on_event: EventCallback,
        cancel: CancelToken | None,
    ) -> tuple[SceneInputs, ReconstructionParams]:
        """Inputs of a request, segmenting first when it has prompts.

        Segmentation reads only the selected frames (params' start/end/stride, as source frame
        numbers); the returned params then select all of them.
        """
        if request.prompts is None:
            if request.frames_dir is None:
                raise InputError("nothing to reconstruct: give an input folder with masks/, or a video with prompts")
            return load_inputs(request.frames_dir, video=request.video), params
        if self.sam_checkpoint is None:
            raise ParameterError("prompts need a SAM checkpoint (--sam); or give masks instead")
        if request.video is None:
            raise InputError("prompts need a video (or frames folder) to segment")
        from com4d.segment import segment_clip_to_folder

        seg = segment_clip_to_folder(
            request.video, request.prompts, self.sam_checkpoint, out_dir / "segmentation",
            on_event=on_event, cancel=cancel, device=str(self.device),
            start=params.frame_start, end=params.frame_end, stride=params.frame_stride,
            on_lost="warn" if params.allow_lost else "error",
        )
        inputs = load_inputs(seg.out_dir)
        inputs.source = str(request.video)
        stage_a = params.frame_start if params.stage_a_frame is None else params.stage_a_frame
        if stage_a not in inputs.frame_numbers:
            raise ParameterError(
                f"stage_a_frame {stage_a} is not among the segmented frames {inputs.frame_numbers[:6]}...; "
                "pick one of the selected frames"
            )
        selected = dataclasses.replace(
            params, frame_start=0, frame_end=None, frame_stride=1, stage_a_frame=inputs.frame_numbers.index(stage_a)
        )
        return inputs, selected

    def reconstruct(
        self,
        request: ReconstructionRequest | SceneInputs,
        params: ReconstructionParams | None = None,
        out_dir: str | Path = "com4d_out",
        on_event: EventCallback = ignore_events,
        cancel: CancelToken | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> SceneResult:
        """Run a whole job, writing `out_dir` (docs/contracts.md) and reporting events as it goes."""
        params = params or ReconstructionParams()
        params.validate()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        on_event(Progress(stage="load", message="reading inputs"))
        if isinstance(request, SceneInputs):
            inputs = request
        else:
            inputs, params = self.prepare_inputs(request, params, out, on_event, cancel)
        sel = select_frames(inputs, params)
        S = self.scene_parts(inputs, params)
        K = len(inputs.dynamic)
        self.check_memory(S + K, params)
        windows = (
            stages.plan_windows(
                len(sel.frames), params.dynamic_ar_block_size, params.dynamic_max_memory_frames
            )
            if K
            else []
        )
        total = params.scene_steps + len(windows) * params.dynamic_steps + S + K + K * len(sel.frames)
        done = [0]
        static_names = (
            inputs.static_names + [f"static_{i:03d}" for i in range(len(inputs.static_names), S)]
        )[:S]
        names = unique_names(static_names + [o.name for o in inputs.dynamic])
        frame_numbers = [inputs.frame_numbers[i] for i in sel.frames]
        w, h = inputs.size
        writer = SceneWriter(
            out,
            names[:S],
            names[S:],
            frame_numbers,
            inputs.frame_numbers[sel.stage_a],
            source={"input": inputs.source, "width": w, "height": h, "fps": inputs.fps},
            params=params.to_dict(),
        )
        trackers: dict[int, Any] = {}  # dynamic object -> tracking.SequenceTracker (topology="tracked")
        timings = {"meshing": 0.0}

        def tick(n: int = 1) -> int:
            done[0] += n
            return done[0]

        def on_step(stage: str, window: int, step: int, steps: int) -> None:
            mesher.poll()  # meshes whose marching cubes finished in the background
            on_event(
                Progress(
                    stage=stage,
                    step=step + 1,
                    steps=steps,
                    window=window + 1,
                    windows=max(1, len(windows)) if stage == "stage_b" else 1,
                    done=tick(),
                    total=total,
                )
            )

        def finish_mesh(payload: tuple, verts: np.ndarray, faces: np.ndarray) -> None:
            """A finished mesh: file, manifest, tracking, events (on this thread, in order)."""
            role, index, frame_index, field_fn = payload
            name = names[index] if role == "static" else names[S + index]
            if role == "static":
                frame = inputs.frame_numbers[sel.stage_a]
                rel = writer.add_static(index, verts, faces)
            else:
                frame = frame_numbers[frame_index]
                rel = writer.add_dynamic_frame(index, frame, verts, faces)
                if params.topology == "tracked":
                    self._track_frame(trackers, index, frame, field_fn, verts, faces, params, on_event,
                                      self.vae.device)
            if len(faces) == 0:
                on_event(WarningEvent(code="empty_mesh", message=f"{name}: the field has no surface at frame {frame}",
                                      frames=[frame]))
            on_event(MeshReady(name=name, role=role, object_index=index, frame=frame, frame_index=frame_index,
                               vertices=verts, faces=faces, path=rel, color=writer.get(role, index).color))
            on_event(Progress(stage="meshing", done=tick(), total=total, message=f"{name} frame {frame}"))

        mesher = Mesher(finish_mesh, params.mesh_dense_depth, params.mesh_final_depth, self.vae.device,
                        workers=params.mesh_workers)

        def emit_mesh(role: str, index: int, frame_index: int | None, latent: torch.Tensor) -> None:
            if cancel is not None:
                cancel.raise_if_cancelled()
            t = time.perf_counter()
            field_fn = self.vae.field_fn(latent)
            # Tracking needs the field again once the mesh is done; otherwise drop it right away.
            keep = field_fn if (role == "dynamic" and params.topology == "tracked") else None
            mesher.submit(field_fn, (role, index, frame_index, keep))
            del field_fn, keep
            timings["meshing"] += time.perf_counter() - t
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        def on_stage_a(static: torch.Tensor, dynamic: torch.Tensor) -> None:
            for i in range(S):
                emit_mesh("static", i, None, static[i])
            tick(K)  # the stage-A dynamic meshes are not exported (stage B re-does every frame)

        def on_frame(f: int, latents: torch.Tensor) -> None:
            for k in range(K):
                emit_mesh("dynamic", k, f, latents[k])

        try:
            try:
                t = time.perf_counter()
                self.sample(
                    inputs,
                    params,
                    noise=noise,
                    on_step=on_step,
                    on_stage_a=on_stage_a,
                    on_frame=on_frame,
                    cancel=cancel,
                )
                timings["sampling"] = time.perf_counter() - t - timings["meshing"]
                t = time.perf_counter()
                mesher.drain()
                timings["meshing"] += time.perf_counter() - t
            except torch.cuda.OutOfMemoryError as err:
                raise OutOfMemory(
                    "the GPU ran out of memory; use fewer tokens (num_tokens), fewer frames or a smaller "
                    f"window (dynamic_max_memory_frames) ({err})"
                ) from err
            if params.topology == "tracked":
                self._finish_tracking(writer, names, S, trackers, on_event)
            on_event(Progress(stage="export", done=done[0], total=total, message="combined frames"))
            if params.combined_frames:
                writer.write_combined_frames()
            if params.preview:
                from com4d.preview import render_scene_preview

                render_scene_preview(writer, out / "preview.png")
        except COM4DError as err:
            writer.finish("cancelled" if err.code == "cancelled" else "failed")
            raise
        except BaseException:
            writer.finish("failed")
            raise
        finally:
            mesher.close()
            trackers.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        writer.finish("complete")
        timings["total"] = time.perf_counter() - t0
        on_event(Done(scene_path="scene.json"))
        return SceneResult(out / "scene.json", out, frame_numbers, timings)

    @staticmethod
    def _track_frame(trackers: dict, index: int, frame: int, field_fn, verts: np.ndarray, faces: np.ndarray,
                     params: ReconstructionParams, on_event: EventCallback, device: torch.device) -> None:
        """Tracked topology: move object `index`'s first mesh onto this frame's surface while the
        frame's field is still alive (it is freed right after)."""
        from com4d import tracking

        if index not in trackers:
            if len(faces) == 0:
                return  # no base mesh yet: the object starts tracking at its first non-empty frame
            config = tracking.TrackingConfig()
            if params.tracking_threshold is not None:
                config = dataclasses.replace(config, chamfer_threshold=params.tracking_threshold)
            trackers[index] = tracking.SequenceTracker(verts, faces, config, device=device)
        on_event(Progress(stage="tracking", message=f"object {index} frame {frame}"))
        trackers[index].add_frame(field_fn, verts, faces, frame)

    @staticmethod
    def _finish_tracking(writer: SceneWriter, names: list[str], S: int, trackers: dict,
                         on_event: EventCallback) -> None:
        for k, tracker in sorted(trackers.items()):
            seq = tracker.result()
            fallback = list(seq.fallback_frames)
            rel = writer.set_tracked(k, seq.frames, seq.vertices, seq.faces, fallback)
            if fallback:
                why = "; ".join(seq.reasons[f] for f in fallback[:3])
                on_event(WarningEvent(
                    code="tracking_fallback",
                    message=f"{names[S + k]}: the tracked mesh does not follow the surface on {len(fallback)} "
                            f"frame(s) ({why}); those frames keep their own meshes",
                    frames=fallback,
                ))
            on_event(TrackedMeshReady(name=names[S + k], object_index=k, frames=list(seq.frames),
                                      vertices=seq.vertices, faces=seq.faces, path=rel, fallback_frames=fallback,
                                      color=writer.get("dynamic", k).color))


__all__ = [
    "COM4DPipeline",
    "Latents",
    "ReconstructionParams",
    "ReconstructionRequest",
    "SceneResult",
    "default_noise",
    "select_frames",
]
