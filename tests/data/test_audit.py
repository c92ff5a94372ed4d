"""Tests for flowmill.data.audit: per-rank key lists of an epoch, with every missing key explained."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
from PIL import Image

from flowmill.data.audit import inspect_epoch
from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import write_shards
from flowmill.data.video import encode_mp4


def decode_text(sample: dict) -> dict:
    if sample["txt"] == b"bad":
        raise ValueError("poisoned")
    return {"txt": sample["txt"].decode()}


def pack(folder, count: int = 23, per_shard: int = 4, bad: tuple[int, ...] = (5,)) -> list[str]:
    samples = [{"__key__": f"s{index:03d}", "txt": "bad" if index in bad else f"t{index}"} for index in range(count)]
    write_shards(samples, folder, source="test", args={}, shard_samples=per_shard, progress=False)
    return [sample["__key__"] for sample in samples]


def accounted(result: dict) -> Counter:
    return Counter(
        [key for rank in result["ranks"] for key in rank["keys"]]
        + [entry["key"] for entry in result["skipped"]] + [entry["key"] for entry in result["dropped"]]
    )


def test_ranks_keys_are_the_training_loaders_and_nothing_is_unexplained(tmp_path):
    keys = pack(tmp_path)
    settings = dict(world_size=2, num_workers=2, epoch=1, seed=5, batch_size=3, shuffle_buffer=8, drop_last=True)
    result = inspect_epoch(tmp_path, decode=decode_text, **settings)
    assert accounted(result) == Counter(keys)
    assert [entry["key"] for entry in result["skipped"]] == ["s005"]
    assert result["skipped"][0]["reason"] == "ValueError: poisoned" and result["skipped"][0]["shard"].endswith("shard-000001.tar")
    assert result["dropped"] and all("remainder" in entry["reason"] for entry in result["dropped"])
    for rank in range(2):
        data = StreamingLoader(tmp_path, rank=rank, world_size=2, batch_size=3, num_workers=2, seed=5, decode=decode_text,
                               shuffle_buffer=8, resampled=False, drop_last=True)
        data.set_epoch(1)
        assert result["ranks"][rank] == {"rank": rank, "keys": [key for batch in data for key in batch["__key__"]]}
    assert inspect_epoch(tmp_path, decode=decode_text, **{**settings, "epoch": 2})["ranks"] != result["ranks"]


def test_resampled_epoch_follows_the_training_stream(tmp_path):
    keys = pack(tmp_path, bad=())
    result = inspect_epoch(tmp_path, world_size=3, num_workers=2, epoch=1, batch_size=5, decode=decode_text, resampled=True)
    assert accounted(result) == Counter(keys) and result["dropped"] == []
    # With one stream per rank, training reads epoch 0's keys, then epoch 1's, across batch boundaries.
    epochs = [
        inspect_epoch(tmp_path, world_size=3, num_workers=0, epoch=epoch, batch_size=5, decode=decode_text,
                      resampled=True)["ranks"][2]["keys"]
        for epoch in (0, 1)
    ]
    data = StreamingLoader(tmp_path, rank=2, world_size=3, batch_size=5, num_workers=0, seed=0, decode=decode_text,
                           shuffle_buffer=256, resampled=True)
    stream = [key for _, batch in zip(range(6), data) for key in batch["__key__"]]
    assert len(epochs[0]) + len(epochs[1]) < len(stream) and len(epochs[0]) % 5 != 0
    assert stream[: len(epochs[0]) + len(epochs[1])] == epochs[0] + epochs[1]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != sorted(epochs[1])


def foreign_shard(path) -> list[str]:
    """A tar written with the standard library, not by flowmill: every field type, one broken image."""

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return buffer.getvalue()

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    members = [
        ("img/a.png", encoded(Image.new("L", (8, 8), 30), "PNG")), ("img/a.txt", b"grey"), ("img/a.cls", b"1"),
        ("img/b.jpg", encoded(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG")), ("img/b.json", b'{"w": 8}'),
        ("arr.npy", npy(np.zeros((2, 2), np.float32))), ("arr.tokens.npy", npy(np.arange(5, dtype=np.int32))),
        ("clip.mp4", encode_mp4(np.zeros((2, 16, 16, 3), np.uint8))),
        ("broken.png", b"\x89PNG not really"), ("broken.txt", b"caption of a broken image"),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ["img/a", "img/b", "arr", "clip", "broken"]


def test_foreign_shards_are_decoded_by_extension(tmp_path):
    keys = foreign_shard(tmp_path / "x-0.tar")
    result = inspect_epoch(str(tmp_path / "x-*.tar"), world_size=1, num_workers=0, shuffle_buffer=0)
    assert result["ranks"] == [{"rank": 0, "keys": keys[:4]}]
    assert result["skipped"] == [{
        "key": "broken", "shard": str(tmp_path / "x-0.tar"),
        "reason": result["skipped"][0]["reason"],
    }]
    assert result["skipped"][0]["reason"].startswith("ValueError: field 'png' does not decode")
    json.dumps(result)  # the --json output is plain JSON
