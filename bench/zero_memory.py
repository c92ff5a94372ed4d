"""Memory per rank under ZeRO stages 0-3, in fp32 and bf16: an MMDiT of ~100M parameters on 2 processes.

For each precision and stage, two gloo processes build the engine with flowmill's own
``build_engine`` (so with the DeepSpeed config and optimizer train/engine.py makes for that
precision), take one training step (so that AdamW's state exists), then a second one, and
count the bytes each rank holds at two moments of it: after the backward, and inside the
optimizer step (where DeepSpeed has made the fp32 gradients the optimizer reads). A rank's
figure is the larger of the two.

The tensors are found by walking the engine: the module's parameters (under ZeRO-3 each
one's local ``ds_tensor``) and buffers, their ``.grad``, the state and parameter groups of
the torch AdamW inside DeepSpeed's optimizer (and the groups' ``.grad``), then every tensor
reachable from DeepSpeed's optimizer object (lists, dicts, dataclasses such as its reduce
buckets). Each storage counts once, in the first category that reaches it:

- params: the weights the module computes with (fp32, or bf16);
- grads: gradients in every form: the parameters' ``.grad``, ZeRO's gradient partitions and
  the fp32 gradients of the optimizer's partitions;
- master: the fp32 weights the optimizer updates when they are not the module's own (bf16's
  fp32 copy; in fp32, ZeRO 1-3 keep one too, a duplicate of the fp32 parameters);
- moments: AdamW's state;
- ema: the rank's shard of the EMA weights (flowmill's ``EMA``, kept beside the engine);
- buffers: the rest the engine holds, mostly ZeRO's gradient reduce buckets.

Every other live tensor of the process is added up as a check ("not found": the inputs);
a large figure there would mean the walk missed something. Activations, and what exists only
during the backward (under ZeRO 1-2 the gradients not yet reduced and the reduce bucket),
are not counted. Ratios compare each stage with stage 0 of the same precision; in bf16,
DeepSpeed's stage 0 keeps a full fp32 master copy and, in the step, fp32 gradients beside
the bf16 ones.

Each rank also compares a digest of each storage with the other rank's: equal bytes mean
the storage is replicated, different ones that it is a partition. The SD3-medium table
extrapolates the bf16 measurement (the precision SD3 is trained in) to 2B parameters:
per GPU, replicated bytes plus partitioned bytes x 2 / GPUs, scaled by the parameter count;
buffers do not grow with the parameter count and are left out of it. (A category's ratio to
stage 0 would not do: the stages hold gradients in different forms, e.g. bf16 stage 0 a
bf16 and an fp32 copy of all of them, ZeRO 1-2 an fp32 partition only.)

Run: ``.venv/bin/python bench/zero_memory.py`` (about 5 minutes on 2 idle CPU cores;
``--precision bf16`` alone half of that).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
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
PRECISIONS = ("fp32", "bf16")
GPUS = (8, 64, 512)
CATEGORIES = ("params", "grads", "master", "moments", "ema", "buffers")
MODEL_STATE = ("params", "grads", "master", "moments", "ema")  # the categories that grow with the parameter count
# SD3's text widths and latent channels, 12 heads of 64 (D = 768), 5 blocks: about 100M parameters.
BENCH_CONFIG = mmdit_config("sd3-medium", depth=5, num_heads=12, head_dim=64, sample_size=16, pos_embed_max_size=16)
LATENT_SIDE, TEXT_TOKENS = 4, 2  # a tiny sample (4 + 2 tokens): the steps only have to create the state


def tensors_in(value, seen: set[int], depth: int = 0):
    """The tensors reachable from ``value`` through containers, dataclasses and DeepSpeed objects."""
    if id(value) in seen or depth > 6:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
        if value.grad is not None:
            yield value.grad
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item, seen, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from tensors_in(item, seen, depth + 1)
    elif dataclasses.is_dataclass(value) or type(value).__module__.startswith("deepspeed."):
        for item in vars(value).values():
            yield from tensors_in(item, seen, depth + 1)


def attribute_category(name: str) -> str:
    """The category of a tensor first reached through DeepSpeed optimizer attribute ``name``."""
    if "ipg" in name or "bucket" in name:
        return "buffers"
    if "grad" in name:
        return "grads"
    if "fp32" in name:
        return "master"
    return "buffers"


def digest(storage: torch.UntypedStorage) -> str:
    return hashlib.blake2b(torch.empty(0, dtype=torch.uint8).set_(storage).numpy(), digest_size=16).hexdigest()


def measure(engine, ema) -> list[dict]:
    """Every storage this rank's engine holds: category, source, bytes, and whether it is
    replicated (byte-identical on every rank)."""
    import torch.distributed as dist

    found: dict[int, dict] = {}

    def add(category: str, source: str, tensors) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in found:
                found[storage.data_ptr()] = {"category": category, "source": source, "bytes": storage.nbytes(),
                                             "storage": storage}

    add("ema", "EMA shards", [*ema.shards.values(), *ema.buffers.values()])
    params = list(engine.module.parameters())
    # ZeRO-3 leaves an empty placeholder in param.data; the rank's share is ds_tensor.
    add("params", "module parameters", [getattr(param, "ds_tensor", param) for param in params])
    add("buffers", "module buffers", list(engine.module.buffers()))
    add("grads", "parameter .grad", [param.grad for param in params if param.grad is not None])
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside DeepSpeed's optimizer
    add("moments", "AdamW state", tensors_in(inner.state, set()))
    for group in inner.param_groups:
        add("master", "AdamW parameters", group["params"])
        add("grads", "AdamW parameters' .grad", [p.grad for p in group["params"] if p.grad is not None])
    if inner is not optimizer:
        for name, value in vars(optimizer).items():
            if value is not inner:
                add(attribute_category(name), f"ZeRO {name}", tensors_in(value, set()))
    # Buffers are scratch space (never compared); the rest is compared across ranks.
    entries = list(found.values())
    digests = [digest(entry["storage"]) if entry["category"] != "buffers" else "" for entry in entries]
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, digests)
    on_every_rank = set.intersection(*(set(other) for other in every_rank)) - {""}
    for entry, key in zip(entries, digests):
        entry["replicated"] = key in on_every_rank
    not_found = 0
    for value in gc.get_objects():
        if type(value) in (torch.Tensor, torch.nn.Parameter) and not value.is_meta:
            storage = value.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in found:
                found[storage.data_ptr()] = {"storage": storage}
                not_found += storage.nbytes()
    return [{key: value for key, value in entry.items() if key != "storage"} for entry in entries] + [
        {"category": "not found", "source": "other live tensors", "bytes": not_found, "replicated": False}]


def summarize(entries: list[dict], moment: str) -> dict:
    """Bytes per category, per source, and the replicated bytes per category."""
    totals = {category: 0 for category in (*CATEGORIES, "not found")}
    replicated = {category: 0 for category in CATEGORIES}
    sources: dict[str, int] = {}
    for entry in entries:
        totals[entry["category"]] += entry["bytes"]
        if entry["replicated"]:
            replicated[entry["category"]] += entry["bytes"]
        key = f"{entry['category']}: {entry['source']}{' (replicated)' if entry['replicated'] else ''}"
        sources[key] = sources.get(key, 0) + entry["bytes"]
    return {"moment": moment, "bytes": totals, "replicated": replicated, "sources": sources,
            "total": sum(totals[category] for category in CATEGORIES)}


def worker(rank: int, stage: int, precision: str, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from flowmill.run_dir import RunDir
    from flowmill.train.config import Config, ParallelConfig, TrainerConfig
    from flowmill.train.distributed import init_distributed, shutdown
    from flowmill.train.ema import EMA
    from flowmill.train.engine import autocast_dtype, build_engine
    from flowmill.train.plan import Plan

    env = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = Config(trainer=TrainerConfig(micro_batch_size=1, precision=precision), parallel=ParallelConfig(zero_stage=stage))
    model = MMDiT(BENCH_CONFIG)
    # Zero-initialised layers (adaLN, the output layer) would give both ranks byte-identical
    # partitions, which the digest comparison below would count as replicated: random values
    # everywhere keep the classification about layout, not content (memory does not depend on values).
    # (The same values on every rank, as any real initialisation gives.)
    values = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=values)
    engine = build_engine(model, cfg, Plan.of(cfg, RunDir("unused"), env.world_size, resume=False))
    ema = EMA(model, env, decay=0.999)
    measured: list[dict] = []

    def in_step(*_) -> None:
        if len(measured) == 1:  # the second step, after its backward was measured
            measured.append(summarize(measure(engine, ema), "optimizer step"))

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.register_step_pre_hook(in_step)
    generator = torch.Generator().manual_seed(rank)
    channels = BENCH_CONFIG.in_channels
    dtype = autocast_dtype(cfg)
    inputs = (torch.randn(1, channels, LATENT_SIDE, LATENT_SIDE, generator=generator), torch.rand(1, generator=generator),
              torch.randn(1, TEXT_TOKENS, BENCH_CONFIG.txt_dim, generator=generator),
              torch.randn(1, BENCH_CONFIG.vec_dim, generator=generator))
    # A non-zero target: the output layer starts at zero, and a zero target would leave every gradient at zero.
    target = torch.randn(1, channels, LATENT_SIDE, LATENT_SIDE, generator=generator)
    for step in range(2):
        # As the training loop does: inputs in the weights' dtype, bf16 under autocast.
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            velocity = engine(*(tensor.to(dtype) for tensor in inputs))
        engine.backward(F.mse_loss(velocity.float(), target))
        if step == 1:
            measured.append(summarize(measure(engine, ema), "after backward"))
        engine.step()
        ema.update(model)
    if len(measured) != 2:
        raise RuntimeError(f"{type(inner).__name__}.step ran without its pre-hook: only {len(measured)} measurement(s)")
    result = max(measured, key=lambda summary: summary["total"])
    result["other_moment_total"] = min(summary["total"] for summary in measured)
    result["num_params"] = sum(getattr(param, "ds_numel", param.numel()) for param in engine.module.parameters())
    result["optimizer"] = type(engine.optimizer).__name__
    Path(out_dir, f"{precision}-stage{stage}-rank{rank}.json").write_text(json.dumps(result))
    shutdown()


def run_stage(stage: int, precision: str, out_dir: str) -> list[dict]:
    from flowmill.train.distributed import free_port

    mp.spawn(worker, args=(stage, precision, free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
    return [json.loads(Path(out_dir, f"{precision}-stage{stage}-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def count_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MMDiT(cfg).parameters())


def extrapolate(results: dict[int, list[dict]], target_params: int,
                categories: tuple[str, ...] = MODEL_STATE) -> dict[int, dict[int, float]]:
    """Per-GPU bytes of ``categories`` of a ``target_params`` model at each stage and GPU count,
    from rank 0's replicated and partitioned bytes."""
    table = {}
    for stage, ranks in results.items():
        measured = ranks[0]
        scale = target_params / measured["num_params"]
        replicated = sum(measured["replicated"][category] for category in categories)
        partitioned = sum(measured["bytes"][category] for category in categories) - replicated
        table[stage] = {gpus: scale * (replicated + partitioned * WORLD_SIZE / gpus) for gpus in GPUS}
    return table


