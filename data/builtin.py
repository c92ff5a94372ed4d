"""Built-in datasets that need no download.

- ``builtin:digits``: scikit-learn's handwritten digits. Each digit (8×8, 16 grey levels)
  is scaled to 0..255 and resized bilinearly to 32×32, stored as a 1-channel PNG with a
  caption in words ("a handwritten digit seven") and its class id. Keys are
  ``digits-000000`` … ``digits-001796``.
- ``builtin:moving-digits``: clips of T frames in which a few of those digits move in
  straight lines and bounce off the frame's edges (Moving-MNIST style), with a caption
  ("digit 3 moves right, digit 7 moves up and left"). A function of the seed only.
- ``builtin:tinyshakespeare``: the text corpus shipped beside the repository, at
  ``REPO/../shared/data/tinyshakespeare/input.txt`` (see ``shared_data_dirs`` for the other places looked at).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from flowmill.data.constants import DEFAULT_SHARD_SAMPLES, DIGITS_SOURCE, MOVING_DIGITS_SOURCE, TINYSHAKESPEARE
from flowmill.data.pack import PackOptions, write_shards
from flowmill.data.parallel import parallel_samples
from flowmill.data.video import encode_mp4

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_COUNT = 1797  # samples in sklearn's digits set
# Motion directions of the moving digits, as (dx, dy) steps in image coordinates (y grows downwards).
DIRECTIONS = {
    "right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1),
    "down and right": (1, 1), "down and left": (-1, 1), "up and right": (1, -1), "up and left": (-1, -1),
}
CLIPS_PER_JOB = 32  # moving-digit clips made per pool task


def digit_caption(label: int) -> str:
    """The caption of class ``label``: ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def digit_captions() -> list[str]:
    """The 10 captions, one per class, in class order (a tokenizer corpus)."""
    return [digit_caption(label) for label in range(len(DIGIT_WORDS))]


def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 images (N, size, size) and int labels (N,)."""
    from sklearn.datasets import load_digits  # lazy for start-up time: scikit-learn is slow to import, only digits need it

    digits = load_digits()
    # sklearn's grey levels run 0..16; spread them over the full byte range before resizing.
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # (N, 8, 8)
    images = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in small])
    return images, digits.target.astype(np.int64)


def digits_samples(size: int = 32) -> Iterator[dict]:
    """Samples ready for ``write_shards``: ``{"__key__", "png": bytes, "txt": str, "cls": str}``."""
    images, labels = digit_images(size)
    for index, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        yield {
            "__key__": f"digits-{index:06d}",
            "png": buffer.getvalue(),
            "txt": digit_caption(int(label)),
            "cls": str(int(label)),
        }


def pack_builtin_digits(out_dir: str | Path, size: int = 32, *, options: PackOptions = PackOptions()) -> dict:
    """Pack the digits into ``out_dir`` (8 shards at the default 225 samples each); returns the manifest.

    The digits are made in this process, whatever ``options.processes`` allows. Idempotent: a
    second call with the same arguments returns the existing manifest.
    """
    return write_shards(
        digits_samples(size), out_dir, source=DIGITS_SOURCE, args={"size": size}, total=DIGITS_COUNT,
        **options.shard_keywords(DEFAULT_SHARD_SAMPLES[DIGITS_SOURCE]),
    )


@dataclass(frozen=True)
class MovingDigitsSpec:
    """What a moving-digits clip looks like; the clips are a function of these fields only."""

    frames: int = 16  # T, frames per clip
    size: int = 32  # side of the square frame in pixels (32 or 64 are the usual sizes)
    digits: int = 2  # digits moving in each clip
    seed: int = 0  # seeds the choice of digits, start positions and motions
    mp4: bool = False  # also store each clip as an .mp4 field

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number of pixels >= 16, got {self.size}")
        if not 1 <= self.digits <= 4:
            raise ValueError(f"digits must be 1 to 4 per clip, got {self.digits}")

    @property
    def sprite(self) -> int:
        """Side of a digit in pixels: 7/16 of the frame, Moving MNIST's 28 in 64."""
        return self.size * 7 // 16


@lru_cache(maxsize=4)
def _sprites(side: int) -> tuple[np.ndarray, np.ndarray]:
    return digit_images(side)


