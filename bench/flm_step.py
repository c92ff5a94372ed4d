"""Speed of the flow language model: training tokens/s, and 1-step versus N-step sampling tokens/s.

Measured side by side in one process on the same model size (the ``model`` section of an flm
config): rounds alternate between the workloads, and each row reports the median round, so a
machine that gets busier halfway slows every row alike. The weights are random (speed does not
depend on them); the FMLM student has the FLM's architecture plus its end-time embedder.

    python bench/flm_step.py --config configs/flm_shakespeare.yaml --batch 32 --steps 8 32 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from flowmill.models.flow_lm import FlowLM
from flowmill.train import flm_objective as objective
from flowmill.train.config import load_config


def training_step(model: FlowLM, batch: int) -> Callable[[], None]:
    """One AdamW step of the FLM loss on a random (batch, L) token batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=generator)

    def run() -> None:
        loss, _ = objective.flm_loss(model, tokens, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/flm_shakespeare.yaml", help="an flm config; its model section is measured")
    parser.add_argument("--batch", type=int, default=32, help="sequences per training step and per sampling call (default 32)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32], help="FLM sampling steps to compare with 1-step FMLM (default 8 32)")
    parser.add_argument("--rounds", type=int, default=5, help="measurement rounds, median reported (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    if cfg.task != "flm":
        raise SystemExit(f"--config: {args.config} is a {cfg.task} config; give an flm config (its model section is measured)")
    torch.manual_seed(0)
    flm = FlowLM(cfg.model)
    student = FlowLM(dataclasses.replace(cfg.model, flow_map=True, learned_loss_weight=False))
    student.init_from_teacher(flm, zero_head=False)
    tokens_per_batch = args.batch * cfg.model.seq_len

    workloads: dict[str, Callable[[], object]] = {"train FLM (fwd+bwd+AdamW)": training_step(flm, args.batch)}
    generator = torch.Generator().manual_seed(1)
    workloads["sample FMLM, 1 step"] = lambda: objective.sample_fmlm(student, args.batch, 1, generator)
    for steps in args.steps:
        workloads[f"sample FLM, {steps} steps"] = lambda steps=steps: objective.sample_flm(flm, args.batch, steps, generator)

    for run in workloads.values():  # warm-up: allocator, clock tables, kernels
        run()
    seconds: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, run in workloads.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)

    params = sum(p.numel() for p in flm.parameters()) / 1e6
    print(f"model: {args.config} ({params:.2f} M parameters, V={cfg.model.vocab_size}, L={cfg.model.seq_len}), "
          f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    one_step = statistics.median(seconds["sample FMLM, 1 step"])
    print(f"| {'workload':<28} | {'ms/batch':>9} | {'tokens/s':>9} | {'time vs 1-step FMLM':>19} |")
    print(f"|{'-' * 30}|{'-' * 11}:|{'-' * 11}:|{'-' * 21}:|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name:<28} | {1000 * median:9.1f} | {tokens_per_batch / median:9.0f} | {median / one_step:18.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
