"""Reading one tar shard as a stream of raw WebDataset samples, checking its sha256 on the way.

The grouping of members into samples is webdataset's (``group_by_keys``):
``dir/key.field.ext`` gives key ``dir/key`` and field ``field.ext`` (lower-cased), and members
webdataset treats as metadata (``__name__``) are no sample. Samples are dicts
``{"__key__", "__url__", field: bytes}``. Local paths are opened with ``open``, URLs
(``s3://``, ``gs://``, ``http(s)://``, ...) with fsspec through ``flowmill.data.remote``, which
retries transient failures and continues a dropped read at its byte, and ``pipe:COMMAND`` (and
the schemes only webdataset knows) with webdataset's ``gopen``.

The standard library's ``tarfile`` parses every tar header either way. A local uncompressed
shard is opened in its random-access mode and each member's bytes are read at the offset
tarfile reports (``_LocalTar``), without the file object ``extractfile`` builds per member,
a large part of the cost of reading a small member (docs/data.md, Performance). Everything else
(compressed, ``pipe:``, remote) is read as a stream by webdataset's ``tar_file_iterator``.

Errors inside a shard (truncated or corrupt tar, a field twice in one sample, fewer samples
than its manifest lists) are appended to a ``reports`` list as ``{"key", "shard", "reason"}``
and reading goes on with what can be read; a shard that does not exist is raised. When the
rest of the shard is lost the key is None and ``"lost"`` says how many samples were never
read (from the manifest's count; None without a manifest).
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import urlparse

import fsspec
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_iterator

from flowmill.data.remote import RemoteFile, Storage
from flowmill.data.shards import Shard, is_local

_READ_BYTES = 1 << 20
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta: members that are no sample
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext pattern
_TAR_BLOCK = 512  # an uncompressed tar is whole 512-byte blocks; a shorter tail means it was cut
# Shards (see _identity) whose bytes this process has already hashed: a shard is hashed on
# its first read only, resampled epochs re-read it at full speed.
_verified: set[tuple] = set()


def forget_verified() -> None:
    """Forget which shards this process has verified: the next read of each is hashed again."""
    _verified.clear()


class ShardChecksumError(RuntimeError):
    """A shard's bytes do not match the sha256 its manifest records."""


def open_shard(url: str, storage: Storage | None = None) -> BinaryIO:
    """Open a shard for reading: a local path, ``pipe:COMMAND``, a URL fsspec knows (read with
    ``storage``'s options and retries), or one of the other schemes webdataset's ``gopen`` handles."""
    if is_local(url):
        return open(url, "rb", buffering=_READ_BYTES)
    scheme = urlparse(url).scheme
    if url.startswith("pipe:") or (scheme not in fsspec.available_protocols() and scheme in gopen_schemes):
        return gopen(url, "rb")
    return RemoteFile(url, storage or Storage())


class _Source:
    """The read-only stream tarfile reads a shard through: counts its bytes, hashes them when
    asked, and is named by the shard's URL in webdataset's error messages."""

    def __init__(self, stream: BinaryIO, url: str, hashing: bool):
        self.stream = stream
        self.url = url
        self.digest = hashlib.sha256() if hashing else None
        self.size = 0
        self.head = b""  # the first block, to tell a plain tar from a compressed one

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.size < _TAR_BLOCK:
            self.head = (self.head + data)[:_TAR_BLOCK]
        self.size += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def read_to_end(self) -> None:
        """Read what tarfile left unread (end-of-archive padding), so size and digest cover the whole file."""
        while self.read(_READ_BYTES):
            pass

    def __str__(self) -> str:
        return self.url


class _StreamedTar:
    """A shard read front to back as a stream, by webdataset's ``tar_file_iterator``, hashed on the way."""

    def __init__(self, stream: BinaryIO, url: str, hashing: bool):
        self.source = _Source(stream, url, hashing)

    def members(self) -> Iterator[dict]:
        """``{"fname", "data"}`` of each regular member, in file order."""
        return tar_file_iterator(self.source, skip_meta=None)  # metadata members are left out by _Members

    def cut(self) -> bool:
        """Whether the file, read to its end, is a plain tar that stops inside a 512-byte block."""
        self.source.read_to_end()
        return self.source.head[257:262] == b"ustar" and self.source.size % _TAR_BLOCK != 0

    def sha256(self) -> str | None:
        """The whole file's sha256 when hashing (what tarfile left unread is read first), else None."""
        if self.source.digest is None:
            return None
        self.source.read_to_end()
        return self.source.digest.hexdigest()


class _LocalTar:
    """A local uncompressed shard in tarfile's random-access mode (see the module docstring);
    opening it raises ``tarfile.ReadError`` for a compressed file or a damaged first header."""

    def __init__(self, stream: BinaryIO, hashing: bool):
        self.stream = stream
        self.archive = tarfile.open(fileobj=stream, mode="r:")
        self.hashing = hashing

    def members(self) -> Iterator[dict]:
        for info in self.archive:
            self.archive.members = []  # keep no record per member (webdataset's reader does the same)
            if not info.isreg():
                continue
            if info.sparse is not None:  # a GNU sparse member: its holes are tarfile's to fill
                data = self.archive.extractfile(info).read()
            else:
                self.stream.seek(info.offset_data)
                data = self.stream.read(info.size)
                if len(data) != info.size:  # cut short: the error tarfile's own reader raises
                    raise tarfile.ReadError("unexpected end of data")
            yield {"fname": info.name, "data": data}

    def cut(self) -> bool:
        # Opened in random-access mode, so a plain tar: it must be whole 512-byte blocks.
        return os.fstat(self.stream.fileno()).st_size % _TAR_BLOCK != 0

    def sha256(self) -> str | None:
        if not self.hashing:
            return None
        self.stream.seek(0)
        return hashlib.file_digest(self.stream, "sha256").hexdigest()


