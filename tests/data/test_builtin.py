"""Tests for flowmill.data.builtin: moving digits and the built-in text corpus (the digits are in test_pack.py)."""

import io
import json
import tarfile

import numpy as np
import pytest

from flowmill.data.builtin import (
    DIRECTIONS,
    MovingDigitsSpec,
    moving_digits_caption,
    moving_digits_clip,
    pack_moving_digits,
    tinyshakespeare_path,
)
from flowmill.data.pack import PackOptions
from flowmill.data.video import read_video


def test_clip_matches_its_description():
    spec = MovingDigitsSpec(frames=12, size=32, digits=2, seed=3)
    clip, description = moving_digits_clip(5, spec)
    assert clip.shape == (12, 32, 32, 3) and clip.dtype == np.uint8
    assert (clip[..., 0] == clip[..., 2]).all() and clip.max() > 200
    side = spec.sprite
    for frame in range(12):
        drawn = np.zeros((32, 32), bool)
        for digit in description["digits"]:
            x, y = digit["positions"][frame]
            assert 0 <= x <= 32 - side and 0 <= y <= 32 - side
            drawn[y : y + side, x : x + side] = True
        assert clip[frame][~drawn].max() == 0, "ink outside the digits' boxes"
    for digit in description["digits"]:
        first, second = np.array(digit["positions"][0]), np.array(digit["positions"][1])
        assert np.abs(second - first).max() == digit["speed"]
        dx, dy = DIRECTIONS[digit["direction"]]
        # The first step goes the stated way unless the digit bounced off an edge right away.
        bounced = not (0 <= first[0] + dx * digit["speed"] <= 32 - side and 0 <= first[1] + dy * digit["speed"] <= 32 - side)
        assert bounced or (np.sign(second - first) == (dx, dy)).all()
    labels = [digit["label"] for digit in description["digits"]]
    assert moving_digits_caption(description) == ", ".join(
        f"digit {label} moves {digit['direction']}" for label, digit in zip(labels, description["digits"])
    )


def test_clips_depend_on_seed_and_index_only():
    spec = MovingDigitsSpec(frames=4, size=64, digits=3, seed=1)
    first, description = moving_digits_clip(7, spec)
    again, _ = moving_digits_clip(7, spec)
    assert (first == again).all() and first.shape == (4, 64, 64, 3) and len(description["digits"]) == 3
    assert not (moving_digits_clip(8, spec)[0] == first).all()
    assert not (moving_digits_clip(7, MovingDigitsSpec(frames=4, size=64, digits=3, seed=2))[0] == first).all()
    with pytest.raises(ValueError, match="size must be an even number"):
        MovingDigitsSpec(size=33)


def test_pack_is_deterministic_across_processes(tmp_path):
    spec = MovingDigitsSpec(frames=6, size=32, mp4=True)
    one = pack_moving_digits(tmp_path / "one", num_clips=70, spec=spec,
                             options=PackOptions(shard_samples=32, processes=1, progress=False))
    two = pack_moving_digits(tmp_path / "two", num_clips=70, spec=spec,
                             options=PackOptions(shard_samples=32, processes=2, progress=False))
    assert [shard["sha256"] for shard in one["shards"]] == [shard["sha256"] for shard in two["shards"]]
    assert one["total_samples"] == 70 and [shard["samples"] for shard in one["shards"]] == [32, 32, 6]
    assert one["fields"] == ["cls", "json", "mp4", "npy", "txt"]
    with tarfile.open(tmp_path / "one" / "shard-000001.tar") as tar:
        files = {member.name: tar.extractfile(member).read() for member in tar}
    clip = np.load(io.BytesIO(files["moving-digits-000040.npy"]))
    expected, description = moving_digits_clip(40, spec)
    assert (clip == expected).all()
    assert files["moving-digits-000040.txt"].decode() == moving_digits_caption(description)
    assert json.loads(files["moving-digits-000040.json"])["digits"] == description["digits"]
    assert int(files["moving-digits-000040.cls"]) == description["digits"][0]["label"]
    assert read_video(files["moving-digits-000040.mp4"]).shape == (6, 32, 32, 3)


def test_tinyshakespeare_path():
    path = tinyshakespeare_path()
    assert path.name == "input.txt" and path.read_text(encoding="utf-8").startswith("First Citizen:")


def test_tinyshakespeare_is_found_where_flowmill_shared_data_points(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("To be.\n", encoding="utf-8")
    monkeypatch.setenv("FLOWMILL_SHARED_DATA", str(tmp_path))
    assert tinyshakespeare_path() == tmp_path / "tinyshakespeare" / "input.txt"
