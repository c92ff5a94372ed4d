"""Speed of the video tokenizer: training clips/s, encode + decode clips/s, and decode time against k.

Measured side by side in one process on the model of a tokenizer config (random weights: speed
does not depend on them): rounds alternate between the workloads and each row reports the
median round, so a machine that gets busier halfway slows every row alike. Decoding is
``--steps`` Euler steps of the flow decoder from the first k tokens; the last column is the
time relative to decoding from 1 token.

    python bench/video_tokenizer_step.py --config configs/video_tokenizer_moving_digits.yaml --batch 16 --steps 25
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from flowmill.models.video_tokenizer import VideoTokenizer
from flowmill.train.config import load_config


def training_step(model: VideoTokenizer, clips: torch.Tensor) -> Callable[[], None]:
    """One AdamW step of the tokenizer's flow loss (nested dropout drawn as in training)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        loss, _ = model.loss(clips, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def encode_decode(model: VideoTokenizer, clips: torch.Tensor, k: int, steps: int, cfg_scale: float) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            indices = model.encode(clips).indices[:, :k]
            model.decode(indices, steps=steps, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/video_tokenizer_moving_digits.yaml", help="a video_tokenizer config; its model section is measured")
    parser.add_argument("--batch", type=int, default=16, help="clips per training step and per encode+decode call (default 16)")
    parser.add_argument("--steps", type=int, default=25, help="decoder ODE steps (default 25)")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the decoder (default 1.0; other values double its batch)")
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    if cfg.task != "video_tokenizer":
        raise SystemExit(f"--config: {args.config} is a {cfg.task} config; give a video_tokenizer config")
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model)
    m = cfg.model
    clips = torch.rand(args.batch, m.frames, m.channels, m.image_size, m.image_size) * 2 - 1
    ks = m.keep_k_choices if m.keep_k_distribution == "pow2" else sorted({1, m.num_registers // 2, m.num_registers})

    workloads: dict[str, Callable[[], None]] = {"train (fwd+bwd+AdamW)": training_step(model, clips)}
    workloads["encode only"] = torch.no_grad()(lambda: model.encode(clips))
    for k in ks:
        workloads[f"encode + decode, k={k}"] = encode_decode(model, clips, k, args.steps, args.cfg)
    timings: dict[str, list[float]] = {name: [] for name in workloads}
    for work in workloads.values():  # warm-up
        work()
    for _ in range(args.rounds):
        for name, work in workloads.items():
            start = time.perf_counter()
            work()
            timings[name].append(time.perf_counter() - start)

    params = sum(p.numel() for p in model.parameters())
    print(f"{args.config}: {params / 1e6:.2f} M parameters, clips {m.frames}×{m.image_size}×{m.image_size}, "
          f"{m.num_patches} patches + K={m.num_registers} tokens, batch {args.batch}, decoder {args.steps} Euler steps, "
          f"cfg {args.cfg}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    first_decode = statistics.median(timings[f"encode + decode, k={ks[0]}"])
    print(f"\n{'workload':<26} {'s/call':>8} {'clips/s':>9} {'vs k=' + str(ks[0]):>8}")
    for name, values in timings.items():
        seconds = statistics.median(values)
        relative = f"{seconds / first_decode:>7.2f}×" if name.startswith("encode + decode") else ""
        print(f"{name:<26} {seconds:>8.3f} {args.batch / seconds:>9.1f} {relative:>8}")
    print("\nThe decoder always attends over all K token slots (the ones past k hold the mask token), so its cost does "
          "not depend on k; the encoder runs once per clip.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
