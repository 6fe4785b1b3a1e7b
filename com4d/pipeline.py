"""The COM4D reconstruction: frames + masks (or a video + prompts) -> a 4D scene of meshes.

`COM4DPipeline` holds the models of one weights folder. A job is planned once, up front
(`com4d.plan`: frames, objects, windows, output files), then executed by a `ReconstructionRun`: the
stage-A/B sampler (`com4d.stages`) streams final latents, each mesh is extracted and written as soon
as its latent is final, its field freed, and an event reported.

    pipe = COM4DPipeline.from_pretrained("weights/", device="cuda")
    pipe.reconstruct(ReconstructionRequest(frames_dir="clip/"), ReconstructionParams(), "out/")
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from com4d import attention, conditioning, routing, stages
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
    WarningEvent,
    ignore_events,
)
from com4d.inputs import SceneInputs, load_inputs
from com4d.mesher import Mesher, MesherFactory
from com4d.params import ModelLimits, ReconstructionParams
from com4d.plan import InputSummary, Plan, plan_reconstruction
from com4d.scene import SceneWriter
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
    """Clean latents of a run: statics (S, T, C), stage-A dynamics (K, T, C; (0, T, C) without a
    stage A), stage B (K, F, T, C)."""

    static: torch.Tensor
    dynamic_stage_a: torch.Tensor
    dynamic: torch.Tensor


def default_noise(
    static: int, dynamic: int, tokens: int, channels: int, seed: int, mode: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The official draws, in the official order, from one generator seeded with `seed`.

    mode "cpu": a CPU generator in float32 (the same numbers on every machine; the official CPU run).
    mode "cuda_fp16": a CUDA generator drawing float16 on the GPU, as the official script does when it
    runs on CUDA in float16, so the same seed gives the same scene as an official GPU run.
    With no static parts the official code skips stage A, so the stage-B noise is the first draw and
    the stage-A entries are empty.
    """
    if mode == "cpu":
        device, dtype = torch.device("cpu"), torch.float32
    elif mode == "cuda_fp16":
        if not torch.cuda.is_available():
            raise ParameterError("noise_mode 'cuda_fp16' draws on a CUDA GPU, and none is available; use 'cpu'")
        device, dtype = torch.device("cuda"), torch.float16
    else:
        raise ParameterError(f"noise_mode must be 'cpu' or 'cuda_fp16', got {mode!r}")
    g = torch.Generator(device).manual_seed(seed)

    def draw(rows: int) -> torch.Tensor:
        return torch.randn(rows, tokens, channels, generator=g, device=device, dtype=dtype)

    if static == 0:
        empty = torch.empty(0, tokens, channels, device=device, dtype=dtype)
        return {"stage_a_static": empty, "stage_a_dynamic": empty, "stage_b_dynamic": draw(dynamic)}
    return {
        "stage_a_static": draw(static),
        "stage_a_dynamic": draw(dynamic),
        "stage_b_dynamic": draw(dynamic),
    }


def input_summary(inputs: SceneInputs, preselected: bool = False) -> InputSummary:
    return InputSummary(
        frame_numbers=list(inputs.frame_numbers),
        dynamic_names=[o.name for o in inputs.dynamic],
        static_names=list(inputs.static_names),
        preselected=preselected,
    )


