"""Video in and out: decoding ``.mp4`` (PyAV) and folders of frames, cutting clips, encoding ``.mp4``.

Frames are uint8 arrays (N, H, W, 3), RGB. A clip is T consecutive frames resized so the
shorter side is ``size`` and centre-cropped to (T, size, size, 3), the layout the video
tokenizer reads from ``.npy``.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from flowmill.data.constants import DEFAULT_SHARD_SAMPLES, VIDEO_SOURCE
from flowmill.data.images import IMAGE_SUFFIXES, square
from flowmill.data.pack import PackOptions, input_fingerprint, write_shards
from flowmill.data.parallel import BadInput, parallel_samples, warn

VIDEO_SUFFIXES = (".mp4",)
MP4_CODEC = "libx264"  # H.264 in the PyAV wheels; reads back in any player


def read_video(source: str | Path | bytes) -> np.ndarray:
    """All frames of a video file or of its bytes, uint8 (N, H, W, 3); ValueError if it has none."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with av.open(handle) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    if not frames:
        raise ValueError("no video frames")
    return np.stack(frames)


def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """uint8 frames (T, H, W, 3) with even H and W → H.264 ``.mp4`` bytes (lossy, crf 18)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sides, got {height}×{width}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(MP4_CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # cpu-independent: x264's default assembly choices made the same frames encode to different
        # bytes from call to call, and packed shards must be byte-identical (manifest sha256).
        stream.options = {"crf": "18", "x264-params": "cpu-independent=1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def read_frames_folder(folder: str | Path) -> np.ndarray:
    """The images directly in ``folder``, sorted by file name, as uint8 (N, H, W, 3)."""
    paths = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no frames ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    frames = []
    for path in paths:
        with Image.open(path) as image:
            frames.append(np.asarray(image.convert("RGB")))
        if frames[-1].shape != frames[0].shape:
            raise ValueError(f"frame {path.name} is {frames[-1].shape[:2]}, the first frame {frames[0].shape[:2]}")
    return np.stack(frames)


def fit_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """One uint8 (H, W, 3) frame resized (shorter side → ``size``, antialiased) and centre-cropped to (size, size, 3)."""
    return np.asarray(square(Image.fromarray(frame), size))


def clip_starts(num_frames: int, frames: int, stride: int) -> range:
    """First frame of every clip of ``frames`` frames, one every ``stride`` frames, that fits in ``num_frames``."""
    return range(0, num_frames - frames + 1, stride)


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video; picklable for pack worker processes."""

    frames: int  # T, frames per clip
    size: int  # side of the square clip in pixels
    stride: int  # frames between the starts of consecutive clips (T: back to back, no overlap)
    mp4: bool  # also store each clip as an .mp4 field
    fps: int = 8  # frame rate written into the .mp4 fields


def video_clips(job: tuple[str, str, ClipSpec]) -> list[dict]:
    """Clip samples of one video: ``job`` is (key prefix, path of an .mp4 or a frames folder, spec).

    Each sample: ``npy`` uint8 (T, size, size, 3), ``json`` {source, start, frames, stride},
    and ``mp4`` when asked. Raises BadInput for a video that cannot be read or is too short.
    """
    prefix, path, spec = job
    try:
        frames = read_frames_folder(path) if Path(path).is_dir() else read_video(path)
    except Exception as exn:  # PyAV and PIL raise many types for unreadable files; all mean "cannot use it"
        what = "frames folder" if Path(path).is_dir() else "PyAV cannot open it"
        raise BadInput(f"{what}: {type(exn).__name__}: {exn}") from None
    starts = clip_starts(len(frames), spec.frames, spec.stride)
    if not starts:
        raise BadInput(f"{len(frames)} frames, shorter than one clip of {spec.frames}")
    samples = []
    for start in starts:
        clip = np.stack([fit_frame(frame, spec.size) for frame in frames[start : start + spec.frames]])
        buffer = io.BytesIO()
        np.save(buffer, clip)
        sample = {
            "__key__": f"{prefix}-{start:06d}",
            "npy": buffer.getvalue(),
            "json": json.dumps({"source": path, "start": start, "frames": spec.frames, "stride": spec.stride}),
        }
        if spec.mp4:
            sample["mp4"] = encode_mp4(clip, spec.fps)
        samples.append(sample)
    return samples


def find_videos(inputs: list[str]) -> tuple[list[str], list[dict]]:
    """Expand inputs into videos: ``.mp4`` files and frames folders (folders with images directly inside).

    A folder is searched recursively for both. Returns (videos in a fixed order, rejected
    inputs as {"input", "reason"}).
    """
    videos: list[str] = []
    rejected: list[dict] = []
    for text in inputs:
        path = Path(text)
        if not path.exists():
            rejected.append({"input": text, "reason": "does not exist"})
        elif path.is_file():
            if path.suffix.lower() in VIDEO_SUFFIXES:
                videos.append(text)
            else:
                rejected.append({"input": text, "reason": f"not a video ({', '.join(VIDEO_SUFFIXES)}) or a frames folder"})
        else:
            found = sorted(
                str(item) for item in path.rglob("*")
                if (item.is_file() and item.suffix.lower() in VIDEO_SUFFIXES)
                or (item.is_dir() and any(child.suffix.lower() in IMAGE_SUFFIXES for child in item.iterdir()))
            )
            if any(child.suffix.lower() in IMAGE_SUFFIXES for child in path.iterdir()):
                found.insert(0, text)
            if not found:
                rejected.append({"input": text, "reason": "folder holds no .mp4 files and no frames"})
            videos.extend(found)
    return videos, rejected


def video_prefix(index: int, path: str) -> str:
    """Key prefix of the ``index``-th video: ``0003-holiday_clip`` for ``…/holiday.clip.mp4``."""
    stem = Path(path).stem if Path(path).suffix.lower() in VIDEO_SUFFIXES else Path(path).name
    return f"{index:04d}-{re.sub(r'[^A-Za-z0-9_-]', '_', stem)}"


def pack_videos(
    inputs: list[str],
    out_dir: str | Path,
    spec: ClipSpec,
    *,
    options: PackOptions = PackOptions(),
    on_reject=warn,
) -> dict:
    """Cut the videos named by ``inputs`` (.mp4 files, frames folders, folders of either) into clips
    packed into ``out_dir``; returns the manifest. Shards hold ``DEFAULT_SHARD_SAMPLES["video"]``
    clips unless ``options`` set a limit. Unusable inputs are reported with ``on_reject``, listed
    in the manifest's notes and left out."""
    for name, value in (("frames", spec.frames), ("size", spec.size), ("stride", spec.stride)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    videos, rejected = find_videos(inputs)
    for item in rejected:
        on_reject(f"skipping {item['input']}: {item['reason']}")
    if not videos:
        raise ValueError(f"no videos to pack in {', '.join(inputs)}")
    jobs = [(video_prefix(index, path), path, spec) for index, path in enumerate(videos)]
    samples = parallel_samples(
        video_clips, jobs, processes=options.processes, rejected=rejected, describe=lambda job: job[1], on_reject=on_reject
    )
    args = {"videos": [str(Path(path).resolve()) for path in videos], "inputs": input_fingerprint(videos), **asdict(spec)}
    return write_shards(
        samples, out_dir, source=VIDEO_SOURCE, args=args, notes={"rejected": rejected},
        **options.shard_keywords(DEFAULT_SHARD_SAMPLES[VIDEO_SOURCE]),
    )