def report(results: dict[int, list[dict]], precision: str, verbose: bool) -> None:
    first = results[0][0]
    print(f"\nMMDiT of {first['num_params'] / 1e6:.1f} M parameters (D={BENCH_CONFIG.dim}, depth {BENCH_CONFIG.depth}), "
          f"{precision}, AdamW, {WORLD_SIZE} processes (gloo); MB per rank, counted from the engine's tensors")
    header = "".join(f"{name:>9}" for name in CATEGORIES)
    print(f"{'stage':>5} {'rank':>4} {'optimizer':<30}{header} {'total':>9} {'vs stage 0':>11}  at (other moment)  not found")
    for stage, ranks in results.items():
        for rank, measured in enumerate(ranks):
            sizes = "".join(f"{measured['bytes'][category] / 2**20:>9.1f}" for category in CATEGORIES)
            print(f"{stage:>5} {rank:>4} {measured['optimizer']:<30}{sizes} {measured['total'] / 2**20:>9.1f} "
                  f"{measured['total'] / results[0][rank]['total']:>10.3f}x  {measured['moment']} "
                  f"({measured['other_moment_total'] / 2**20:.1f})  {measured['bytes']['not found'] / 2**20:.2f}")
            if verbose:
                for source, nbytes in sorted(measured["sources"].items()):
                    print(f"{'':>12}{source:<70}{nbytes / 2**20:>9.1f}")
    ratios = " / ".join(f"{largest_rank(results[stage], CATEGORIES) / largest_rank(results[0], CATEGORIES):.2f}"
                        for stage in STAGES if stage)
    state = " / ".join(f"{largest_rank(results[stage], MODEL_STATE) / largest_rank(results[0], MODEL_STATE):.2f}"
                       for stage in STAGES if stage)
    print(f"{precision}: ZeRO 1 / 2 / 3 vs stage 0, largest rank: {ratios} (model state alone, no buffers: {state})")


