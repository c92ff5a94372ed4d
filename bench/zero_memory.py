"""Memory per rank under ZeRO stages 0-3: an MMDiT of ~100M parameters on 2 processes.

For each stage, two gloo processes build flowmill's DeepSpeed engine (fp32, AdamW) around
the same MMDiT, take one training step (so that AdamW's state exists) and the forward +
backward of a second (so that gradients exist), then count the bytes each rank holds,
from the engine's own tensors:

- parameters: the module's parameters (under ZeRO-3, each one's local partition ``ds_tensor``);
- gradients: the parameters' ``.grad`` and the ZeRO optimizer's gradient buffers and partitions;
- optimizer state: AdamW's moments and the ZeRO optimizer's other tensors (fp32 master partitions).

Tensors are counted once per storage (views into DeepSpeed's flat buffers are not counted
twice), in that order. It prints the bytes and the ratio to stage 0 per rank, then
extrapolates per-GPU memory for SD3-medium (2B parameters) on 8, 64 and 512 GPUs from the
measured per-category ratios: a category that holds r times its stage-0 bytes on 2 ranks is
split as a replicated share 1 - f and a partitioned share f = 2 (1 - r) that shrinks as 1/N.
Activations, communication buckets outside the optimizer and allocator slack are not counted.

Run: ``.venv/bin/python bench/zero_memory.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from flowmill.models.mmdit import MMDIT_SIZES, MMDiT, mmdit_config

WORLD_SIZE = 2
STAGES = (0, 1, 2, 3)
GPUS = (8, 64, 512)
CATEGORIES = ("parameters", "gradients", "optimizer")
# SD3's text widths and latent channels, 12 heads of 64 (D = 768), 5 blocks: about 100M parameters.
BENCH_CONFIG = mmdit_config("sd3-medium", depth=5, num_heads=12, head_dim=64, sample_size=16, pos_embed_max_size=16)
LATENT_SIDE, TEXT_TOKENS = 16, 8
# The ZeRO optimizers' fp32 master partitions (stage 1-2, stage 3).
MASTER_COPIES = ("ZeRO single_partition_of_fp32_groups", "ZeRO fp32_partitioned_groups_flat")  # one small sample per step: the step only has to create the state


def tensors_in(value, depth: int = 0):
    """The non-empty tensors inside nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        if value.numel():
            yield value
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, depth + 1)


def gradient_buffer(name: str) -> bool:
    """ZeRO optimizer attributes that hold gradients (averaged_gradients, ipg buckets, grad partitions...)."""
    return "grad" in name or name.startswith("ipg")