def _open_tar(stream: BinaryIO, url: str, hashing: bool) -> _LocalTar | _StreamedTar:
    if is_local(url):
        try:
            return _LocalTar(stream, hashing)
        except tarfile.ReadError:  # compressed, or damaged from the start: the stream reader reports it
            stream.seek(0)
    return _StreamedTar(stream, url, hashing)


def _identity(shard: Shard) -> tuple:
    """What a verified shard is remembered by: for a local file also its size and modification
    time, so a file rewritten since it was hashed is hashed again."""
    if not is_local(shard.url):
        return shard.url, shard.sha256
    stat = os.stat(shard.url)
    return shard.url, shard.sha256, stat.st_size, stat.st_mtime_ns


def _key_and_field(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext`` with its pattern compiled once: ``base_plus_ext`` looks the
    pattern up in ``re``'s cache on every call, and ``group_by_keys`` calls it for every member."""
    match = _KEY_AND_FIELD.match(name)
    return match.groups() if match else (None, None)


def _exception_text(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"


def read_samples(shard: Shard, reports: list[dict], verify: bool = True, storage: Storage | None = None) -> Iterator[dict]:
    """Raw samples of ``shard`` in file order; problems go to ``reports`` (see module docstring).
    A remote shard is read with ``storage`` (options, retries); a transient failure that outlasts
    the retries makes the rest of the shard unreadable, reported like a damaged tar.

    With ``verify`` and a manifest sha256, the shard's bytes are hashed on this process's
    first read of it and ``ShardChecksumError`` is raised after its last sample if they differ.
    """
    identity = _identity(shard) if verify and shard.sha256 is not None else None
    check = identity is not None and identity not in _verified
    stream = open_shard(shard.url, storage)
    try:
        yield from _samples(shard, _open_tar(stream, shard.url, hashing=check), reports)
    finally:
        stream.close()
    if check:
        _verified.add(identity)


class _Members:
    """The member stream of one shard, as webdataset's ``group_by_keys`` gets it.

    It ends with webdataset's end-of-shard marker ``{}`` even when reading fails, so that
    ``group_by_keys`` hands out the sample it holds before the error (kept in ``error``) is
    raised; and it remembers the member handed on last, so that the error ``group_by_keys``
    raises for a field seen twice in one sample can be pinned to that sample's key.
    """

    def __init__(self, tar: _LocalTar | _StreamedTar, url: str, reports: list[dict]):
        self.tar = tar
        self.url = url
        self.reports = reports
        self.last: dict | None = None
        self.error: Exception | None = None
        self.repeated: set[str] = set()  # keys of samples rejected for a repeated field

    def __iter__(self) -> Iterator[dict]:
        try:
            # webdataset's metadata filter, compiled once: its default is a pattern re-looked-up per member.
            for member in self.tar.members():
                if "__" in member["fname"] and _META_MEMBER.match(member["fname"]):
                    continue
                member["__url__"] = self.url
                self.last = member
                yield member
        except Exception as exn:  # raised by _samples once group_by_keys has handed out the last whole sample
            self.error = exn
        yield {}

    def handler(self, exn: Exception) -> bool:
        # group_by_keys raises ValueError only for a file name repeated within a sample.
        if not isinstance(exn, ValueError) or self.last is None:
            raise exn
        key, suffix = _key_and_field(self.last["fname"])
        self.repeated.add(key)
        self.reports.append({"key": key, "shard": self.url, "reason": f"field {suffix.lower()!r} appears twice in the sample"})
        return True


def _lost(shard: Shard, count: int, members: _Members) -> int | None:
    """Samples of ``shard`` that were never read (its manifest count less those read or rejected),
    None when no manifest gives the count."""
    return None if shard.samples is None else max(0, shard.samples - count - len(members.repeated))


def _samples(shard: Shard, tar: _LocalTar | _StreamedTar, reports: list[dict]) -> Iterator[dict]:
    url = shard.url
    count = 0
    expected = f" of {shard.samples}" if shard.samples is not None else ""
    members = _Members(tar, url, reports)
    try:
        for sample in group_by_keys(members, keys=_key_and_field, handler=members.handler):
            if sample["__key__"] not in members.repeated:
                count += 1
                yield sample
        if members.error is not None:
            raise members.error
    except FileNotFoundError:
        raise
    except Exception as exn:  # a corrupt shard must not stop training: report and keep what was read
        reports.append({
            "key": None, "shard": url, "lost": _lost(shard, count, members),
            "reason": f"unreadable after {count}{expected} samples, the rest of the shard is lost ({_exception_text(exn)})",
        })
    else:
        # tarfile takes a tar cut at a header for a complete one; the block size and the manifest tell.
        if tar.cut() or (shard.samples is not None and count + len(members.repeated) < shard.samples):
            reports.append({
                "key": None, "shard": url, "lost": _lost(shard, count, members),
                "reason": f"truncated: the tar ends after {count}{expected} samples, the rest of the shard is lost",
            })
    actual = tar.sha256()
    if actual is not None and actual != shard.sha256:
        raise ShardChecksumError(
            f"shard {url} does not match its manifest: sha256 {actual}, manifest says {shard.sha256}; "
            "the file changed or is damaged; pack the dataset again, or read it unverified with "
            "data.verify_shards=false (flowmill data inspect: --no-verify)"
        )
