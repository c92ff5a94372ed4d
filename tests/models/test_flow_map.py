"""flowmill.models.flow_map and the MMDiT's end-time input: a flow map loaded from a velocity
MMDiT is that model, its state dict is the velocity model's plus the jump embedding, and
sampling takes one network call per jump."""

from __future__ import annotations

import pytest
import torch

from flowmill.models.flow_map import jump, load_velocity_weights, sample_jumps
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.models.samplers import EulerSampler


def trained_like(model: MMDiT, seed: int) -> MMDiT:
    """``model`` with every weight random (a fresh MMDiT outputs zero, which would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 16, 16, generator=generator), torch.rand(batch, generator=generator),
            torch.randn(batch, 5, 32, generator=generator), torch.randn(batch, 24, generator=generator))


def test_a_flow_map_loaded_from_a_velocity_mmdit_reproduces_its_velocity_exactly():
    teacher = trained_like(MMDiT(mmdit_config("tiny", qk_norm=True)), seed=0).eval()
    flow_map = MMDiT(mmdit_config("tiny", qk_norm=True, flow_map=True)).eval()
    load_velocity_weights(flow_map, teacher.state_dict())
    img, t, txt, vec = inputs()
    with torch.no_grad():
        velocity = teacher(img, t, txt, vec)
        for s in (t, 0.5 * t, torch.zeros_like(t)):
            assert torch.equal(flow_map(img, t, txt, vec, s), velocity)
        assert torch.equal(flow_map(img, t, txt, vec), velocity)  # no end time: the diagonal
    # The velocity model's keys are unchanged; the map adds only the jump embedding.
    extra = set(flow_map.state_dict()) - set(teacher.state_dict())
    assert extra and all(key.startswith("embed.jump.") for key in extra)
    assert set(teacher.state_dict()) <= set(flow_map.state_dict())
    with pytest.raises(ValueError, match="not a flow map"):
        teacher(img, t, txt, vec, t)
    with pytest.raises(ValueError, match="do not fit the flow map"):
        load_velocity_weights(MMDiT(mmdit_config("tiny", qk_norm=False, flow_map=True)), teacher.state_dict())


def test_the_end_time_changes_the_output_once_the_jump_embedding_is_trained():
    flow_map = trained_like(MMDiT(mmdit_config("tiny", flow_map=True)), seed=2).eval()
    img, t, txt, vec = inputs()
    with torch.no_grad():
        assert not torch.allclose(flow_map(img, t, txt, vec, 0.5 * t), flow_map(img, t, txt, vec, t))
        assert torch.equal(flow_map(img, t, txt, vec, t), flow_map(img, t, txt, vec))


def test_n_jumps_of_a_map_that_is_its_velocity_are_n_euler_steps():
    teacher = trained_like(MMDiT(mmdit_config("tiny")), seed=3).eval()
    flow_map = MMDiT(mmdit_config("tiny", flow_map=True)).eval()
    load_velocity_weights(flow_map, teacher.state_dict())
    noise, _, txt, vec = inputs()
    null_txt, null_vec = torch.zeros(1, 5, 32), torch.zeros(1, 24)
    with torch.no_grad():
        for steps, scale in ((1, 1.0), (3, 2.0)):
            mapped = sample_jumps(flow_map, noise, steps, txt, vec, null_txt, null_vec, scale)
            def guided(x, t):
                both = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([txt, null_txt.expand_as(txt)]),
                               torch.cat([vec, null_vec.expand_as(vec)]))
                v_cond, v_uncond = both.chunk(2)
                return v_uncond + scale * (v_cond - v_uncond)
            euler = EulerSampler().sample(guided, noise, steps)
            torch.testing.assert_close(mapped, euler, rtol=1e-5, atol=1e-5)
    x, t, s = torch.ones(2, 3), torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.25])
    assert torch.equal(jump(torch.full((2, 3), 2.0), x, t, s), torch.tensor([[-1.0] * 3, [0.5] * 3]))
