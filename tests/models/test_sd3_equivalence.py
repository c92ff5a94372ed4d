"""flowmill's MMDiT is diffusers' SD3Transformer2DModel: same outputs for the same weights,
both ways through the folders, and clear refusals for what is not an SD3 transformer."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from flowmill.models import sd3_convert
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.models.sd3_convert import (
    diffusers_to_flowmill,
    flowmill_to_diffusers,
    load_diffusers_folder,
    load_model_folder,
    save_diffusers_folder,
    save_model_folder,
)

torch.set_num_threads(1)

TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24, out_channels=4,
                pos_embed_max_size=16)
# The last block's text queries, whose output diffusers discards and flowmill does not hold.
DEAD = ("transformer_blocks.2.attn.add_q_proj.weight", "transformer_blocks.2.attn.add_q_proj.bias",
        "transformer_blocks.2.attn.norm_added_q.weight")


def random_sd3(qk_norm, seed: int = 0) -> SD3Transformer2DModel:
    """A tiny SD3 transformer with EVERY parameter random, zero-initialised layers included."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TINY_SD3, qk_norm=qk_norm).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def inputs(batch=2, height=16, width=16, length=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 4, height, width, generator=generator)
    txt = torch.randn(batch, length, 32, generator=generator)
    vec = torch.randn(batch, 24, generator=generator)
    t = torch.rand(batch, generator=generator)
    return img, t, txt, vec


def diffusers_velocity(model, img, t, txt, vec):
    return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t).sample


def assert_same_function(ours: MMDiT, theirs: SD3Transformer2DModel, height: int, width: int):
    img, t, txt, vec = inputs(height=height, width=width)
    with torch.no_grad():
        expected = diffusers_velocity(theirs, img, t, txt, vec)
        got = ours(img, t, txt, vec)
    assert got.shape == expected.shape == img.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.fixture(params=[None, "rms_norm"], ids=["no-qk-norm", "qk-rms-norm"])
def imported(request, tmp_path):
    """(diffusers model, its folder, flowmill model imported from the folder, cfg)."""
    reference = random_sd3(request.param)
    folder = tmp_path / "diffusers"
    reference.save_pretrained(folder)
    cfg, state_dict = load_diffusers_folder(folder)
    model = MMDiT(cfg).eval()
    model.load_state_dict(state_dict)
    return reference, folder, model, cfg


@pytest.mark.parametrize("size", [(16, 16), (8, 12), (10, 4)], ids=["full", "smaller-non-square", "tall"])
def test_imported_model_matches_diffusers(imported, size):
    reference, _, model, cfg = imported
    assert cfg.qk_norm == (reference.config.qk_norm == "rms_norm")
    assert_same_function(model, reference, *size)


def test_export_loads_in_diffusers_without_missing_keys_and_matches(imported, tmp_path):
    reference, _, model, cfg = imported
    folder = tmp_path / "exported"
    save_diffusers_folder(folder, cfg, model.state_dict())
    reloaded, info = SD3Transformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False, output_loading_info=True)
    assert not any(info.values()), info
    reloaded.eval()
    for size in [(16, 16), (6, 14)]:
        img, t, txt, vec = inputs(height=size[0], width=size[1])
        with torch.no_grad():
            expected = diffusers_velocity(reference, img, t, txt, vec)
            assert torch.equal(diffusers_velocity(reloaded, img, t, txt, vec), expected)
    original, exported = reference.state_dict(), reloaded.state_dict()
    live = [name for name in original if name not in DEAD]
    assert all(torch.equal(original[name], exported[name]) for name in live)
    assert not exported[DEAD[0]].any()


def test_flowmill_to_diffusers_to_flowmill_is_exact():
    cfg = mmdit_config("tiny", depth=3, qk_norm=True)
    model = MMDiT(cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    config, theirs = flowmill_to_diffusers(cfg, model.state_dict())
    cfg_back, ours = diffusers_to_flowmill(theirs, json.loads(json.dumps(config)))
    assert cfg_back == cfg
    assert ours.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[name], tensor) for name, tensor in model.state_dict().items())


def test_fresh_positional_table_is_diffusers_table():
    for pos_embed_max_size, sample_size in [(16, 16), (24, 12)]:
        kwargs = {**TINY_SD3, "pos_embed_max_size": pos_embed_max_size, "sample_size": sample_size}
        reference = SD3Transformer2DModel(**kwargs)
        cfg = mmdit_config("tiny", pos_embed_max_size=pos_embed_max_size, sample_size=sample_size, depth=3)
        table = MMDiT(cfg).embed.pe.reshape(1, -1, cfg.dim)
        assert torch.equal(table, reference.pos_embed.pos_embed)


