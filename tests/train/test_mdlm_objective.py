"""flowmill.train.mdlm_objective and flowmill.models.masked_diffusion_lm: the masked-diffusion LM's ELBO
and its ancestral sampler, on the two-pattern toy set of the FLM tests (two sequences that differ at
every position: one step draws every token alone and mixes them, many steps must pick one)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowmill.models.flow_lm import FlowLMConfig
from flowmill.models.masked_diffusion_lm import MaskedDiffusionLM
from flowmill.train import mdlm_objective as mdlm
from tests.toy_language import (
    BATCH,
    CONFIG,
    PATTERNS,
    L,
    V,
    one_thread_per_module,  # noqa: F401 - an autouse fixture, active once imported
    pattern_rate,
)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = MaskedDiffusionLM(CONFIG)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss, _ = mdlm.mdlm_loss(model, PATTERNS[torch.randint(0, 2, (BATCH,), generator=generator)], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False).eval()


class Recorder(torch.nn.Module):
    """A model that keeps every input it is called with."""

    def __init__(self, model: MaskedDiffusionLM):
        super().__init__()
        self.model, self.calls = model, []
        self.vocab_size, self.seq_len, self.mask_id = model.vocab_size, model.seq_len, model.mask_id

    def forward(self, tokens_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(tokens_t.clone())
        return self.model(tokens_t, t)


def test_masking_endpoints_and_carry_over_ce():
    generator = torch.Generator().manual_seed(0)
    tokens = PATTERNS.repeat(4, 1)
    assert torch.equal(mdlm.mask_tokens(tokens, torch.zeros(8), V, generator), tokens)  # t = 0 is the data
    assert (mdlm.mask_tokens(tokens, torch.ones(8), V, generator) == V).all()  # t = 1 is all masks
    half = mdlm.mask_tokens(PATTERNS.repeat(512, 1), torch.full((1024,), 0.3), V, generator)
    assert (half == V).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert ((half == V) | (half == PATTERNS.repeat(512, 1))).all()  # a token is masked or itself
    tokens_t = mdlm.mask_tokens(tokens, torch.full((8,), 0.5), V, generator)
    logits = torch.randn(8, L, V, generator=generator)
    ce = mdlm.carry_over_ce(logits, tokens_t, tokens, V)
    masked = tokens_t == V
    assert masked.any() and (~masked).any()
    assert (ce[~masked] == 0).all()  # unmasked tokens are carried over: no loss, whatever the logits say
    torch.testing.assert_close(ce[masked], F.cross_entropy(logits[masked], tokens[masked], reduction="none"))


def test_the_loss_is_the_elbo_weighted_by_one_over_t():
    """A fresh model (zero head) predicts uniform logits: every masked token costs log V, and the 1/t weight
    makes the expected loss log V at every t, the negative log-likelihood of the uniform model."""
    model = MaskedDiffusionLM(CONFIG)
    generator = torch.Generator().manual_seed(1)
    tokens = PATTERNS.repeat(256, 1)
    loss, metrics = mdlm.mdlm_loss(model, tokens, generator)
    assert metrics["masked_ce"].item() == pytest.approx(math.log(V), abs=1e-5)
    assert loss.item() == pytest.approx(math.log(V), rel=0.05)
    for time in (0.05, 0.5, 1.0):  # the weight cancels the share of masks, down to small t
        ce = mdlm.validation_ce(model, tokens, torch.tensor([time]), generator)
        assert ce.item() / time == pytest.approx(math.log(V), rel=0.2)
    assert mdlm.validation_elbo(model, tokens, generator).item() == pytest.approx(math.log(V), rel=0.02)
    times = mdlm.training_times(1000, generator, torch.device("cpu"))
    assert times.min() >= mdlm.MIN_TIME and times.max() <= 1.0


def test_training_lowers_the_elbo_towards_the_data_entropy(trained):
    """Two equally likely sequences: log 2 nats per sequence, log(2)/L per token, far below log V."""
    elbo = mdlm.validation_elbo(trained, PATTERNS.repeat(16, 1), torch.Generator().manual_seed(2)).item()
    assert elbo < 0.1 * math.log(V)
    ce = mdlm.validation_ce(trained, PATTERNS.repeat(16, 1), torch.tensor([0.9, 0.5, 0.1]), torch.Generator().manual_seed(2))
    assert ce[0] > ce[1] > ce[2]  # fewer masks, less to guess


def test_sampling_unmasks_everything_keeps_unmasked_tokens_and_reproduces_the_patterns(trained):
    """Tokens unmasked in the same step are drawn independently: with many steps they come one at a
    time and the sample is one of the patterns; one step draws every token alone and mixes them."""
    recorder = Recorder(trained)
    samples = mdlm.sample_mdlm(recorder, 64, 64, torch.Generator().manual_seed(1))
    assert samples.shape == (64, L) and samples.dtype == torch.long
    assert ((samples >= 0) & (samples < V)).all()  # no mask left after the last step
    assert len(recorder.calls) == 64 and (recorder.calls[0] == V).all()  # one call per step, from all masks
    for before, after in zip(recorder.calls, [*recorder.calls[1:], samples]):
        kept = before != V
        assert torch.equal(after[kept], before[kept])  # carry-over: an unmasked token never changes
    assert torch.equal(samples, mdlm.sample_mdlm(trained, 64, 64, torch.Generator().manual_seed(1)))
    assert pattern_rate(samples) > 0.7
    assert ((samples[:, None, :] == PATTERNS[None]).all(-1).float().mean(0) > 0.2).all()  # both patterns
    assert pattern_rate(mdlm.sample_mdlm(trained, 64, 1, torch.Generator().manual_seed(1))) < 0.1


def test_a_rows_sample_depends_on_its_own_generator_only(trained):
    streams = [torch.Generator().manual_seed(i) for i in range(3)]
    together = mdlm.sample_mdlm(trained, 3, 4, streams)
    alone = mdlm.sample_mdlm(trained, 1, 4, [torch.Generator().manual_seed(2)])
    assert torch.equal(together[2:], alone)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        mdlm.sample_mdlm(trained, 1, 0, streams[:1])


def test_the_model_reads_masks_and_predicts_real_tokens_only():
    model = MaskedDiffusionLM(CONFIG)
    assert model.mask_id == V and model.embed.tokens.num_embeddings == V + 1
    tokens_t = torch.full((2, L), V)
    assert model(tokens_t, torch.ones(2)).shape == (2, L, V)  # no logit for the mask: it is never predicted
    with pytest.raises(ValueError, match="neither flow_map nor learned_loss_weight"):
        MaskedDiffusionLM(FlowLMConfig(vocab_size=V, seq_len=L, dim=32, depth=1, num_heads=2, flow_map=True))
