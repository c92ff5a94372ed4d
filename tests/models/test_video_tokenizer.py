import time

import pytest
import torch
import torch.nn.functional as F

from flowmill.models.video_tokenizer import (
    VIDEO_TOKENIZER_SIZES,
    VideoTokenizer,
    VideoTokenizerConfig,
    patchify,
    unpatchify,
    video_tokenizer_config,
)

torch.set_num_threads(1)

# 4 frames of 8×8, tubelet (2, 4, 4): N = 8 patches of P = 32·C values; K = 4 tokens.
TINY = dict(frames=4, image_size=8, channels=3, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, num_registers=4)


def tiny_model(seed: int = 0, **overrides) -> VideoTokenizer:
    torch.manual_seed(seed)
    return VideoTokenizer(video_tokenizer_config("tiny", **{**TINY, **overrides}))


def randomized(model: VideoTokenizer, seed: int = 0) -> VideoTokenizer:
    """Every weight random, so outputs depend on every input (a fresh decoder outputs zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def clips(batch: int, config: VideoTokenizerConfig, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.frames, config.channels, config.image_size, config.image_size)
    return torch.rand(shape, generator=generator) * 2 - 1


def moving_squares(batch: int, frames: int, size: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T, 1, H, W) clips in [-1, 1]: a bright square moving one pixel per frame."""
    video = -torch.ones(batch, frames, 1, size, size)
    for clip in range(batch):
        row, col = torch.randint(0, size - side - frames + 2, (2,), generator=generator).tolist()
        d_row, d_col = torch.randint(0, 2, (2,), generator=generator).tolist()
        for frame in range(frames):
            top, left = row + d_row * frame, col + d_col * frame
            video[clip, frame, 0, top : top + side, left : left + side] = 1.0
    return video


# ----- config ---------------------------------------------------------------------------------


