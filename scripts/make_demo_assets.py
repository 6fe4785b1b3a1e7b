"""Generate the bundled demo: tiny seeded weights in the official layout and a synthetic clip.

    .venv/bin/python scripts/make_demo_assets.py      # writes com4d/assets/demo/

The weights are random (seeded) and tiny: they exercise every code path of the real model and the
real loaders, but they were never trained, so what they reconstruct are smooth random blobs. The
clip is a ball rolling in front of a box, with the ball's masks and the box marked as static.
Re-running gives the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from com4d.conditioning import _ATTENTION_KEYS_V4_TO_V5
from com4d.dit import COM4DTransformer, DiTConfig
from com4d.vae import ShapeVAE, VAEConfig
from com4d.weights import standard_to_heads_first

OUT = Path(__file__).resolve().parents[1] / "com4d" / "assets" / "demo"
META = {"format": "pt"}

DIT = dict(width=48, num_layers=5, num_heads=4, in_channels=8, cross_attention_dim=32)
VAE = VAEConfig(latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=32,
                num_layers_encoder=2, num_layers_decoder=3)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=14,
            image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)


def save_diffusers(folder: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"),
              metadata=META)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def make_transformer(gen: torch.Generator, tables: bool) -> tuple[dict, dict]:
    cfg = DiTConfig(**DIT)
    if tables:
        cfg.part_rows, cfg.frame_rows, cfg.static_embedding, cfg.dynamic_embedding = 8, 16, True, True
    cfg.spatial_block_ids = [0, 2, 4]
    cfg.temporal_block_ids = [0, 1, 3, 5]
    model = COM4DTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name else
                        0.05 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                bound = (3 / p.shape[1]) ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        # Keep the random velocity small so sampled latents stay near N(0, 1), where the demo VAE
        # has a surface (an untrained model has no idea where shapes are).
        model.proj_out.weight.mul_(0.15)
    state = standard_to_heads_first(model.state_dict(), cfg.num_heads)
    config = {
        "_class_name": "PartFrameCrafterDiTModel" if tables else "TripoSGDiTModel",
        "width": cfg.width, "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "in_channels": cfg.in_channels, "cross_attention_dim": cfg.cross_attention_dim,
    }
    if tables:
        config.update({
            "max_num_parts": 8, "max_num_frames": 16,
            "enable_part_embedding": True, "enable_frame_embedding": True,
            "enable_static_embedding": True, "enable_dynamic_embedding": True,
            "enable_static_embedding_per_block": False, "enable_dynamic_embedding_per_block": False,
            "enable_local_cross_attn": True, "enable_global_cross_attn": True,
            "spatial_global_attn_block_ids": [0, 2, 4], "temporal_global_attn_block_ids": [0, 1, 3, 5],
            "global_attn_block_ids": [0, 2, 4], "global_attn_block_id_range": None,
        })
    return state, config


def make_vae(gen: torch.Generator) -> tuple[dict, dict]:
    model = ShapeVAE(VAE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name else
                        0.05 * torch.randn(p.shape, generator=gen))
            else:
                bound = (3 / p.shape[1]) ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        # Smooth fields: damp the high frequencies of the query embedding, stress xyz.
        F = VAE.embed_frequency
        w = model.decoder.proj_query.weight  # (D, 3 + 6F)
        w[:, :3] *= 3.0
        for c in range(3):
            for k in range(F):
                w[:, 3 + c * F + k] *= 0.35**k
                w[:, 3 + 3 * F + c * F + k] *= 0.35**k
        # Shift the output so that fields of N(0, 1) latents straddle 0 (a surface exists).
        axis = torch.linspace(-1, 1, 12)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
        z = torch.randn(8, 16, VAE.latent_channels, generator=gen)
        fields = torch.cat([model.decode(z[i : i + 1], grid)[0] for i in range(len(z))])
        model.decoder.proj_out.bias += fields.quantile(0.8)  # field = -proj_out: ~20 % inside
        # Steepen the field like a trained decoder's (saturated far from the surface), so that
        # the hierarchical extraction refines only a thin band around the surface.
        scale = 12.0 / fields.std().clamp_min(1e-6)
        model.decoder.proj_out.weight.mul_(scale)
        model.decoder.proj_out.bias.mul_(scale)
    state = standard_to_heads_first(model.state_dict(), VAE.num_attention_heads)
    config = {"_class_name": "TripoSGVAEModel", **{k: getattr(VAE, k) for k in VAE.__dataclass_fields__}}
    return state, config


def make_dino(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**DINO))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    renamed = {}
    for key, value in state.items():  # the official (transformers 4.x) key names
        for v4, v5 in _ATTENTION_KEYS_V4_TO_V5:
            key = key.replace(v5, v4)
        renamed[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(folder / "model.safetensors"), metadata=META)
    config = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_act": "gelu", "mlp_ratio": 4,
              "qkv_bias": True, "use_swiglu_ffn": False, "num_channels": 3, "drop_path_rate": 0.0,
              "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "initializer_range": 0.02,
              "apply_layernorm": True, "use_mask_token": True, "torch_dtype": "float32", **DINO}
    config.pop("intermediate_size")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def make_weights(root: Path) -> None:
    gen = torch.Generator().manual_seed(2026)
    tri = root / "TripoSG"
    state, config = make_transformer(gen, tables=False)
    save_diffusers(tri / "transformer", state, config)
    state, config = make_transformer(gen, tables=True)
    save_diffusers(root / "COM4D" / "transformer", state, config)
    state, config = make_vae(gen)
    save_diffusers(tri / "vae", state, config)
    make_dino(tri / "image_encoder_dinov2", seed=7)
    (tri / "feature_extractor_dinov2").mkdir(parents=True, exist_ok=True)
    (tri / "feature_extractor_dinov2" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 256}}, indent=2))
    (tri / "scheduler").mkdir(parents=True, exist_ok=True)
    (tri / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": False}, indent=2))
    (tri / "model_index.json").write_text(json.dumps({
        "_class_name": "TripoSGPipeline",
        "feature_extractor_dinov2": ["transformers", "BitImageProcessor"],
        "image_encoder_dinov2": ["transformers", "Dinov2Model"],
        "scheduler": ["triposg.schedulers.scheduling_rectified_flow", "RectifiedFlowScheduler"],
        "transformer": ["triposg.models.transformers.triposg_transformer", "TripoSGDiTModel"],
        "vae": ["triposg.models.autoencoders.autoencoder_kl_triposg", "TripoSGVAEModel"]}, indent=2))


def make_clip(folder: Path, frames: int = 8, size: int = 96) -> None:
    """A red ball rolling left to right in front of a blue box, on a soft gradient."""
    for sub in ("frames", "frames_no_bg", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = np.stack([200 - 0.4 * yy, 210 - 0.3 * yy, 190 + 0.2 * yy], -1)
    box = (xx > 0.55 * size) & (xx < 0.85 * size) & (yy > 0.35 * size) & (yy < 0.8 * size)
    for f in range(frames):
        cx = size * (0.2 + 0.45 * f / (frames - 1))
        cy = size * (0.62 - 0.12 * np.sin(np.pi * f / (frames - 1)))
        ball = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.13 * size) ** 2
        img = background.copy()
        img[box] = [60, 90, 200]
        shade = 1.0 - 0.4 * np.clip(((xx - cx + 4) ** 2 + (yy - cy + 4) ** 2) / (0.13 * size) ** 2, 0, 1)
        img[ball] = (np.array([220, 50, 40])[None] * shade[ball][:, None])
        img = img.clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "frames" / f"{f:06d}.png")
        Image.fromarray((ball * 255).astype(np.uint8)).save(folder / "masks" / f"{f:06d}_object_000.png")
        no_bg = np.where((ball | box)[..., None], img, 255).astype(np.uint8)
        Image.fromarray(no_bg).save(folder / "frames_no_bg" / f"{f:06d}.png")
    (folder / "objects.json").write_text(json.dumps({
        "version": 1, "dynamic": [{"id": 0, "name": "ball"}], "static": [{"name": "box"}],
        "scene_num_parts": 1}, indent=1))


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    make_weights(OUT / "weights")
    make_clip(OUT / "clip")
    (OUT / "README.md").write_text(
        "Bundled demo for `com4d demo`: tiny seeded random weights in the official TripoSG/COM4D layout\n"
        "and a synthetic 8-frame clip (a ball rolling in front of a box). Made by\n"
        "`scripts/make_demo_assets.py`. The weights were never trained: they show the machinery, not\n"
        "reconstruction quality.\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
