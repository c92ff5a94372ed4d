"""What the ``flowmill data`` commands do: the handlers ``flowmill.data.cli`` names.

Each handler takes the parsed namespace and returns the exit code; errors in what the user
asked for are raised as ``UsageError`` (``flowmill.cli`` prints them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from pathlib import Path

import torch

from flowmill.data.audit import inspect_epoch
from flowmill.data.builtin import (
    MovingDigitsSpec,
    digit_captions,
    moving_digits_caption_lines,
    pack_builtin_digits,
    pack_moving_digits,
    tinyshakespeare_path,
)
from flowmill.data.constants import (
    DIGIT_CAPTIONS,
    DIGITS_SOURCE,
    IMAGES_SOURCE,
    MOVING_DIGITS_CAPTIONS,
    MOVING_DIGITS_SOURCE,
    PACK_SOURCES,
    TEXT_SOURCE,
    TINYSHAKESPEARE,
    VIDEO_SOURCE,
)
from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.images import pack_images
from flowmill.data.latents import DEFAULT_KEEP, LATENTS_SECTION, VAE_ENCODER, first_image
from flowmill.data.pack import PackOptions
from flowmill.data.remote import Storage, StorageError
from flowmill.data.text import pack_text
from flowmill.data.text_tokenizer import train_text_tokenizer
from flowmill.data.video import ClipSpec, pack_videos
from flowmill.errors import UsageError

# (fewest, most) INPUTs before OUT_DIR per pack source; None: no upper bound.
INPUTS = {
    DIGITS_SOURCE: (0, 0), MOVING_DIGITS_SOURCE: (0, 0), IMAGES_SOURCE: (1, 1), TEXT_SOURCE: (1, None), VIDEO_SOURCE: (1, None),
}
# Options that only mean something for some sources; giving one to another source is an error.
OPTION_SOURCES = {
    "size": (MOVING_DIGITS_SOURCE, IMAGES_SOURCE, VIDEO_SOURCE),
    "frames": (MOVING_DIGITS_SOURCE, VIDEO_SOURCE),
    "mp4": (MOVING_DIGITS_SOURCE, VIDEO_SOURCE),
    "stride": (VIDEO_SOURCE,),
    "num_clips": (MOVING_DIGITS_SOURCE,),
    "digits": (MOVING_DIGITS_SOURCE,),
    "seed": (MOVING_DIGITS_SOURCE,),
    "tokenizer": (TEXT_SOURCE,),
    "seq_len": (TEXT_SOURCE,),
    "val_fraction": (TEXT_SOURCE,),
}


def _check_pack_args(args: argparse.Namespace) -> tuple[list[str], str]:
    """(inputs, out_dir) of a pack command line; UsageError for a wrong combination."""
    if args.source not in PACK_SOURCES:
        raise UsageError(f"unknown pack source {args.source!r}; choose one of: {', '.join(PACK_SOURCES)}")
    *inputs, out_dir = args.paths
    low, high = INPUTS[args.source]
    if len(inputs) < low or (high is not None and len(inputs) > high):
        wanted = "no INPUT" if high == 0 else "one INPUT" if high == 1 else "one or more INPUTs"
        raise UsageError(f"{args.source} takes {wanted} before OUT_DIR, got {len(inputs)}: {' '.join(inputs) or '-'}")
    for option, sources in OPTION_SOURCES.items():
        value = getattr(args, option)
        if value not in (None, False) and args.source not in sources:
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} applies to {', '.join(sources)}, not to {args.source}")
    if args.source == TEXT_SOURCE and args.tokenizer is None:
        raise UsageError("text needs --tokenizer TOK.model (train one with `flowmill data tokenizer`)")
    return inputs, out_dir


def pack_command(args: argparse.Namespace) -> int:
    """``flowmill data pack``: pack the source, print one line per dataset written."""
    inputs, out_dir = _check_pack_args(args)
    options = PackOptions(
        shard_samples=args.shard_samples, shard_bytes=args.shard_bytes, processes=args.processes,
        progress=not args.quiet, overwrite=args.overwrite,
    )
    try:
        manifests = _run_pack(args, inputs, out_dir, options)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    for where, manifest in manifests.items():
        print(_summary(where, manifest, "inputs"))
    return 0


def _summary(where: str, manifest: dict, skipped: str) -> str:
    """One line on a dataset written to ``where``; ``skipped`` names what its rejected entries are."""
    rejected = len(manifest["made"].get("notes", {}).get("rejected", []))  # manifests before notes have none
    return (
        f"{where}: {manifest['total_samples']} samples in {len(manifest['shards'])} shards, fields "
        f"{', '.join(manifest['fields'])}" + (f"; {rejected} {skipped} skipped (listed in manifest.json)" if rejected else "")
    )


def _run_pack(args: argparse.Namespace, inputs: list[str], out_dir: str, options: PackOptions) -> dict[str, dict]:
    """Pack as the command line says; returns {folder written: manifest}."""
    def given(value, default):
        return default if value is None else value

    if args.source == DIGITS_SOURCE:
        return {out_dir: pack_builtin_digits(out_dir, options=options)}
    if args.source == MOVING_DIGITS_SOURCE:
        spec = MovingDigitsSpec(
            frames=given(args.frames, 16), size=given(args.size, 32), digits=given(args.digits, 2),
            seed=given(args.seed, 0), mp4=args.mp4,
        )
        return {out_dir: pack_moving_digits(out_dir, num_clips=given(args.num_clips, 1024), spec=spec, options=options)}
    if args.source == IMAGES_SOURCE:
        return {out_dir: pack_images(inputs[0], out_dir, size=args.size, options=options)}
    if args.source == VIDEO_SOURCE:
        frames = given(args.frames, 16)
        spec = ClipSpec(frames=frames, size=given(args.size, 32), stride=given(args.stride, frames), mp4=args.mp4)
        return {out_dir: pack_videos(inputs, out_dir, spec, options=options)}
    manifests = pack_text(
        inputs, out_dir, text_tokenizer_path=args.tokenizer, seq_len=given(args.seq_len, 256),
        val_fraction=given(args.val_fraction, 0.1), options=options,
    )
    return {str(Path(out_dir) / split): manifest for split, manifest in manifests.items()}


def _read_lines(paths: list[str]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        if path == DIGIT_CAPTIONS:
            lines.extend(digit_captions())
            continue
        if path == MOVING_DIGITS_CAPTIONS:
            lines.extend(moving_digits_caption_lines())
            continue
        if path == TINYSHAKESPEARE:
            path = str(tinyshakespeare_path())
        try:
            lines.extend(Path(path).read_text(encoding="utf-8").splitlines())
        except FileNotFoundError:
            raise UsageError(f"text file {path} does not exist") from None
        except UnicodeDecodeError as exn:
            raise UsageError(f"{path} is not UTF-8 text ({exn.reason} at byte {exn.start})") from None
    return lines


def tokenizer_command(args: argparse.Namespace) -> int:
    """``flowmill data tokenizer``: train a sentencepiece model on the texts, print where it went."""
    path = train_text_tokenizer(
        _read_lines(args.text), args.out_prefix, args.vocab_size, model_type=args.model_type, newlines=args.newlines
    )
    print(f"wrote {path}")
    return 0


def _skipped_count(skipped: list[dict]) -> str:
    """``"3"``, or ``"115 (112 in unreadable shards)"``; a lost rest without a manifest count is named, not guessed."""
    samples = sum(1 for entry in skipped if entry["key"] is not None)
    lost = [entry["lost"] for entry in skipped if entry["key"] is None]
    known = sum(count for count in lost if count is not None)
    unknown = sum(1 for count in lost if count is None)
    text = str(samples + known)
    if known:
        text += f" ({known} in unreadable shards)"
    if unknown:
        text += f" and the unread rest of {unknown} shard{'s' if unknown > 1 else ''} without a manifest count"
    return text


def _print_inspection(result: dict) -> None:
    width = max(40, shutil.get_terminal_size().columns - 4)
    for rank in result["ranks"]:
        print(f"rank {rank['rank']}: {len(rank['keys'])} samples")
        print(textwrap.fill(" ".join(rank["keys"]), width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False))
    print(f"skipped: {_skipped_count(result['skipped'])}")
    for entry in result["skipped"]:
        print(f"  {entry['key'] or '(rest of shard)'} in {entry['shard']}: {entry['reason']}")
    print(f"dropped: {len(result['dropped'])}")
    for entry in result["dropped"]:
        print(f"  {entry['key']}: {entry['reason']}")


def inspect_command(args: argparse.Namespace) -> int:
    """``flowmill data inspect``: print (or ``--json``) which keys each simulated rank reads."""
    if args.retries < 0:
        raise UsageError(f"--retries: must be >= 0, got {args.retries}")
    try:
        result = inspect_epoch(
            args.dataset, world_size=args.world_size, num_workers=args.num_workers, epoch=args.epoch, seed=args.seed,
            batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer, drop_last=args.drop_last,
            resampled=args.resampled, verify=not args.no_verify,
            storage=Storage(dict(args.storage_options), retries=args.retries),
        )
    except (FileNotFoundError, StorageError, ValueError, RuntimeError) as exn:  # RuntimeError: checksum mismatch, nothing decodable
        raise UsageError(str(exn)) from None
    if args.json:
        print(json.dumps(result))
    else:
        _print_inspection(result)
    return 0


def _vae_encoder_args(args: argparse.Namespace) -> tuple[str, dict, tuple[str, ...]]:
    """(encoder spec, factory keywords, kept fields) of ``--vae``: the dataset's first image decides the
    image field and size; the caption and class are kept when the samples have them."""
    if args.arg:
        raise UsageError("--arg: keywords go to an --encoder factory; --vae takes none")
    image_field, size, fields = first_image(args.dataset)
    keep = tuple(args.keep) if args.keep else tuple(name for name in DEFAULT_KEEP if name in fields)
    # The manifest names the VAE by its absolute path: training and sampling may run from another folder.
    vae = str(Path(args.vae).resolve())
    return VAE_ENCODER, {"vae": vae, "image_field": image_field, "size": size}, keep


def encode_command(args: argparse.Namespace) -> int:
    """``flowmill data encode``: cache the encoder's outputs as shards, print what was written."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.nproc < 1:
        raise UsageError(f"--nproc: must be at least 1, got {args.nproc}")
    options = PackOptions(
        shard_samples=args.shard_samples, shard_bytes=args.shard_bytes, progress=not args.quiet, overwrite=args.overwrite,
    )
    try:
        if args.vae is not None:
            spec, encoder_args, keep = _vae_encoder_args(args)
        else:
            spec, encoder_args, keep = args.encoder, dict(args.arg), tuple(args.keep)
        encoder = load_encoder(spec, encoder_args)
        manifest = encode_dataset(
            args.dataset, args.out_dir, encoder, encoder_spec=spec, encoder_args=encoder_args,
            batch_size=args.batch_size, keep=keep, dtype=args.dtype, processes=args.nproc, options=options,
        )
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as exn:
        raise UsageError(str(exn)) from None
    print(_summary(args.out_dir, manifest, "samples"))
    latents = manifest.get(LATENTS_SECTION)
    if latents is not None:
        measured = f" (measured on the data: {', '.join(latents['measured'])})" if latents["measured"] else ""
        print(f"latents {'x'.join(map(str, latents['shape']))}: scaling_factor {latents['scaling_factor']:.6g}, "
              f"shift_factor {latents['shift_factor'] or 0.0:.6g}{measured}")
    return 0
