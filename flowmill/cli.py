"""The ``flowmill`` command line: one entry point, one sub-command per verb."""

from __future__ import annotations

import argparse
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXAMPLES = """examples:
  flowmill train configs/mmdit_digits.yaml trainer.max_steps=100
  flowmill launch local --nproc 2 configs/mmdit_digits.yaml
  flowmill resume runs/mmdit-digits-20260101-120000 trainer.max_steps=400
  flowmill sample runs/mmdit-digits-20260101-120000 --prompt "a handwritten digit seven" --out samples/
  flowmill sample runs/flm-shakespeare-20260101-120000 --steps 32 --num-samples 8 --out samples.jsonl
  flowmill reconstruct runs/tokenizer-moving-digits-20260101-120000 clip.npy --num-tokens 4 --out recon/
"""


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides in dotted form, e.g. trainer.max_steps=40 optim.lr=3e-4"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmill",
        description="Train flow-based generative models (rectified flow) with DeepSpeed, WebDataset and MLflow.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train in this process (or in each process of a torchrun/srun job)",
        description="Train the run described by CONFIG in this process. Under torchrun or srun every process "
        "runs this command; RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT come from the environment.",
    )
    train.add_argument("config", nargs="?", help="YAML config, e.g. configs/mmdit_digits.yaml")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint (used by `flowmill resume`)")
    add_overrides(train)

    launch = commands.add_parser("launch", help="start a multi-process job", description="Start a training job on several processes.")
    where = launch.add_subparsers(dest="where", required=True, metavar="WHERE")
    local = where.add_parser(
        "local",
        help="N processes on this machine",
        description="Start N training processes on this machine (gloo on the CPU, nccl on GPUs). "
        "If one process dies, the whole job stops and the failing rank is reported.",
    )
    local.add_argument("--nproc", type=int, default=1, help="number of processes (default 1)")
    local.add_argument("config", help="YAML config, e.g. configs/mmdit_digits.yaml")
    add_overrides(local)
    from flowmill.launchers.slurm import register as register_slurm
    from flowmill.launchers.slurm import register_runs_logs

    register_slurm(where)

    resume = commands.add_parser(
        "resume",
        help="continue a run from its latest checkpoint",
        description="Continue RUN_DIR from its latest checkpoint with the run's own config.yaml plus overrides "
        "(e.g. trainer.max_steps=40 extends it). The MLflow run is continued.",
    )
    resume.add_argument("run_dir", metavar="RUN_DIR", help="a run directory created by flowmill")
    resume.add_argument("--nproc", type=int, default=None, help="number of local processes (default: the run's world size)")
    add_overrides(resume)

    sample = commands.add_parser(
        "sample",
        help="generate samples from a run or checkpoint (EMA weights)",
        description="Generate samples with the EMA weights of RUN_DIR's latest checkpoint (or of the checkpoint "
        "folder CKPT). Image runs (MMDiT): N images per --prompt, one PNG each, grid.png (one row per prompt) "
        "and samples.jsonl in --out DIR. Text runs (flm, fmlm): N sequences of --steps steps, detokenized, "
        'one {"text": ...} per line of --out FILE.jsonl; a few are printed.',
    )
    sample.add_argument("source", metavar="RUN_DIR|CKPT|MODEL_DIR",
                        help="a run directory, one of its checkpoints/step-* folders, or a model folder (with --text-from)")
    sample.add_argument("--prompt", action="append", default=[], help="a text prompt (image runs); repeat for several")
    sample.add_argument("--num-samples", type=int, default=4, help="samples per prompt (image runs) or in all (text runs) (default 4)")
    sample.add_argument("--steps", type=int, default=25, help="ODE solver steps (jumps for an fmlm flow map, e.g. 1) (default 25)")
    sample.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3.0; 1 disables)")
    sample.add_argument("--sampler", default="euler", help="ODE solver: euler or heun (default euler)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--out", required=True, help="output: a folder for images, a FILE.jsonl for text")
    sample.add_argument("--text-from", metavar="RUN_DIR",
                        help="model folders (image models) only: the run whose text encoder, tokenizer and timestep shift to use")

    reconstruct = commands.add_parser(
        "reconstruct",
        help="encode clips with a video tokenizer and decode them from their first k tokens",
        description="Encode each INPUT (an .mp4 file or an .npy uint8 array (T, H, W, 3)) with the video tokenizer "
        "of RUN_DIR (EMA weights) and decode it from its first --num-tokens tokens: writes <name>.npy (uint8, "
        "the clip's shape) and <name>.mp4 into --out. Inputs of another length or size are refused, or cut and "
        "resized with --fit crop. "
        "Example: flowmill reconstruct runs/tokenizer-1 clip.npy --num-tokens 4 --out recon/",
    )
    reconstruct.add_argument("source", metavar="RUN_DIR|CKPT", help="a video tokenizer run dir or one of its checkpoints/step-* folders")
    reconstruct.add_argument("inputs", nargs="+", metavar="INPUT", help=".mp4 files or .npy arrays (T, H, W, 3) uint8")
    reconstruct.add_argument("--num-tokens", type=int, required=True, metavar="K", help="decode from the first K tokens (1..the run's K)")
    reconstruct.add_argument("--steps", type=int, default=25, help="ODE solver steps of the flow decoder (default 25)")
    reconstruct.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance over the tokens (default 1.0: none)")
    reconstruct.add_argument("--sampler", default="euler", help="ODE solver: euler or heun (default euler)")
    reconstruct.add_argument("--seed", type=int, default=0, help="noise seed of the decoder (default 0)")
    from flowmill.data.decode import CLIP_FITS

    reconstruct.add_argument("--fit", choices=CLIP_FITS, help="inputs of another shape: refuse them, or keep the "
                             "first T frames, resized and centre-cropped (default: the run's video.fit)")
    reconstruct.add_argument("--out", required=True, metavar="DIR", help="folder for <name>.npy and <name>.mp4")

    from flowmill.train.model_io import register as register_model_io

    register_model_io(commands)

    from flowmill.data.cli import register as register_data

    register_data(commands)

    from flowmill.train.runs import register as register_runs
    from flowmill.train.runs import register_ui

    runs = commands.add_parser(
        "runs",
        help="list and compare runs tracked in MLflow",
        description="Inspect runs: `runs list` tables an experiment's runs, `runs compare` puts some runs side by "
        "side, `runs logs` shows a run's SLURM output.",
    )
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    register_runs(runs_commands)
    register_runs_logs(runs_commands)
    register_ui(commands)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a trailing positional nothing once an option came between it and the first
    # positional (`resume RUN_DIR --nproc 1 trainer.max_steps=6`): such overrides come back here.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


