"""Reading the official weights folders: config files, safetensors, the head-interleaved q/k/v.

The official releases (`hf download VAST-AI/TripoSG`, `hf download INSAIT-Institute/COM4D`) are
folders of `config.json` + safetensors per component. This module knows their layout and turns a
checkpoint into a state dict our modules load with `strict` checks, raising `WeightsError` with the
file and tensor named when anything does not fit.

The trap (reference §2.5): `to_q/to_k/to_v` are stored separately but the official attention
concatenates their outputs and splits them *per head first*: head h's query, key and value are
consecutive slices of width `head_dim` inside `[x Wq | x Wk | x Wv]` viewed as (heads, 3 * head_dim).
We permute the rows once at load time so that our attention can use the standard split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from com4d.errors import WeightsError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

# TripoSG folder components (model_index.json lists exactly these).
TRIPOSG_COMPONENTS = ("transformer", "vae", "image_encoder_dinov2", "feature_extractor_dinov2", "scheduler")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON config file, naming the file in the error when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"missing config file {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise WeightsError(f"config file {path} does not hold a JSON object")
    return data


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in a safetensors file, read from its header only (no data)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises several exception types for a bad header
        raise WeightsError(f"{path} is not a readable safetensors file: {err}") from err


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, in their stored dtype."""
    path = Path(path)
    tensor_shapes(path)  # validates the header with a clear error first
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise WeightsError(f"cannot load tensors from {path}: {err}") from err


def heads_first_to_standard(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Permute the official head-interleaved q/k/v rows into the standard per-head layout.

    Self-attention (`*.attn1.*`): rows of `[Wq; Wk; Wv]` viewed as (heads, 3, head_dim, in) hold
    head h's q, k, v at [h, 0], [h, 1], [h, 2]. Cross-attention (`*.attn2.*`): `to_q` is already
    standard; `[Wk; Wv]` viewed as (heads, 2, head_dim, in) holds head h's k and v.
    Returns a new dict; other tensors are passed through.
    """
    out = dict(state)

    def consistent(*names: str) -> bool:
        # A missing or odd-shaped tensor is left alone: load_state_strict names it precisely.
        if any(n not in state for n in names):
            return False
        shapes = {tuple(state[n].shape) for n in names}
        return len(shapes) == 1 and len(next(iter(shapes))) == 2 and next(iter(shapes))[0] % num_heads == 0

    for key in state:
        m = re.fullmatch(r"(.*\.attn1)\.to_q\.weight", key)
        if m:
            p = m.group(1)
            if not consistent(*(f"{p}.to_{n}.weight" for n in "qkv")):
                continue
            wq, wk, wv = (state[f"{p}.to_{n}.weight"] for n in "qkv")
            w = torch.cat([wq, wk, wv], 0)  # (3*D, in)
            d, fan_in = wq.shape
            w = w.view(num_heads, 3, d // num_heads, fan_in)  # (H, 3, hd, in)
            for i, n in enumerate("qkv"):
                out[f"{p}.to_{n}.weight"] = w[:, i].reshape(d, fan_in).contiguous()
            continue
        m = re.fullmatch(r"(.*\.attn2)\.to_k\.weight", key)
        if m:
            p = m.group(1)
            if not consistent(f"{p}.to_k.weight", f"{p}.to_v.weight"):
                continue
            wk, wv = state[f"{p}.to_k.weight"], state[f"{p}.to_v.weight"]
            w = torch.cat([wk, wv], 0)  # (2*D, in)
            d, fan_in = wk.shape
            w = w.view(num_heads, 2, d // num_heads, fan_in)  # (H, 2, hd, in)
            out[f"{p}.to_k.weight"] = w[:, 0].reshape(d, fan_in).contiguous()
            out[f"{p}.to_v.weight"] = w[:, 1].reshape(d, fan_in).contiguous()
    return out


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `module`, refusing missing, unexpected or wrongly shaped tensors.

    The error names the file and the first offending tensors so a user can tell a wrong folder
    (e.g. the TripoSG VAE given as the transformer) from a truncated download.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensor(s), e.g. {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape, e.g. {'; '.join(wrong[:3])}")
    if problems:
        raise WeightsError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))


def find_component(folder: Path, name: str, weights_file: str = DIFFUSERS_WEIGHTS) -> Path:
    """`folder/name` if it holds a config and weights file, with an error naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"weights folder {folder} does not exist")
    sub = folder / name
    if not sub.is_dir():
        raise WeightsError(
            f"{folder} is not a TripoSG weights folder: it has no '{name}/' subfolder "
            f"(expected {', '.join(TRIPOSG_COMPONENTS)})"
        )
    for f in ("config.json", weights_file):
        if not (sub / f).is_file():
            raise WeightsError(f"missing file {sub / f}")
    return sub