def measure(engine) -> dict:
    """Bytes per category (and per optimizer attribute) of the tensors this rank's engine holds."""
    owner: dict[int, tuple[str, str, int]] = {}

    def add(category: str, source: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or not tensor.numel():
            return
        storage = tensor.untyped_storage()
        owner.setdefault(storage.data_ptr(), (category, source, storage.nbytes()))

    params = list(engine.module.parameters())
    for param in params:
        # ZeRO-3 leaves an empty placeholder in param.data; the rank's share is ds_tensor.
        add("parameters", "module parameters", param.ds_tensor if hasattr(param, "ds_tensor") else param)
    for param in params:
        add("gradients", "parameter .grad", param.grad)
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside a ZeRO optimizer
    for state in inner.state.values():
        for tensor in tensors_in(state):
            add("optimizer", "AdamW state", tensor)
    if inner is not optimizer:
        for name, value in vars(optimizer).items():
            for tensor in tensors_in(value):
                add("gradients" if gradient_buffer(name) else "optimizer", f"ZeRO {name}", tensor)
    # fp32 training: the ZeRO optimizer's fp32 "master" partitions hold the same values as the
    # (already fp32) parameters; counted, and also reported, as a duplicate DeepSpeed keeps.
    param_dtype = params[0].dtype
    duplicate = sum(nbytes for category, source, nbytes in owner.values()
                    if param_dtype == torch.float32 and source in MASTER_COPIES)
    totals = {category: 0 for category in CATEGORIES}
    sources: dict[str, int] = {}
    for category, source, nbytes in owner.values():
        totals[category] += nbytes
        sources[f"{category}: {source}"] = sources.get(f"{category}: {source}", 0) + nbytes
    return {"bytes": totals, "sources": sources, "duplicate_master_bytes": duplicate, "num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                                     for p in params)}


def worker(rank: int, stage: int, precision: str, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from flowmill.train.config import Config
    from flowmill.train.distributed import init_distributed, shutdown
    from flowmill.train.engine import build_engine

    env = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = Config()
    cfg.trainer.micro_batch_size = 1
    cfg.parallel.zero_stage = stage
    cfg.trainer.precision = precision
    engine = build_engine(MMDiT(BENCH_CONFIG), cfg, env)
    generator = torch.Generator().manual_seed(rank)
    channels = BENCH_CONFIG.in_channels
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    inputs = (torch.randn(1, channels, LATENT_SIDE, LATENT_SIDE, generator=generator), torch.rand(1, generator=generator),
              torch.randn(1, TEXT_TOKENS, BENCH_CONFIG.txt_dim, generator=generator),
              torch.randn(1, BENCH_CONFIG.vec_dim, generator=generator))
    for step in range(2):
        # As the training loop does: inputs in the weights' dtype, bf16 under autocast.
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            velocity = engine(*(tensor.to(dtype) for tensor in inputs))
        engine.backward(F.mse_loss(velocity.float(), torch.zeros(1, channels, LATENT_SIDE, LATENT_SIDE)))
        if step == 0:
            engine.step()
    Path(out_dir, f"stage{stage}-rank{rank}.json").write_text(json.dumps(measure(engine)))
    shutdown()


def run_stage(stage: int, precision: str, out_dir: str) -> list[dict]:
    from flowmill.train.distributed import free_port

    mp.spawn(worker, args=(stage, precision, free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
    return [json.loads(Path(out_dir, f"stage{stage}-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def count_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MMDiT(cfg).parameters())


def extrapolate(results: dict[int, list[dict]], num_params: int, target_params: int) -> dict[int, dict[int, float]]:
    """Per-GPU bytes of a ``target_params`` model at each stage and GPU count, from rank 0's measured ratios."""
    base = results[0][0]["bytes"]
    table = {}
    for stage, ranks in results.items():
        table[stage] = {}
        for gpus in GPUS:
            total = 0.0
            for category in CATEGORIES:
                if not base[category]:
                    continue
                ratio = ranks[0]["bytes"][category] / base[category]
                partitioned = min(1.0, max(0.0, WORLD_SIZE / (WORLD_SIZE - 1) * (1 - ratio)))
                total += base[category] / num_params * target_params * ((1 - partitioned) + partitioned / gpus)
            table[stage][gpus] = total
    return table


def report(results: dict[int, list[dict]], precision: str, verbose: bool) -> None:
    num_params = results[0][0]["num_params"]
    print(f"MMDiT of {num_params / 1e6:.1f} M parameters (D={BENCH_CONFIG.dim}, depth {BENCH_CONFIG.depth}), {precision}, "
          f"AdamW, {WORLD_SIZE} processes (gloo); MB per rank, counted from the engine's tensors")
    print(f"{'stage':>5} {'rank':>4} {'params':>9} {'grads':>9} {'optimizer':>10} {'total':>9} {'vs stage 0':>11}")
    for stage, ranks in results.items():
        for rank, measured in enumerate(ranks):
            sizes = [measured["bytes"][category] / 2**20 for category in CATEGORIES]
            base = sum(results[0][rank]["bytes"].values()) / 2**20
            print(f"{stage:>5} {rank:>4} {sizes[0]:>9.1f} {sizes[1]:>9.1f} {sizes[2]:>10.1f} {sum(sizes):>9.1f} "
                  f"{sum(sizes) / base:>10.3f}x")
            if verbose:
                for source, nbytes in sorted(measured["sources"].items()):
                    print(f"{'':>12}{source:<60}{nbytes / 2**20:>9.1f}")
            if measured["duplicate_master_bytes"]:
                rest = sum(sizes) - measured["duplicate_master_bytes"] / 2**20
                print(f"{'':>12}of which {measured['duplicate_master_bytes'] / 2**20:.1f} MB is DeepSpeed's fp32 master copy of "
                      f"the fp32 parameters; without it {rest:.1f} MB, {rest / base:.3f}x")
    target = count_params(MMDIT_SIZES["sd3-medium"])
    table = extrapolate(results, num_params, target)
    print(f"\nSD3-medium ({target / 1e9:.2f} B parameters), {precision} AdamW: GB per GPU for parameters + gradients + "
          "optimizer state (no activations), extrapolated from the ratios above")
    print(f"{'stage':>5}" + "".join(f"{f'{gpus} GPUs':>11}" for gpus in GPUS))
    for stage, row in table.items():
        print(f"{stage:>5}" + "".join(f"{row[gpus] / 1e9:>11.1f}" for gpus in GPUS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="trainer.precision (default fp32)")
    parser.add_argument("--verbose", action="store_true", help="also list the bytes per source tensor group")
    parser.add_argument("--json", action="store_true", help="also print the measurements as one JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out_dir:
        results = {stage: run_stage(stage, args.precision, out_dir) for stage in STAGES}
    report(results, args.precision, args.verbose)
    if args.json:
        print(json.dumps({str(stage): ranks for stage, ranks in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
