"""Fixtures for the Blender add-on tests: the real `bpy` module, headless.

The add-on is put together exactly as build_addon.py packs it (blender_addon/ + backend's protocol
and client) into a temporary folder on sys.path, and enabled through Blender's own add-on system.
Every test that touches the scene starts from an empty file.

What the tests need from the library (torch) is made once per run by `library_outputs.py` in the
backend's Python, as the add-on itself leaves the library to the backend: Blender's Python has no torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy", reason="the add-on tests need the bpy module (pip install bpy==4.5.15)")
import addon_utils  # noqa: E402  (Blender's module, importable once bpy is)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "com4d_blender"
BACKEND_PYTHON_VARIABLE = "COM4D_BACKEND_PYTHON"


def backend_python() -> str:
    """The Python with the library and the backend (torch): $COM4D_BACKEND_PYTHON, else this one."""
    return os.environ.get(BACKEND_PYTHON_VARIABLE) or sys.executable


def load_build_addon():
    spec = importlib.util.spec_from_file_location("build_addon", ROOT / "build_addon.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def library(tmp_path_factory) -> Path:
    """The folder `library_outputs.py` filled in the backend's Python (see its docstring)."""
    out = tmp_path_factory.mktemp("library")
    python = backend_python()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(
        [python, str(ROOT / "tests" / "addon" / "library_outputs.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"the library could not run in {python} (set {BACKEND_PYTHON_VARIABLE} to a Python with the "
        f"repository's requirements installed):\n{done.stderr[-3000:]}"
    )
    return out


@pytest.fixture(scope="session")
def library_facts(library) -> dict:
    """The library's object colours and the tiny weights folder."""
    return json.loads((library / "facts.json").read_text())


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