def largest_rank(ranks: list[dict], categories: tuple[str, ...]) -> int:
    """The most bytes any rank holds in ``categories``."""
    return max(sum(measured["bytes"][category] for category in categories) for measured in ranks)


def report_extrapolation(results: dict[int, list[dict]]) -> None:
    target = count_params(MMDIT_SIZES["sd3-medium"])
    table, ema = extrapolate(results, target), extrapolate(results, target, ("ema",))
    print(f"\nSD3-medium ({target / 1e9:.2f} B parameters), bf16 AdamW: GB per GPU for parameters + gradients + fp32 "
          "master + moments + EMA (no activations, no buffers), extrapolated from the bf16 measurement above")
    columns = "".join(f"{f'{gpus} GPUs':>11}" for gpus in GPUS)
    ema_columns = "".join(f"{f'EMA {gpus}':>10}" for gpus in GPUS)
    print(f"{'stage':>5}{columns}{ema_columns}   buffers measured here (MB, not extrapolated)")
    for stage, row in table.items():
        print(f"{stage:>5}" + "".join(f"{row[gpus] / 1e9:>11.1f}" for gpus in GPUS)
              + "".join(f"{ema[stage][gpus] / 1e9:>10.2f}" for gpus in GPUS)
              + f"{results[stage][0]['bytes']['buffers'] / 2**20:>11.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", action="append", choices=PRECISIONS,
                        help="trainer.precision to measure (default: both)")
    parser.add_argument("--verbose", action="store_true", help="also list the bytes per source tensor group")
    parser.add_argument("--json", action="store_true", help="also print the measurements as one JSON line")
    args = parser.parse_args(argv)
    precisions = args.precision or list(PRECISIONS)
    with tempfile.TemporaryDirectory() as out_dir:
        results = {precision: {stage: run_stage(stage, precision, out_dir) for stage in STAGES} for precision in precisions}
    for precision in precisions:
        report(results[precision], precision, args.verbose)
    if "bf16" in results:
        report_extrapolation(results["bf16"])
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
