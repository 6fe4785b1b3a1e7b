"""Build the Blender extension zip: `python build_addon.py` -> dist/com4d_blender-<version>.zip.

The zip holds the add-on (blender_addon/), the wire protocol and client copied verbatim from
backend/ (one definition of the protocol for both ends), the library's parameter schema
(com4d/params.py, as `_params.py`: the panel's defaults and ranges are the backend's), and
pyzmq + msgpack wheels for Blender's Pythons (3.11: Blender 4.2-5.0; 3.13: 5.1 and later) on
Linux and Windows (x64, arm64) and macOS (arm64, x64): every platform the manifest declares. The wheels come from the
package index through `pip download` and are cached in dist/wheel-cache/, so a second build needs
no network. Offline: `--wheels-from DIR` (a folder of
wheels) or `--no-wheels` (for a Blender whose Python already has pyzmq and msgpack).

Example:
    python build_addon.py                      # full build, wheels fetched once then cached
    python build_addon.py --no-wheels          # quick build without wheels
    python build_addon.py --wheels-from ~/whl  # offline build from a folder of wheels
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "blender_addon"
SHARED_MODULES = (ROOT / "backend" / "protocol.py", ROOT / "backend" / "client.py")
# The library's parameter schema (standard library only), shipped as the add-on's `_params` module.
PARAMS_SCHEMA = ROOT / "com4d" / "params.py"
PARAMS_MODULE = "_params.py"
PACKAGE_ID = "com4d_blender"
MANIFEST = "blender_manifest.toml"

REQUIREMENTS = ("pyzmq==27.3.0", "msgpack==1.2.4")
PYTHON_VERSIONS = ("3.11", "3.13")
# Blender platform -> the wheel platform tags pip may pick for it (pip adds older macOS versions itself).
PLATFORMS = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "linux-arm64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    "windows-x64": ("win_amd64",),
    "windows-arm64": ("win_arm64",),
    "macos-arm64": ("macosx_11_0_arm64",),
    "macos-x64": ("macosx_11_0_x86_64",),
}
DEFAULT_CACHE = ROOT / "dist" / "wheel-cache"


class BuildError(RuntimeError):
    """The build cannot go on; the message says what to do."""


def manifest_version(manifest_text: str) -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', manifest_text, re.MULTILINE)
    if match is None:
        raise BuildError(f"{ADDON_DIR / MANIFEST} has no version line")
    return match.group(1)


def with_wheels(manifest_text: str, wheel_names: list[str]) -> str:
    """The manifest with its `wheels = [...]` list replaced (removed when there are none)."""
    pattern = re.compile(r"^wheels\s*=\s*\[.*?\]\n", re.MULTILINE | re.DOTALL)
    if not pattern.search(manifest_text):
        raise BuildError(f"{MANIFEST} needs a `wheels = [...]` list for the build to fill in")
    block = ""
    if wheel_names:
        block = "wheels = [\n" + "".join(f'  "./wheels/{name}",\n' for name in wheel_names) + "]\n"
    return pattern.sub(lambda _: block, manifest_text, count=1)


def fetch_wheels(
    cache: Path, requirements=REQUIREMENTS, pythons=PYTHON_VERSIONS, platforms=PLATFORMS, quiet: bool = True
) -> list[Path]:
    """The wheels for every (Python, platform) pair, downloaded once into `cache`."""
    found: dict[str, Path] = {}
    for python in pythons:
        for blender_platform, tags in platforms.items():
            target = cache / f"py{python}-{blender_platform}"
            stamp = target / "complete.json"
            if not (stamp.is_file() and json.loads(stamp.read_text()) == list(requirements)):
                _pip_download(target, requirements, python, tags, quiet)
                stamp.write_text(json.dumps(list(requirements)))
            for wheel in sorted(target.glob("*.whl")):
                found.setdefault(wheel.name, wheel)
    return [found[name] for name in sorted(found)]


def _pip_download(target: Path, requirements, python: str, tags, quiet: bool) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        *requirements,
        "--dest",
        str(target),
        "--only-binary=:all:",
        "--no-deps",
        "--python-version",
        python,
    ]
    for tag in tags:
        command += ["--platform", tag]
    if quiet:
        command.append("--quiet")
    print(f"fetching wheels for Python {python} on {tags[0]}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise BuildError(
            f"pip could not download {' '.join(requirements)} for Python {python} ({tags[0]}):\n"
            f"{result.stderr.strip()[-2000:]}\nOffline? Use --wheels-from DIR or --no-wheels."
        )


def wheels_in(folder: Path, requirements=REQUIREMENTS) -> list[Path]:
    """The wheels of our requirements found in `folder` (any version tags)."""
    names = tuple(req.split("==")[0].replace("-", "_").lower() for req in requirements)
    wheels = sorted(p for p in Path(folder).glob("*.whl") if p.name.split("-")[0].lower() in names)
    if not wheels:
        raise BuildError(f"{folder} holds no pyzmq or msgpack wheels")
    return wheels


def assemble(dest: Path, wheels: list[Path] = ()) -> Path:
    """Put the extension's files together in `dest/com4d_blender/` and return that folder."""
    missing = [str(p) for p in (*SHARED_MODULES, PARAMS_SCHEMA) if not p.is_file()]
    if missing:
        raise BuildError(
            f"missing {', '.join(missing)}: the extension ships the backend's protocol and client "
            "and the library's parameter schema"
        )
    package = Path(dest) / PACKAGE_ID
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for source in sorted(ADDON_DIR.glob("*.py")):
        shutil.copy2(source, package / source.name)
    for source in SHARED_MODULES:
        shutil.copy2(source, package / source.name)
    shutil.copy2(PARAMS_SCHEMA, package / PARAMS_MODULE)
    if wheels:
        (package / "wheels").mkdir()
        for wheel in wheels:
            shutil.copy2(wheel, package / "wheels" / wheel.name)
    manifest = (ADDON_DIR / MANIFEST).read_text(encoding="utf-8")
    (package / MANIFEST).write_text(with_wheels(manifest, [w.name for w in wheels]), encoding="utf-8")
    return package


