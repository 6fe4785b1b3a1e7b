"""Structure of the DiT: real-size parameter counts, grouped forward, loading errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity_utils import parity_dir, state_dict_keys_file  # noqa: E402

from com4d.dit import COM4DTransformer, DiTConfig  # noqa: E402
from com4d.errors import WeightsError  # noqa: E402

COM4D_DIT = parity_dir() / "weights" / "COM4D" / "transformer"


def n_params(cfg: DiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in COM4DTransformer(cfg).parameters())


def test_real_configs_have_the_released_parameter_counts():
    # TripoSG DiT: 1,439,556,160 (reference §2.2 / peers §2.1); COM4D adds 32 + 64 + 1 + 1 rows of 2048.
    assert n_params(DiTConfig.triposg()) == 1_439_556_160
    assert n_params(DiTConfig.com4d()) == 1_439_556_160 + (32 + 64 + 2) * 2048
    assert round(n_params(DiTConfig.com4d()) / 1e6, 2) == 1439.76


def test_key_names_match_the_official_checkpoint_list():
    keys_file = state_dict_keys_file()  # in the repository: a missing file fails here, it never skips
    official = {}
    section = None
    for line in keys_file.read_text().splitlines():
        if line.startswith("=="):
            section = line
            continue
        if section and "PartFrameCrafter" in section and " (" in line:
            name, shape = line.split(" (", 1)
            official[name] = tuple(int(s) for s in shape.rstrip(",)").split(",") if s.strip())
    assert len(official) == 558
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in COM4DTransformer(DiTConfig.com4d()).state_dict().items()}
    assert ours == official


@pytest.fixture(scope="module")
def model() -> COM4DTransformer:
    return COM4DTransformer.from_pretrained(COM4D_DIT)


def test_table_sizes_come_from_the_safetensors_header(model):
    state = load_file(str(COM4D_DIT / "diffusion_pytorch_model.safetensors"))
    assert model.cfg.part_rows == state["part_embedding.weight"].shape[0]
    assert model.cfg.frame_rows == state["frame_embedding.weight"].shape[0]
    torch.testing.assert_close(model.frame_embedding.weight, state["frame_embedding.weight"])


def inputs(model, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(b, 16, cfg.in_channels, generator=g)
    ctx = torch.randn(b, 20, cfg.cross_attention_dim, generator=g)
    t = torch.rand(b, generator=g) * 1000
    return x, t, ctx


def test_groups_do_not_see_each_other_and_timesteps_are_per_latent(model):
    x, t, ctx = inputs(model, 5)
    joint = model(x, t, ctx, group_sizes=[2, 3], mode="frames")
    first = model(x[:2], t[:2], ctx[:2], group_sizes=[2], mode="frames")
    second = model(x[2:], t[2:], ctx[2:], group_sizes=[3], mode="frames")
    torch.testing.assert_close(joint, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
    # changing one latent of group 1 changes group 1's outputs but not group 0's
    x2 = x.clone()
    x2[4] += 1.0
    moved = model(x2, t, ctx, group_sizes=[2, 3], mode="frames")
    torch.testing.assert_close(moved[:2], joint[:2], atol=1e-6, rtol=1e-6)
    assert (moved[2:4] - joint[2:4]).abs().max() > 1e-3


def test_grouped_parts_forward_equals_a_one_column_grid_of_static_objects(model):
    """Training's 'parts' mode and inference's grid route a static scene the same way."""
    x, t, ctx = inputs(model, 3)
    t = t[:1].expand(3)
    packed = model(x, t, ctx, group_sizes=[3], mode="parts")
    grid = model.forward_grid(x[:, None], t[:1], ctx[:, None], ctx[:, None], static_rows=3)
    torch.testing.assert_close(packed, grid[:, 0], atol=1e-5, rtol=1e-5)


def make_folder(tmp_path: Path, mutate) -> Path:
    dst = tmp_path / "transformer"
    shutil.copytree(COM4D_DIT, dst)
    state = load_file(str(dst / "diffusion_pytorch_model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    state, config = mutate(state, config)
    save_file(state, str(dst / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_shape_names_the_file_and_the_tensor(tmp_path):
    def mutate(state, config):
        state["blocks.1.attn2.to_k.weight"] = state["blocks.1.attn2.to_k.weight"][:, :-1].contiguous()
        return state, config

    folder = make_folder(tmp_path, mutate)
    pattern = r"diffusion_pytorch_model\.safetensors.*blocks\.1\.attn2\.to_k\.weight"
    with pytest.raises(WeightsError, match=pattern):
        COM4DTransformer.from_pretrained(folder)


def test_missing_and_unknown_tensors_are_named(tmp_path):
    # the first block after the middle one has a long skip, whatever the depth of the fixture's model
    skip_block = json.loads((COM4D_DIT / "config.json").read_text())["num_layers"] // 2 + 1

    def mutate(state, config):
        del state[f"blocks.{skip_block}.skip_norm.bias"]
        state["extra.weight"] = torch.zeros(2)
        return state, config

    folder = make_folder(tmp_path, mutate)
    with pytest.raises(WeightsError, match=rf"blocks\.{skip_block}\.skip_norm\.bias.*extra\.weight"):
        COM4DTransformer.from_pretrained(folder)


def test_a_vae_folder_given_as_transformer_is_refused(tmp_path):
    vae = parity_dir() / "weights" / "TripoSG" / "vae"
    with pytest.raises(WeightsError, match="TripoSGVAEModel"):
        COM4DTransformer.from_pretrained(vae)


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text((COM4D_DIT / "config.json").read_text())
    with pytest.raises(WeightsError, match="missing weights file"):
        COM4DTransformer.from_pretrained(tmp_path)


def test_layout_conversion_round_trips():
    from com4d.weights import heads_first_to_standard, standard_to_heads_first

    state = load_file(str(COM4D_DIT / "diffusion_pytorch_model.safetensors"))
    heads = json.loads((COM4D_DIT / "config.json").read_text())["num_attention_heads"]
    back = standard_to_heads_first(heads_first_to_standard(state, heads), heads)
    assert back.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(back[k], state[k], atol=0, rtol=0)
    converted = heads_first_to_standard(state, heads)
    assert not torch.equal(converted["blocks.0.attn1.to_k.weight"], state["blocks.0.attn1.to_k.weight"])


def test_feed_forward_slicing_and_skipped_static_rows_change_nothing(model, monkeypatch):
    import com4d.dit as dit

    g = torch.Generator().manual_seed(3)
    cfg = model.cfg
    x = torch.randn(4, 3, 16, cfg.in_channels, generator=g)
    enc = torch.randn(4, 3, 20, cfg.cross_attention_dim, generator=g)
    whole = model.forward_grid(x, 300.0, enc, enc, static_rows=2, cutoff=True)
    monkeypatch.setattr(dit, "FF_CHUNK_TOKENS", 20)  # one cell (17 tokens) per slice
    sliced = model.forward_grid(x, 300.0, enc, enc, static_rows=2, cutoff=True)
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)
    ctx = dit.CellContext.per_cell(enc)
    dyn = torch.arange(2 * 3, 4 * 3)
    only_dynamic = model.forward_grid(x[2:], 300.0, ctx.subset(dyn), ctx.subset(dyn), static_rows=2, cutoff=True,
                                      row_offset=2, total_rows=4)
    torch.testing.assert_close(only_dynamic, whole[2:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="only be left out after the cutoff"):
        model.forward_grid(x[2:], 300.0, ctx.subset(dyn), ctx.subset(dyn), static_rows=2, cutoff=False,
                           row_offset=2, total_rows=4)


def test_unconditional_cross_attention_is_exactly_the_output_bias(model):
    g = torch.Generator().manual_seed(4)
    cfg = model.cfg
    x = torch.randn(3, 2, 16, cfg.in_channels, generator=g)
    zeros = torch.zeros(3, 2, 20, cfg.cross_attention_dim)
    computed = model.forward_grid(x, 700.0, zeros, zeros, static_rows=1)  # per-cell zero tokens, computed
    from com4d.dit import CellContext

    shortcut = CellContext.zeros(6, 20, cfg.cross_attention_dim, x.device, x.dtype)
    fast = model.forward_grid(x, 700.0, shortcut, shortcut, static_rows=1)
    torch.testing.assert_close(fast, computed, atol=1e-6, rtol=1e-6)
