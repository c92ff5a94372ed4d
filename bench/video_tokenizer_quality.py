"""Reconstruction quality of a trained video tokenizer against the number of tokens k, with baselines.

For held-out clips (the first ``--clips`` of the run's eval.path, else data.path) it encodes
each clip, decodes it from its first k tokens (k = 1, 2, 4, ... K; decoder steps: the run's
recon.steps, else sample.steps; solver and guidance: its sample section) and prints PSNR and
SSIM per k, next to two baselines that hold no more information than the tokens:

- the mean clip of ``--train-clips`` training clips (0 bits: the same reconstruction for every clip);
- the best plain 3-D grid code of at most the tokens' bits (each clip averaged over a grid of
  cells, each cell rounded to 2-16 levels, upsampled back; the grid and levels are picked per k
  for the highest PSNR on these very clips, which favours the baseline).

It says whether PSNR rises with k (coarse to fine) and whether all K tokens beat both baselines,
writes the PSNR and SSIM plots into ``--out`` and, unless ``--no-mlflow``, logs the curves
(``bench/psnr_k{k}``, ``bench/ssim_k{k}``, baselines) and the plots to the run's MLflow run.

    python bench/video_tokenizer_quality.py runs/video-tokenizer-moving-digits-... --clips 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flowmill.train.sample import load_task_and_model
from flowmill.train.tasks.video_tokenizer import VideoTokenizerTask
from flowmill.train.video_metrics import best_grid_code, psnr, ssim, token_bits
from flowmill.train.videos import quality_plot


def first_clips(task: VideoTokenizerTask, source: str, count: int) -> torch.Tensor:
    """The first ``count`` clips of ``source`` in shard order, decoded as the run decodes them."""
    clips = task.first_batch(source, count)["video"]
    if len(clips) < count:
        raise SystemExit(f"{source} holds only {len(clips)} clips; pass --clips {len(clips)} or fewer")
    return clips


def log_to_mlflow(run_dir: Path, rows: list[dict], plots: list[Path]) -> str:
    """The curves as metrics (step = k) and the plots as artifacts of the run's MLflow run."""
    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    for row in rows:
        k = row["k"]
        for name in ("psnr", "ssim", "grid_psnr", "grid_ssim", "mean_psnr", "mean_ssim"):
            client.log_metric(info["run_id"], f"bench/{name}_by_k", row[name], step=k)
            client.log_metric(info["run_id"], f"bench/{name}_k{k}", row[name])
    for plot in plots:
        client.log_artifact(info["run_id"], str(plot), "bench")
    return info["run_id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a video tokenizer run (its latest EMA weights are measured)")
    parser.add_argument("--clips", type=int, default=64, help="held-out clips to reconstruct (default 64)")
    parser.add_argument("--train-clips", type=int, default=512, help="training clips averaged into the mean-clip baseline (default 512)")
    parser.add_argument("--steps", type=int, help="decoder ODE steps (default: the run's recon.steps, else sample.steps)")
    parser.add_argument("--out", help="folder for the plots and results.json (default RUN_DIR/bench)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow run")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    task, model, checkpoint = load_task_and_model(run_dir)
    if not isinstance(task, VideoTokenizerTask):
        raise SystemExit(f"{run_dir} trains a {task.family!r} model; this bench measures video tokenizers")
    held_out = first_clips(task, task.cfg.eval.path or task.cfg.data.path, args.clips)
    mean_clip = first_clips(task, task.cfg.data.path, args.train_clips).mean(dim=0, keepdim=True)
    mean_recon = mean_clip.expand_as(held_out)
    mean_psnr, mean_ssim = psnr(mean_recon, held_out), ssim(mean_recon, held_out)
    print(f"{checkpoint.path}: {len(held_out)} held-out clips, K = {model.config.num_registers} tokens of "
          f"{model.fsq.codebook_size} codes, decoder: {task.cfg.sample.sampler} {args.steps or task.recon_steps} steps, "
          f"cfg {task.cfg.sample.cfg_scale}")

    decoded = task.reconstructions(model, held_out, steps=args.steps)
    rows = []
    for k, clips in decoded.items():
        bits = token_bits(k, model.fsq.codebook_size)
        code, grid_psnr = best_grid_code(held_out, bits)
        rows.append({
            "k": k, "bits": round(bits, 1), "psnr": psnr(clips, held_out), "ssim": ssim(clips, held_out),
            "grid_psnr": grid_psnr, "grid_ssim": ssim(code(held_out), held_out),
            "grid": f"{'x'.join(map(str, code.grid))}@{code.levels}", "mean_psnr": mean_psnr, "mean_ssim": mean_ssim,
        })

    print(f"\n{'k':>4} {'bits':>7} | {'PSNR dB':>8} {'SSIM':>6} | {'grid code':>12} {'PSNR':>6} {'SSIM':>6} | "
          f"{'mean clip':>9} {'PSNR':>6} {'SSIM':>6}")
    for row in rows:
        print(f"{row['k']:>4} {row['bits']:>7} | {row['psnr']:>8.2f} {row['ssim']:>6.3f} | {row['grid']:>12} "
              f"{row['grid_psnr']:>6.2f} {row['grid_ssim']:>6.3f} | {'':>9} {row['mean_psnr']:>6.2f} {row['mean_ssim']:>6.3f}")
    psnrs = [row["psnr"] for row in rows]
    rises = all(later > earlier for earlier, later in zip(psnrs, psnrs[1:]))
    last = rows[-1]
    beats_mean = last["psnr"] > last["mean_psnr"] and last["ssim"] > last["mean_ssim"]
    beats_grid = last["psnr"] > last["grid_psnr"] and last["ssim"] > last["grid_ssim"]
    print(f"\nPSNR rises with every doubling of k: {'yes' if rises else 'no'} "
          f"({psnrs[-1] - psnrs[0]:+.2f} dB from k={rows[0]['k']} to k={last['k']})")
    print(f"k={last['k']} beats the mean clip (0 bits): {'yes' if beats_mean else 'no'} "
          f"({last['psnr'] - last['mean_psnr']:+.2f} dB, SSIM {last['ssim'] - last['mean_ssim']:+.3f})")
    print(f"k={last['k']} beats the best grid code of {last['bits']} bits: {'yes' if beats_grid else 'no'} "
          f"({last['psnr'] - last['grid_psnr']:+.2f} dB, SSIM {last['ssim'] - last['grid_ssim']:+.3f})")

    out = Path(args.out) if args.out else run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    ks = [row["k"] for row in rows]
    plots = [
        quality_plot(ks, {"tokenizer": psnrs}, "PSNR (dB)", out / "video_tokenizer_quality_psnr.png",
                     baselines={"grid code, same bits": [r["grid_psnr"] for r in rows], "mean clip": [mean_psnr] * len(rows)}),
        quality_plot(ks, {"tokenizer": [r["ssim"] for r in rows]}, "SSIM", out / "video_tokenizer_quality_ssim.png",
                     baselines={"grid code, same bits": [r["grid_ssim"] for r in rows], "mean clip": [mean_ssim] * len(rows)}),
    ]
    (out / "results.json").write_text(json.dumps({"checkpoint": str(checkpoint.path), "rows": rows, "rises": rises,
                                                  "beats_mean": beats_mean, "beats_grid": beats_grid}, indent=1))
    print(f"plots: {', '.join(map(str, plots))}")
    if not args.no_mlflow:
        print(f"logged to MLflow run {log_to_mlflow(run_dir, rows, plots)}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
