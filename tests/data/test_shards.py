"""Tests for flowmill.data.shards: naming datasets by manifest, brace pattern, glob, pipe: and fsspec URLs."""

import fsspec
import pytest

from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import write_shards
from flowmill.data.shards import Shard, dataset_shards, resolve_shards


def pack(folder, count: int = 9, per_shard: int = 3) -> dict:
    samples = [{"__key__": f"k{index:02d}", "txt": f"t{index}"} for index in range(count)]
    return write_shards(samples, folder, source="test", args={}, shard_samples=per_shard, progress=False)


def keys_read(source, **settings) -> list[str]:
    data = StreamingLoader(source, rank=0, world_size=1, batch_size=2, num_workers=0, seed=0,
                           decode=lambda sample: {"txt": sample["txt"].decode()}, shuffle_buffer=0, resampled=False,
                           **settings)
    return sorted(key for batch in data for key in batch["__key__"])


def test_manifest_lists_shards_with_checksums(tmp_path):
    manifest = pack(tmp_path)
    shards = dataset_shards(tmp_path)
    assert shards == dataset_shards(tmp_path / "manifest.json")
    assert [shard.sha256 for shard in shards] == [entry["sha256"] for entry in manifest["shards"]]
    assert [shard.samples for shard in shards] == [3, 3, 3]
    assert dataset_shards(str(tmp_path / "shard-{000000..000002}.tar")) == [Shard(shard.url) for shard in shards]


def test_pipe_urls_are_read(tmp_path):
    pack(tmp_path)
    urls = [f"pipe:cat {url}" for url in resolve_shards(tmp_path)]
    assert keys_read(urls) == [f"k{index:02d}" for index in range(9)]


def test_fsspec_urls_manifest_and_glob(tmp_path):
    manifest = pack(tmp_path)
    by_manifest = dataset_shards(f"file://{tmp_path}/manifest.json")
    assert [shard.url for shard in by_manifest] == [f"file://{tmp_path}/{entry['name']}" for entry in manifest["shards"]]
    assert by_manifest[0].sha256 == manifest["shards"][0]["sha256"]
    assert keys_read(f"file://{tmp_path}/manifest.json") == [f"k{index:02d}" for index in range(9)]
    assert resolve_shards(f"file://{tmp_path}/*.tar") == [shard.url for shard in by_manifest]


def test_in_memory_fsspec_store(tmp_path):
    pack(tmp_path, count=4, per_shard=2)
    memory = fsspec.filesystem("memory")
    for url in resolve_shards(tmp_path):
        memory.pipe(f"/flowmill-test/{url.rsplit('/', 1)[-1]}", open(url, "rb").read())
    try:
        assert keys_read("memory://flowmill-test/shard-{000000..000001}.tar") == ["k00", "k01", "k02", "k03"]
    finally:
        memory.rm("/flowmill-test", recursive=True)


def test_missing_things_are_named(tmp_path):
    pack(tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 shards .* first: .*shard-000001.tar"):
        dataset_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no dataset manifest at file://"):
        dataset_shards(f"file://{tmp_path}/nowhere/manifest.json")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        dataset_shards(f"file://{tmp_path}/*.tgz")


def test_invalid_manifest_is_named_with_its_place(tmp_path):
    pack(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "flowmill-shards/1",\n "shards": [}')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'manifest.json'} is not valid JSON \(.* at line 2 column"):
        dataset_shards(tmp_path)
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a flowmill manifest"):
        dataset_shards(tmp_path)