@record
def main(argv: list[str] | None = None) -> int:
    from flowmill.train.checkpoint import CheckpointError
    from flowmill.train.config import ConfigError

    args = parse_args(argv)
    try:
        return dispatch(args)
    except ConfigError as error:
        print(f"flowmill: config error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as error:
        print(f"flowmill: error: {error}", file=sys.stderr)
        return 2


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from flowmill.train.config import ConfigError
        from flowmill.train.loop import run_from_cli

        config, overrides = args.config, args.overrides
        if args.resume and config:
            # argparse hands the first override to the optional CONFIG positional.
            if "=" not in config:
                raise ConfigError(f"--resume continues with the run's own config.yaml; drop {config}")
            config, overrides = None, [config, *overrides]
        if not config and not args.resume:
            raise ConfigError("pass a CONFIG file (or --resume RUN_DIR)")
        run_from_cli(config, overrides, args.resume)
        return 0
    if args.command == "launch" and args.where == "local":
        from flowmill.launchers.local import launch_local

        return launch_local(args.config, args.overrides, args.nproc)
    if args.command == "resume":
        from flowmill.launchers.local import resume_local

        return resume_local(args.run_dir, args.overrides, args.nproc)
    if args.command == "sample":
        from flowmill.train.config import ConfigError
        from flowmill.train.model_io import is_model_folder, sample_model_folder
        from flowmill.train.sample import sample_command

        if is_model_folder(args.source):
            return sample_model_folder(args)
        if args.text_from:
            raise ConfigError("--text-from: only a model folder needs it; a run samples with its own text encoder")
        return sample_command(args)
    if args.command == "reconstruct":
        from pathlib import Path

        from flowmill.train.config import ConfigError
        from flowmill.train.sample import load_task_and_model

        task, model, checkpoint = load_task_and_model(Path(args.source))
        if not hasattr(task, "reconstruct_command"):
            raise ConfigError(f"{args.source} trains a {task.family!r} model; reconstruct needs a video tokenizer run")
        return task.reconstruct_command(model, checkpoint, args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
