"""Tests for flowmill.data.tario: tar members → samples, reports, sha256 checks."""

import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from flowmill.data import tario
from flowmill.data.shards import Shard, sha256_file
from flowmill.data.tario import ShardChecksumError, read_samples


def write_tar(path, members: list[tuple[str, bytes]], format=tarfile.DEFAULT_FORMAT) -> str:
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


# A local plain tar is read in tarfile's random-access mode, anything else as a stream
# (tario._open_tar): the tests that read a shard run both ways, the second through a pipe.
BOTH_READERS = pytest.mark.parametrize("piped", [False, True], ids=["local", "stream"])


def shard_url(path, piped: bool) -> str:
    return f"pipe:cat {path}" if piped else str(path)


@BOTH_READERS
def test_members_are_grouped_into_samples_by_key(tmp_path, piped):
    url = shard_url(write_tar(tmp_path / "a.tar", [
        ("__meta__/info.json", b"{}"), ("k1.png", b"P"), ("k1.TXT", b"t"), ("sub/k2.seg.npy", b"N"), ("sub/k2.cls", b"3"),
        ("noext", b"x"), ("k3.txt", b"u"),
    ]), piped)
    reports = []
    samples = list(read_samples(Shard(url), reports))
    assert samples == [
        {"__key__": "k1", "__url__": url, "png": b"P", "txt": b"t"},
        {"__key__": "sub/k2", "__url__": url, "seg.npy": b"N", "cls": b"3"},
        {"__key__": "k3", "__url__": url, "txt": b"u"},
    ]
    assert reports == []


@BOTH_READERS
def test_a_field_twice_rejects_the_sample(tmp_path, piped):
    url = shard_url(write_tar(tmp_path / "a.tar", [("k1.txt", b"a"), ("k1.txt", b"b"), ("k2.txt", b"c")]), piped)
    reports = []
    assert [sample["__key__"] for sample in read_samples(Shard(url), reports)] == ["k2"]
    assert reports == [{"key": "k1", "shard": url, "reason": "field 'txt' appears twice in the sample"}]


@BOTH_READERS
def test_truncated_shard_keeps_what_was_read_and_reports_the_rest(tmp_path, piped):
    url = write_tar(tmp_path / "a.tar", [(f"k{index}.txt", b"x" * 600) for index in range(6)])
    data = open(url, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: 3 * 1536 + 700])  # inside the 4th file
    reports = []
    samples = list(read_samples(Shard(shard_url(tmp_path / "cut.tar", piped), samples=6), reports))
    assert [sample["__key__"] for sample in samples] == ["k0", "k1", "k2"]
    assert len(reports) == 1 and reports[0]["key"] is None
    assert "unreadable after 3 of 6 samples" in reports[0]["reason"] and "ReadError" in reports[0]["reason"]
    assert reports[0]["lost"] == 3


@BOTH_READERS
def test_checksum_is_checked_once_per_process(tmp_path, monkeypatch, piped):
    monkeypatch.setattr(tario, "_verified", set())
    path = write_tar(tmp_path / "a.tar", [("k1.txt", b"a")])
    url = shard_url(path, piped)
    good = Shard(url, sha256_file(path))
    assert len(list(read_samples(good, []))) == 1
    assert len(tario._verified) == 1
    wrong = Shard(url, "0" * 64)
    with pytest.raises(ShardChecksumError, match="a.tar does not match its manifest: sha256 [0-9a-f]{64}, manifest says 0000"):
        list(read_samples(wrong, []))
    assert len(list(read_samples(wrong, [], verify=False))) == 1
    if not piped:  # a local file is known by its size and mtime too; a URL is trusted once verified
        write_tar(tmp_path / "a.tar", [("k1.txt", b"b")])  # rewritten since it was verified: hashed again
        with pytest.raises(ShardChecksumError):
            list(read_samples(good, []))


def test_missing_shard_is_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_samples(Shard(str(tmp_path / "gone.tar")), []))


