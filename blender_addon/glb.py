"""A small numpy reader for the binary glTF (GLB) meshes our library writes.

Why not Blender's glTF importer: it is an operator that creates its own objects, materials and
y-up-to-z-up rotation in the active collection, one file per call, which is slow for hundreds of
per-frame meshes and leaves us to find and re-parent what it made. Streamed results arrive as numpy
arrays anyway, so reading a GLB into the same arrays lets one importer serve both the wire and
the output folder. The reader handles what trimesh writes: triangle primitives with a float32
POSITION accessor and integer indices, placed by a node hierarchy (matrix or TRS).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GLB_MAGIC = 0x46546C67  # b"glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
TRIANGLES = 4

_COMPONENT_DTYPES = {
    5120: np.int8,
    5121: np.uint8,
    5122: np.int16,
    5123: np.uint16,
    5125: np.uint32,
    5126: np.float32,
}
_TYPE_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


class GlbError(ValueError):
    """The file is not a GLB this reader understands; the message names the file and the problem."""


@dataclass(frozen=True)
class GlbMesh:
    """All triangles of one GLB in the file's own (y-up) coordinates."""

    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int32


def read_glb(path: str | Path) -> GlbMesh:
    """Read every triangle mesh in the GLB's default scene, node transforms applied, merged into one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GlbError(f"cannot read the mesh file {path}: {err.strerror or err}") from err
    return parse_glb(data, name=str(path))


def parse_glb(data: bytes, name: str = "<bytes>") -> GlbMesh:
    """Parse GLB bytes; `name` only appears in error messages."""
    gltf, binary = _split_chunks(data, name)
    parts = [
        _primitive_arrays(gltf, binary, prim, matrix, name) for prim, matrix in _placed_primitives(gltf, name)
    ]
    if not parts:
        return GlbMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
    vertices, faces, offset = [], [], 0
    for verts, tris in parts:
        vertices.append(verts)
        faces.append(tris + offset)
        offset += len(verts)
    return GlbMesh(np.concatenate(vertices).astype(np.float32), np.concatenate(faces).astype(np.int32))


def _split_chunks(data: bytes, name: str) -> tuple[dict, bytes]:
    if len(data) < 20:
        raise GlbError(f"{name} is too short to be a GLB file ({len(data)} bytes)")
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC:
        raise GlbError(f"{name} is not a binary glTF (.glb) file: it does not start with 'glTF'")
    if version != 2:
        raise GlbError(f"{name} is glTF version {version}; only version 2 is supported")
    if length > len(data):
        raise GlbError(f"{name} is truncated: the header says {length} bytes, the file has {len(data)}")
    gltf, binary, offset = None, b"", 12
    while offset + 8 <= length:
        chunk_length, chunk_type = struct.unpack_from("<II", data, offset)
        chunk = data[offset + 8 : offset + 8 + chunk_length]
        if len(chunk) != chunk_length:
            raise GlbError(f"{name} is truncated inside a chunk")
        if chunk_type == CHUNK_JSON:
            try:
                gltf = json.loads(chunk.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise GlbError(f"{name} has a JSON chunk that is not valid JSON: {err}") from err
        elif chunk_type == CHUNK_BIN and not binary:
            binary = chunk
        offset += 8 + chunk_length
    if not isinstance(gltf, dict):
        raise GlbError(f"{name} has no JSON chunk")
    return gltf, binary


def _placed_primitives(gltf: dict, name: str) -> list[tuple[dict, np.ndarray]]:
    """Every primitive with the world matrix of the node that uses it (identity for loose meshes)."""
    meshes = gltf.get("meshes", [])
    nodes = gltf.get("nodes", [])
    scenes = gltf.get("scenes", [])
    if not nodes:
        return [(prim, np.eye(4)) for mesh in meshes for prim in mesh.get("primitives", [])]
    if scenes:
        roots = scenes[gltf.get("scene", 0)].get("nodes", [])
    else:
        children = {c for node in nodes for c in node.get("children", [])}
        roots = [i for i in range(len(nodes)) if i not in children]
    placed: list[tuple[dict, np.ndarray]] = []
    stack = [(int(i), np.eye(4), 0) for i in roots]
    while stack:
        index, parent, depth = stack.pop()
        if depth > len(nodes) or not 0 <= index < len(nodes):
            raise GlbError(f"{name} has a broken node hierarchy (node {index})")
        node = nodes[index]
        world = parent @ _node_matrix(node)
        if "mesh" in node:
            mesh_index = int(node["mesh"])
            if not 0 <= mesh_index < len(meshes):
                raise GlbError(f"{name}: node {index} points at mesh {mesh_index}, which does not exist")
            placed.extend((prim, world) for prim in meshes[mesh_index].get("primitives", []))
        stack.extend((int(c), world, depth + 1) for c in node.get("children", []))
    return placed


def _node_matrix(node: dict) -> np.ndarray:
    if "matrix" in node:
        return np.asarray(node["matrix"], dtype=np.float64).reshape(4, 4).T  # glTF stores column-major
    t = np.asarray(node.get("translation", [0, 0, 0]), dtype=np.float64)
    x, y, z, w = node.get("rotation", [0, 0, 0, 1])
    s = np.asarray(node.get("scale", [1, 1, 1]), dtype=np.float64)
    rotation = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * s[None, :]
    matrix[:3, 3] = t
    return matrix


def _primitive_arrays(gltf: dict, binary: bytes, prim: dict, matrix: np.ndarray, name: str):
    mode = prim.get("mode", TRIANGLES)
    if mode != TRIANGLES:
        raise GlbError(f"{name} has a primitive of mode {mode}; only triangles (mode 4) are supported")
    attributes = prim.get("attributes", {})
    if "POSITION" not in attributes:
        raise GlbError(f"{name} has a primitive without POSITION")
    vertices = _accessor(gltf, binary, attributes["POSITION"], name).reshape(-1, 3).astype(np.float64)
    if "indices" in prim:
        indices = _accessor(gltf, binary, prim["indices"], name).reshape(-1).astype(np.int64)
    else:
        indices = np.arange(len(vertices), dtype=np.int64)
    if len(indices) % 3:
        raise GlbError(f"{name} has {len(indices)} triangle indices, which is not a multiple of 3")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(vertices)):
        raise GlbError(f"{name} has triangle indices outside its {len(vertices)} vertices")
    if not np.allclose(matrix, np.eye(4)):
        vertices = vertices @ matrix[:3, :3].T + matrix[:3, 3]
    return vertices.astype(np.float32), indices.reshape(-1, 3).astype(np.int32)


def _accessor(gltf: dict, binary: bytes, index: int, name: str) -> np.ndarray:
    try:
        accessor = gltf["accessors"][int(index)]
        view = gltf["bufferViews"][int(accessor["bufferView"])]
        dtype = np.dtype(_COMPONENT_DTYPES[int(accessor["componentType"])]).newbyteorder("<")
        width = _TYPE_WIDTHS[accessor["type"]]
        count = int(accessor["count"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise GlbError(f"{name} has a malformed accessor {index}: {err!r}") from err
    if int(view.get("buffer", 0)) != 0:
        raise GlbError(f"{name} uses an external buffer; only the GLB's own binary chunk is supported")
    start = int(view.get("byteOffset", 0)) + int(accessor.get("byteOffset", 0))
    element = dtype.itemsize * width
    stride = int(view.get("byteStride", element))
    needed = start + (count - 1) * stride + element if count else start
    if needed > len(binary) or needed > int(view.get("byteOffset", 0)) + int(view["byteLength"]):
        raise GlbError(f"{name}: accessor {index} reads past the end of its data")
    if stride == element:
        flat = np.frombuffer(binary, dtype=dtype, count=count * width, offset=start)
        return flat.reshape(count, width)
    rows = np.lib.stride_tricks.as_strided(
        np.frombuffer(binary, dtype=np.uint8, offset=start), shape=(count, element), strides=(stride, 1)
    )
    return np.frombuffer(rows.copy().tobytes(), dtype=dtype).reshape(count, width)
