"""Decoders: raw WebDataset samples (``{"__key__", ext: bytes}``) → tensors.

A decoder raises on anything wrong with a sample (missing field, undecodable bytes, wrong
shape); the loader then skips the sample and reports the error text as the reason.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from flowmill.data.images import square
from flowmill.data.text_tokenizer import TextTokenizer


def field(sample: dict, name: str) -> bytes:
    """The bytes of field ``name``; KeyError listing the fields present if it is missing."""
    if name not in sample:
        present = sorted(key for key in sample if not key.startswith("__"))
        raise KeyError(f"missing field {name!r} (sample has: {', '.join(present) or 'nothing'})")
    return sample[name]


def image_uint8(data: bytes, channels: int) -> torch.Tensor:
    """PNG/JPEG bytes → uint8 tensor (channels, H, W); channels is 1 (grey) or 3 (RGB)."""
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"channels must be one of {sorted(modes)}, got {channels}")
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert(modes[channels]))
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], channels).copy()).permute(2, 0, 1)


@lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype, str, int]:
    """(shape, dtype, memory order "C"/"F", bytes of data) of a ``.npy`` header."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("npy array holds Python objects, which are not loaded (pickle)")
    return shape, dtype, "F" if fortran_order else "C", math.prod(shape) * dtype.itemsize


def npy_array(data: bytes) -> np.ndarray:
    """``.npy`` bytes → read-only array viewing ``data`` (no copy). Headers are parsed once per
    distinct header, and the array is one ``np.ndarray`` call on the bytes: ``np.load`` parses
    every header and copies the data out of a file object, a per-sample cost of the loader
    (docs/data.md, Performance)."""
    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        raise ValueError("not .npy data (bad magic)")
    header_end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    shape, dtype, order, nbytes = _npy_header(data[:header_end])
    if len(data) - header_end < nbytes:
        raise ValueError(f"npy data is truncated: {len(data) - header_end} bytes for a {shape} {dtype} array of {nbytes}")
    return np.ndarray(shape, dtype, data, header_end, None, order)


def text(data: bytes) -> str:
    """UTF-8 bytes → str."""
    return data.decode("utf-8")


def class_id(data: bytes) -> int:
    """``.cls`` bytes (an ASCII integer) → int."""
    return int(data.decode("ascii").strip())


@dataclass
class ImageTextDecoder:
    """Decode image+caption samples (e.g. the built-in digits) for a text-to-image model.

    Returns ``{"img": float (C, H, W) in [-1, 1], "txt": str}`` plus, with a tokenizer,
    ``"txt_ids": long (max_len,)`` padded with the pad id and ``"txt_mask": bool (max_len,)``
    (True on real tokens), plus ``"cls": int`` when the sample has a ``.cls`` field.
    """

    image_field: str = "png"  # the image field: png or jpg, or a latent image *.npy float (C, H, W) taken as it is
    channels: int = 1  # 1 = grey, 3 = RGB (a latent: its C)
    size: int | None = 32  # expected image side in pixels; another size is rejected (None accepts any)
    tokenizer: TextTokenizer | None = None  # tokenizes the caption when set
    max_len: int = 16  # token ids per caption, eos included, when a tokenizer is set

    def __call__(self, sample: dict) -> dict:
        data = field(sample, self.image_field)
        if self.image_field.endswith("npy"):
            img = torch.from_numpy(npy_array(data).astype(np.float32))
            if img.ndim != 3 or img.shape[0] != self.channels:
                raise ValueError(f"latent is {tuple(img.shape)}, expected ({self.channels}, H, W)")
        else:
            img = image_uint8(data, self.channels).float() / 127.5 - 1.0
        if self.size is not None and img.shape[1:] != (self.size, self.size):
            raise ValueError(f"image is {tuple(img.shape[1:])}, expected ({self.size}, {self.size})")
        out = {"img": img, "txt": text(field(sample, "txt"))}
        if self.tokenizer is not None:
            ids, mask = self.tokenizer.encode_padded([out["txt"]], self.max_len)
            out["txt_ids"], out["txt_mask"] = ids[0], mask[0]
        if "cls" in sample:
            out["cls"] = class_id(sample["cls"])
        return out


CLIP_FITS = ("error", "crop")


