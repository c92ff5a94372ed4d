"""Shards from object storage (flowmill.data.remote): a real S3 API (moto's server) and a plain HTTP
server, both on 127.0.0.1: exactly-once reading, credentials, retries, checksums, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import tarfile

import pytest

from flowmill.cli import main
from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import write_shards
from flowmill.data.remote import Storage
from flowmill.data.shards import dataset_shards
from flowmill.data.tario import ShardChecksumError, forget_verified
from flowmill.errors import UsageError
from flowmill.train.config import check_data_source, load_config
from tests.helpers import TINY_CONFIG
from tests.remote_helpers import BUCKET, STORE_GROUP, free_port

pytestmark = pytest.mark.xdist_group(STORE_GROUP)

DIGITS = 1797
INSPECT = ["--world-size", "2", "--num-workers", "2", "--batch-size", "4", "--json"]


@pytest.fixture
def s3_env(s3_digits, monkeypatch):
    """The standard AWS variables pointing at the test's S3 server."""
    for name, value in s3_digits.env.items():
        monkeypatch.setenv(name, value)
    return s3_digits


def inspect(source: str, capsys, *flags: str) -> tuple[int, str, str]:
    """``flowmill data inspect SOURCE`` in this process: exit code, stdout, stderr."""
    logger = logging.getLogger("flowmill")
    kept = logger.handlers[:], logger.propagate, logger.level
    capsys.readouterr()
    try:
        code = main(["data", "inspect", source, *INSPECT, *flags])
    finally:  # the CLI sets up flowmill's logger for the process, on the stream capsys replaces
        logger.handlers[:], logger.propagate, logger.level = kept
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def local_order(digits_dir) -> list[list[str]]:
    """The keys each of 2 ranks × 2 workers reads from the local digits, in delivery order."""
    from flowmill.data.audit import inspect_epoch

    # Decoding only the label: every digit decodes, so the order is the one `inspect` (which decodes every field) sees.
    result = inspect_epoch(digits_dir, world_size=2, num_workers=2, batch_size=4, decode=lambda sample: {"cls": int(sample["cls"])})
    return [rank["keys"] for rank in result["ranks"]]


@pytest.mark.parametrize("where", ["s3 manifest", "http brace pattern"])
def test_inspect_reads_every_remote_sample_once_in_the_local_order(where, s3_env, http_digits, local_order, capsys):
    source = (f"s3://{BUCKET}/digits/" if where == "s3 manifest"
              else f"{http_digits.url}/digits/shard-{{000000..000007}}.tar")
    code, out, err = inspect(source, capsys)
    assert code == 0, err
    result = json.loads(out)
    order = [rank["keys"] for rank in result["ranks"]]
    keys = [key for rank in order for key in rank]
    assert len(keys) == len(set(keys)) == DIGITS and result["skipped"] == result["dropped"] == []
    assert order == local_order  # same split, shuffles and batches as the local shards


def test_globs_brace_patterns_and_storage_options_without_environment(s3_digits, http_digits, monkeypatch):
    for name in s3_digits.env:
        monkeypatch.delenv(name, raising=False)
    storage = Storage({"endpoint_url": s3_digits.endpoint, "key": "testing", "secret": "testing",
                       "client_kwargs": {"region_name": "us-east-1"}})
    listed = dataset_shards(f"s3://{BUCKET}/digits/manifest.json", storage)
    names = [shard.url.rsplit("/", 1)[1] for shard in listed]
    assert names == [f"shard-{index:06d}.tar" for index in range(8)] and all(shard.sha256 for shard in listed)
    urls = [shard.url for shard in listed]
    assert [shard.url for shard in dataset_shards(f"s3://{BUCKET}/digits/*.tar", storage)] == urls
    assert [shard.url for shard in dataset_shards(f"s3://{BUCKET}/digits/shard-{{000000..000007}}.tar", storage)] == urls
    over_http = [url.replace(f"s3://{BUCKET}", http_digits.url) for url in urls]
    assert [shard.url for shard in dataset_shards(f"{http_digits.url}/digits/*.tar")] == over_http  # the index page
    loader = StreamingLoader([urls[0]], rank=0, world_size=1, batch_size=225, num_workers=0, seed=0,
                             decode=lambda sample: {"cls": int(sample["cls"])}, shuffle_buffer=0, resampled=False,
                             storage=storage)
    assert len(next(iter(loader))["__key__"]) == 225


