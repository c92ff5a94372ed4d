"""Tests for flowmill.data.pack and the built-in digits packed with it."""

import io
import json
import logging
import tarfile

import pytest
from PIL import Image

from flowmill.data.builtin import DIGIT_WORDS, digit_captions, pack_builtin_digits
from flowmill.data.pack import PackOptions, write_shards
from flowmill.data.shards import resolve_shards, sha256_file


def samples(count: int, text: str = "x") -> list[dict]:
    return [{"__key__": f"k{index:03d}", "txt": f"{text} {index}", "bin": bytes([index % 256]) * 10} for index in range(count)]


def tar_keys(path) -> list[str]:
    with tarfile.open(path) as archive:
        return sorted({name.split(".")[0] for name in archive.getnames()})


def test_manifest_describes_the_shards(tmp_path):
    manifest = write_shards(samples(10), tmp_path / "ds", source="test", args={"n": 10}, shard_samples=4, progress=False)
    assert [shard["name"] for shard in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 4, 2]
    assert manifest["total_samples"] == 10
    assert manifest["fields"] == ["bin", "txt"]
    assert manifest["made"]["params"] == {"source": "test", "args": {"n": 10}, "shard_samples": 4, "shard_bytes": None}
    assert manifest["made"]["flowmill_version"] and manifest["made"]["time"]
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text()) == manifest
    for shard in manifest["shards"]:
        path = tmp_path / "ds" / shard["name"]
        assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
    assert tar_keys(tmp_path / "ds" / "shard-000002.tar") == ["k008", "k009"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left behind


def test_shard_bytes_limits_shard_size(tmp_path):
    big = [{"__key__": f"k{index}", "bin": b"\0" * 3000} for index in range(12)]
    manifest = write_shards(big, tmp_path, source="test", args={}, shard_bytes=10_000, progress=False)
    assert len(manifest["shards"]) > 2
    assert sum(shard["samples"] for shard in manifest["shards"]) == 12
    assert all(shard["bytes"] < 10_000 + 2 * 3584 + 10240 for shard in manifest["shards"])


def test_repacking_the_same_inputs_writes_nothing(tmp_path):
    first = write_shards(samples(6), tmp_path, source="test", args={"n": 6}, shard_samples=4, progress=False)
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}

    def must_not_be_read():
        raise AssertionError("samples were read although the dataset is complete")
        yield

    again = write_shards(must_not_be_read(), tmp_path, source="test", args={"n": 6}, shard_samples=4, progress=False)
    assert again == first
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before


def test_same_samples_give_identical_shards(tmp_path):
    one = write_shards(samples(5), tmp_path / "a", source="test", args={}, shard_samples=2, progress=False)
    two = write_shards(samples(5), tmp_path / "b", source="test", args={}, shard_samples=2, progress=False)
    assert [shard["sha256"] for shard in one["shards"]] == [shard["sha256"] for shard in two["shards"]]


