"""Image conditioning: DINOv2 tokens of the frames and of the masked objects (reference §4.3).

COM4D conditions every latent on the DINOv2-L tokens of a 518×518 image: the full frame for the
scene and static parts, the frame with everything but one object painted white for that object.
The official preprocessing is reproduced exactly:

1. the frame is resized to 518×518 with PIL's LANCZOS (aspect ratio not kept), masks with NEAREST;
2. object images: `u8(clip(img/255·m + (1 − m)·1, 0, 1)·255)` with m = mask/255, in float32;
3. pixel values `(u8/255 − mean)/std` in float32 with the ImageNet mean/std (no crop);
4. `Dinov2Model(...).last_hidden_state` (after the final LayerNorm): (B, 1 + (518/14)², hidden)
   = (B, 1370, 1024), CLS first, then the 37×37 patches row-major.

The classifier-free-guidance branch uses all-zero tokens, not DINO of a blank image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from com4d.errors import InputError, WeightsError
from com4d.weights import TRANSFORMERS_WEIGHTS, find_component, load_state_strict, load_tensors, read_json

CONDITIONING_SIZE = 518
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_FOLDER = "image_encoder_dinov2"
PROCESSOR_FOLDER = "feature_extractor_dinov2"
PROCESSOR_CONFIG = "preprocessor_config.json"

# Config keys that describe the file, the dtype or a backbone head, not the encoder we build.
_NON_MODEL_KEYS = (
    "dtype",
    "torch_dtype",
    "transformers_version",
    "architectures",
    "model_type",
    "_name_or_path",
    "out_features",
    "out_indices",
    "stage_names",
)
# Official checkpoints name the attention weights as transformers 4.x does; transformers 5 renamed them.
_ATTENTION_KEYS_V4_TO_V5 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)

ImageLike = np.ndarray | Image.Image


# -- preprocessing ---------------------------------------------------------------------------------


def _as_pil(image: ImageLike, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise InputError(f"{what} must be uint8 (0..255), got an array of {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InputError(f"{what} must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def resize_frame(frame: ImageLike, size: int = CONDITIONING_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: the frame as RGB, resized with LANCZOS without keeping the aspect ratio."""
    image = _as_pil(frame, "a frame").convert("RGB")
    return np.asarray(image.resize((size, size), Image.LANCZOS))


def resize_mask(mask: ImageLike, size: int = CONDITIONING_SIZE) -> np.ndarray:
    """(size, size) uint8 (255 = object): the mask as 8-bit L (bool → 0/255), resized with NEAREST."""
    image = _as_pil(mask, "a mask").convert("L")
    return np.asarray(image.resize((size, size), Image.NEAREST))


def mask_onto_white(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the object where mask = 255, white elsewhere, soft in between.

    The official `_apply_mask` with dilation 0 and no crop, so the object keeps its place in the
    image. Float32 throughout and truncation to uint8, exactly as the official code does.
    """
    frame = np.asarray(frame)
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    if frame.dtype != np.uint8 or mask.dtype != np.uint8:
        raise InputError(f"frame and mask must be uint8, got {frame.dtype} and {mask.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3 or mask.shape != frame.shape[:2]:
        raise InputError(
            f"mask_onto_white needs an (H, W, 3) frame and an (H, W) mask of the same size, "
            f"got {frame.shape} and {mask.shape} (resize both with resize_frame / resize_mask first)"
        )
    m = np.clip(mask.astype(np.float32) / 255.0, 0.0, 1.0)[..., None]  # (H, W, 1)
    base = frame.astype(np.float32) / 255.0  # (H, W, 3)
    white = np.float32(255.0)  # the official fill is a white image, divided by 255 after the product
    out = np.clip(base * m + (1.0 - m) * white / 255.0, 0.0, 1.0)  # (H, W, 3)
    return (out * 255.0).astype(np.uint8)


def to_pixel_values(
    images: Sequence[ImageLike] | np.ndarray,
    size: int = CONDITIONING_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(B, 3, size, size) float32 DINO input: `(u8/255 − mean)/std` of RGB images already at size².

    The official BitImageProcessor call (size 518, no crop) computes exactly this for 518² input.
    Images of another size are refused rather than silently resized: resize first with
    `resize_frame` (and composite objects with `mask_onto_white` at that size).
    """
    arrays = _stack_rgb(images, size)  # (B, size, size, 3) uint8
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    pixels = (arrays.astype(np.float32) / 255.0 - mean32) / std32  # (B, S, S, 3) float32
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))  # (B, 3, S, S)