def moving_digits_clip(index: int, spec: MovingDigitsSpec) -> tuple[np.ndarray, dict]:
    """Clip ``index``: uint8 frames (T, size, size, 3) and its description
    ``{"digits": [{"label", "direction", "speed", "positions": [[x, y] per frame]}]}`` (top-left corners)."""
    sprites, labels = _sprites(spec.sprite)
    rng = np.random.default_rng([spec.seed, index])
    room = spec.size - spec.sprite
    canvas = np.zeros((spec.frames, spec.size, spec.size), dtype=np.uint8)
    digits = []
    for _ in range(spec.digits):
        choice = int(rng.integers(len(labels)))
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        speed = int(rng.integers(1, 3)) * max(1, spec.size // 32)
        step = [speed * unit for unit in DIRECTIONS[direction]]
        position = [int(rng.integers(room + 1)), int(rng.integers(room + 1))]
        positions = []
        for frame in range(spec.frames):
            positions.append(list(position))
            x, y = position
            window = canvas[frame, y : y + spec.sprite, x : x + spec.sprite]
            np.maximum(window, sprites[choice], out=window)
            for axis in (0, 1):
                if not 0 <= position[axis] + step[axis] <= room:
                    step[axis] = -step[axis]  # bounce off the edge
                position[axis] += step[axis]
        digits.append({"label": int(labels[choice]), "direction": direction, "speed": speed, "positions": positions})
    return np.repeat(canvas[..., None], 3, axis=-1), {"digits": digits}


def moving_digits_caption_lines() -> list[str]:
    """Every "digit D moves DIRECTION" phrase, one per line: the vocabulary of the captions (a tokenizer corpus)."""
    return [f"digit {label} moves {direction}" for label in range(10) for direction in DIRECTIONS]


def moving_digits_caption(description: dict) -> str:
    """``"digit 3 moves right, digit 7 moves up and left"`` (directions at the first frame)."""
    return ", ".join(f"digit {digit['label']} moves {digit['direction']}" for digit in description["digits"])


def _moving_digits_samples(job: tuple[range, MovingDigitsSpec]) -> list[dict]:
    indices, spec = job
    samples = []
    for index in indices:
        clip, description = moving_digits_clip(index, spec)
        buffer = io.BytesIO()
        np.save(buffer, clip)
        sample = {
            "__key__": f"moving-digits-{index:06d}",
            "npy": buffer.getvalue(),
            "txt": moving_digits_caption(description),
            "json": json.dumps({"frames": spec.frames, "size": spec.size, **description}),
            "cls": str(description["digits"][0]["label"]),
        }
        if spec.mp4:
            sample["mp4"] = encode_mp4(clip)
        samples.append(sample)
    return samples


def pack_moving_digits(
    out_dir: str | Path,
    num_clips: int = 1024,
    spec: MovingDigitsSpec = MovingDigitsSpec(),
    *,
    options: PackOptions = PackOptions(),
) -> dict:
    """Pack ``num_clips`` moving-digit clips into ``out_dir``; returns the manifest.

    Each sample: ``npy`` uint8 (T, size, size, 3), ``txt`` caption, ``json`` description
    with per-frame positions, ``cls`` label of the first digit, and ``mp4`` with
    ``spec.mp4``. The shards do not depend on ``options.processes``. Idempotent.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    jobs = [(range(start, min(start + CLIPS_PER_JOB, num_clips)), spec) for start in range(0, num_clips, CLIPS_PER_JOB)]

    def samples() -> Iterator[dict]:
        # Runs only if the dataset is not packed yet.
        _sprites(spec.sprite)  # loaded once here; forked pack processes inherit it
        yield from parallel_samples(_moving_digits_samples, jobs, processes=options.processes, rejected=[])

    return write_shards(
        samples(), out_dir, source=MOVING_DIGITS_SOURCE, args={"num_clips": num_clips, **spec.__dict__}, total=num_clips,
        **options.shard_keywords(DEFAULT_SHARD_SAMPLES[MOVING_DIGITS_SOURCE]),
    )


def shared_data_dirs() -> list[Path]:
    """Where the project's shared data folder may be, first match wins: ``$FLOWMILL_SHARED_DATA``,
    then ``shared/data`` beside the checkout, then the workplace's ``/work/shared/data`` (a
    checkout elsewhere, e.g. a CI clone in /tmp, still finds it)."""
    repo = Path(__file__).resolve().parent.parent  # data/ sits at REPO/data
    dirs = [Path(os.environ["FLOWMILL_SHARED_DATA"])] if os.environ.get("FLOWMILL_SHARED_DATA") else []
    return [*dirs, repo.parent / "shared" / "data", Path("/work/shared/data")]


def tinyshakespeare_path() -> Path:
    """The built-in text corpus; FileNotFoundError saying where it was looked for if it is missing."""
    candidates = [folder / "tinyshakespeare" / "input.txt" for folder in shared_data_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{TINYSHAKESPEARE} is read from the first of {', '.join(map(str, candidates))}, none of "
                            "which exists; set FLOWMILL_SHARED_DATA to the folder holding tinyshakespeare/, or pass a text file")