def fit_clip(clip: np.ndarray, frames: int, size: int, fit: str = "error") -> np.ndarray:
    """A uint8 (N, H, W, 3) video as a (frames, size, size, 3) clip.

    ``fit="error"`` accepts only that exact shape; ``fit="crop"`` keeps the first ``frames``
    frames and resizes each (shorter side → ``size``) and centre-crops it. ValueError otherwise.
    """
    expected = (frames, size, size, 3)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"clip is {clip.dtype} {clip.shape}, expected uint8 (T, H, W, 3) RGB frames")
    if clip.shape == expected:
        return clip
    if fit == "error":
        raise ValueError(f"clip is {clip.shape}, expected {expected} (fit crop cuts and resizes other clips: "
                         "video.fit=crop in a config, --fit crop for reconstruct)")
    if len(clip) < frames:
        raise ValueError(f"clip has {len(clip)} frames, fewer than the {frames} a clip needs")
    return np.stack([np.asarray(square(Image.fromarray(frame), size)) for frame in clip[:frames]])


@dataclass
class ClipDecoder:
    """Decode video clips for the video tokenizer: ``npy`` uint8 (T, H, W, 3) → ``{"video": float (T, 3, H, W) in [-1, 1]}``.

    ``field`` may also name an ``mp4`` field (decoded with PyAV). A clip of another shape is
    rejected, or cut to shape with ``fit="crop"`` (see ``fit_clip``).
    """

    frames: int = 16  # T, frames per clip
    size: int = 32  # H = W, pixels
    field: str = "npy"  # the clip's field: npy (uint8 array) or mp4
    fit: str = "error"  # clips of another shape: error (reject) | crop (first T frames, resized, centre-cropped)

    def __call__(self, sample: dict) -> dict:
        data = field(sample, self.field)
        clip = video_frames(data) if self.field.endswith("mp4") else npy_array(data)
        clip = fit_clip(clip, self.frames, self.size, self.fit)
        return {"video": clip_tensor(clip)}


def clip_tensor(clip: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) → float (T, 3, H, W) in [-1, 1], the video tokenizer's input."""
    return torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0


@dataclass
class TokenDecoder:
    """Decode token sequences for a language model: ``tokens.npy`` int (L,) → ``{"tokens": long (L,)}``."""

    seq_len: int  # L, ids per sequence; another length is rejected
    vocab_size: int | None = None  # ids must be < vocab_size when set
    field: str = "tokens.npy"  # the sequence's field

    def __call__(self, sample: dict) -> dict:
        ids = npy_array(field(sample, self.field))
        if ids.shape != (self.seq_len,) or ids.dtype.kind not in "iu":
            raise ValueError(f"token sequence is {ids.dtype} {ids.shape}, expected integers ({self.seq_len},)")
        tokens = torch.from_numpy(ids.astype(np.int64))
        if self.vocab_size is not None and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids span {int(tokens.min())}..{int(tokens.max())}, outside the vocabulary of {self.vocab_size}")
        return {"tokens": tokens}


def video_frames(data: bytes) -> np.ndarray:
    """``.mp4`` (or any PyAV-readable video) bytes → uint8 frames (T, H, W, 3)."""
    from flowmill.data.video import read_video  # lazy for start-up time: PyAV loads only for datasets with videos

    return read_video(data)


IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "gif", "tif", "tiff")
VIDEO_FIELDS = ("mp4", "webm", "mkv", "avi", "mov")
CLASS_FIELDS = ("cls", "cls2", "index", "label")


def decode_field(name: str, data: bytes):
    """One field by the extension at the end of its name (``tokens.npy`` → npy):
    images → uint8 tensor (C, H, W) with C = 1 (grey) or 3; ``npy`` → array as stored
    (token arrays included); videos → uint8 array (T, H, W, 3); ``txt`` → str; ``json`` →
    parsed value; ``cls`` → int; any other extension → the bytes unchanged."""
    extension = name.rsplit(".", 1)[-1]
    if extension in IMAGE_FIELDS:
        with Image.open(io.BytesIO(data)) as image:
            channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
        return image_uint8(data, channels)
    if extension == "npy":
        return npy_array(data)
    if extension in VIDEO_FIELDS:
        return video_frames(data)
    if extension == "txt":
        return text(data)
    if extension == "json":
        return json.loads(data)
    if extension in CLASS_FIELDS:
        return class_id(data)
    return data


@dataclass
class GenericDecoder:
    """Decode every field of any WebDataset sample by its extension (see ``decode_field``).

    The decoder ``flowmill data inspect`` uses on shards flowmill did not pack: a sample
    whose field fails to decode is rejected with the field name in the reason.
    """

    def __call__(self, sample: dict) -> dict:
        decoded = {}
        for name, data in sample.items():
            if name.startswith("__"):
                continue
            try:
                decoded[name] = decode_field(name, data)
            except Exception as exn:
                raise ValueError(f"field {name!r} does not decode ({type(exn).__name__}: {exn})") from exn
        if not decoded:
            raise ValueError("sample has no fields")
        return decoded