def test_remote_shards_are_verified_against_their_manifest(tmp_path, s3_digits, http_digits):
    samples = [{"__key__": f"k{index:02d}", "txt": f"t{index}"} for index in range(4)]
    write_shards(samples, tmp_path / "set", source="test", args={}, shard_samples=2, progress=False)
    shard = tmp_path / "set" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes().replace(b"t3", b"t9"))  # a member's bytes change, the tar stays valid
    with tarfile.open(shard) as tar:
        assert tar.extractfile("k03.txt").read() == b"t9"
    (http_digits.root / "tampered").symlink_to(tmp_path / "set")
    for source in (s3_digits.upload(tmp_path / "set", "tampered"), f"{http_digits.url}/tampered/manifest.json"):
        forget_verified()
        loader = StreamingLoader(source, rank=0, world_size=1, batch_size=1, num_workers=0, seed=0,
                                 decode=lambda sample: {"txt": sample["txt"].decode()}, shuffle_buffer=0, resampled=False,
                                 storage=Storage({"endpoint_url": s3_digits.endpoint, "key": "testing", "secret": "testing"}
                                                 if source.startswith("s3") else {}))
        with pytest.raises(ShardChecksumError, match="shard-000001.tar does not match its manifest"):
            list(loader)


def read_keys(source: str, storage: Storage) -> tuple[list[str], dict]:
    loader = StreamingLoader(source, rank=0, world_size=1, batch_size=64, num_workers=0, seed=0,
                             decode=lambda sample: {"cls": int(sample["cls"])}, shuffle_buffer=0, resampled=False,
                             max_skip_fraction=1.0, storage=storage)
    return [key for batch in loader for key in batch["__key__"]], loader.stats


def test_a_dropped_connection_or_5xx_is_retried_where_it_stopped(digits_dir, http_digits, caplog):
    forget_verified()  # the shards are hashed while read, across the reconnection
    expected, _ = read_keys(str(digits_dir), Storage())
    source = f"{http_digits.url}/digits/manifest.json"
    cut = "/digits/shard-000003.tar"
    # The first GET of this 780 kB shard ends after 600 kB: past what the client buffers ahead of
    # the reader, so the reader is mid-shard when the connection drops.
    http_digits.drops[cut] = [600_000]
    http_digits.statuses["/digits/shard-000005.tar"] = [503]
    del http_digits.gets[:]
    keys, stats = read_keys(source, Storage(retries=2, backoff_s=0.01))
    assert keys == expected and stats["skipped"] == stats["shard_errors"] == 0
    assert http_digits.gets.count(cut) == 2 and http_digits.gets.count("/digits/shard-000005.tar") == 2
    retried_at = [int(match.group(1)) for message in caplog.messages
                  if (match := re.match(rf"reading at byte (\d+) of {http_digits.url}{cut} failed", message))]
    assert len(retried_at) == 1 and retried_at[0] > 0, caplog.messages  # continued mid-shard, not from its start

    # Once the retries are used up without progress, the rest of the shard is lost, counted like a damaged tar.
    http_digits.drops[cut] = [600_000, 1_000]
    keys, stats = read_keys(source, Storage(retries=1, backoff_s=0.01))
    assert stats["shard_errors"] == 1 and len(keys) + stats["skipped"] == DIGITS and 0 < stats["skipped"] < 225


@pytest.mark.parametrize("case", ["unreachable endpoint", "wrong credentials", "missing bucket"])
def test_bad_storage_is_one_line_at_start_up(case, s3_env, capsys, monkeypatch):
    import moto.settings

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only make the test slower
    if case == "wrong credentials":
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks access keys from now on
    url, options = {  # case: (URL the error names, storage options)
        "unreachable endpoint": (f"s3://{BUCKET}/digits/manifest.json", [f"endpoint_url=http://127.0.0.1:{free_port()}"]),
        "wrong credentials": (f"s3://{BUCKET}/digits/manifest.json", ["key=wrong", "secret=wrong"]),
        "missing bucket": ("s3://no-such-bucket/digits/manifest.json", []),
    }[case]
    flags = [flag for option in options for flag in ("--storage-option", option)]
    code, out, err = inspect(url, capsys, "--retries", "1", *flags)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("flowmill: error: ") and url in err
    expected = {"unreachable endpoint": "gave up after 2 attempts", "wrong credentials": "access denied",
                "missing bucket": "bucket does not exist"}[case]
    assert expected in err

    options = "{" + ", ".join(option.replace("=", ": ", 1) for option in options) + "}"
    cfg = load_config(TINY_CONFIG, [f"data.path={url}", f"data.storage_options={options}", "data.retries=1"])
    with pytest.raises(UsageError, match=f"^data.path: .*{url}") as refused:
        check_data_source(cfg)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_missing_backend_names_the_extra(capsys, monkeypatch):
    # s3fs as if it were not installed (it is, for the other tests): fsspec imports it on first use of s3://.
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    for url, extra in ((f"s3://{BUCKET}/digits/manifest.json", "s3"), (f"gs://{BUCKET}/digits/manifest.json", "gcs")):
        if extra == "gcs" and importlib.util.find_spec("gcsfs") is not None:
            continue  # installed here: nothing is missing
        code, out, err = inspect(url, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert url in err and f"pip install 'flowmill[{extra}]'" in err
