"""flowmill.models.flow_lm: time mapping, clock, shapes, pipeline stages, teacher → student init."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowmill.models.flow_lm import (
    FLOW_LM_SIZES,
    FlowLM,
    FlowLMConfig,
    continuous_time,
    discrete_time,
    flow_lm_config,
    paper_time_to_flowmill,
)

V, L = 8, 6
CONFIG = FlowLMConfig(vocab_size=V, seq_len=L, dim=32, depth=2, num_heads=2, cond_dim=16, time_freq_dim=16, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (zero-initialised heads included) so outputs depend on all of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def test_paper_time_maps_to_flowmill_and_back():
    paper = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    flowmill = paper_time_to_flowmill(paper)
    assert torch.equal(flowmill, torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64))  # paper noise (0) is flowmill 1
    assert torch.equal(paper_time_to_flowmill(flowmill), paper)


def test_discrete_time_is_the_argmax_corruption_rate():
    """P(argmax x_t != token) = (1 - 1/V)·tau(t), measured by Monte Carlo."""
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([0.2, 0.35, 0.5, 0.7], dtype=torch.float64)
    noise = torch.randn(4, 40000, V, generator=generator, dtype=torch.float64)
    x_t = t[:, None, None] * noise
    x_t[..., 0] += 1 - t[:, None]  # token 0, one-hot weight 1 - t
    wrong = (x_t.argmax(-1) != 0).double().mean(-1)
    assert torch.allclose(wrong, (1 - 1 / V) * discrete_time(t, V), atol=0.01)
    ends = discrete_time(torch.tensor([0.0, 1.0], dtype=torch.float64), V)
    assert torch.allclose(ends, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("vocab_size", [2, 8, 50257])
def test_continuous_time_inverts_the_clock(vocab_size):
    tau = torch.linspace(0, 1, 513, dtype=torch.float64)
    t = continuous_time(tau, vocab_size)
    assert t[0] == 0.0 and t[-1] == 1.0
    assert (t.diff() > 0).all()
    assert (discrete_time(t, vocab_size) - tau).abs().max() < 1e-6
    assert continuous_time(tau.float(), vocab_size).dtype == torch.float32


def test_forward_shapes_and_time_arity():
    torch.manual_seed(0)
    model = FlowLM(CONFIG)
    x_t, t = torch.randn(3, L, V), torch.rand(3)
    assert model(x_t, t).shape == (3, L, V)
    assert model(x_t[:, :4], t).shape == (3, 4, V)
    with pytest.raises(ValueError, match="takes \\(x_t, t\\)"):
        model(x_t, t, t)
    student = FlowLM(dataclasses.replace(CONFIG, flow_map=True))
    assert student(x_t, t, 0.5 * t).shape == (3, L, V)
    with pytest.raises(ValueError, match="takes \\(x_t, t, s\\)"):
        student(x_t, t)


def test_fresh_model_predicts_uniform_and_output_depends_on_time():
    torch.manual_seed(0)
    model = FlowLM(CONFIG)
    x_t = torch.randn(2, L, V)
    assert torch.equal(model(x_t, torch.rand(2)), torch.zeros(2, L, V))  # zero head: uniform logits
    randomize(model, seed=1)
    assert not torch.allclose(model(x_t, torch.full((2,), 0.2)), model(x_t, torch.full((2,), 0.8)))


@pytest.mark.parametrize("flow_map", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_pipeline_layers_chain_to_forward(flow_map, rotary):
    torch.manual_seed(0)
    model = FlowLM(dataclasses.replace(CONFIG, flow_map=flow_map, learned_loss_weight=True, rotary=rotary))
    randomize(model, seed=2)
    x_t, t = torch.randn(2, L, V), torch.rand(2)
    inputs = (x_t, t, 0.5 * t) if flow_map else (x_t, t)
    out = inputs
    layers = model.pipeline_layers()
    assert len(layers) == CONFIG.depth + 2
    for layer in layers:
        out = layer(out)
    assert torch.allclose(out, model(*inputs), atol=1e-6)
    staged = {id(p) for layer in layers for p in layer.parameters()}
    owned = {id(p) for name, p in model.named_parameters() if not name.startswith("loss_weight.")}
    assert staged == owned


def test_sizes_lookup():
    config = flow_lm_config("small", vocab_size=V, seq_len=L)
    assert (config.dim, config.depth, config.num_heads, config.cond_dim) == (768, 12, 12, 128)
    assert config.vocab_size == V and FLOW_LM_SIZES["small"].vocab_size == 50257
    with pytest.raises(ValueError, match="unknown flow LM size 'huge'; choose one of: tiny, paper-tiny, small, medium"):
        flow_lm_config("huge")
    with pytest.raises(ValueError, match="not divisible"):
        FlowLMConfig(dim=30, num_heads=4)


def test_student_starts_as_its_teacher():
    torch.manual_seed(0)
    teacher = FlowLM(CONFIG)
    randomize(teacher, seed=3)
    student = FlowLM(dataclasses.replace(CONFIG, flow_map=True, learned_loss_weight=True))
    randomize(student, seed=4)
    student.init_from_teacher(teacher, zero_head=False)
    x_t, t = torch.randn(2, L, V), torch.rand(2)
    assert torch.allclose(student(x_t, t, 0.3 * t), teacher(x_t, t), atol=1e-6)
    student.init_from_teacher(teacher, zero_head=True)  # the stage-1 corrector: g = 0
    assert torch.equal(student(x_t, t, 0.3 * t), torch.zeros(2, L, V))
    with pytest.raises(ValueError, match="flow_map=True"):
        FlowLM(CONFIG).init_from_teacher(teacher, zero_head=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        FlowLM(dataclasses.replace(CONFIG, dim=64, flow_map=True)).init_from_teacher(teacher, zero_head=False)


def test_rotary_positions_replace_learned_ones():
    """With ``rotary`` the model has no absolute position table, yet it tells positions apart: swapping two
    positions of the input does not just swap those outputs (a transformer without positions would)."""
    rotary = FlowLM(dataclasses.replace(CONFIG, rotary=True)).eval()
    randomize(rotary, seed=3)
    assert not any("pos_embed" in name for name, _ in rotary.named_parameters())
    x_t, t = torch.randn(2, L, V), torch.rand(2)
    swap = [1, 0, *range(2, L)]
    with torch.no_grad():
        assert not torch.allclose(rotary(x_t[:, swap], t), rotary(x_t, t)[:, swap], atol=1e-4)


def test_dropout_and_attention_softcap_reach_every_block():
    model = FlowLM(dataclasses.replace(CONFIG, dropout=0.2, attn_softcap=30.0))
    assert all(block.dropout.p == 0.2 and block.attn_softcap == 30.0 for block in model.blocks)
    assert FlowLMConfig().dropout == 0.1  # the paper's
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\)"):
        dataclasses.replace(CONFIG, dropout=1.0)
    with pytest.raises(ValueError, match="attn_softcap must be >= 0"):
        dataclasses.replace(CONFIG, attn_softcap=-1.0)
