"""Parsers of the commands that train a run or read one back: ``train``, ``sample``,
``reconstruct``, ``import`` and ``export``. Their handlers live in ``flowmill.train.commands``."""

from __future__ import annotations

import argparse

from flowmill.arguments import EXAMPLE_RUN, add_config, add_guidance, add_run_source, add_sampler, set_handler

COMMANDS = "flowmill.train.commands"


def register(commands: argparse._SubParsersAction) -> None:
    _add_train(commands)
    _add_sample(commands)
    _add_reconstruct(commands)
    _add_import(commands)
    _add_export(commands)
    _add_judge(commands)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train in this process (or in each process of a torchrun/srun job)",
        description="Train the run described by CONFIG in this process. Under torchrun or srun every process "
        "runs this command; RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT come from the environment.",
    )
    add_config(train, optional=True)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint (used by `flowmill resume`)")
    set_handler(train, f"{COMMANDS}:train")


def _add_sample(commands: argparse._SubParsersAction) -> None:
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
    add_sampler(sample, steps=25, cfg=None, cfg_help="classifier-free guidance scale (with --guidance raag: its w_max; "
                "a flow map distilled with guidance carries it, and --cfg guides each jump on top)")
    add_guidance(sample)
    sample.add_argument("--out", required=True, help="output: a folder for images, a FILE.jsonl for text")
    sample.add_argument("--text-from", metavar="RUN_DIR",
                        help="model folders (image models) only: the run whose text encoder, text tokenizer and timestep shift to use")
    set_handler(sample, f"{COMMANDS}:sample")


def _add_reconstruct(commands: argparse._SubParsersAction) -> None:
    reconstruct = commands.add_parser(
        "reconstruct",
        help="encode and decode with a trained video tokenizer or autoencoder",
        description="Encode each INPUT with the model of RUN_DIR (EMA weights) and decode it again into --out. "
        "A video tokenizer run reads .mp4 files and .npy uint8 arrays (T, H, W, 3), decodes them from their first "
        "--num-tokens tokens and writes <name>.npy (uint8, the clip's shape) and <name>.mp4; inputs of another "
        "length or size are refused, or cut and resized with --fit crop. An autoencoder run reads PNG/JPEG images "
        "of its size, or without INPUT the first --num-samples held-out images of --data, and writes one PNG per "
        "image, grid.png (originals above reconstructions) and reconstructions.jsonl (PSNR per image), and prints "
        "the mean PSNR. "
        "Examples: flowmill reconstruct runs/video-tokenizer-1 clip.npy --num-tokens 4 --out recon/; "
        "flowmill reconstruct runs/vae-digits-1 --out recon/",
    )
    add_run_source(reconstruct)
    reconstruct.add_argument("inputs", nargs="*", metavar="INPUT",
                             help="video tokenizer: .mp4 files or .npy arrays (T, H, W, 3) uint8; autoencoder: image "
                             "files (none: held-out images)")
    reconstruct.add_argument("--num-tokens", type=int, metavar="K", help="video tokenizer: decode from the first K tokens "
                             "(1..the run's K; required)")
    add_sampler(reconstruct, steps=25, cfg=1.0, cfg_help="video tokenizer: classifier-free guidance over the tokens")
    reconstruct.add_argument("--fit", help="video tokenizer: inputs of another shape: error (refuse them) or crop (keep "
                             "the first T frames, resized and centre-cropped) (default: the run's video.fit)")
    reconstruct.add_argument("--data", metavar="DATASET", help="autoencoder without INPUT: where the held-out images "
                             "are (default: the run's eval.path, else data.path)")
    reconstruct.add_argument("--num-samples", type=int, metavar="N", help="autoencoder without INPUT: images to "
                             "reconstruct, the first N of --data (default: the run's eval.num_samples)")
    reconstruct.add_argument("--out", required=True, metavar="DIR", help="folder for the reconstructions")
    set_handler(reconstruct, f"{COMMANDS}:reconstruct")


def _add_import(commands: argparse._SubParsersAction) -> None:
    importer = commands.add_parser(
        "import", help="turn weights of another library into a flowmill model folder",
        description="Read another library's weights into a flowmill model folder, which `flowmill sample`, "
        "`flowmill export` and a training config's model.init_from=MODEL_DIR accept.",
    )
    formats = importer.add_subparsers(dest="format", required=True, metavar="FORMAT")
    sd3 = formats.add_parser(
        "sd3", help="a diffusers SD3Transformer2DModel folder, or a whole SD3 pipeline folder",
        description="Import a diffusers SD3Transformer2DModel folder (config.json + diffusion_pytorch_model"
        "[.safetensors|-*.safetensors]), e.g. the transformer/ folder of a Stable Diffusion 3 pipeline, or the "
        "whole pipeline folder (model_index.json, transformer/, vae/): its VAE is copied to MODEL_DIR/vae, and "
        "`flowmill sample MODEL_DIR --text-from RUN` decodes the model's latents through it. "
        "Example: flowmill import sd3 stable-diffusion-3-medium-diffusers --out models/sd3-medium",
    )
    sd3.add_argument("source", metavar="DIR", help="the diffusers transformer folder, or the SD3 pipeline folder")
    sd3.add_argument("--out", required=True, metavar="MODEL_DIR", help="the flowmill model folder to write (new or empty)")
    set_handler(sd3, f"{COMMANDS}:import_sd3")


def _add_export(commands: argparse._SubParsersAction) -> None:
    exporter = commands.add_parser(
        "export", help="write a run's or model folder's weights in another library's format",
        description="Write a model in another library's format. A run exports its EMA weights (the ones "
        "`flowmill sample` uses) unless --live is given.",
    )
    formats = exporter.add_subparsers(dest="format", required=True, metavar="FORMAT")
    sd3 = formats.add_parser(
        "sd3", help="an MMDiT as a diffusers SD3Transformer2DModel folder",
        description="Write an MMDiT as a diffusers SD3Transformer2DModel folder that "
        f"SD3Transformer2DModel.from_pretrained(OUT_DIR) loads. Example: flowmill export sd3 {EXAMPLE_RUN} out/sd3",
    )
    add_run_source(sd3, "RUN_DIR|CKPT|MODEL_DIR")
    sd3.add_argument("out", metavar="OUT_DIR", help="the diffusers folder to write (new or empty)")
    sd3.add_argument("--live", action="store_true", help="a run's trained weights from its DeepSpeed checkpoint instead of the EMA")
    set_handler(sd3, f"{COMMANDS}:export_sd3")


def _add_judge(commands: argparse._SubParsersAction) -> None:
    judge = commands.add_parser(
        "judge", help="train (or find) the judge LM that scores a text config's samples",
        description="Train the judge of an flm/fmlm config's data.path with its judge section, once; later calls "
        "(and the runs' evaluations) find it in judge.cache_dir. Prints its record (settings, held-out perplexity).",
        epilog="example: flowmill judge configs/flm_shakespeare.yaml judge.steps=500",
    )
    add_config(judge)
    set_handler(judge, f"{COMMANDS}:judge")