@BOTH_READERS
def test_tar_cut_at_a_header_is_reported(tmp_path, piped):
    # tarfile takes a tar that ends inside a header for a complete one; the block size tells.
    url = write_tar(tmp_path / "a.tar", [(f"k{index}.txt", b"x" * 600) for index in range(6)])
    (tmp_path / "cut.tar").write_bytes(open(url, "rb").read()[: 2 * 1536 + 100])
    reports = []
    samples = list(read_samples(Shard(shard_url(tmp_path / "cut.tar", piped)), reports))
    assert [sample["__key__"] for sample in samples] == ["k0", "k1"]
    assert len(reports) == 1 and reports[0]["key"] is None and "truncated" in reports[0]["reason"]


@BOTH_READERS
def test_tar_cut_between_members_is_caught_by_the_manifest_count(tmp_path, piped):
    path = write_tar(tmp_path / "a.tar", [(f"k{index}.txt", b"x" * 600) for index in range(6)])
    (tmp_path / "cut.tar").write_bytes(open(path, "rb").read()[: 4 * 1536])
    whole = []
    assert len(list(read_samples(Shard(shard_url(path, piped), samples=6), whole))) == 6 and whole == []
    reports = []
    assert len(list(read_samples(Shard(shard_url(tmp_path / "cut.tar", piped), samples=6), reports))) == 4
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


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_and_non_ascii_names_read_alike_both_ways(tmp_path, format):
    # Names past ustar's 100 bytes or outside ASCII travel in extra pax / GNU headers before the member.
    long_dir = "d" * 120
    members = [(f"{long_dir}/k1.txt", b"a"), (f"{long_dir}/k1.cls", b"1"), ("schöne/k2.txt", b"b" * 700), ("k3.txt", b"c")]
    path = write_tar(tmp_path / "a.tar", members, format=format)
    local, piped = ([(s["__key__"], s) for s in read_samples(Shard(shard_url(path, p)), [])] for p in (False, True))
    assert [key for key, _ in local] == [f"{long_dir}/k1", "schöne/k2", "k3"]
    assert [{k: v for k, v in s.items() if k != "__url__"} for _, s in local] == [
        {k: v for k, v in s.items() if k != "__url__"} for _, s in piped
    ]
    assert local[1][1]["txt"] == b"b" * 700


def test_local_plain_tars_are_read_at_their_offsets_others_as_streams(tmp_path):
    plain = write_tar(tmp_path / "a.tar", [("k1.txt", b"a")])
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        tar.add(plain, arcname="k1.txt")
    with open(plain, "rb") as stream:
        assert isinstance(tario._open_tar(stream, plain, hashing=False), tario._LocalTar)
    for url in (str(tmp_path / "a.tar.gz"), f"pipe:cat {plain}"):
        stream = tario.open_shard(url)
        try:
            assert isinstance(tario._open_tar(stream, url, hashing=False), tario._StreamedTar)
        finally:
            stream.close()


@pytest.mark.parametrize("name", [
    "k1.png", "k1.seg.npy", "sub/k2.cls", "a.b/c.d", "x/y/.z", "a.b/c", ".hidden", "noext", "dir/", "k.",
    "a/b/c.tar.gz",
])
def test_members_split_into_key_and_field_as_webdataset_splits_them(name):
    assert tario._key_and_field(name) == base_plus_ext(name)


def test_shards_written_by_webdataset_read_alike_both_ways(tmp_path):
    # webdataset's TarWriter stamps a float mtime: tarfile then puts a pax header before every member.
    path = str(tmp_path / "wds.tar")
    with wds.TarWriter(path) as sink:
        for index in range(5):
            sink.write({"__key__": f"dir/s{index}", "txt": f"t{index}", "cls": index, "bin": bytes(range(index * 50))})
    with tarfile.open(path) as tar:
        assert any(member.pax_headers for member in tar)  # the case this test is about
    local, piped = (list(read_samples(Shard(shard_url(path, p)), [])) for p in (False, True))
    assert [sample["__key__"] for sample in local] == [f"dir/s{index}" for index in range(5)]
    assert [sample["bin"] for sample in local] == [bytes(range(index * 50)) for index in range(5)]
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in local] == [
        {k: v for k, v in s.items() if k != "__url__"} for s in piped
    ]