def _stack_rgb(images: Sequence[ImageLike] | np.ndarray, size: int) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (np.ndarray, Image.Image)):
        raise InputError("pass a list of images (or a (B, H, W, 3) uint8 array), not a single image")
    if len(images) == 0:
        raise InputError("no images to encode")
    out = []
    for k, image in enumerate(images):
        arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if arr.dtype != np.uint8 or arr.shape != (size, size, 3):
            raise InputError(
                f"image {k} must be a ({size}, {size}, 3) uint8 RGB array, got {arr.shape} {arr.dtype} "
                f"(use resize_frame first)"
            )
        out.append(arr)
    return np.stack(out)


# -- the encoder -----------------------------------------------------------------------------------


class ImageEncoder:
    """DINOv2 (transformers' `Dinov2Model`) plus the official COM4D preprocessing.

    `encode(images)` gives the conditioning tokens (B, 1 + (size/patch)², hidden) in the model's
    dtype on its device (the guidance branch uses zeros instead: `CellContext.zeros`).

    `offload()` moves the weights to host memory (pinned when they came from a GPU) so that the
    encoder holds no GPU memory while the DiT samples; the next `encode` (or `onload()`) brings
    them back to the device they were loaded on, from memory, not from disk.
    """

    def __init__(
        self,
        model: Dinov2Model,
        size: int = CONDITIONING_SIZE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.model = model.eval().requires_grad_(False)
        self.home = model.embeddings.cls_token.device  # where encode() runs
        self.size = size
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.cls_token.dtype

    @property
    def offloaded(self) -> bool:
        return self.device != self.home

    def offload(self) -> None:
        """Weights to host memory (pinned if the home device is a GPU); no-op when home is the CPU."""
        if self.offloaded or self.home.type == "cpu":
            return
        self.model.to("cpu")
        if torch.cuda.is_available():
            for p in self.model.parameters():
                p.data = p.data.pin_memory()
            for b in self.model.buffers():
                b.data = b.data.pin_memory()

    def onload(self) -> None:
        """Weights back to the home device (a no-op when they are there)."""
        if self.offloaded:
            self.model.to(self.home, non_blocking=True)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the CLS token plus one per patch (1370 at 518 px, patch 14)."""
        return 1 + (self.size // self.model.config.patch_size) ** 2

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        size: int = CONDITIONING_SIZE,
    ) -> ImageEncoder:
        """Load a TripoSG folder (its `image_encoder_dinov2/`) or the encoder folder itself.

        Mean/std come from `feature_extractor_dinov2/preprocessor_config.json` when present (next
        to the encoder folder), else the ImageNet values every released model uses.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"weights folder {folder} does not exist")
        if (folder / ENCODER_FOLDER).is_dir():
            encoder_dir = find_component(folder, ENCODER_FOLDER, TRANSFORMERS_WEIGHTS)
        else:
            encoder_dir = folder
            for name in ("config.json", TRANSFORMERS_WEIGHTS):
                if not (folder / name).is_file():
                    raise WeightsError(
                        f"missing file {folder / name} (give the TripoSG folder or its {ENCODER_FOLDER}/)"
                    )
        model = load_dinov2(encoder_dir)
        mean, std = _normalization(encoder_dir)
        return cls(model.to(device=device, dtype=dtype), size=size, mean=mean, std=std)

    def pixel_values(self, images: Sequence[ImageLike] | np.ndarray, size: int | None = None) -> torch.Tensor:
        """(B, 3, size, size) float32 on the CPU (see `to_pixel_values`); size defaults to self.size."""
        return to_pixel_values(images, size or self.size, self.mean, self.std)

    def encode(
        self, images: Sequence[ImageLike] | np.ndarray, batch_size: int = 8, size: int | None = None
    ) -> torch.Tensor:
        """(B, num_tokens, hidden) `last_hidden_state` of uint8 RGB images at size² (default
        self.size; a request passes its own size instead of changing the shared encoder), in batches."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        size = size or self.size
        arrays = _stack_rgb(images, size)  # validates every image up front
        self.onload()
        chunks = []
        with torch.no_grad():
            for start in range(0, len(arrays), batch_size):
                pixels = self.pixel_values(arrays[start : start + batch_size], size)  # (b, 3, S, S) fp32
                pixels = pixels.to(device=self.device, dtype=self.dtype)
                chunks.append(self.model(pixel_values=pixels).last_hidden_state)  # (b, N, D)
        return torch.cat(chunks)  # (B, N, D)



def dinov2_config(config_path: Path) -> Dinov2Config:
    """A `Dinov2Config` from an official config.json (transformers 4.x or 5.x format alike).

    The dtype keys (`torch_dtype` in 4.x, `dtype` in 5.x) and backbone keys are dropped: the caller
    picks the dtype. Attention runs through PyTorch's SDPA, which matches the official fp32 numbers
    within 2e-6 on the CPU and uses the fused kernels on a GPU.
    """
    raw = read_json(config_path)
    model_type = raw.get("model_type", "dinov2")
    if model_type != "dinov2":
        raise WeightsError(f"{config_path} describes a '{model_type}' model, not DINOv2 ('dinov2')")
    if raw.get("use_swiglu_ffn", False):
        raise WeightsError(f"{config_path}: the SwiGLU DINOv2 (giant) is not the TripoSG image encoder")
    fields = {k: v for k, v in raw.items() if k not in _NON_MODEL_KEYS}
    try:
        return Dinov2Config(**fields, attn_implementation="sdpa")
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path} is not a usable DINOv2 config: {err}") from err


def load_dinov2(encoder_dir: Path) -> Dinov2Model:
    """A float32 `Dinov2Model` on the CPU with the weights of `encoder_dir/model.safetensors`.

    The weights go through our strict check (missing, unknown or wrongly shaped tensors name the
    file); the key names are mapped to whichever naming the installed transformers uses.
    """
    encoder_dir = Path(encoder_dir)
    config = dinov2_config(encoder_dir / "config.json")
    weights_path = encoder_dir / TRANSFORMERS_WEIGHTS
    state = load_tensors(weights_path)
    with torch.device("meta"):
        model = Dinov2Model(config)
    model = model.to_empty(device="cpu")
    expected = model.state_dict().keys()
    load_state_strict(model, _rename_attention_keys(state, expected), weights_path)
    return model.float().eval()


def _rename_attention_keys(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    uses_v5_names = any(".attention.q_proj." in k for k in expected)
    pairs = _ATTENTION_KEYS_V4_TO_V5 if uses_v5_names else [(b, a) for a, b in _ATTENTION_KEYS_V4_TO_V5]
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            key = key.replace(old, new)
        out[key] = value
    return out


def _normalization(encoder_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the preprocessor config next to the encoder, else ImageNet's."""
    for path in (encoder_dir.parent / PROCESSOR_FOLDER / PROCESSOR_CONFIG, encoder_dir / PROCESSOR_CONFIG):
        if path.is_file():
            raw = read_json(path)
            mean, std = raw.get("image_mean", IMAGENET_MEAN), raw.get("image_std", IMAGENET_STD)
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise WeightsError(f"{path}: image_mean / image_std must be three numbers (std > 0)")
            return tuple(float(x) for x in mean), tuple(float(x) for x in std)
    return IMAGENET_MEAN, IMAGENET_STD
