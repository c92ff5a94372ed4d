"""MMDiT training speed: flowmill vs diffusers' SD3Transformer2DModel, and the DeepSpeed step.

For each size, one diffusers ``SD3Transformer2DModel`` gets random weights and flowmill's
MMDiT imports them (the same function); both run forward + backward of an MSE loss on the
same inputs, repetitions interleaved (the order alternates) so that load from other
processes hits both alike. Printed per size:

- fwd+bwd milliseconds (median) of diffusers, flowmill eager and flowmill with
  ``model.compile`` (its joint blocks through torch.compile; the one-off compile time is
  printed too), and the median of the per-repetition ratios flowmill / diffusers;
- achieved FLOP/s (matmul and attention FLOPs counted by ``torch.utils.flop_counter``) as a
  fraction of this machine's matmul peak, measured here with a large fp32 matmul;
- a full training step through flowmill's DeepSpeed engine (one process, ZeRO 0, AdamW,
  gradient clipping), next to the bare fwd+bwd and a plain PyTorch step (fwd+bwd, clipping,
  AdamW as train/engine.py builds it, fused), so the engine's overhead shows. Alone, the
  engine has no gradients to all-reduce (train/engine.py turns DeepSpeed's all-reduce off for
  a single ZeRO-0 process); with 2 or more processes a step also pays that all-reduce.

Run: ``.venv/bin/python bench/mmdit_step.py`` (a few minutes; the first compile of a size
takes longer, later runs reuse inductor's cache). ``--threads`` sets torch's intra-op
threads (default 1: steadier numbers on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

# SD3's architecture at sizes this CPU can time: (diffusers config, batch, latent side, text tokens).
SIZES = {
    # configs/mmdit_digits.yaml's model: 32x32 grey digits, patch 4 (64 image tokens), 16 text tokens.
    "digits": (dict(sample_size=32, patch_size=4, in_channels=1, out_channels=1, num_layers=4, attention_head_dim=32,
                    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
                    pos_embed_max_size=8, qk_norm="rms_norm"), 32, 32, 16),
    # SD3-shaped: 16 latent channels, patch 2, 32x32 latent (256 image tokens), 77 text tokens, D=384.
    "mid": (dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                 num_attention_heads=6, joint_attention_dim=256, caption_projection_dim=384, pooled_projection_dim=128,
                 pos_embed_max_size=32, qk_norm="rms_norm"), 2, 32, 77),
}


def matmul_peak(side: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` (side x side) fp32 matmuls."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(repeats))
    return 2 * side**3 / best


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def random_models(config: dict):
    """(diffusers model, flowmill MMDiT) with the same random weights, every layer non-zero."""
    from diffusers import SD3Transformer2DModel

    from flowmill.models.mmdit import MMDiT
    from flowmill.models.sd3_convert import diffusers_to_flowmill

    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    cfg, state_dict = diffusers_to_flowmill(reference.state_dict(), dict(reference.config))
    model = MMDiT(cfg)
    model.load_state_dict(state_dict)
    return reference.train(), model.train()


def interleaved(steps: dict, reps: int) -> dict[str, list[float]]:
    """Wall seconds of each named step over ``reps`` rounds, the order reversed every other round."""
    names = list(steps)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(timed(steps[name])[0])
    return times


def paired_ratio(times: dict, ours: str, theirs: str) -> float:
    return statistics.median(a / b for a, b in zip(times[ours], times[theirs]))


def bench_size(name: str, reps: int, compile_blocks: bool, engine: bool) -> dict:
    config, batch, side, length = SIZES[name]
    reference, model = random_models(config)
    generator = torch.Generator().manual_seed(1)
    img = torch.randn(batch, config["in_channels"], side, side, generator=generator)
    t = torch.rand(batch, generator=generator)
    txt = torch.randn(batch, length, config["joint_attention_dim"], generator=generator)
    vec = torch.randn(batch, config["pooled_projection_dim"], generator=generator)
    target = torch.randn(batch, config["out_channels"], side, side, generator=generator)

    def diffusers_step():
        reference.zero_grad(set_to_none=True)
        out = reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t).sample
        F.mse_loss(out, target).backward()

    def flowmill_step(module):
        def step():
            module.zero_grad(set_to_none=True)
            F.mse_loss(module(img, t, txt, vec), target).backward()
        return step

    steps = {"diffusers": diffusers_step, "flowmill": flowmill_step(model)}
    result = {"size": name, "params": sum(p.numel() for p in model.parameters()), "batch": batch}
    if compile_blocks:
        compiled = copy.deepcopy(model)
        compiled.compile_blocks()
        result["compile_s"] = timed(flowmill_step(compiled))[0]
        steps["flowmill+compile"] = flowmill_step(compiled)
        # Same function: compared with gradients on, as compiled blocks run only then.
        expected = model(img, t, txt, vec).detach()
        result["compile_rel_diff"] = ((compiled(img, t, txt, vec).detach() - expected).abs().max() / expected.abs().max()).item()
    for step in steps.values():
        step()
        step()
    times = interleaved(steps, reps)
    result["ms"] = {key: 1e3 * statistics.median(value) for key, value in times.items()}
    result["ratio_vs_diffusers"] = {key: paired_ratio(times, key, "diffusers") for key in steps if key != "diffusers"}

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        flowmill_step(model)()
    result["gflop_per_step"] = counter.get_total_flops() / 1e9
    if engine:
        result["engine"] = bench_engine(model, compile_blocks, (img, t, txt, vec), target, batch, reps)
    return result


def bench_engine(model, compile_blocks: bool, inputs: tuple, target: torch.Tensor, batch: int, reps: int) -> dict:
    """Milliseconds of bare fwd+bwd, a plain PyTorch step and a DeepSpeed engine step (ZeRO 0), interleaved."""
    from flowmill.run_dir import RunDir
    from flowmill.train.config import Config, ParallelConfig, TrainerConfig
    from flowmill.train.distributed import init_distributed
    from flowmill.train.engine import build_engine
    from flowmill.train.plan import Plan

    env = init_distributed("cpu")
    cfg = Config(trainer=TrainerConfig(micro_batch_size=batch), parallel=ParallelConfig(zero_stage=0))
    plan = Plan.of(cfg, RunDir("unused"), env.world_size, resume=False)
    variants = {"eager": False, "compile": True} if compile_blocks else {"eager": False}
    out = {}
    for label, compiled in variants.items():
        bare, plain, owned = (copy.deepcopy(model) for _ in range(3))
        for module in (bare, plain, owned):
            if compiled:
                module.compile_blocks()
        ds_engine = build_engine(owned, cfg, plan)
        optimizer = torch.optim.AdamW(plain.parameters(), lr=cfg.optim.lr, fused=True)

        def bare_step():
            bare.zero_grad(set_to_none=True)
            F.mse_loss(bare(*inputs), target).backward()

        def plain_step():
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(plain(*inputs), target).backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
            optimizer.step()

        def engine_step():
            loss = F.mse_loss(ds_engine(*inputs), target)
            ds_engine.backward(loss)
            ds_engine.step()

        steps = {"fwd+bwd": bare_step, "torch step": plain_step, "engine step": engine_step}
        for step in steps.values():
            step()
            step()
        times = interleaved(steps, reps)
        out[label] = {
            "ms": {key: 1e3 * statistics.median(value) for key, value in times.items()},
            "engine_vs_fwd_bwd": paired_ratio(times, "engine step", "fwd+bwd"),
            "engine_vs_torch_step": paired_ratio(times, "engine step", "torch step"),
        }
    return out


def report(results: list[dict], peak: float, threads: int) -> None:
    load = os.getloadavg()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({threads} thread(s)); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for result in results:
        ms = result["ms"]
        print(f"\n{result['size']}: {result['params'] / 1e6:.2f} M parameters, batch {result['batch']}, "
              f"{result['gflop_per_step']:.2f} GFLOP per fwd+bwd")
        if "compile_s" in result:
            print(f"  compile (first step, blocks): {result['compile_s']:.1f} s; compiled vs eager output: "
                  f"max |difference| {result['compile_rel_diff']:.1e} of max |v|")
        print(f"  {'fwd+bwd':<18}{'ms':>10}{'vs diffusers':>14}{'FLOP/s':>12}{'of peak':>9}")
        for key, value in ms.items():
            ratio = result["ratio_vs_diffusers"].get(key, 1.0)
            flops = result["gflop_per_step"] * 1e9 / (value / 1e3)
            print(f"  {key:<18}{value:>10.1f}{ratio:>14.3f}{flops / 1e9:>9.2f} G{flops / peak:>9.1%}")
        for label, engine in result.get("engine", {}).items():
            print(f"  engine ({label}):")
            for key, value in engine["ms"].items():
                flops = result["gflop_per_step"] * 1e9 / (value / 1e3)
                print(f"    {key:<16}{value:>10.1f} ms{flops / peak:>9.1%} of peak")
            print(f"    engine step / bare fwd+bwd: {engine['engine_vs_fwd_bwd']:.3f}; "
                  f"engine step / plain torch step: {engine['engine_vs_torch_step']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="sizes to time (default: all)")
    parser.add_argument("--reps", type=int, default=10, help="interleaved repetitions per step (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-engine", action="store_true", help="skip the DeepSpeed engine step")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    results = [bench_size(name, args.reps, not args.no_compile, not args.no_engine) for name in args.size or list(SIZES)]
    report(results, peak, args.threads)
    if args.json:
        print(json.dumps({"peak_flops": peak, "results": results}))
    if not args.no_engine:
        from flowmill.train.distributed import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
