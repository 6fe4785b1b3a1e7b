"""DINOv2 off the GPU while the DiT samples: offload/onload keep the same weights (no disk re-read)
and the same features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from com4d.conditioning import ImageEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import parity_dir  # noqa: E402


def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(2)]


def test_offload_on_a_cpu_encoder_changes_nothing():
    encoder = ImageEncoder.from_pretrained(parity_dir() / "weights" / "TripoSG", "cpu", size=28)
    before = encoder.encode(frames())
    storages = [p.data_ptr() for p in encoder.model.parameters()]
    encoder.offload()
    assert not encoder.offloaded and encoder.device == torch.device("cpu")
    after = encoder.encode(frames())
    assert [p.data_ptr() for p in encoder.model.parameters()] == storages  # the same tensors, not reloaded
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offload_frees_the_gpu_and_encode_brings_it_back():
    encoder = ImageEncoder.from_pretrained(parity_dir() / "weights" / "TripoSG", "cuda", size=28)
    before = encoder.encode(frames())
    held = torch.cuda.memory_allocated()
    encoder.offload()
    assert encoder.offloaded and encoder.device.type == "cpu"
    assert next(encoder.model.parameters()).is_pinned()
    assert torch.cuda.memory_allocated() < held
    after = encoder.encode(frames())
    assert not encoder.offloaded and after.device.type == "cuda"
    torch.testing.assert_close(after, before, atol=0, rtol=0)
