"""Reading one tar shard as a stream of raw WebDataset samples, checking its sha256 on the way.

A sample is the run of consecutive tar members sharing a key: ``dir/key.field.ext`` gives
key ``dir/key`` and field ``field.ext`` (split at the first dot of the file name, field
lower-cased, as webdataset does). Samples are dicts ``{"__key__", "__url__", field: bytes}``.

Errors inside a shard (truncated or corrupt tar, a field twice in one sample) are appended
to a ``reports`` list as ``{"key", "shard", "reason"}`` (key None when the rest of the shard
is lost) and reading goes on with what can be read; a shard that does not exist is raised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from webdataset.gopen import gopen

from flowmill.data.shards import Shard, is_local
from flowmill.data.tarstream import tar_members

_READ_BYTES = 1 << 20
# (url, sha256) pairs whose bytes this process has already hashed: a shard is hashed on its
# first read only, resampled epochs re-read it at full speed.
_verified: set[tuple[str, str]] = set()


class ShardChecksumError(RuntimeError):
    """A shard's bytes do not match the sha256 its manifest records."""


def open_shard(url: str) -> BinaryIO:
    """Open a shard for reading: local path, ``pipe:COMMAND`` or any fsspec URL."""
    if url.startswith("pipe:"):
        return gopen(url, "rb")
    if is_local(url):
        return open(url, "rb", buffering=_READ_BYTES)
    return fsspec.open(url, "rb").open()


class _Hashing:
    """A read-only stream that hashes everything read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """Read what the tar reader left unread (end-of-archive padding) and return the digest of the whole file."""
        while self.read(_READ_BYTES):
            pass
        return self.digest.hexdigest()


def _split_name(name: str) -> tuple[str, str] | None:
    """``"dir/key.field.ext"`` → ``("dir/key", "field.ext")``; None for a name without a dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _is_meta(name: str) -> bool:
    # webdataset keeps dataset metadata in members named __...__; they are no sample.
    base = name.rpartition("/")[2]
    return base.startswith("__") and base.partition(".")[0].endswith("__")


def _exception_text(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"


def read_samples(shard: Shard, reports: list[dict], verify: bool = True) -> Iterator[dict]:
    """Raw samples of ``shard`` in file order; problems go to ``reports`` (see module docstring).

    With ``verify`` and a manifest sha256, the shard's bytes are hashed on this process's
    first read of it and ``ShardChecksumError`` is raised after its last sample if they differ.
    """
    url = shard.url
    check = verify and shard.sha256 is not None and (url, shard.sha256) not in _verified
    stream = open_shard(url)
    try:
        yield from _samples(shard, stream, reports, check)
    finally:
        stream.close()


def _samples(shard: Shard, stream: BinaryIO, reports: list[dict], check: bool) -> Iterator[dict]:
    url = shard.url
    source = _Hashing(stream) if check else stream
    current: dict | None = None
    count = 0
    duplicate = None
    try:
        for name, data in tar_members(source):
            split = _split_name(name)
            if split is None or _is_meta(name):
                continue
            key, suffix = split
            if current is not None and key != current["__key__"]:
                if duplicate is None:
                    count += 1
                    yield current
                current = None
            if current is None:
                current, duplicate = {"__key__": key, "__url__": url}, None
            if suffix in current:
                duplicate = suffix
                reports.append({"key": key, "shard": url, "reason": f"field {suffix!r} appears twice in the sample"})
            current[suffix] = data
        if current is not None and duplicate is None:
            count += 1
            yield current
    except FileNotFoundError:
        raise
    except Exception as exn:  # a corrupt shard must not stop training: report and keep what was read
        if current is not None and duplicate is None:
            count += 1
            yield current
        expected = f" of {shard.samples}" if shard.samples is not None else ""
        reports.append({
            "key": None, "shard": url,
            "reason": f"unreadable after {count}{expected} samples, the rest of the shard is lost ({_exception_text(exn)})",
        })
    if check:
        actual = source.hexdigest_to_end()
        if actual != shard.sha256:
            raise ShardChecksumError(
                f"shard {url} does not match its manifest: sha256 {actual}, manifest says {shard.sha256}; "
                "the file changed or is damaged (repack it, or read it unverified with verify=False)"
            )
        _verified.add((url, shard.sha256))
