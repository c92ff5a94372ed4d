"""``flowmill data ...`` parsers: pack shards, train a text tokenizer, inspect what each rank reads, cache encoders.

``register(subparsers)`` adds the ``data`` group to the main parser. Each command names its
handler in ``flowmill.data.commands``, imported only when the command runs: this module
imports nothing heavy, so ``flowmill data ... --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import textwrap
from typing import Any

from flowmill.arguments import set_handler
from flowmill.data.constants import (
    DEFAULT_RETRIES,
    DEFAULT_SHARD_SAMPLES,
    DIGIT_CAPTIONS,
    DIGITS_SOURCE,
    ENCODE_SHARD_SAMPLES,
    IMAGES_SOURCE,
    MODEL_TYPES,
    MOVING_DIGITS_CAPTIONS,
    MOVING_DIGITS_SOURCE,
    PACK_SOURCES,
    TEXT_SOURCE,
    TINYSHAKESPEARE,
    VIDEO_SOURCE,
)

BYTE_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """``"64MB"`` → 64000000, ``"1GiB"`` → 1073741824, ``"5000"`` → 5000."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5000, 64MB or 1GiB")
    return int(match.group(1)) * BYTE_UNITS[match.group(2).lower()]


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, value), value read as JSON when it parses (numbers, true, lists), else a string."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_writing(parser: argparse.ArgumentParser, default_size: str) -> None:
    """--shard-samples, --shard-bytes, --overwrite and --quiet: how a command writes its shards (``PackOptions``)."""
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds another dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    size = parser.add_argument_group(f"shard size (default: {default_size})")
    size.add_argument("--shard-samples", type=int, help="close a shard after this many samples")
    size.add_argument("--shard-bytes", type=parse_bytes, help="close a shard once it holds this many bytes (5000, 64MB, 1GiB)")


