"""MMDiT: shapes, adaLN-Zero initialisation, pipeline layers, named sizes, training signal."""

from __future__ import annotations

import pytest
import torch

from flowmill.models.mmdit import MMDIT_SIZES, JointBlock, MMDiT, MMDiTConfig, mmdit_config, sincos_pe_2d

torch.set_num_threads(1)


def tiny(**overrides) -> MMDiTConfig:
    return mmdit_config("tiny", **overrides)


def randomised(model: MMDiT, seed: int = 0) -> MMDiT:
    """Every parameter random, so that no zero-initialised layer hides a wrong wire."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def inputs(cfg: MMDiTConfig, batch: int = 2, height: int = 16, width: int = 16, length: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, cfg.in_channels, height, width, generator=generator)
    t = torch.rand(batch, generator=generator)
    txt = torch.randn(batch, length, cfg.txt_dim, generator=generator)
    vec = torch.randn(batch, cfg.vec_dim, generator=generator)
    return img, t, txt, vec


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (8, 12), (12, 6)])
def test_velocity_has_the_image_shape(qk_norm, size):
    cfg = tiny(qk_norm=qk_norm, out_channels=3)
    model = randomised(MMDiT(cfg))
    img, t, txt, vec = inputs(cfg, height=size[0], width=size[1])
    out = model(img, t, txt, vec)
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_each_sample_is_independent_of_the_others_in_the_batch():
    cfg = tiny()
    model = randomised(MMDiT(cfg))
    img, t, txt, vec = inputs(cfg, batch=3)
    together = model(img, t, txt, vec)
    alone = torch.cat([model(img[i:i + 1], t[i:i + 1], txt[i:i + 1], vec[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_adaln_zero_init_gives_zero_velocity_and_identity_blocks():
    cfg = tiny(depth=3)
    model = MMDiT(cfg)
    img, t, txt, vec = inputs(cfg)
    assert torch.equal(model(img, t, txt, vec), torch.zeros_like(img))
    img_tokens, txt_tokens, cond = model.embed(img, t, txt, vec)
    for index, block in enumerate(model.blocks):
        new_img, new_txt = block(img_tokens, txt_tokens, cond)
        assert torch.equal(new_img, img_tokens), f"block {index} changes the image tokens at init"
        if index < cfg.depth - 1:
            assert torch.equal(new_txt, txt_tokens), f"block {index} changes the text tokens at init"
        else:
            assert new_txt is None


def test_a_fresh_model_learns_and_every_parameter_gets_a_gradient():
    cfg = tiny(qk_norm=True)
    model = MMDiT(cfg)
    img, t, txt, vec = inputs(cfg, batch=4)
    target = torch.randn_like(img)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(img, t, txt, vec) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # After a few steps the zero-initialised gates are open: no parameter may be dead.
    model.zero_grad()
    (model(img, t, txt, vec) - target).square().mean().backward()
    dead = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.abs().sum() > 0]
    assert not dead


def test_pipeline_layers_chain_to_forward_and_share_parameters():
    cfg = tiny(depth=3, qk_norm=True)
    model = randomised(MMDiT(cfg))
    img, t, txt, vec = inputs(cfg, height=8, width=12)
    layers = model.pipeline_layers()
    assert len(layers) == cfg.depth + 2
    value = (img, t, txt, vec)
    for layer in layers[:-1]:
        value = layer(value)
        assert isinstance(value, tuple) and all(isinstance(item, torch.Tensor) for item in value)
    assert len(value) == 2, "after the last block only image tokens and conditioning travel on"
    assert torch.equal(layers[-1](value), model(img, t, txt, vec))
    own = {id(param) for param in model.parameters()}
    shared = {id(param) for layer in layers for param in layer.parameters()}
    assert shared == own


def test_blocks_are_a_flat_module_list_and_the_last_one_ends_the_text_stream():
    model = MMDiT(tiny(depth=4))
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 4
    assert all(isinstance(block, JointBlock) for block in model.blocks)
    names = {name for name, _ in model.blocks[-1].named_parameters()}
    assert "txt.kv.weight" in names and not any(name.startswith(("txt.proj", "txt.mlp", "txt.qkv")) for name in names)


def test_positional_table_is_cropped_centrally():
    cfg = tiny()
    model = MMDiT(cfg)
    table = model.embed.pe  # (16, 16, D)
    assert table.shape == (cfg.pos_embed_max_size, cfg.pos_embed_max_size, cfg.dim)
    torch.testing.assert_close(model.embed.cropped_pe(4, 6), table[6:10, 5:11], rtol=0, atol=0)
    torch.testing.assert_close(model.embed.cropped_pe(16, 16), table, rtol=0, atol=0)


def test_sincos_table_rows_and_columns():
    table = sincos_pe_2d(dim=8, grid_size=4, base_size=2).double()  # positions 0, .5, 1, 1.5
    positions = torch.arange(4, dtype=torch.float64) / 2
    omega = torch.tensor([1.0, 0.01], dtype=torch.float64)  # 10000^(-k/2)
    col = torch.cat([torch.sin(positions[:, None] * omega), torch.cos(positions[:, None] * omega)], dim=1)
    torch.testing.assert_close(table[2, :, :4], col, rtol=0, atol=1e-7)  # first half: column position
    torch.testing.assert_close(table[:, 3, 4:], col, rtol=0, atol=1e-7)  # second half: row position


def test_bad_image_sizes_are_refused():
    cfg = tiny()
    model = MMDiT(cfg)
    img, t, txt, vec = inputs(cfg)
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        model(img[..., :15], t, txt, vec)
    big = torch.randn(2, cfg.in_channels, 34, 16)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 16"):
        model(big, t, txt, vec)


def test_named_sizes_and_overrides():
    assert set(MMDIT_SIZES) == {"tiny", "small", "sd3-medium"}
    medium = mmdit_config("sd3-medium")
    sizes = (medium.depth, medium.dim, medium.txt_dim, medium.vec_dim, medium.pos_embed_max_size)
    assert sizes == (24, 1536, 4096, 2048, 192)
    cfg = mmdit_config("tiny", depth=5, qk_norm=True)
    assert cfg.depth == 5 and cfg.qk_norm and MMDIT_SIZES["tiny"].depth == 2
    with pytest.raises(ValueError, match="choose one of: tiny, small, sd3-medium"):
        mmdit_config("huge")
    with pytest.raises(ValueError, match="dpeth"):
        mmdit_config("tiny", dpeth=4)
    with pytest.raises(ValueError, match="depth"):
        MMDiTConfig(depth=0)


def test_sd3_medium_builds_on_the_meta_device_with_its_parameter_count():
    with torch.device("meta"):
        model = MMDiT(mmdit_config("sd3-medium"))
    count = sum(param.numel() for param in model.parameters())
    # diffusers' SD3-medium transformer has 2,028,328,000 parameters; flowmill lacks the
    # last block's unused text-query projection (1536·1536 + 1536).
    assert count == 2_028_328_000 - (1536 * 1536 + 1536)


def test_bf16_forward_and_backward_run():
    cfg = tiny(qk_norm=True)
    model = randomised(MMDiT(cfg)).to(torch.bfloat16)
    img, t, txt, vec = inputs(cfg)
    out = model(img.bfloat16(), t, txt.bfloat16(), vec.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()


@pytest.mark.slow
def test_compiled_blocks_are_the_same_function_and_a_deep_copy_keeps_its_own_weights():
    import copy

    from torch._dynamo.utils import counters

    cfg = tiny(qk_norm=True, depth=3)
    eager = randomised(MMDiT(cfg))
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    img, t, txt, vec = inputs(cfg)
    frames = counters["frames"]["ok"]
    expected, got = eager(img, t, txt, vec), compiled(img, t, txt, vec)
    assert counters["frames"]["ok"] > frames  # the compiled path ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    got.square().mean().backward()
    for (name, param), theirs in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    # An EMA-style deep copy of a compiled model computes with its own weights, not the original's.
    average = copy.deepcopy(compiled)
    with torch.no_grad():
        for param in average.parameters():
            param.mul_(0.5)
    reference = copy.deepcopy(eager)
    with torch.no_grad():
        for param in reference.parameters():
            param.mul_(0.5)
    torch.testing.assert_close(average(img, t, txt, vec), reference(img, t, txt, vec), rtol=1e-5, atol=1e-5)
