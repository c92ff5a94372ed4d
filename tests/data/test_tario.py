"""Tests for flowmill.data.tario: tar members → samples, reports, sha256 checks."""

import io
import tarfile

import pytest
from webdataset.tariterators import base_plus_ext

from flowmill.data import tario
from flowmill.data.shards import Shard, sha256_file
from flowmill.data.tario import ShardChecksumError, read_samples


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_members_are_grouped_into_samples_by_key(tmp_path):
    url = write_tar(tmp_path / "a.tar", [
        ("__meta__/info.json", b"{}"), ("k1.png", b"P"), ("k1.TXT", b"t"), ("sub/k2.seg.npy", b"N"), ("sub/k2.cls", b"3"),
        ("noext", b"x"), ("k3.txt", b"u"),
    ])
    reports = []
    samples = list(read_samples(Shard(url), reports))
    assert samples == [
        {"__key__": "k1", "__url__": url, "png": b"P", "txt": b"t"},
        {"__key__": "sub/k2", "__url__": url, "seg.npy": b"N", "cls": b"3"},
        {"__key__": "k3", "__url__": url, "txt": b"u"},
    ]
    assert reports == []


def test_a_field_twice_rejects_the_sample(tmp_path):
    url = write_tar(tmp_path / "a.tar", [("k1.txt", b"a"), ("k1.txt", b"b"), ("k2.txt", b"c")])
    reports = []
    assert [sample["__key__"] for sample in read_samples(Shard(url), reports)] == ["k2"]
    assert reports == [{"key": "k1", "shard": url, "reason": "field 'txt' appears twice in the sample"}]


def test_truncated_shard_keeps_what_was_read_and_reports_the_rest(tmp_path):
    url = write_tar(tmp_path / "a.tar", [(f"k{index}.txt", b"x" * 600) for index in range(6)])
    data = open(url, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: 3 * 1536 + 700])  # inside the 4th file
    reports = []
    samples = list(read_samples(Shard(str(tmp_path / "cut.tar"), samples=6), reports))
    assert [sample["__key__"] for sample in samples] == ["k0", "k1", "k2"]
    assert len(reports) == 1 and reports[0]["key"] is None
    assert "unreadable after 3 of 6 samples" in reports[0]["reason"] and "ReadError" in reports[0]["reason"]


def test_checksum_is_checked_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(tario, "_verified", set())
    url = write_tar(tmp_path / "a.tar", [("k1.txt", b"a")])
    good = Shard(url, sha256_file(url))
    assert len(list(read_samples(good, []))) == 1
    assert len(tario._verified) == 1
    wrong = Shard(url, "0" * 64)
    with pytest.raises(ShardChecksumError, match="a.tar does not match its manifest: sha256 [0-9a-f]{64}, manifest says 0000"):
        list(read_samples(wrong, []))
    assert len(list(read_samples(wrong, [], verify=False))) == 1
    write_tar(tmp_path / "a.tar", [("k1.txt", b"b")])  # rewritten since it was verified: hashed again
    with pytest.raises(ShardChecksumError):
        list(read_samples(good, []))


def test_missing_shard_is_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_samples(Shard(str(tmp_path / "gone.tar")), []))


def test_tar_cut_at_a_header_is_reported(tmp_path):
    # tarfile takes a tar that ends inside a header for a complete one; the block size tells.
    url = write_tar(tmp_path / "a.tar", [(f"k{index}.txt", b"x" * 600) for index in range(6)])
    (tmp_path / "cut.tar").write_bytes(open(url, "rb").read()[: 2 * 1536 + 100])
    reports = []
    samples = list(read_samples(Shard(str(tmp_path / "cut.tar")), reports))
    assert [sample["__key__"] for sample in samples] == ["k0", "k1"]
    assert len(reports) == 1 and reports[0]["key"] is None and "truncated" in reports[0]["reason"]


def test_tar_cut_between_members_is_caught_by_the_manifest_count(tmp_path):
    url = write_tar(tmp_path / "a.tar", [(f"k{index}.txt", b"x" * 600) for index in range(6)])
    (tmp_path / "cut.tar").write_bytes(open(url, "rb").read()[: 4 * 1536])
    whole = []
    assert len(list(read_samples(Shard(url, samples=6), whole))) == 6 and whole == []
    reports = []
    assert len(list(read_samples(Shard(str(tmp_path / "cut.tar"), samples=6), reports))) == 4
    assert len(reports) == 1 and "the tar ends after 4 of 6 samples" in reports[0]["reason"]


def test_gzip_and_pipe_shards_are_read(tmp_path):
    members = [("k1.txt", b"a"), ("k1.cls", b"1"), ("k2.txt", b"b")]
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = [{"k1": {"txt": b"a", "cls": b"1"}}, {"k2": {"txt": b"b"}}]
    for url in (str(tmp_path / "a.tar.gz"), f"pipe:cat {tmp_path / 'a.tar.gz'}"):
        reports = []
        samples = list(read_samples(Shard(url), reports))
        assert [{s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}} for s in samples] == expected
        assert reports == [] and all(sample["__url__"] == url for sample in samples)


@pytest.mark.parametrize("name", [
    "k1.png", "k1.seg.npy", "sub/k2.cls", "a.b/c.d", "x/y/.z", "a.b/c", ".hidden", "noext", "dir/", "k.",
    "a/b/c.tar.gz",
])
def test_members_split_into_key_and_field_as_webdataset_splits_them(name):
    assert tario._key_and_field(name) == base_plus_ext(name)
