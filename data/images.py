"""Packing a folder of captioned images: ``cat.jpg`` + ``cat.txt`` (or ``cat.json``) → one sample.

The folder is searched recursively. A sample's key is the image's path relative to the
folder without its suffix, dots replaced by ``_`` (``cats/a.b.jpg`` → ``cats/a_b``). Its
fields: the image bytes under their suffix (``jpg`` for ``.jpeg``), ``txt`` the caption,
``json`` the sidecar JSON when there is one. A ``.json`` without a ``.txt`` must hold a
string ``"caption"`` (or ``"text"``), which becomes ``txt``. Images are checked by
decoding them; with ``size`` they are resized (shorter side) and centre-cropped to a square
and re-encoded in their format.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from flowmill.data.constants import DEFAULT_SHARD_SAMPLES, IMAGES_SOURCE
from flowmill.data.pack import PackOptions, input_fingerprint, write_shards
from flowmill.data.parallel import BadInput, parallel_samples, warn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FIELD_OF_SUFFIX = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class ImageJob:
    """One image to pack; picklable for pack worker processes."""

    folder: str  # the folder being packed
    relative: str  # the image's path inside it
    size: int | None  # square side to resize and crop to; None keeps the image as it is


def find_images(folder: str | Path, size: int | None = None) -> list[ImageJob]:
    """Every image under ``folder``, sorted by relative path. FileNotFoundError / ValueError for a
    missing folder or one without images."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of images")
    found = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not found:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [ImageJob(str(root), relative, size) for relative in found]


def image_key(relative: str) -> str:
    """Sample key of an image path relative to the packed folder (see module docstring)."""
    stem = str(Path(relative).with_suffix(""))
    return stem.replace(".", "_")


def _caption(image: Path) -> dict:
    fields: dict = {}
    text_path, json_path = image.with_suffix(".txt"), image.with_suffix(".json")
    if text_path.is_file():
        try:
            fields["txt"] = text_path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exn:
            raise BadInput(f"caption {text_path.name} is not UTF-8 text ({exn.reason} at byte {exn.start})") from None
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise BadInput(f"{json_path.name} is not UTF-8 JSON ({exn})") from None
        fields["json"] = json.dumps(meta, sort_keys=True)
        if "txt" not in fields:
            captions = [meta[key] for key in CAPTION_KEYS if isinstance(meta, dict) and isinstance(meta.get(key), str)]
            if not captions:
                raise BadInput(f"{json_path.name} has no string {' or '.join(repr(key) for key in CAPTION_KEYS)} and there is no .txt")
            fields["txt"] = captions[0]
    if "txt" not in fields:
        raise BadInput("no caption: put a .txt or .json beside the image")
    return fields


def square(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized (shorter side → ``size``, bicubic, antialiased) and centre-cropped to size × size."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_sample(job: ImageJob) -> list[dict]:
    """The sample of one image (a one-element list); BadInput when the image or its caption is unusable."""
    path = Path(job.folder) / job.relative
    field = FIELD_OF_SUFFIX[path.suffix.lower()]
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes fully: a truncated file fails here, not in training
            if job.size is not None:
                buffer = io.BytesIO()
                square(image.convert("RGB") if image.mode not in ("L", "RGB") else image, job.size).save(
                    buffer, format=PIL_FORMAT[field]
                )
                data = buffer.getvalue()
    except Exception as exn:  # PIL raises many types for bad files; all mean "cannot decode"
        raise BadInput(f"cannot decode the image ({type(exn).__name__}: {exn})") from None
    return [{"__key__": image_key(job.relative), field: data, **_caption(path)}]


def pack_images(
    folder: str | Path,
    out_dir: str | Path,
    *,
    size: int | None = None,
    options: PackOptions = PackOptions(),
    on_reject=warn,
) -> dict:
    """Pack the captioned images under ``folder`` into ``out_dir``; returns the manifest.

    Shards hold ``DEFAULT_SHARD_SAMPLES["images"]`` samples unless ``options`` set a limit.
    Unusable images (undecodable, no caption, a key taken by another image) are reported
    with ``on_reject`` (one line each), listed in the manifest's notes and left out.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    jobs = find_images(folder, size)
    rejected: list[dict] = []
    owners: dict[str, str] = {}
    kept = []
    for job in jobs:
        key = image_key(job.relative)
        if key in owners:
            reason = f"its key {key!r} is taken by {owners[key]}"
            rejected.append({"input": job.relative, "reason": reason})
            on_reject(f"skipping {job.relative}: {reason}")
            continue
        owners[key] = job.relative
        kept.append(job)
    samples = parallel_samples(
        image_sample, kept, processes=options.processes, rejected=rejected, describe=lambda job: job.relative, on_reject=on_reject
    )
    args = {"folder": str(Path(folder).resolve()), "size": size, "inputs": input_fingerprint([folder])}
    return write_shards(
        samples, out_dir, source=IMAGES_SOURCE, args=args, total=len(kept), notes={"rejected": rejected},
        **options.shard_keywords(DEFAULT_SHARD_SAMPLES[IMAGES_SOURCE]),
    )
