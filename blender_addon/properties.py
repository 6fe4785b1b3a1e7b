"""The add-on's data in Blender: objects to reconstruct and settings per clip, job state per session.

Objects and settings live on the MovieClip (they describe that footage and are saved with the
.blend). The running job's state lives on the WindowManager: it is not saved, so a file never
reopens showing a job that is no longer running. Only the main thread writes any of it.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .params import default, description, limits
from .tracking_prompts import ObjectSpec, TrackRef

ROLE_ITEMS = [
    ("dynamic", "Dynamic", "Moves or deforms: one mesh per frame"),
    ("static", "Static", "Does not move: one mesh for the whole clip"),
]

TOKEN_ITEMS = [
    ("512", "512", "Fastest, coarsest shapes (the training setting)"),
    ("1024", "1024", "Faster, coarser shapes"),
    ("2048", "2048", "The paper's setting: finer shapes, about twice the time"),
]

TOPOLOGY_ITEMS = [
    ("per_frame", "Mesh per Frame", "A separate mesh on every frame, shown in turn (any shape changes)"),
    (
        "tracked",
        "Deforming Mesh",
        "One mesh with a shape key per frame (frames it cannot follow keep their own)",
    ),
]

JOB_STATES = [
    ("IDLE", "Idle", ""),
    ("CONNECTING", "Connecting", ""),
    ("RUNNING", "Running", ""),
    ("CANCELLING", "Cancelling", ""),
    ("DONE", "Done", ""),
    ("CANCELLED", "Cancelled", ""),
    ("FAILED", "Failed", ""),
]
ACTIVE_STATES = {"CONNECTING", "RUNNING", "CANCELLING"}


class COM4D_PG_track(bpy.types.PropertyGroup):
    """A track that marks an object: `name` is the track's name."""

    positive: BoolProperty(
        name="On the object",
        default=True,
        description="The markers are on the object (off: they mark what is not the object)",
    )


class COM4D_PG_object(bpy.types.PropertyGroup):
    """One object to reconstruct: `name` is the user's name for it."""

    enabled: BoolProperty(name="Reconstruct", default=True)
    role: EnumProperty(name="Role", items=ROLE_ITEMS, default="dynamic")
    tracking_object: StringProperty(
        name="Tracking Object", description="The clip's tracking object whose tracks mark this object"
    )
    use_all_tracks: BoolProperty(
        name="All Tracks",
        default=True,
        description="Use every track of the tracking object (off: only the listed ones)",
    )
    tracks: CollectionProperty(type=COM4D_PG_track)

    def to_spec(self) -> ObjectSpec:
        negatives = tuple(t.name for t in self.tracks if not t.positive)
        if self.use_all_tracks:
            return ObjectSpec(self.name, self.role, self.tracking_object, None, negatives)
        refs = tuple(TrackRef(t.name, t.positive) for t in self.tracks)
        return ObjectSpec(self.name, self.role, self.tracking_object, refs)


class COM4D_PG_clip(bpy.types.PropertyGroup):
    """What to reconstruct from one clip, and how."""

    objects: CollectionProperty(type=COM4D_PG_object)
    active_object: IntProperty(name="Active Object", default=0)
    use_clip_range: BoolProperty(
        name="Whole Clip",
        default=True,
        description="Reconstruct every frame of the clip (off: the range below)",
    )
    frame_first: IntProperty(
        name="First",
        default=1,
        min=1,
        description="First clip frame to reconstruct (clip frame 1 is the video's first)",
    )
    frame_last: IntProperty(name="Last", default=250, min=1, description="Last clip frame to reconstruct")
    frame_stride: IntProperty(
        name="Stride",
        default=default("frame_stride"),
        soft_max=100,
        description=description("frame_stride"),
        **limits("frame_stride"),
    )
    num_tokens: EnumProperty(
        name="Tokens",
        items=TOKEN_ITEMS,
        default=str(default("num_tokens")),
        description="Latent tokens per object: detail of the shapes",
    )
    steps: IntProperty(
        name="Steps",
        default=default("scene_steps"),
        soft_max=200,
        description="Denoising steps per stage (the paper uses 50)",
        **limits("scene_steps"),
    )
    guidance: FloatProperty(
        name="Guidance",
        default=default("scene_guidance"),
        soft_max=15.0,
        description="Classifier-free guidance of both stages; 1 or less is one pass per step (faster)",
        **limits("scene_guidance"),
    )
    seed: IntProperty(name="Seed", default=default("seed"), description="Noise seed", **limits("seed"))
    mesh_detail: IntProperty(
        name="Mesh Detail",
        default=default("mesh_final_depth"),
        soft_min=5,
        description="Octree depth of the meshes: 9 is the paper's, each step down is about 4x fewer faces",
        **limits("mesh_final_depth"),
    )
    topology: EnumProperty(
        name="Moving Objects",
        items=TOPOLOGY_ITEMS,
        default=default("topology"),
        description="How moving objects come back: a mesh per frame, or one mesh that deforms",
    )
    allow_lost: BoolProperty(
        name="Keep Lost Objects",
        default=default("allow_lost"),
        description="Go on when segmentation loses an object on some frames (off: the job fails)",
    )

    def specs(self) -> list[ObjectSpec]:
        return [item.to_spec() for item in self.objects if item.enabled]


class COM4D_PG_job(bpy.types.PropertyGroup):
    """The job of this session, as the panel shows it."""

    state: EnumProperty(name="State", items=JOB_STATES, default="IDLE")
    job_id: StringProperty(name="Job")
    connection: StringProperty(name="Connection", default="not connected")
    stage: StringProperty(name="Stage")
    step: IntProperty()
    steps: IntProperty()
    window: IntProperty()
    windows: IntProperty()
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR")
    message: StringProperty(name="Message")
    error: StringProperty(name="Error")
    warnings: StringProperty(name="Warnings")
    meshes: IntProperty(name="Meshes")
    reconstruction: StringProperty(name="Reconstruction", description="The collection being filled")

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def reset(self) -> None:
        for name in ("job_id", "stage", "message", "error", "warnings", "reconstruction"):
            setattr(self, name, "")
        for name in ("step", "steps", "window", "windows", "meshes"):
            setattr(self, name, 0)
        self.progress = 0.0
        self.state = "IDLE"


CLASSES = (COM4D_PG_track, COM4D_PG_object, COM4D_PG_clip, COM4D_PG_job)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.MovieClip.com4d = PointerProperty(type=COM4D_PG_clip)
    bpy.types.WindowManager.com4d_job = PointerProperty(type=COM4D_PG_job)


def unregister() -> None:
    del bpy.types.WindowManager.com4d_job
    del bpy.types.MovieClip.com4d
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
