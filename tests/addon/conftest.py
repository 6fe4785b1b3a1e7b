"""Fixtures for the Blender add-on tests: the real `bpy` module, headless.

The add-on is put together exactly as build_addon.py packs it (blender_addon/ + backend's protocol
and client) into a temporary folder on sys.path, and enabled through Blender's own add-on system.
Every test that touches the scene starts from an empty file.
"""

from __future__ import annotations

import importlib.util
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy", reason="the add-on tests need the bpy module (pip install bpy==4.5.15)")
import addon_utils  # noqa: E402  (Blender's module, importable once bpy is)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "com4d_blender"


def load_build_addon():
    spec = importlib.util.spec_from_file_location("build_addon", ROOT / "build_addon.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def addon_root(tmp_path_factory) -> Path:
    """A folder holding the assembled add-on package, on sys.path."""
    root = tmp_path_factory.mktemp("addon")
    load_build_addon().assemble(root)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="session")
def addon(addon_root):
    """The enabled add-on's package module."""
    addon_utils.enable(PACKAGE, default_set=True, handle_error=_raise)
    module = sys.modules[PACKAGE]
    yield module
    addon_utils.disable(PACKAGE, default_set=True, handle_error=_raise)


def _raise(err):
    raise err


@pytest.fixture
def scene(addon):
    """An empty file (the add-on stays enabled); returns its scene."""
    bpy.ops.wm.read_homefile(use_empty=True, load_ui=False)
    bpy.data.window_managers[0].com4d_job.reset()
    yield bpy.context.scene
    addon.job_session.shutdown()


@pytest.fixture
def prefs(addon):
    """The add-on preferences, restored after the test."""
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    saved = {name: getattr(prefs, name) for name in prefs.bl_rna.properties.keys() if name != "rna_type"}
    yield prefs
    for name, value in saved.items():
        try:
            setattr(prefs, name, value)
        except AttributeError:
            pass


def write_video(path: Path, frames: int = 12, width: int = 160, height: int = 120, fps: int = 24) -> Path:
    """A small H.264/MPEG-4 video whose frames differ (a bright square moving right)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index in range(frames):
            image = np.full((height, width, 3), 40, np.uint8)
            x = 10 + index * 4
            image[40:80, x : x + 30] = (230, 200, 60)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def video(tmp_path) -> Path:
    return write_video(tmp_path / "clip.mp4")


@pytest.fixture
def clip(scene, video):
    """The generated video loaded as a movie clip."""
    return bpy.data.movieclips.load(str(video))
