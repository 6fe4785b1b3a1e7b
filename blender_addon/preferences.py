"""Add-on preferences: where the backend is, how to start one locally, how long to wait."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, FloatProperty, StringProperty

from .credentials import Credentials, load_credentials
from .job import Timeouts

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


class COM4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    address: StringProperty(
        name="Backend Address",
        default=DEFAULT_ADDRESS,
        description="ZeroMQ address of the COM4D backend, e.g. tcp://127.0.0.1:5555 or tcp://gpu-box:5555",
    )
    server_public_key: StringProperty(
        name="Server Public Key",
        default="",
        description="For a remote backend: the server's CurveZMQ public key (40 characters) or the "
        "path of the server.key file `com4d-backend keys` wrote. Leave empty for a backend on this machine",
    )
    client_key_file: StringProperty(
        name="Client Key File",
        subtype="FILE_PATH",
        default="",
        description="For a server that admits listed clients only: this client's .key_secret file",
    )
    use_local_backend: BoolProperty(
        name="Start a Local Backend",
        default=False,
        description="Start the backend on this machine when reconstructing, if none answers",
    )
    python: StringProperty(
        name="Backend Python",
        subtype="FILE_PATH",
        default="",
        description="The Python executable of the environment where COM4D is installed",
    )
    weights: StringProperty(
        name="Weights Folder",
        subtype="DIR_PATH",
        default="",
        description="Folder holding the TripoSG and COM4D weights folders",
    )
    sam_checkpoint: StringProperty(
        name="SAM Checkpoint",
        subtype="FILE_PATH",
        default="",
        description="Segment Anything checkpoint (.pth) used to follow the objects",
    )
    store: StringProperty(
        name="Job Store",
        subtype="DIR_PATH",
        default="",
        description="Where the backend keeps jobs and results (empty: the add-on's user folder)",
    )
    device: StringProperty(
        name="Device", default="cuda", description="Torch device for the backend: cuda, cuda:1, cpu"
    )
    connect_timeout: FloatProperty(
        name="Connect",
        default=5.0,
        min=0.5,
        max=600.0,
        unit="TIME_ABSOLUTE",
        description="Seconds to wait for the backend's first answer",
    )
    start_timeout: FloatProperty(
        name="Local Start",
        default=120.0,
        min=5.0,
        max=3600.0,
        unit="TIME_ABSOLUTE",
        description="Seconds a local backend may take to load before it answers",
    )
    submit_timeout: FloatProperty(
        name="Submit",
        default=120.0,
        min=1.0,
        max=3600.0,
        unit="TIME_ABSOLUTE",
        description="Seconds to wait for a job to be accepted (includes uploading the clip)",
    )
    lost_timeout: FloatProperty(
        name="Lost Connection",
        default=30.0,
        min=2.0,
        max=3600.0,
        unit="TIME_ABSOLUTE",
        description="Seconds without any answer before a running job is given up",
    )

    def credentials(self) -> Credentials:
        """The keys to reach the backend with (raises CredentialsError naming a bad one)."""
        return load_credentials(
            bpy.path.abspath(self.server_public_key)
            if self.server_public_key.startswith("//")
            else self.server_public_key,
            bpy.path.abspath(self.client_key_file),
        )

    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout,
            submit=self.submit_timeout,
            quiet=min(5.0, self.lost_timeout / 2),
            lost=self.lost_timeout,
            start=self.start_timeout,
        )

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        col = layout.column(heading="Backend")
        col.prop(self, "address")
        col.prop(self, "server_public_key")
        col.prop(self, "client_key_file")
        col.operator("com4d.check_connection", icon="LINKED")
        box = layout.box()
        box.prop(self, "use_local_backend")
        sub = box.column()
        sub.active = self.use_local_backend
        for name in ("python", "weights", "sam_checkpoint", "store", "device", "start_timeout"):
            sub.prop(self, name)
        row = sub.row(align=True)
        row.operator("com4d.start_backend", icon="PLAY")
        row.operator("com4d.stop_backend", icon="PAUSE")
        col = layout.column(heading="Timeouts")
        for name in ("connect_timeout", "submit_timeout", "lost_timeout"):
            col.prop(self, name)


def preferences(context=None) -> COM4D_AddonPreferences:
    """This add-on's preferences, whether it is installed as an extension or a plain add-on."""
    context = context or bpy.context
    return context.preferences.addons[__package__].preferences


CLASSES = (COM4D_AddonPreferences,)