def write_zip(package: Path, zip_path: Path) -> Path:
    """Zip the folder's contents with the manifest at the top level, as Blender expects."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                stored = zipfile.ZIP_STORED if path.suffix == ".whl" else zipfile.ZIP_DEFLATED
                archive.write(path, path.relative_to(package).as_posix(), compress_type=stored)
    tmp.replace(zip_path)
    return zip_path


def blender_ext_cli() -> Path | None:
    """Blender's own extension tool (`blender_ext.py`), found inside an installed `bpy` module."""
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if found:
            return found[-1]
    return None


def validate(zip_path: Path) -> str:
    """Check the zip with Blender's extension validator, when the `bpy` module is installed."""
    cli = blender_ext_cli()
    if cli is None:
        return "not validated (no bpy module installed)"
    result = subprocess.run(
        [sys.executable, str(cli), "validate", str(zip_path)], capture_output=True, text=True
    )
    if result.returncode != 0 or "ERROR" in result.stdout:
        raise BuildError(
            f"Blender's validator rejects {zip_path.name}:\n{(result.stdout + result.stderr).strip()}"
        )
    return "validated by Blender's extension tool"


def build(
    out_dir: Path = ROOT / "dist",
    wheels_mode: str = "fetch",
    wheels_dir: Path | None = None,
    cache: Path = DEFAULT_CACHE,
) -> Path:
    """Build the zip; `wheels_mode` is "fetch" (index + cache), "from" (`wheels_dir`) or "none"."""
    if wheels_mode == "fetch":
        wheels = fetch_wheels(cache)
    elif wheels_mode == "from":
        wheels = wheels_in(wheels_dir)
    elif wheels_mode == "none":
        wheels = []
    else:
        raise BuildError(f"unknown wheels mode {wheels_mode!r}")
    version = manifest_version((ADDON_DIR / MANIFEST).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="com4d_addon_") as staging:
        package = assemble(Path(staging), wheels)
        zip_path = write_zip(package, Path(out_dir) / f"{PACKAGE_ID}-{version}.zip")
    print(f"{zip_path.name}: {validate(zip_path)}")
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Example:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-wheels", action="store_true", help="bundle no wheels")
    group.add_argument(
        "--wheels-from", type=Path, metavar="DIR", help="bundle the pyzmq/msgpack wheels in DIR"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="wheel cache (default: dist/wheel-cache)"
    )
    args = parser.parse_args(argv)
    mode = "none" if args.no_wheels else "from" if args.wheels_from else "fetch"
    try:
        zip_path = build(args.out, mode, args.wheels_from, args.cache)
    except BuildError as err:
        print(f"build_addon: {err}", file=sys.stderr)
        return 1
    print(f"built {zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
