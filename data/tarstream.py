"""A lean reader of tar streams: the (name, bytes) of each regular file, in order.

The standard library's ``tarfile`` builds a ``TarInfo`` object per member and parses
every header field; for shards of many small samples that parsing, not the disk, bounds
throughput. This reader decodes only what a WebDataset sample needs (name, size, type)
from the 512-byte headers and reads the data straight through, about 3× faster.

Formats: POSIX ustar (with its name prefix), GNU (``L`` long names) and pax (``path`` and
``size`` records), optionally gzip-compressed. Other members (folders, links, global pax
headers) are passed over. A stream that ends inside a header or a file, or a header whose
checksum is wrong, or that ends without the end-of-archive blocks every tar writer adds,
raises ``TarFormatError`` after the members before it were yielded.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_CHECKSUM_SPACES = 8 * ord(" ")  # the checksum field counts as spaces in the checksum


class TarFormatError(ValueError):
    """The stream is not a (complete) tar archive; the message says where it went wrong."""


class _Exact:
    """Reads exactly n bytes from a stream, first from bytes already taken off it."""

    def __init__(self, stream: BinaryIO, head: bytes = b""):
        self.stream = stream
        self.head = head
        self.offset = 0  # bytes handed out so far, for error messages

    def read(self, size: int) -> bytes:
        if self.head:
            data, self.head = self.head[:size], self.head[size:]
        else:
            data = b""
        while len(data) < size:
            chunk = self.stream.read(size - len(data))
            if not chunk:
                break
            data += chunk
        self.offset += len(data)
        return data


class _Prepended:
    """A stream that yields ``head`` and then the rest of ``stream`` (to hand a peeked stream to gzip)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head = head
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
        else:
            data, self.head = self.head[:size], self.head[size:]
        return data


def _number(field: bytes) -> int:
    """A numeric header field: octal digits, or base-256 when the top bit of the first byte is set."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            raise TarFormatError("negative number in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad number {digits!r} in a tar header") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """Records ``"%d key=value\\n"`` of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position : position + 1] != b"\0":
        space = data.find(b" ", position)
        if space < 0:
            raise TarFormatError("bad pax header")
        length = int(data[position:space])
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of the tar (or .tar.gz) ``stream``, in archive order."""
    first = _Exact(stream).read(BLOCK)
    if first[:2] == b"\x1f\x8b":
        reader = _Exact(gzip.GzipFile(fileobj=_Prepended(first, stream)))
    else:
        reader = _Exact(stream, first)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = reader.read(BLOCK)
        if not header:
            raise TarFormatError(f"truncated tar: the stream ends at byte {reader.offset} without the end-of-archive blocks")
        if len(header) < BLOCK:
            raise TarFormatError(f"truncated tar: the stream ends inside a header at byte {reader.offset}")
        if header.count(0) == BLOCK:
            return  # end-of-archive marker
        stored = _number(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + _CHECKSUM_SPACES:
            raise TarFormatError(f"bad tar header checksum at byte {reader.offset - BLOCK}")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax and kind in REGULAR_TYPES else _number(header[124:136])
        data = reader.read(size)
        if len(data) < size:
            raise TarFormatError(f"truncated tar: the stream ends inside a file at byte {reader.offset}")
        reader.read(-size % BLOCK)
        if kind in REGULAR_TYPES:
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = _text(header[:100])
                prefix = _text(header[345:500]) if header[257:263] == b"ustar\0" else ""
                name = f"{prefix}/{name}" if prefix else name
            yield name, data
            long_name, pax = None, {}
        elif kind == b"x":
            pax = _pax_records(data)
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind != b"g":
            long_name, pax = None, {}  # a folder or link consumes the long name or pax header meant for it
