"""Masked-diffusion language models (``task: mdlm``), the discrete-diffusion baseline of the flow LMs.

The model and the objective are ``flowmill.models.masked_diffusion_lm`` and
``flowmill.train.mdlm_objective`` (t = 0 is data, t = 1 all masks; a token is masked with
probability t). The data, tokenizer, judge, samples and ``flowmill sample`` are the FLM's
(``flowmill.train.tasks.flm``); the model section is the FLM's too, plus ``model.mask_id``.

Every evaluation logs ``val/elbo``, the negative ELBO on held-out text in nats per token (an upper
bound on the model's negative log-likelihood), and ``val/ce_tau{tau}`` and their mean ``val/ce``:
the cross-entropy per token with a share tau of the tokens masked, on the same grid
``lm_eval.val_clock`` as the FLM's corruption levels (docs/flm.md compares the two). Samples and
``sample/entropy``, ``sample/gen_ppl`` are the FLM's, with ``sample.steps`` unmasking steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from flowmill.errors import UsageError
from flowmill.models.masked_diffusion_lm import MaskedDiffusionLM
from flowmill.run_dir import RunDir
from flowmill.train import mdlm_objective as objective
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import ItemStreams, Totals, eval_chunks
from flowmill.train.flm_objective import Noise
from flowmill.train.tasks.flm import (
    EVAL_CHUNK,
    FLMRunConfig,
    FlowLMModelConfig,
    TextFlowTask,
    ce_keys,
    own_text_tokenizer,
    with_mean_ce,
)

FAMILY = "masked_diffusion_lm"


@dataclass
class MaskedLMModelConfig(FlowLMModelConfig):
    """The flow LM's architecture read as a masked-diffusion LM's (flow_map and learned_loss_weight stay false)."""

    mask_id: int | None = None  # the mask token's id; null: model.vocab_size, the embedding row after the vocabulary (the only one it can be)


@dataclass(frozen=True)
class MDLMRunConfig(FLMRunConfig):
    task: str = "mdlm"
    model: MaskedLMModelConfig = field(default_factory=MaskedLMModelConfig)


class MaskedTrainee:
    """The engine's forward as the objective sees a masked-diffusion LM: callable, with its plain attributes."""

    def __init__(self, forward: Callable[..., torch.Tensor], module: MaskedDiffusionLM):
        self._forward = forward
        self.vocab_size = module.vocab_size
        self.seq_len = module.seq_len
        self.mask_id = module.mask_id

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self._forward(*args)


class MDLMTask(TextFlowTask):
    """``task: mdlm``: a masked-diffusion LM trained on its continuous-time ELBO."""

    config_class = MDLMRunConfig
    family = FAMILY
    sampling = "ancestral unmasking steps"
    cfg: MDLMRunConfig

    def __init__(self, cfg: MDLMRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        self.text_tokenizer_path, self.text_tokenizer = own_text_tokenizer(cfg, self.run_dir)
        self.model_config = cfg.model.architecture()

    @classmethod
    def validate_config(cls, cfg: MDLMRunConfig) -> None:
        super().validate_config(cfg)
        if cfg.parallel.pipeline_stages > 1:
            raise UsageError("parallel.pipeline_stages: mdlm trains without pipeline stages (ZeRO 0-3 only); set it to 1")
        for key in ("flow_map", "learned_loss_weight"):
            if getattr(cfg.model, key):
                raise UsageError(f"model.{key}: a masked-diffusion LM has no {key.replace('_', ' ')}; set it to false")
        vocab, mask = cfg.model.vocab_size, cfg.model.mask_id
        if mask is not None and 0 <= mask < vocab:
            raise UsageError(f"model.mask_id: {mask} collides with a token of the vocabulary (ids 0..{vocab - 1}); "
                             f"the mask is the id after it, {vocab}: leave model.mask_id unset")
        if mask is not None and mask != vocab:
            raise UsageError(f"model.mask_id: {mask} is not the id after the vocabulary, {vocab} (the mask's embedding row); "
                             "leave model.mask_id unset")

    def build_model(self) -> nn.Module:
        self.live = MaskedDiffusionLM(self.model_config)
        return self.live

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        return objective.mdlm_loss(MaskedTrainee(model, self.live), batch["tokens"].to(self.env.device), generator)

    def sample_tokens(self, model: nn.Module, num_samples: int, steps: int, generator: Noise) -> torch.Tensor:
        return objective.sample_mdlm(model, num_samples, steps, generator)

    def validation_metrics(self, model: nn.Module, tokens: torch.Tensor, seed: int, env: DistEnv) -> dict:
        """``val/ce_tau{tau}`` (a share tau of the tokens masked) per value of lm_eval.val_clock, their mean
        ``val/ce``, and ``val/elbo`` (negative ELBO, nats per token)."""
        device = next(model.parameters()).device
        clock = self.cfg.lm_eval.val_clock
        totals = Totals([*ce_keys(clock), "val/elbo"])
        streams = ItemStreams(seed)  # a sequence's ELBO masks continue its stream after its CE masks
        times = torch.tensor(clock, dtype=torch.float32, device=device)
        for chunk in eval_chunks(len(tokens), EVAL_CHUNK, env):
            part = tokens[chunk.rows].to(device)
            for key, value in zip(ce_keys(clock), objective.validation_ce(model, part, times, streams.of(chunk)).tolist()):
                totals.add(key, value * len(part), len(part))
            totals.add("val/elbo", objective.validation_elbo(model, part, streams.of(chunk)).item() * len(part), len(part))
        return with_mean_ce(totals.reduced(env), clock)