def test_flowmill_model_folder_round_trip(imported, tmp_path):
    _, _, model, cfg = imported
    save_model_folder(tmp_path / "model", "mmdit", cfg, model.state_dict())
    meta = json.loads((tmp_path / "model" / "flowmill_model.json").read_text())
    assert meta["family"] == "mmdit" and meta["config"]["depth"] == 3
    family, cfg_back, state_dict = load_model_folder(tmp_path / "model")
    assert family == "mmdit" and cfg_back == cfg
    assert all(torch.equal(state_dict[name], tensor) for name, tensor in model.state_dict().items())
    with pytest.raises(ValueError, match="choose one of: mmdit"):
        save_model_folder(tmp_path / "other", "unet", cfg, model.state_dict())
    with pytest.raises(ValueError, match="flowmill_model.json is missing"):
        load_model_folder(tmp_path)


def edit_folder(folder, config_edit=None, weights_edit=None):
    if config_edit:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if weights_edit:
        path = folder / "diffusion_pytorch_model.safetensors"
        weights = load_file(path)
        weights_edit(weights)
        save_file(weights, path)


def test_what_is_not_an_sd3_transformer_is_refused(imported):
    _, folder, _, _ = imported
    cases = [
        (lambda c: c.update(_class_name="FluxTransformer2DModel"), None, "_class_name is 'FluxTransformer2DModel'"),
        (lambda c: c.update(_class_name="SD3Transformer2DModel"), None, None),
        (lambda c: c.update(dual_attention_layers=[0, 1]), None, "dual-attention"),
        (lambda c: c.pop("dual_attention_layers"), None, None),
        (lambda c: c.update(qk_norm="layer_norm"), None, "unsupported qk_norm 'layer_norm'"),
        (lambda c: c.update(caption_projection_dim=64), None, "caption_projection_dim 64"),
        (lambda c: c.update(new_knob=1), None, "new_knob"),
        (lambda c: c.pop("num_layers"), None, "lacks key.*num_layers"),
        (None, lambda w: w.pop("transformer_blocks.1.attn.to_k.weight"), "missing.*blocks.1.attn.to_k.weight"),
        (None, lambda w: w.update(extra=torch.zeros(1)), "unexpected.*extra"),
        (None, lambda w: w.update({"proj_out.bias": torch.zeros(3)}), "wrong shape.*proj_out.bias"),
    ]
    original_config = (folder / "config.json").read_text()
    original_weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    for config_edit, weights_edit, message in cases:
        edit_folder(folder, config_edit, weights_edit)
        if message is None:
            load_diffusers_folder(folder)
        else:
            with pytest.raises(ValueError, match=message):
                load_diffusers_folder(folder)
        (folder / "config.json").write_text(original_config)
        save_file(original_weights, folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither diffusion_pytorch_model.safetensors"):
        load_diffusers_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_diffusers_folder(folder)


def test_sharded_diffusers_folder_is_read(imported, tmp_path):
    reference, _, model, _ = imported
    folder = tmp_path / "sharded"
    reference.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / sd3_convert.DIFFUSERS_INDEX).is_file()
    _, state_dict = load_diffusers_folder(folder)
    assert all(torch.equal(state_dict[name], tensor) for name, tensor in model.state_dict().items())


def test_export_refuses_what_diffusers_cannot_hold():
    cfg = mmdit_config("tiny", mlp_ratio=2.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        flowmill_to_diffusers(cfg, MMDiT(cfg).state_dict())
    cfg = mmdit_config("tiny")
    state_dict = MMDiT(cfg).state_dict()
    state_dict.pop("final.linear.bias")
    with pytest.raises(ValueError, match="missing.*final.linear.bias"):
        flowmill_to_diffusers(cfg, state_dict)


def test_training_step_gradients_match_diffusers(imported):
    """Training runs flowmill's own CPU forms of GELU and RMS norm: the gradient of every
    weight still equals diffusers' (mapped through the importer, which only reshapes and
    concatenates, so it maps gradients as it maps weights)."""
    reference, _, model, _ = imported
    img, t, txt, vec = inputs()
    weights = torch.randn(img.shape, generator=torch.Generator().manual_seed(2))
    (diffusers_velocity(reference.train(), img, t, txt, vec) * weights).sum().backward()
    (model.train()(img, t, txt, vec) * weights).sum().backward()
    grads = {name: torch.zeros_like(param) if param.grad is None else param.grad
             for name, param in reference.named_parameters()}
    grads.update({name: buffer for name, buffer in reference.named_buffers()})
    _, expected = diffusers_to_flowmill(grads, dict(reference.config))
    for name, param in model.named_parameters():
        scale = expected[name].abs().max()
        assert (param.grad - expected[name]).abs().max() <= 1e-5 * scale + 1e-7, name