def resolve_com4d_transformer(folder: Path) -> Path:
    """The official resolution order: `transformer_ema/`, then `transformer/`, then the folder itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"COM4D weights folder {folder} does not exist")
    if (folder / "transformer_ema" / DIFFUSERS_WEIGHTS).is_file():
        return folder / "transformer_ema"
    if (folder / "transformer").is_dir():
        sub = folder / "transformer"
    else:
        sub = folder
    for f in ("config.json", DIFFUSERS_WEIGHTS):
        if not (sub / f).is_file():
            raise WeightsError(
                f"missing file {sub / f} (a COM4D folder holds transformer_ema/ or transformer/ "
                f"with config.json and {DIFFUSERS_WEIGHTS})"
            )
    return sub


def resolve_weights_root(folder: Path) -> tuple[Path, Path]:
    """Split a user's weights folder into (TripoSG folder, COM4D transformer folder).

    Accepted layouts: `DIR/TripoSG/` + `DIR/COM4D/` (what the README tells users to download), or
    a TripoSG folder alone (then its plain `transformer/` is used: a TripoSG DiT without the COM4D
    tables, useful for single objects only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"weights folder {folder} does not exist")
    if (folder / "TripoSG").is_dir():
        triposg = folder / "TripoSG"
        com4d = folder / "COM4D"
        if not com4d.is_dir():
            raise WeightsError(f"{folder} has TripoSG/ but no COM4D/ (hf download INSAIT-Institute/COM4D)")
        return triposg, resolve_com4d_transformer(com4d)
    if (folder / "vae").is_dir() and (folder / "transformer").is_dir():
        return folder, find_component(folder, "transformer")
    raise WeightsError(
        f"{folder} is not a weights folder: expected TripoSG/ and COM4D/ subfolders "
        "(see README, 'Weights')"
    )


def standard_to_heads_first(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """The inverse of `heads_first_to_standard`: our layout -> the official on-disk layout.

    Used to save models (e.g. the bundled demo weights, test models) exactly as the official code
    would, so that they load through the same path as a user's download.
    """
    out = dict(state)
    for key in state:
        m = re.fullmatch(r"(.*\.attn1)\.to_q\.weight", key)
        if m:
            p = m.group(1)
            ws = [state[f"{p}.to_{n}.weight"] for n in "qkv"]
            d, fan_in = ws[0].shape
            w = torch.stack([x.view(num_heads, d // num_heads, fan_in) for x in ws], 1)  # (H, 3, hd, in)
            w = w.reshape(3 * d, fan_in)
            for i, n in enumerate("qkv"):
                out[f"{p}.to_{n}.weight"] = w[i * d : (i + 1) * d].contiguous()
            continue
        m = re.fullmatch(r"(.*\.attn2)\.to_k\.weight", key)
        if m:
            p = m.group(1)
            ws = [state[f"{p}.to_{n}.weight"] for n in "kv"]
            d, fan_in = ws[0].shape
            w = torch.stack([x.view(num_heads, d // num_heads, fan_in) for x in ws], 1).reshape(2 * d, fan_in)
            out[f"{p}.to_k.weight"] = w[:d].contiguous()
            out[f"{p}.to_v.weight"] = w[d:].contiguous()
    return out