def test_other_parameters_need_overwrite(tmp_path):
    write_shards(samples(6), tmp_path, source="test", args={"n": 6}, shard_samples=4, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(samples(3), tmp_path, source="test", args={"n": 3}, shard_samples=4, progress=False)
    manifest = write_shards(samples(3), tmp_path, source="test", args={"n": 3}, shard_samples=4, overwrite=True, progress=False)
    assert manifest["total_samples"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar"]


def test_damaged_copy_of_the_same_dataset_is_rewritten(tmp_path, caplog):
    write_shards(samples(6), tmp_path, source="test", args={}, shard_samples=4, progress=False)
    (tmp_path / "shard-000001.tar").write_bytes(b"short")
    manifest = write_shards(samples(6), tmp_path, source="test", args={}, shard_samples=4, progress=False)
    assert sha256_file(tmp_path / "shard-000001.tar") == manifest["shards"][1]["sha256"]
    # Same size, one byte altered: only the sha256 tells, and the shard is packed again, not kept.
    shard = tmp_path / "shard-000000.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[damaged.index(b"x")] ^= 1
    shard.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="flowmill.data.pack"):
        again = write_shards(samples(6), tmp_path, source="test", args={}, shard_samples=4, progress=False)
    assert sha256_file(shard) == again["shards"][0]["sha256"] == manifest["shards"][0]["sha256"]
    assert any("shard-000000.tar does not match the sha256" in record.getMessage() for record in caplog.records)


def test_invalid_manifest_in_the_folder_is_no_dataset_of_ours(tmp_path):
    write_shards(samples(3), tmp_path, source="test", args={}, shard_samples=4, progress=False)
    (tmp_path / "manifest.json").write_text('{"format": "flowmill-shards/1", ')
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(samples(3), tmp_path, source="test", args={}, shard_samples=4, progress=False)
    assert write_shards(samples(3), tmp_path, source="test", args={}, shard_samples=4, overwrite=True,
                        progress=False)["total_samples"] == 3


def test_bad_samples_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 'k000'"):
        write_shards(samples(2) + samples(1), tmp_path / "a", source="test", args={}, shard_samples=4, progress=False)
    with pytest.raises(ValueError, match="contains a '.'"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path / "b", source="test", args={}, shard_samples=4, progress=False)
    with pytest.raises(ValueError, match="shard_samples"):
        write_shards(samples(2), tmp_path / "c", source="test", args={}, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []


def test_builtin_digits_land_in_eight_shards(tmp_path):
    manifest = pack_builtin_digits(tmp_path, options=PackOptions(progress=False))
    assert len(manifest["shards"]) == 8 and manifest["total_samples"] == 1797
    assert manifest["fields"] == ["cls", "png", "txt"]
    assert len(resolve_shards(tmp_path)) == 8
    with tarfile.open(tmp_path / "shard-000000.tar") as archive:
        png = archive.extractfile("digits-000007.png").read()
        caption = archive.extractfile("digits-000007.txt").read().decode()
        label = int(archive.extractfile("digits-000007.cls").read())
    image = Image.open(io.BytesIO(png))
    assert image.size == (32, 32) and image.mode == "L"
    assert caption == f"a handwritten digit {DIGIT_WORDS[label]}" == digit_captions()[label]
    assert image.getextrema()[1] > 200  # grey levels spread over the byte range, not sklearn's 0..16


def test_members_have_plain_ustar_headers(tmp_path):
    # No pax header per member (a float mtime would add one): a member is its header block and its data.
    write_shards(samples(3), tmp_path, source="test", args={}, shard_samples=4, progress=False)
    with tarfile.open(tmp_path / "shard-000000.tar") as archive:
        members = archive.getmembers()
    assert [member.pax_headers for member in members] == [{}] * 6
    assert [member.offset_data - member.offset for member in members] == [512] * 6


def test_pack_options_fall_back_to_the_source_default_only_without_any_limit():
    assert PackOptions().shard_keywords(225) == {"shard_samples": 225, "shard_bytes": None, "progress": True, "overwrite": False}
    assert PackOptions(shard_bytes=5000).shard_keywords(225)["shard_samples"] is None
    assert PackOptions(shard_samples=10, shard_bytes=5000).shard_keywords(225) == {
        "shard_samples": 10, "shard_bytes": 5000, "progress": True, "overwrite": False,
    }
    assert PackOptions(progress=False, overwrite=True).shard_keywords(1) == {
        "shard_samples": 1, "shard_bytes": None, "progress": False, "overwrite": True,
    }


def test_a_byte_limit_alone_replaces_the_default_sample_limit(tmp_path):
    manifest = pack_builtin_digits(tmp_path, options=PackOptions(shard_bytes=1_000_000, progress=False))
    assert manifest["made"]["params"]["shard_samples"] is None and manifest["made"]["params"]["shard_bytes"] == 1_000_000
    assert max(shard["samples"] for shard in manifest["shards"]) > 225  # no 225-sample default on top of the byte limit
