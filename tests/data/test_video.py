"""Tests for flowmill.data.video: PyAV decoding/encoding, frames folders, clips, packing videos."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from flowmill.data.pack import PackOptions
from flowmill.data.video import (
    ClipSpec,
    clip_starts,
    encode_mp4,
    find_videos,
    fit_frame,
    pack_videos,
    read_frames_folder,
    read_video,
)
from tests.helpers import shard_members


def ramp(frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i is a flat grey of level 6·i: each frame is recognisable after lossy coding."""
    return np.repeat(np.arange(frames, dtype=np.uint8)[:, None, None, None] * 6, height * width * 3).reshape(
        frames, height, width, 3
    )


def write_frames(folder, frames: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame-{index:03d}.png")


def test_mp4_round_trip_keeps_frames():
    frames = ramp(12)
    decoded = read_video(encode_mp4(frames))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int).mean(axis=(1, 2, 3)) - frames.astype(int).mean(axis=(1, 2, 3))).max() < 3
    with pytest.raises(ValueError, match="even frame sides"):
        encode_mp4(ramp(2, 15, 16))


def test_fit_frame_crops_the_centre_square():
    frame = np.zeros((40, 80, 3), np.uint8)
    frame[:, 20:60] = 255  # the centre 40×40 is white, the sides black
    fitted = fit_frame(frame, 20)
    assert fitted.shape == (20, 20, 3) and fitted.min() > 200


def test_clip_starts():
    assert list(clip_starts(40, 8, 4)) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert list(clip_starts(16, 16, 16)) == [0]
    assert list(clip_starts(15, 16, 16)) == []


def test_frames_folder_in_name_order_and_consistent_size(tmp_path):
    write_frames(tmp_path / "f", ramp(5, 8, 8))
    assert read_frames_folder(tmp_path / "f")[:, 0, 0, 0].tolist() == [0, 6, 12, 18, 24]
    Image.new("RGB", (4, 4)).save(tmp_path / "f" / "frame-999.png")
    with pytest.raises(ValueError, match=r"frame-999.png is \(4, 4\)"):
        read_frames_folder(tmp_path / "f")


def test_find_videos_expands_folders(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"")
    write_frames(tmp_path / "v" / "shot", ramp(2, 4, 4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    videos, rejected = find_videos([str(tmp_path / "v"), str(tmp_path / "empty"), str(tmp_path / "notes.txt"), "nope.mp4"])
    assert videos == [str(tmp_path / "v" / "a.mp4"), str(tmp_path / "v" / "shot")]
    assert [item["reason"] for item in rejected] == [
        "folder holds no .mp4 files and no frames", "not a video (.mp4) or a frames folder", "does not exist"
    ]


def test_pack_videos_cuts_clips_and_skips_bad_inputs(tmp_path):
    (tmp_path / "a.mp4").write_bytes(encode_mp4(ramp(20)))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "short.mp4").write_bytes(encode_mp4(ramp(3)))
    write_frames(tmp_path / "frames", ramp(10, 32, 32))
    inputs = [str(tmp_path / name) for name in ("a.mp4", "bad.mp4", "short.mp4", "frames", "missing.mp4")]
    lines = []
    spec = ClipSpec(frames=8, size=16, stride=6, mp4=True)
    manifest = pack_videos(inputs, tmp_path / "out", spec, options=PackOptions(shard_samples=2, processes=2, progress=False),
                           on_reject=lines.append)
    assert manifest["total_samples"] == 3 + 1  # a.mp4: starts 0, 6, 12; frames: start 0
    assert manifest["fields"] == ["json", "mp4", "npy"]
    reasons = {item["input"]: item["reason"] for item in manifest["made"]["notes"]["rejected"]}
    assert reasons[str(tmp_path / "missing.mp4")] == "does not exist"
    assert "PyAV cannot open it" in reasons[str(tmp_path / "bad.mp4")]
    assert reasons[str(tmp_path / "short.mp4")] == "3 frames, shorter than one clip of 8"
    assert len(lines) == 3 and all(line.startswith("skipping ") for line in lines)
    files = shard_members(tmp_path / "out")
    clip = np.load(io.BytesIO(files["0000-a-000006.npy"]))
    assert clip.shape == (8, 16, 16, 3) and clip.dtype == np.uint8
    assert np.abs(clip.mean(axis=(1, 2, 3)) - 6 * np.arange(6, 14)).max() < 3
    assert json.loads(files["0003-frames-000000.json"]) == {"source": str(tmp_path / "frames"), "start": 0, "frames": 8, "stride": 6}
    assert read_video(files["0003-frames-000000.mp4"]).shape == (8, 16, 16, 3)
    again = pack_videos(inputs, tmp_path / "one-process", spec,
                        options=PackOptions(shard_samples=2, processes=1, progress=False), on_reject=lines.append)
    assert [shard["sha256"] for shard in again["shards"]] == [shard["sha256"] for shard in manifest["shards"]]
