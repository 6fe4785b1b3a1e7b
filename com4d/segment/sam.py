"""SAM (segment-anything v1) from a checkpoint file, and a predictor that embeds each frame once.

A user's checkpoint may be vit_h, vit_l or vit_b, whatever its file is called; tests use a tiny model
built from the same modules. So the architecture is read from the tensor shapes in the state dict
(`infer_sam_config`) and the model is built from that, never from the file name.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from com4d.errors import WeightsError

# SAM's mask decoder uses 8 heads in every released size; head counts leave no trace in weight shapes.
DECODER_NUM_HEADS = 8
_PRESETS = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b"}


@dataclass(frozen=True)
class SamConfig:
    """Sizes of a segment-anything model; the released ones are `vit_h`, `vit_l`, `vit_b`."""

    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_mlp_ratio: float = 4.0
    encoder_qkv_bias: bool = True
    encoder_use_rel_pos: bool = True
    encoder_window_size: int = 14
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = DECODER_NUM_HEADS
    decoder_attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def name(self) -> str:
        """'vit_h' / 'vit_l' / 'vit_b' for the released sizes, else a short description."""
        preset = _PRESETS.get((self.encoder_embed_dim, self.encoder_depth))
        return preset or f"custom(embed={self.encoder_embed_dim}, depth={self.encoder_depth})"


def build_sam(config: SamConfig):
    """A segment-anything `Sam` with the sizes of `config` (weights as initialised)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = config.img_size // config.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.encoder_mlp_ratio,
            out_chans=config.prompt_embed_dim,
            qkv_bias=config.encoder_qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=config.encoder_use_rel_pos,
            window_size=config.encoder_window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
                attention_downsample_rate=config.decoder_attention_downsample_rate,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    )


def infer_sam_config(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> SamConfig:
    """Read the model sizes from tensor shapes (works on real, meta or shape-only tensors)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise WeightsError(
                f"{source} is not a segment-anything (SAM v1) checkpoint: it has no tensor {key!r}"
            )
        return tuple(state_dict[key].shape)

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
        return max(found) + 1 if found else 0

    embed_dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    depth = count("image_encoder.blocks.")
    if depth == 0:
        raise WeightsError(f"{source} has no image encoder blocks (image_encoder.blocks.N.*)")
    hidden = shape("image_encoder.blocks.0.mlp.lin1.weight")[0]
    prompt_dim = shape("image_encoder.neck.0.weight")[0]

    rel_sizes = [
        state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape
        for i in range(depth)
        if f"image_encoder.blocks.{i}.attn.rel_pos_h" in state_dict
    ]
    use_rel_pos = len(rel_sizes) == depth
    if "image_encoder.pos_embed" in state_dict:
        grid = shape("image_encoder.pos_embed")[1]
    elif use_rel_pos:
        grid = (max(s[0] for s in rel_sizes) + 1) // 2
    else:
        grid = 1024 // patch
    if use_rel_pos:
        head_dim = rel_sizes[0][1]
        spans = [(s[0] + 1) // 2 for s in rel_sizes]
        global_idx = tuple(i for i, span in enumerate(spans) if span == grid)
        windows = {span for span in spans if span != grid}
        if len(windows) > 1:
            raise WeightsError(f"{source}: image encoder blocks use several window sizes {sorted(windows)}")
        window = windows.pop() if windows else 0
    else:
        preset_heads = {768: 12, 1024: 16, 1280: 16}
        if embed_dim not in preset_heads:
            raise WeightsError(f"{source}: cannot tell the encoder's head count (no relative positions)")
        head_dim, window, global_idx = embed_dim // preset_heads[embed_dim], 0, ()
    if embed_dim % head_dim:
        raise WeightsError(f"{source}: encoder width {embed_dim} is not a multiple of head size {head_dim}")

    cross_dim = shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    if prompt_dim % DECODER_NUM_HEADS or cross_dim % DECODER_NUM_HEADS:
        raise WeightsError(
            f"{source}: mask decoder widths {prompt_dim}/{cross_dim} do not split into "
            f"{DECODER_NUM_HEADS} heads as SAM's decoder does"
        )
    return SamConfig(
        img_size=grid * patch,
        patch_size=patch,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_mlp_ratio=hidden / embed_dim,
        encoder_qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state_dict,
        encoder_use_rel_pos=use_rel_pos,
        encoder_window_size=window,
        encoder_global_attn_indexes=global_idx,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=count("mask_decoder.transformer.layers."),
        decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        decoder_attention_downsample_rate=prompt_dim // cross_dim,
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=count("mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
    )


def read_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a SAM checkpoint (.pth as Meta ships it, or .safetensors), never unpickling code."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"SAM checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(p))
        else:
            try:
                data = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a bad file
        raise WeightsError(f"cannot read SAM checkpoint {p}: {err}") from err
    if isinstance(data, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(data.get(wrapper), dict):
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    if any(k.startswith("image_encoder.trunk.") for k in data):
        raise WeightsError(
            f"{p} is a SAM 2 checkpoint; this step needs a segment-anything (SAM v1) checkpoint "
            "such as sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth"
        )
    return data


def load_sam(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Build the SAM that `path` holds (size read from its shapes) and load its weights strictly."""
    state_dict = read_sam_state_dict(path)
    config = infer_sam_config(state_dict, source=str(path))
    model = build_sam(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise WeightsError(f"{path} does not match a {config.name} SAM: {' '.join(first)}") from err
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise WeightsError(f"cannot move SAM to device {device!r}: {err}") from err
    model.eval()
    return model, config


@dataclass
class _Embedding:
    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class SamFramePredictor:
    """`SamPredictor` that keeps the embeddings of the last few frames, keyed by frame number.

    Computing the image embedding is nearly all of SAM's cost; all objects of a frame share it, and a
    frame visited again (propagating backwards from a later prompt) reuses it.
    """

    def __init__(self, model, cache_size: int = 4):
        from segment_anything import SamPredictor

        self._predictor = SamPredictor(model)
        self._cache: OrderedDict[object, _Embedding] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self.embeddings_computed = 0

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits SAM returns and takes back as `mask_input`."""
        return 4 * self._predictor.model.prompt_encoder.image_embedding_size[0]

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        """Make `image` (H, W, 3) uint8 RGB current; reuse its embedding if `key` was seen lately."""
        p = self._predictor
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            emb = self._cache[key]
            p.features, p.original_size, p.input_size = emb.features, emb.original_size, emb.input_size
            p.is_image_set = True
            return
        p.set_image(np.ascontiguousarray(image), image_format="RGB")
        self.embeddings_computed += 1
        if key is not None:
            self._cache[key] = _Embedding(p.features, tuple(p.original_size), tuple(p.input_size))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def predict(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask_output: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask logits (C, H, W) float32 (> 0 = object), scores (C,), low-res logits (C, h, w)."""
        logits, scores, low_res = self._predictor.predict(
            point_coords=point_coords,
            point_labels=point_labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask_output,
            return_logits=True,
        )
        return logits.astype(np.float32), scores.astype(np.float32), low_res.astype(np.float32)