def _add_encode(commands: argparse._SubParsersAction) -> None:
    encode = commands.add_parser(
        "encode",
        help="run a frozen encoder over a dataset once and write its outputs as new shards",
        description=(
            "Cache a frozen encoder's outputs (text embeddings, latents) so training does not recompute them every "
            "step. The encoder is MODULE:CALLABLE, called with the --arg keywords; it returns an object with "
            "decode(sample), __call__(batch) and description (see flowmill.data.encode). Each output becomes a "
            "NAME.npy field of a sample with the source key; --keep copies source fields (e.g. txt) along. "
            "--vae VAE (a diffusers AutoencoderKL folder or a flowmill autoencoder run) writes latent shards instead: "
            "the posterior's unscaled latent_mean.npy and latent_std.npy plus txt and cls; the manifest names the VAE "
            "(sha256) and its scaling_factor/shift_factor, measured on the data when the VAE has none."
        ),
        epilog=(
            "examples:\n"
            "  flowmill data encode datasets/digits datasets/digits-txt-emb "
            "--encoder flowmill.train.encoders:text_encoder --arg run_dir=runs/mmdit-digits-1 --keep png txt cls\n"
            "  flowmill data encode datasets/digits datasets/digits-latent --vae runs/vae-digits --nproc 2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument("dataset", metavar="DATASET", help="folder with manifest.json, manifest, brace pattern or glob")
    encode.add_argument("out_dir", metavar="OUT_DIR", help="folder for the encoded shards and manifest.json")
    which = encode.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", metavar="MODULE:CALLABLE", help="factory of the frozen encoder")
    which.add_argument("--vae", metavar="VAE", help="encode the images to latents with this VAE (diffusers folder or autoencoder run)")
    encode.add_argument("--arg", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                        help="keyword for the factory (JSON values: numbers, true, lists; else a string); repeat")
    encode.add_argument("--batch-size", type=int, default=64, help="samples per encoder call (default 64)")
    encode.add_argument("--keep", nargs="+", default=[], metavar="FIELD",
                        help="source fields copied to each output sample (--vae: default txt and cls, when present)")
    encode.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="encoding processes, each its share of the shards (one GPU each when present) (default 1)")
    encode.add_argument("--dtype", choices=("float32", "float16"), help="store floating outputs in this type")
    encode.add_argument("--threads", type=int, help="torch CPU threads for the encoder (default: torch's choice)")
    _add_writing(encode, f"{ENCODE_SHARD_SAMPLES} samples per shard")
    set_handler(encode, "flowmill.data.commands:encode_command")


def _add_pack(commands: argparse._SubParsersAction) -> None:
    pack = commands.add_parser(
        "pack",
        help="write WebDataset tar shards + manifest.json",
        usage="flowmill data pack SOURCE [INPUT ...] OUT_DIR [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
            Write a dataset as WebDataset tar shards plus manifest.json into OUT_DIR, using all cores.
            Re-running with the same arguments and unchanged inputs does nothing; a half-finished run
            leaves no partial dataset behind. Unusable inputs are reported one line each and skipped.

            sources:
              {DIGITS_SOURCE:<22} scikit-learn digits, 32x32 grey PNG + caption + class (no INPUT)
              {MOVING_DIGITS_SOURCE:<22} digits bouncing in a frame: .npy uint8 (T, S, S, 3) + caption (no INPUT)
              {IMAGES_SOURCE:<22} one folder of images with a .txt or .json caption beside each image
              {TEXT_SOURCE:<22} text files ({TINYSHAKESPEARE} for the built-in corpus) → token sequences,
              {'':<22} written as OUT_DIR/train and OUT_DIR/val (held-out tail of each file)
              {VIDEO_SOURCE:<22} .mp4 files, folders of frames, or folders holding either → clips of T frames"""),
        epilog=textwrap.dedent(f"""\
            examples:
              flowmill data pack {DIGITS_SOURCE} data/digits
              flowmill data pack {MOVING_DIGITS_SOURCE} data/moving --frames 16 --size 32 --num-clips 2048
              flowmill data pack {IMAGES_SOURCE} photos/ data/photos --size 256 --shard-bytes 256MB
              flowmill data pack {TEXT_SOURCE} {TINYSHAKESPEARE} data/shakespeare --tokenizer data/shakespeare-tok.model --seq-len 256
              flowmill data pack {VIDEO_SOURCE} clips/*.mp4 frames/ data/clips --frames 16 --size 64 --stride 8"""),
    )
    pack.add_argument("source", metavar="SOURCE", help=f"what to pack; one of: {', '.join(PACK_SOURCES)}")
    pack.add_argument("paths", nargs="+", metavar="PATH", help="the source's inputs (none for builtin sources), then OUT_DIR")
    pack.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    _add_writing(pack, "samples per shard by source, "
                 + ", ".join(f"{name} {count}" for name, count in DEFAULT_SHARD_SAMPLES.items()))
    media = pack.add_argument_group("images and video")
    media.add_argument("--size", type=int, help="square side in pixels (video and moving digits: default 32; images: keep as is)")
    media.add_argument("--frames", type=int, help="frames per clip, T (default 16)")
    media.add_argument("--stride", type=int, help="frames between the starts of consecutive clips (default: T, no overlap)")
    media.add_argument("--mp4", action="store_true", help="also store each clip as an H.264 .mp4 field")
    digits = pack.add_argument_group(MOVING_DIGITS_SOURCE)
    digits.add_argument("--num-clips", type=int, help="clips to make (default 1024)")
    digits.add_argument("--digits", type=int, help="digits moving in each clip (default 2)")
    digits.add_argument("--seed", type=int, help="seed of the clips (default 0)")
    text = pack.add_argument_group(TEXT_SOURCE)
    text.add_argument("--tokenizer", metavar="TOK.model", help="sentencepiece model from `flowmill data tokenizer`")
    text.add_argument("--seq-len", type=int, help="tokens per sequence (default 256)")
    text.add_argument("--val-fraction", type=float, help="tail of each file held out as OUT_DIR/val (default 0.1; 0: none)")
    set_handler(pack, "flowmill.data.commands:pack_command")


def _add_tokenizer(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser(
        "tokenizer",
        help="train a sentencepiece text tokenizer",
        description=(
            "Train a sentencepiece model on text, one sentence per line, and write OUT_PREFIX.model. "
            "Special ids: pad 0, unk 1, bos 2, eos 3. --vocab-size is an upper bound on tiny corpora."
        ),
        epilog=(
            f"examples: flowmill data tokenizer data/digits-tok --text {DIGIT_CAPTIONS} --vocab-size 32\n"
            f"          flowmill data tokenizer data/shakespeare-tok --text {TINYSHAKESPEARE} --vocab-size 1024 --newlines"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tokenizer.add_argument("out_prefix", metavar="OUT_PREFIX", help="path without extension; writes OUT_PREFIX.model")
    tokenizer.add_argument(
        "--text", nargs="+", required=True, metavar="FILE",
        help=f"UTF-8 text files, {DIGIT_CAPTIONS} for the 10 digit captions, {MOVING_DIGITS_CAPTIONS} for the "
        f"phrases of the moving-digits captions, {TINYSHAKESPEARE} for the built-in corpus",
    )
    tokenizer.add_argument("--vocab-size", type=int, required=True, help="largest vocabulary, special ids included")
    tokenizer.add_argument("--model-type", choices=MODEL_TYPES, default="unigram", help="sentencepiece algorithm (default unigram)")
    tokenizer.add_argument("--newlines", action="store_true", help="keep line breaks and runs of spaces (for language-model text)")
    set_handler(tokenizer, "flowmill.data.commands:tokenizer_command")


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="show which sample keys each rank reads in an epoch, and why any key is not read",
        description=(
            "Run the training data loader (same shard split, shuffles, decoding and batching) once per simulated "
            "rank and print the sample keys each rank receives in order, then every key not delivered with its "
            "reason: skipped (bad sample or unreadable shard) or dropped (remainder policy). Works on any "
            "WebDataset shards: every field is decoded by its extension (png, jpg, npy, txt, json, cls, mp4, ...)."
        ),
        epilog=(
            "example: flowmill data inspect data/digits --world-size 2 --num-workers 2 --batch-size 8 --json\n"
            "Samples of different shapes cannot share a batch: with --batch-size > 1 such samples are skipped, "
            "as training would skip them."
        ),
    )
    inspect.add_argument("dataset", metavar="DATASET",
                         help="folder with manifest.json, manifest, brace pattern, glob or URL (s3://, gs://, http(s)://)")
    inspect.add_argument("--world-size", type=int, required=True, help="data-parallel ranks to simulate")
    inspect.add_argument("--num-workers", type=int, required=True, help="dataloader workers per rank")
    inspect.add_argument("--epoch", type=int, default=0, help="epoch to show (default 0)")
    inspect.add_argument("--seed", type=int, default=0, help="data seed, trainer.seed in a config (default 0)")
    inspect.add_argument("--batch-size", type=int, default=1, help="micro batch size per rank (default 1)")
    inspect.add_argument("--shuffle-buffer", type=int, default=256, help="samples in the shuffle buffer, data.shuffle_buffer (default 256)")
    inspect.add_argument("--drop-last", action="store_true", help="drop each worker's last partial batch, as a drop_last loader does")
    inspect.add_argument(
        "--resampled", action="store_true",
        help="follow the infinite training stream from its start, where batches run across epoch ends",
    )
    inspect.add_argument("--no-verify", action="store_true", help="do not check shards against the manifest's sha256")
    inspect.add_argument(
        "--storage-option", dest="storage_options", action="append", type=parse_assignment, default=[], metavar="KEY=VALUE",
        help="a keyword of the fsspec filesystem of remote shards, as data.storage_options in a config, e.g. "
        "endpoint_url=http://127.0.0.1:9000 (repeatable; VALUE read as JSON when it parses). Without them, credentials "
        "and endpoint come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...",
    )
    inspect.add_argument(
        "--retries", type=int, default=DEFAULT_RETRIES,
        help=f"retries of a remote read that failed transiently, with backoff, data.retries (default {DEFAULT_RETRIES})",
    )
    inspect.add_argument("--json", action="store_true", help='print {"ranks": [...], "skipped": [...], "dropped": [...]}')
    set_handler(inspect, "flowmill.data.commands:inspect_command")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group (``pack``, ``tokenizer``, ``inspect``, ``encode``) to the main parser's ``subparsers``."""
    data = subparsers.add_parser(
        "data",
        help="make and check datasets: pack WebDataset shards, train tokenizers, inspect the data order, cache encoders",
        description="Dataset tools. Start with: flowmill data pack builtin:digits data/digits",
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_pack(commands)
    _add_tokenizer(commands)
    _add_inspect(commands)
    _add_encode(commands)
