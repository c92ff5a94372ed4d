"""Wraps a plain model in DeepSpeed: ZeRO stage, precision, AdamW, schedule, clipping.

Parallelism is applied here, from outside the model (models/ never imports deepspeed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from flowmill.train.config import Config
from flowmill.train.plan import Plan

# ZeRO's gradient reduce bucket holds the model's largest gradient, as transformers' DeepSpeed
# integration sizes it ("auto": hidden_size², one weight matrix), and at most PyTorch DDP's default
# (bucket_cap_mb=25), which amortizes a collective. DeepSpeed's default, 5e8 elements (1 GB in bf16,
# 2 GB in fp32), is allocated in every ZeRO 1-2 backward and held for the whole run by ZeRO-3: more
# than all the rest a rank holds for a model of a few hundred million parameters.
REDUCE_BUCKET_BYTES = 25 * 2**20


def reduce_bucket_elements(cfg: Config, largest_param: int | None) -> int:
    """ZeRO's reduce bucket in elements: the largest parameter's gradient (when known), capped at DDP's 25 MB."""
    cap = REDUCE_BUCKET_BYTES // autocast_dtype(cfg).itemsize
    return cap if largest_param is None else min(largest_param, cap)


def deepspeed_config(cfg: Config, plan: Plan, load_universal: bool = False, largest_param: int | None = None) -> dict:
    """The DeepSpeed JSON config of a run; the global batch is micro × accum × data-parallel ranks.

    ``largest_param`` (elements) sizes ZeRO's reduce bucket; unknown, the bucket is DDP's 25 MB."""
    ds = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.trainer.precision == "bf16"},
        "steps_per_print": 10**9,  # flowmill reports progress itself
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}  # re-shard a checkpoint saved on another world size
    if cfg.parallel.zero_stage > 0:
        ds["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_elements(cfg, largest_param)
    if cfg.parallel.zero_stage == 3:
        # Small models: gather every parameter at once instead of DeepSpeed's prefetch heuristics.
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``decay_steps`` (default max_steps)."""
    warmup, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
    total = cfg.optim.decay_steps or cfg.trainer.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# What activation checkpointing (checkpoint_wrapper) inserts into the names of a block's parameters.
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def unwrapped_name(name: str) -> str:
    """A parameter's name as the plain model (without activation checkpointing) has it."""
    return name.replace(WRAPPER_PREFIX, "")


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing from outside the model: each of ``model.blocks`` recomputes
    its activations in backward instead of storing them (same values, less memory)."""
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList to checkpoint")
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block)


def pipeline_module(model: nn.Module, cfg: Config, loss_fn: Callable | None) -> nn.Module:
    """Cut ``model.pipeline_layers()`` into ``parallel.pipeline_stages`` DeepSpeed stages.

    The layers share the model's parameter tensors, so the stage a rank holds updates the
    same objects as ``model``'s (the EMA relies on it).
    """
    if not hasattr(model, "pipeline_layers"):
        raise ValueError(f"{type(model).__name__} cannot be cut into pipeline stages (no pipeline_layers())")
    return PipelineModule(
        layers=model.pipeline_layers(),
        num_stages=cfg.parallel.pipeline_stages,
        loss_fn=loss_fn,
        partition_method="parameters",
        activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
    )


def build_engine(model: nn.Module, cfg: Config, plan: Plan, load_universal: bool = False,
                 loss_fn: Callable | None = None) -> Any:
    """Return a DeepSpeed engine owning the model (or its pipeline stage), AdamW and the LR schedule.

    With ``parallel.pipeline_stages > 1`` the engine is a PipelineEngine trained through
    ``train_batch``; ``loss_fn(output, target)`` is then applied on the last stage.
    """
    if cfg.parallel.pipeline_stages > 1:
        model = pipeline_module(model, cfg, loss_fn)
    elif cfg.parallel.activation_checkpointing:
        checkpoint_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        # One kernel pass per tensor instead of a chain of elementwise ops, and the ZeRO
        # optimizers step it on their flat fp32 partitions all the same.
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, plan, load_universal, largest_param=max(p.numel() for p in params)),
    )
    if cfg.parallel.zero_stage == 0 and cfg.parallel.pipeline_stages == 1 and plan.world_size == 1:
        # Alone, DeepSpeed would still flatten every gradient into one buffer, all-reduce it with
        # itself and copy it back after each backward: a full copy of the gradients for nothing.
        # (ZeRO 1-3 reduce through their own optimizer, which this flag would skip.)
        engine.enable_backward_allreduce = False
    return engine


def autocast_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32


class PipelineForward:
    """The whole pipeline's forward pass without gradient, called the same way on every stage of
    one pipeline: ``forward(*inputs)`` returns, on every stage, the last stage's output for one
    micro-batch of ``inputs``, an output shaped like the first input (a flow map's average velocity).

    For targets made from the network's own outputs (a flow map's progressive self-distillation):
    DeepSpeed's ``eval_batch`` runs the stages, and the last stage broadcasts what it returned.
    """

    def __init__(self, engine: Any, dtype: torch.dtype):
        self.engine = engine
        self.dtype = dtype
        self.last_stage = engine.grid.stage_to_global(engine.num_stages - 1)
        self.group = engine.grid.get_pipe_parallel_group()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = tuple(a.to(self.dtype) if torch.is_floating_point(a) else a for a in inputs)
        no_target = torch.zeros(())  # the last stage loads a target for every micro-batch; this one is unused
        # eval_batch adds each output to the running loss that train_batch left (a scalar) without
        # resetting it first, as train_batch does; the next train_batch starts it afresh anyway.
        self.engine.total_loss = None
        _, output = self.engine.eval_batch(iter([(cast, no_target)]), return_logits=True, compute_loss=False,
                                           reduce_output=None, bcast_loss=False, num_micro_batches=1)
        result = output.detach().float() if self.engine.is_last_stage() else torch.empty(inputs[0].shape, device=inputs[0].device)
        torch.distributed.broadcast(result, src=self.last_stage, group=self.group)
        return result