def test_sizes_and_overrides():
    assert {"tiny", "d18"} <= set(VIDEO_TOKENIZER_SIZES)
    config = video_tokenizer_config("tiny", frames=4, num_registers=8)
    assert config.frames == 4 and config.num_registers == 8
    assert config.dim == VIDEO_TOKENIZER_SIZES["tiny"].dim
    assert config.keep_k_choices == [1, 2, 4, 8]
    assert video_tokenizer_config("tiny", keep_k_distribution="uniform", num_registers=5).keep_k_choices == [1, 2, 3, 4, 5]
    assert VIDEO_TOKENIZER_SIZES["d18"].num_patches == 8 * 8 * 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_registers=6), "power of two"),
        (dict(keep_k_distribution="geometric"), "choose one of: pow2, uniform"),
        (dict(tubelet=(3, 4, 4)), "tubelet"),
        (dict(num_heads=5), "divisible"),
        (dict(cfg_drop_prob=1.0), "cfg_drop_prob"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        video_tokenizer_config("tiny", **overrides)


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown video tokenizer size 'huge'; choose one of: tiny"):
        video_tokenizer_config("huge")


# ----- patches and encoder --------------------------------------------------------------------


def test_patchify_round_trip_and_patch_content():
    video = torch.randn(2, 4, 3, 8, 8)
    patches = patchify(video, (2, 4, 4))
    assert patches.shape == (2, 8, 2 * 4 * 4 * 3)
    # Patch 1 is frames 0-1, rows 0-3, columns 4-7.
    assert torch.equal(patches[:, 1], video[:, 0:2, :, 0:4, 4:8].permute(0, 1, 3, 4, 2).reshape(2, -1))
    assert torch.equal(unpatchify(patches, (2, 4, 4), 4, 3, 8), video)


def test_patch_positions_are_a_fixed_table_as_loud_as_the_content():
    model = tiny_model()
    pos = model.patch_pos  # (N, D), N = 2 × 2 × 2 patches
    assert pos.shape == (model.config.num_patches, model.config.dim)
    assert "patch_pos" not in dict(model.named_parameters()) and "patch_pos" not in model.state_dict()
    distances = torch.cdist(pos, pos) + torch.eye(len(pos)) * 1e9
    # Every patch has its own place, told apart as clearly as a noise patch's embedding varies.
    noise_embedding_std = model.dec_patch_embed(torch.randn(256, model.config.patch_values)).std(0).mean()
    assert distances.min() > noise_embedding_std, (distances.min(), noise_embedding_std)
    assert torch.equal(pos, tiny_model(seed=1).patch_pos)  # fixed: the same for every seed


def test_encode_shapes_and_codes_match_indices():
    model = tiny_model()
    encoded = model.encode(clips(3, model.config))
    assert encoded.indices.shape == (3, 4) and encoded.indices.dtype == torch.int64
    assert encoded.codes.shape == (3, 4, 3)
    assert torch.equal(model.fsq.indices_to_codes(encoded.indices), encoded.codes)


def test_registers_attend_causally():
    # Two blocks: a leak from a later register into the patches would reach earlier
    # registers only in the block after it.
    # In eval mode: standardising 2 clips over the batch would map every latent to ±1.
    model = tiny_model(encoder_depth=2).eval()
    video = clips(2, model.config)
    with torch.no_grad():
        before = model.register_latents(video)
        model.registers[2] += torch.randn(model.config.dim)
        after = model.register_latents(video)
    torch.testing.assert_close(after[:, :2], before[:, :2], rtol=0, atol=1e-6)
    assert (after[:, 2:] - before[:, 2:]).abs().amax(dim=-1).min() > 1e-3


def test_wrong_clip_shape_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\) = \(B, 4, 3, 8, 8\), got \(2, 6, 3, 8, 8\)"):
        model.encode(torch.zeros(2, 6, 3, 8, 8))
    with pytest.raises(ValueError, match="got \\(4, 3, 8, 8\\)"):
        model.loss(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        model.encode(torch.zeros(2, 4, 3, 8, 8, dtype=torch.uint8))


# ----- nested dropout and token conditioning --------------------------------------------------


@pytest.mark.parametrize("keep_k", [1, 2, 3, 4])
def test_masked_tokens_cannot_reach_the_decoder(keep_k):
    model = randomized(tiny_model())
    generator = torch.Generator().manual_seed(1)
    codes_a = model.fsq.indices_to_codes(torch.randint(model.fsq.codebook_size, (2, 4), generator=generator))
    codes_b = model.fsq.indices_to_codes(torch.randint(model.fsq.codebook_size, (2, 4), generator=generator))
    codes_b[:, 0] = -codes_a[:, 0]  # the same token sequences except at position 0 ...
    codes_b[:, 1:keep_k] = codes_a[:, 1:keep_k]  # ... and beyond the kept prefix
    x_t = torch.randn(2, 8, 96, generator=generator)
    t = torch.tensor([0.3, 0.8])
    keep = torch.full((2,), keep_k)

    def velocity(codes, start):
        changed = codes_a.clone()
        changed[:, start:] = codes[:, start:]
        return model.velocity(x_t, t, model.token_condition(changed, keep))

    with torch.no_grad():
        reference = velocity(codes_a, 0)
        assert torch.equal(velocity(codes_b, keep_k), reference)  # tokens >= k changed: no effect
        assert not torch.allclose(velocity(codes_b, 0), reference)  # token 0 changed: output moves
        null = model.token_condition(codes_a, torch.zeros(2, dtype=torch.long))
        assert torch.equal(null, model.token_condition(codes_b, torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize("keep_k", [1, 3])
def test_loss_trains_only_the_registers_of_the_kept_prefix(keep_k):
    model = randomized(tiny_model(encoder_depth=2))
    loss, _ = model.loss(clips(2, model.config), torch.Generator().manual_seed(0), keep_k=keep_k)
    loss.backward()
    grad_norms = model.registers.grad.norm(dim=-1)
    assert torch.all(grad_norms[keep_k:] == 0)
    assert torch.all(grad_norms[:keep_k] > 0)
    # End to end through the FSQ straight-through estimator, down to the patch embedding.
    assert model.enc_patch_embed.weight.grad.abs().max() > 0


def test_keep_k_distribution_and_cfg_dropout():
    model = tiny_model(num_registers=8, cfg_drop_prob=0.25)
    keep = model.sample_keep_k(4000, torch.device("cpu"), torch.Generator().manual_seed(0))
    values, counts = keep.unique(return_counts=True)
    assert values.tolist() == [0, 1, 2, 4, 8]
    assert abs(counts[0].item() / 4000 - 0.25) < 0.03
    assert counts[1:].min() > 0.75 * 4000 / 4 * 0.85

    never_dropped = tiny_model(num_registers=6, keep_k_distribution="uniform", cfg_drop_prob=0.0)
    keep = never_dropped.sample_keep_k(600, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert keep.unique().tolist() == [1, 2, 3, 4, 5, 6]


def test_loss_is_reproducible_and_reports_metrics():
    model = randomized(tiny_model())  # a fresh decoder predicts x0 = 0 whatever the noise
    video = clips(4, model.config)
    loss_a, metrics = model.loss(video, torch.Generator().manual_seed(3))
    loss_b, _ = model.loss(video, torch.Generator().manual_seed(3))
    loss_c, _ = model.loss(video, torch.Generator().manual_seed(4))
    assert loss_a.dim() == 0 and torch.isfinite(loss_a)
    assert torch.equal(loss_a, loss_b) and not torch.equal(loss_a, loss_c)
    assert set(metrics) == {"flow_loss", "keep_k_mean", "codebook_usage"}
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())
    assert 0 < metrics["codebook_usage"] <= 16 / model.fsq.codebook_size
    with pytest.raises(ValueError, match="1..4 tokens, got 5"):
        model.loss(video, keep_k=5)


# ----- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_decode_from_every_prefix_length(cfg_scale):
    model = randomized(tiny_model())
    indices = model.encode(clips(2, model.config)).indices
    outputs = []
    for keep_k in range(1, 5):
        video = model.decode(indices[:, :keep_k], steps=3, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
        assert video.shape == (2, 4, 3, 8, 8) and video.dtype == torch.float32
        assert torch.isfinite(video).all()
        outputs.append(video)
    # Same noise, longer prefix: the condition and so the clip changes.
    for shorter, longer in zip(outputs[:-1], outputs[1:]):
        assert not torch.allclose(shorter, longer)
    again = model.decode(indices, steps=3, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, outputs[-1])


def test_cfg_scale_zero_is_the_unconditional_model():
    model = randomized(tiny_model())
    generator = torch.Generator().manual_seed(0)
    indices_a = torch.randint(model.fsq.codebook_size, (2, 4), generator=generator)
    indices_b = torch.randint(model.fsq.codebook_size, (2, 2), generator=generator)
    video_a = model.decode(indices_a, steps=2, cfg_scale=0.0, generator=torch.Generator().manual_seed(1))
    video_b = model.decode(indices_b, steps=2, cfg_scale=0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(video_a, video_b)
    guided = model.decode(indices_a, steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(guided, video_a)


def test_euler_integrates_from_noise_at_t1_to_data_at_t0():
    model = tiny_model()
    constant = torch.randn(1, 8, 96)
    seen_times = []

    def constant_velocity(x_t, t, cond):
        seen_times.append(t[0].item())
        return constant.expand_as(x_t)

    model.velocity = constant_velocity
    video = model.decode(torch.zeros(2, 4, dtype=torch.long), steps=4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 8, 96, generator=torch.Generator().manual_seed(5))
    # dx/dt = v from t = 1 to t = 0 gives x0 = noise - v.
    torch.testing.assert_close(patchify(video, (2, 4, 4)), noise - constant)
    assert seen_times == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_bad_decode_inputs_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="1..4 tokens, got 0"):
        model.decode(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="1..4 tokens, got 5"):
        model.decode(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        model.decode(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 125\)"):
        model.decode(torch.full((1, 2), 125))
    with pytest.raises(ValueError, match="steps"):
        model.decode(torch.zeros(1, 2, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="choose one of: euler, heun"):
        model.decode(torch.zeros(1, 2, dtype=torch.long), sampler="rk4")


def test_heun_sampler_spends_two_evaluations_per_step():
    model = randomized(tiny_model())
    calls = []
    velocity = model.velocity
    model.velocity = lambda x_t, t, cond: calls.append(t[0].item()) or velocity(x_t, t, cond)
    video = model.decode(torch.zeros(2, 3, dtype=torch.long), steps=2, sampler="heun")
    assert video.shape == (2, 4, 3, 8, 8) and torch.isfinite(video).all()
    assert calls == pytest.approx([1.0, 0.5, 0.5, 0.0])


# ----- training -------------------------------------------------------------------------------


def test_tiny_model_learns_moving_squares():
    start = time.perf_counter()
    config = video_tokenizer_config(
        "tiny", frames=4, image_size=16, channels=1, dim=64, encoder_depth=1, decoder_depth=1, num_registers=8
    )
    torch.manual_seed(0)
    model = VideoTokenizer(config)
    generator = torch.Generator().manual_seed(0)
    data = moving_squares(16, 4, 16, 4, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        batch = data[(step % 2) * 8 : (step % 2) * 8 + 8]
        loss, _ = model.loss(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert time.perf_counter() - start < 20


def test_trained_decoder_reads_the_clips_own_tokens():
    """At t = 1 the decoder sees pure noise: only the tokens tell the clips apart, so a clip's own
    tokens must reconstruct it better than another clip's (a decoder that ignored its tokens, or
    an encoder that gave every clip the same ones, would score the same with both)."""
    config = video_tokenizer_config(
        "tiny", frames=4, image_size=16, channels=1, dim=64, encoder_depth=1, decoder_depth=1, num_registers=8,
        noise_only_prob=0.9,
    )
    torch.manual_seed(0)
    model = VideoTokenizer(config)
    generator = torch.Generator().manual_seed(0)
    data = moving_squares(32, 4, 16, 4, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(200):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        loss, _ = model.loss(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        codes = model.encode(data).codes
        x0 = patchify(data, config.tubelet)
        noise, t, keep = torch.randn(x0.shape, generator=generator), torch.ones(len(data)), torch.full((len(data),), 8)
        own = F.mse_loss(model.decoder_output(noise, t, model.token_condition(codes, keep)), x0)
        other = F.mse_loss(model.decoder_output(noise, t, model.token_condition(codes.roll(1, 0), keep)), x0)
    assert own < 0.9 * other, (own.item(), other.item())


def test_latent_norm_spreads_clips_over_the_codebook():
    """Near-identical clips (one small square on black) still get different codes: each latent is
    standardised over the batch in training, with running statistics at inference."""
    generator = torch.Generator().manual_seed(0)
    video = moving_squares(32, 4, 8, 2, generator).expand(-1, -1, 3, -1, -1)
    spread = tiny_model()
    assert spread.encode(video).indices.unique().numel() > 8
    plain = tiny_model(latent_norm=False)
    assert plain.encode(video).indices.unique().numel() < spread.encode(video).indices.unique().numel()
    latents = spread.register_latents(video).flatten(1)
    torch.testing.assert_close(latents.mean(0), torch.zeros(latents.shape[1]), atol=1e-5, rtol=0)
    spread.eval()  # running statistics: a single clip encodes the same alone as in any batch
    assert torch.equal(spread.encode(video[:1]).indices, spread.encode(video[:4]).indices[:1])