@contextmanager
def block_routing(model: COM4DTransformer, params: ReconstructionParams) -> Iterator[None]:
    """Run the DiT with the routing ids of `params` (official default: infer.sh's ids).

    The grid forward reads the spatial ids from the model's config at call time; they are set for
    the duration of one run and restored after it, so the checkpoint's own config.json values do
    not leak into a run that did not ask for them.
    """
    try:
        routing.check_skip_pairing(model.cfg.num_layers, params.spatial_block_ids)
    except ValueError as err:
        raise ParameterError(f"spatial_block_ids {list(params.spatial_block_ids)}: {err}") from err
    saved = (model.cfg.spatial_block_ids, model.cfg.temporal_block_ids)
    model.cfg.spatial_block_ids = list(params.spatial_block_ids)
    model.cfg.temporal_block_ids = list(params.temporal_block_ids)
    try:
        yield
    finally:
        model.cfg.spatial_block_ids, model.cfg.temporal_block_ids = saved


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

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(part_rows=self.transformer.cfg.part_rows, frame_rows=self.transformer.cfg.frame_rows)

    def plan(self, inputs: SceneInputs, params: ReconstructionParams, preselected: bool = False) -> Plan:
        """The plan of `params` on `inputs`, checked against this model's tables."""
        return plan_reconstruction(input_summary(inputs, preselected), params, self.limits)

    def encode_images(self, images: list[np.ndarray], size: int) -> torch.Tensor:
        return self.image_encoder.encode(images, size=size).to(self.dtype)  # (B, Lc, Dc)

    def conditioning_images(
        self, inputs: SceneInputs, params: ReconstructionParams, indices: list[int]
    ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """Full frames and per-object masked frames at the conditioning size, for frame indices.

        Object images blend frame and white with mask/255 (`conditioning.mask_onto_white`), as the
        official code; frames_no_bg/ replaces frames/ only when `use_frames_no_bg` asks for it.
        """
        source = inputs.frames_no_bg if (params.use_frames_no_bg and inputs.frames_no_bg) else inputs.frames
        size = params.image_size
        full = [conditioning.resize_frame(source[i], size) for i in indices]
        objects = []
        for obj in inputs.dynamic:
            masked = []
            for j, i in enumerate(indices):
                mask = conditioning.resize_mask(obj.masks[i], size)
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
        plan: Plan | None = None,
        static_rows_after_cutoff: bool = False,
    ) -> Latents:
        """Stage A then stage B; returns all clean latents (the meshing-free core of the method).

        `noise` overrides the random draws (keys of `default_noise`), e.g. to reproduce recorded
        official noise. `on_stage_a(static, dynamic)` and `on_frame(f, latents)` fire as soon as
        latents are final. `static_rows_after_cutoff` see `stages.run_stage_b`.
        """
        plan = plan or self.plan(inputs, params)
        S, K, F = plan.num_static, plan.num_dynamic, len(plan.frames)
        C, T = self.transformer.cfg.in_channels, params.num_tokens
        noise = noise or default_noise(S, K, T, C, params.seed, params.noise_mode)
        K_a = K if plan.has_stage_a else 0
        for key, shape in (("stage_a_static", (S, T, C)), ("stage_a_dynamic", (K_a, T, C)),
                           ("stage_b_dynamic", (K, T, C))):
            if tuple(noise[key].shape) != shape:
                raise ParameterError(f"noise[{key!r}] must have shape {shape}, got {tuple(noise[key].shape)}")
        dev, dt, size = self.device, self.dtype, params.image_size

        def step_hook(stage: str, window: int, step: int, steps: int) -> None:
            if cancel is not None:
                cancel.raise_if_cancelled()
            if on_step is not None:
                on_step(stage, window, step, steps)

        with block_routing(self.transformer, params):
            # Every image is encoded first (none depends on a latent), so that DINOv2 leaves the GPU
            # before the DiT samples; a long-lived backend brings it back from host memory next job.
            tokens_a = tokens_full = tokens_obj = None
            if plan.has_stage_a:
                # Stage A sees one frame: statics the full image, dynamics their masked image.
                full_a, objects_a = self.conditioning_images(inputs, params, [plan.stage_a])
                tokens_a = self.encode_images(full_a + [o[0] for o in objects_a], size)  # (1 + K, Lc, Dc)
            if K > 0:
                # Stage B: every selected frame's full image and object images.
                full_b, objects_b = self.conditioning_images(inputs, params, plan.frames)
                tokens_full = self.encode_images(full_b, size)  # (F, Lc, Dc)
                tokens_obj = torch.stack([self.encode_images(o, size) for o in objects_b])  # (K, F, Lc, Dc)
            self.image_encoder.offload()

            static = dyn_a = None
            if plan.has_stage_a:
                # Stage A: the scene at one frame.
                index_t = torch.tensor([0] * S + list(range(1, K + 1)), device=dev)
                ctx_t = CellContext(tokens_a, index_t)
                ctx_s = CellContext(tokens_a, torch.zeros(S + K, dtype=torch.long, device=dev))
                ctx_0 = CellContext.zeros(S + K, *tokens_a.shape[-2:], dev, tokens_a.dtype)
                x0 = torch.cat([noise["stage_a_static"], noise["stage_a_dynamic"]]).to(dev, dt)
                clean_a = stages.run_stage_a(
                    self.transformer, self.scheduler, x0, S, ctx_t, ctx_s, ctx_0,
                    steps=params.scene_steps, guidance=params.scene_guidance,
                    full_image_from_step=params.scene_full_image_from_step, on_step=step_hook, trace=trace,
                )  # (S + K, T, C)
                static, dyn_a = clean_a[:S], clean_a[S:]
                del ctx_t, ctx_s, ctx_0, tokens_a
                if on_stage_a is not None:
                    on_stage_a(static, dyn_a)
            else:
                static = torch.empty(0, T, C, device=dev, dtype=dt)
            if K == 0:
                return Latents(static, dyn_a, static.new_zeros(0, F, T, C))

            # Stage B: the moving objects over every selected frame.
            dyn = stages.run_stage_b(
                self.transformer, self.scheduler, static, dyn_a, noise["stage_b_dynamic"].to(dev, dt),
                stages.StageBContexts(full=tokens_full, objects=tokens_obj), torch.zeros_like(tokens_full[:1]),
                plan.windows, steps=params.dynamic_steps, guidance=params.dynamic_guidance,
                mix_cutoff=params.dynamic_mix_cutoff, static_rows_after_cutoff=static_rows_after_cutoff,
                on_step=step_hook, on_frame=on_frame, trace=trace,
            )  # (K, F, T, C)
        empty = static.new_zeros(0, T, C)
        return Latents(static, dyn_a if dyn_a is not None else empty, dyn)

    # -- the whole job ----------------------------------------------------------------------------

    def prepare_inputs(
        self,
        request: ReconstructionRequest,
        params: ReconstructionParams,
        out_dir: Path,
        on_event: EventCallback,
        cancel: CancelToken | None,
    ) -> tuple[SceneInputs, bool]:
        """(inputs, preselected) of a request, segmenting first when it has prompts.

        Segmentation reads only the selected frames (params' start/end/stride, as source frame
        numbers), so its inputs are `preselected`: the plan uses all of them.
        """
        if request.prompts is None:
            if request.frames_dir is None:
                raise InputError("nothing to reconstruct: give an input folder with masks/, or a video with prompts")
            return load_inputs(request.frames_dir, video=request.video), False
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
        return inputs, True

    def reconstruct(
        self,
        request: ReconstructionRequest | SceneInputs,
        params: ReconstructionParams | None = None,
        out_dir: str | Path = "com4d_out",
        on_event: EventCallback = ignore_events,
        cancel: CancelToken | None = None,
        noise: dict[str, torch.Tensor] | None = None,
        mesher: MesherFactory = Mesher,
    ) -> SceneResult:
        """Run a whole job, writing `out_dir` (docs/contracts.md) and reporting events as it goes.

        `mesher` makes the job's mesher (`com4d.mesher.MesherFactory`); cluster mode passes one that
        meshes final latents on idle GPU workers."""
        params = params or ReconstructionParams()
        params.validate(self.limits)
        available = attention.available_backends(self.device, self.dtype)
        if params.attention_backend not in available:  # refused before any work, not midway
            raise ParameterError(
                f"attention_backend {params.attention_backend!r} does not run on {self.device} in {self.dtype}; "
                f"available here: {', '.join(available)}"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        on_event(Progress(stage="load", message="reading inputs"))
        if isinstance(request, SceneInputs):
            inputs, preselected = request, False
        else:
            inputs, preselected = self.prepare_inputs(request, params, out, on_event, cancel)
        plan = self.plan(inputs, params, preselected)
        self.check_memory(plan.num_objects, params)
        run = ReconstructionRun(self, inputs, params, plan, out, on_event, cancel, mesher)
        return run.execute(noise, started)


class ReconstructionRun:
    """One job being executed: the plan, the scene writer, the mesher and the progress count.

    Sampling streams final latents into `emit_mesh`; the mesher calls `finish_mesh` for each mesh
    (in order, on this thread); `execute` ties them together and turns failures into a manifest
    status.
    """

    def __init__(
        self,
        pipe: COM4DPipeline,
        inputs: SceneInputs,
        params: ReconstructionParams,
        plan: Plan,
        out: Path,
        on_event: EventCallback,
        cancel: CancelToken | None,
        mesher: MesherFactory = Mesher,
    ):
        self.pipe, self.inputs, self.params, self.plan, self.out = pipe, inputs, params, plan, out
        self.on_event, self.cancel = on_event, cancel
        w, h = inputs.size
        self.writer = SceneWriter(
            out, plan.static_names, plan.dynamic_names, plan.frame_numbers, plan.stage_a_frame_number,
            source={"input": inputs.source, "width": w, "height": h, "fps": inputs.fps},
            params=params.to_dict(),
        )
        self.mesher = mesher(self.finish_mesh, params.mesh_dense_depth, params.mesh_final_depth, pipe.vae.device,
                             workers=params.mesh_workers,
                             cancel=cancel.raise_if_cancelled if cancel is not None else None,
                             field_of=pipe.vae.field_fn)
        self.trackers: dict[int, Any] = {}  # dynamic object -> topology.SequenceTracker (topology="tracked")
        self.done = 0
        self.timings = {"meshing": 0.0}

    # -- progress ---------------------------------------------------------------------------------

    def tick(self, n: int = 1) -> int:
        self.done += n
        return self.done

    def on_step(self, stage: str, window: int, step: int, steps: int) -> None:
        self.mesher.poll()  # meshes whose marching cubes finished in the background
        windows = max(1, len(self.plan.windows)) if stage == "stage_b" else 1
        self.on_event(Progress(stage=stage, step=step + 1, steps=steps, window=window + 1, windows=windows,
                               done=self.tick(), total=self.plan.total_units))

    # -- meshing ----------------------------------------------------------------------------------

    def emit_mesh(self, role: str, index: int, frame_index: int | None, latent: torch.Tensor) -> None:
        """Start meshing one final latent; role is "static", "stage_a" (a moving object at the
        stage-A frame) or "dynamic" (a moving object at selected frame `frame_index`)."""
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        t = time.perf_counter()
        if role == "dynamic" and self.params.topology == "tracked":
            # The topology tracker needs the field again once the mesh is done: it stays on this device.
            field_fn = self.pipe.vae.field_fn(latent)
            self.mesher.submit(field_fn, (role, index, frame_index, field_fn))
            del field_fn
        else:  # any mesher may make this mesh (on another GPU in cluster mode)
            self.mesher.submit_latent(latent, (role, index, frame_index, None))
        self.timings["meshing"] += time.perf_counter() - t
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_stage_a(self, static: torch.Tensor, dynamic: torch.Tensor) -> None:
        for i in range(self.plan.num_static):
            self.emit_mesh("static", i, None, static[i])
        for k in range(self.plan.num_dynamic):
            self.emit_mesh("stage_a", k, None, dynamic[k])

    def on_frame(self, f: int, latents: torch.Tensor) -> None:
        for k in range(self.plan.num_dynamic):
            self.emit_mesh("dynamic", k, f, latents[k])

    def finish_mesh(self, payload: tuple, verts: np.ndarray, faces: np.ndarray) -> None:
        """A finished mesh: file, manifest, topology tracking, the combined GLB of a frame it
        completes, events (on this thread, in order)."""
        role, index, frame_index, field_fn = payload
        plan, writer = self.plan, self.writer
        if role == "stage_a":
            # Written (the official scene_XXX.glb) but not streamed: a MeshReady of a moving object is
            # one of its selected frames.
            name, frame = plan.dynamic_names[index], plan.stage_a_frame_number
            writer.add_stage_a_dynamic(index, verts, faces)
        elif role == "static":
            name, frame = plan.static_names[index], plan.stage_a_frame_number
            rel = writer.add_static(index, verts, faces)
        else:
            name, frame = plan.dynamic_names[index], plan.frame_numbers[frame_index]
            rel = writer.add_dynamic_frame(index, frame, verts, faces)
            if self.params.topology == "tracked":
                self.track_frame(index, frame, field_fn, verts, faces)
        if self.params.combined_frames and role != "stage_a":
            writer.write_ready_frames()  # each frame's combined GLB as soon as its last mesh exists
        if len(faces) == 0:
            self.on_event(WarningEvent(code="empty_mesh", message=f"{name}: the field has no surface at frame {frame}",
                                       frames=[frame]))
        if role != "stage_a":
            self.on_event(MeshReady(name=name, role=role, object_index=index, frame=frame, frame_index=frame_index,
                                    vertices=verts, faces=faces, path=rel,
                                    color=writer.get(role, index).color))
        self.on_event(Progress(stage="meshing", done=self.tick(), total=plan.total_units,
                               message=f"{name} frame {frame}"))

    # -- one topology per object (topology="tracked") --------------------------------------------

    def track_frame(self, index: int, frame: int, field_fn, verts: np.ndarray, faces: np.ndarray) -> None:
        """Move object `index`'s first mesh onto this frame's surface while the frame's field is
        still alive (it is freed right after)."""
        from com4d import topology

        if index not in self.trackers:
            if len(faces) == 0:
                return  # no base mesh yet: the object starts at its first non-empty frame
            config = topology.TrackingConfig()
            if self.params.tracking_threshold is not None:
                config = dataclasses.replace(config, chamfer_threshold=self.params.tracking_threshold)
            self.trackers[index] = topology.SequenceTracker(verts, faces, config, device=self.pipe.vae.device)
        self.on_event(Progress(stage="topology", message=f"object {index} frame {frame}"))
        self.trackers[index].add_frame(field_fn, verts, faces, frame)

    def finish_topology(self) -> None:
        names = self.plan.dynamic_names
        for k, tracker in sorted(self.trackers.items()):
            seq = tracker.result()
            fallback = list(seq.fallback_frames)
            rel = self.writer.set_tracked(k, seq.frames, seq.vertices, seq.faces, fallback)
            if fallback:
                why = "; ".join(seq.reasons[f] for f in fallback[:3])
                self.on_event(WarningEvent(
                    code="tracking_fallback",
                    message=f"{names[k]}: the tracked mesh does not follow the surface on {len(fallback)} "
                            f"frame(s) ({why}); those frames keep their own meshes",
                    frames=fallback,
                ))
            self.on_event(TrackedMeshReady(name=names[k], object_index=k, frames=list(seq.frames),
                                           vertices=seq.vertices, faces=seq.faces, path=rel, fallback_frames=fallback,
                                           color=self.writer.get("dynamic", k).color))

    # -- the job ----------------------------------------------------------------------------------

    def sample_and_mesh(self, noise: dict[str, torch.Tensor] | None) -> None:
        """Sampling with meshing streamed behind it; a CUDA out-of-memory becomes an OutOfMemory."""
        try:
            t = time.perf_counter()
            self.pipe.sample(self.inputs, self.params, noise=noise, on_step=self.on_step, on_stage_a=self.on_stage_a,
                             on_frame=self.on_frame, cancel=self.cancel, plan=self.plan)
            self.timings["sampling"] = time.perf_counter() - t - self.timings["meshing"]
            t = time.perf_counter()
            self.mesher.drain()
            self.timings["meshing"] += time.perf_counter() - t
        except torch.cuda.OutOfMemoryError as err:
            raise OutOfMemory(
                "the GPU ran out of memory; use fewer tokens (num_tokens), fewer frames or a smaller "
                f"window (dynamic_max_memory_frames) ({err})"
            ) from err

    def export(self) -> None:
        self.on_event(Progress(stage="export", done=self.done, total=self.plan.total_units, message="combined frames"))
        if self.params.combined_frames:
            self.writer.write_stage_a_scene()
            self.writer.write_combined_frames()  # only frames not written as their meshes finished
        if self.params.preview:
            from com4d.preview import render_scene_preview

            render_scene_preview(self.writer, self.out / "preview.png")

    def execute(self, noise: dict[str, torch.Tensor] | None, started: float) -> SceneResult:
        if self.plan.windows and self.params.dynamic_ar_block_size > self.params.dynamic_max_memory_frames:
            # accepted like the official code, which trims all history and only warns
            self.on_event(WarningEvent(
                code="block_exceeds_memory",
                message=f"dynamic_ar_block_size {self.params.dynamic_ar_block_size} exceeds "
                        f"dynamic_max_memory_frames {self.params.dynamic_max_memory_frames}: windows keep no "
                        "history, so consecutive blocks are not linked",
            ))
        try:
            with attention.use_backend(self.params.attention_backend):
                self.sample_and_mesh(noise)
            if self.params.topology == "tracked":
                self.finish_topology()
            self.export()
        except COM4DError as err:
            self.writer.finish("cancelled" if err.code == "cancelled" else "failed")
            raise
        except BaseException:
            self.writer.finish("failed")
            raise
        finally:
            self.mesher.close()
            self.trackers.clear()
            gc.collect()
            if self.pipe.device.type == "cuda":
                torch.cuda.empty_cache()
        self.writer.finish("complete")
        self.timings["total"] = time.perf_counter() - started
        self.on_event(Done(scene_path="scene.json"))
        return SceneResult(self.out / "scene.json", self.out, list(self.plan.frame_numbers), self.timings)


__all__ = [
    "COM4DPipeline",
    "Latents",
    "ReconstructionParams",
    "ReconstructionRequest",
    "ReconstructionRun",
    "SceneResult",
    "default_noise",
]
