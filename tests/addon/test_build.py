"""`build_addon.py` makes an extension zip that Blender itself validates, installs and enables.

Installing runs in a fresh Python process (one bpy per process, and a throw-away
BLENDER_USER_RESOURCES), the way a user's Blender would install it from disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

from .conftest import ROOT, load_build_addon

INSTALL_SCRIPT = r"""
import json, os, sys
import bpy
zip_path = sys.argv[-1]
result = bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo="user_default", enable_on_install=True
)
name = "bl_ext.user_default.com4d_blender"
module = sys.modules.get(name)
site = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "extensions", ".local")
extracted = sorted(
    os.path.join(root, d) for root, dirs, _ in os.walk(site) for d in dirs if d in ("zmq", "msgpack")
)
print("RESULT " + json.dumps({
    "result": sorted(result),
    "module": getattr(module, "__file__", None),
    "operators": sorted(dir(bpy.ops.com4d)),
    "panel": hasattr(bpy.types, "COM4D_PT_reconstruct"),
    "address": bpy.context.preferences.addons[name].preferences.address,
    "extracted": extracted,
}))
"""


def install_in_fresh_blender(zip_path: Path, user_resources: Path) -> dict:
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(user_resources))
    done = subprocess.run(
        [sys.executable, "-c", INSTALL_SCRIPT, str(zip_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"install failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_zip_without_wheels_installs_and_enables_as_an_extension(tmp_path):
    build_addon = load_build_addon()
    zip_path = build_addon.build(tmp_path / "dist", wheels_mode="none")

    assert zip_path.name == "com4d_blender-0.1.0.zip"
    names = zipfile.ZipFile(zip_path).namelist()
    assert {"blender_manifest.toml", "__init__.py", "protocol.py", "client.py", "_params.py"} <= set(names)
    assert zipfile.ZipFile(zip_path).read("protocol.py") == (ROOT / "backend" / "protocol.py").read_bytes()
    assert zipfile.ZipFile(zip_path).read("_params.py") == (ROOT / "com4d" / "params.py").read_bytes()
    installed = install_in_fresh_blender(zip_path, tmp_path / "user")

    assert installed["result"] == ["FINISHED"]
    assert installed["module"] == str(
        tmp_path / "user" / "extensions" / "user_default" / "com4d_blender" / "__init__.py"
    )
    assert {"reconstruct", "cancel", "import_folder", "object_add"} <= set(installed["operators"])
    assert installed["panel"] and installed["address"] == "tcp://127.0.0.1:5555"


@pytest.fixture(scope="module")
def cached_wheels():
    """All bundled wheels, from the build's cache (fetched once from the package index)."""
    build_addon = load_build_addon()
    try:
        return build_addon.fetch_wheels(build_addon.DEFAULT_CACHE)
    except build_addon.BuildError as err:
        pytest.skip(f"the wheels cannot be fetched (offline?): {str(err)[:200]}")


def blender_ext():
    """Blender's own extension tool, as a module: its wheel-platform rules are the ones that count."""
    cli = load_build_addon().blender_ext_cli()
    assert cli is not None, "bpy ships blender_ext.py"
    spec = importlib.util.spec_from_file_location("blender_ext", cli)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs_on_python(wheel: str, python: str) -> bool:
    """Whether a CPython `python` ("3.13") can load the wheel: its own ABI, or a stable ABI no newer."""
    _, _, _, tags = parse_wheel_filename(wheel)
    minor = int(python.split(".")[1])
    return any(
        (t.interpreter == t.abi == f"cp3{minor}")
        or (t.abi == "abi3" and t.interpreter.startswith("cp3") and int(t.interpreter[3:]) <= minor)
        for t in tags
    )


def test_the_manifest_declares_the_platforms_the_build_fetches_wheels_for():
    manifest = tomllib.loads((ROOT / "blender_addon" / "blender_manifest.toml").read_text())
    assert sorted(manifest["platforms"]) == sorted(load_build_addon().PLATFORMS)
    assert {"windows-arm64", "linux-arm64"} <= set(manifest["platforms"])


def test_bundled_wheels_cover_every_declared_platform_and_python(cached_wheels):
    declared = tomllib.loads((ROOT / "blender_addon" / "blender_manifest.toml").read_text())["platforms"]
    compatible = blender_ext().blender_platform_compatible_with_wheel_platform
    names = [w.name for w in cached_wheels]
    for package in ("pyzmq", "msgpack"):
        for python in load_build_addon().PYTHON_VERSIONS:
            for platform in declared:
                assert any(
                    name.startswith(package + "-")
                    and runs_on_python(name, python)
                    and any(compatible(platform, t.platform) for t in parse_wheel_filename(name)[3])
                    for name in names
                ), f"no {package} wheel for Python {python} on {platform}"
    for name in names:  # and nothing for a platform the manifest does not declare
        assert any(compatible(p, t.platform) for p in declared for t in parse_wheel_filename(name)[3]), name


def test_zip_with_wheels_installs_and_its_wheels_load(tmp_path, cached_wheels):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    here = set(sys_tags())
    for wheel in cached_wheels:  # the wheels this Python on this machine loads (Blender picks the same)
        if here & set(parse_wheel_filename(wheel.name)[3]):
            shutil.copy2(wheel, wheel_dir / wheel.name)
    assert len(list(wheel_dir.iterdir())) == 2
    build_addon = load_build_addon()
    assert build_addon.main(["--wheels-from", str(wheel_dir), "--out", str(tmp_path / "dist")]) == 0
    zip_path = tmp_path / "dist" / "com4d_blender-0.1.0.zip"
    manifest = zipfile.ZipFile(zip_path).read("blender_manifest.toml").decode()
    assert sorted(
        line.strip().strip('",').removeprefix("./wheels/")
        for line in manifest.splitlines()
        if "./wheels/" in line
    ) == sorted(p.name for p in wheel_dir.iterdir())

    installed = install_in_fresh_blender(zip_path, tmp_path / "user")

    assert installed["result"] == ["FINISHED"]
    site_packages = {str(Path(p).parent) for p in installed["extracted"]}
    assert len(site_packages) == 1 and len(installed["extracted"]) == 2  # zmq and msgpack extracted
    # the extracted (bundled) pyzmq and msgpack work on their own, without this environment's copies
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import zmq, msgpack; "
        "assert zmq.__file__.startswith(sys.argv[1]) and msgpack.__file__.startswith(sys.argv[1]); "
        "s = zmq.Context().socket(zmq.DEALER); s.close(); print(msgpack.unpackb(msgpack.packb([1])))"
    )
    done = subprocess.run([sys.executable, "-c", check, site_packages.pop()], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[1]", done.stderr


def test_offline_build_without_the_backend_modules_says_what_is_missing(tmp_path, monkeypatch):
    build_addon = load_build_addon()
    monkeypatch.setattr(build_addon, "SHARED_MODULES", (tmp_path / "protocol.py",))
    with pytest.raises(build_addon.BuildError, match="protocol.py"):
        build_addon.build(tmp_path / "dist", wheels_mode="none")
