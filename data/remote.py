"""Reading shards and manifests from object storage and web servers (``s3://``, ``gs://``, ``http(s)://``, ...).

Backends. fsspec opens every URL with a scheme: s3fs ``s3://`` (``pip install 'flowmill[s3]'``),
gcsfs ``gs://`` (``flowmill[gcs]``), aiohttp ``http(s)://``; a missing backend is a
``StorageError`` naming the extra to install. Schemes fsspec has no implementation for are left
to webdataset's ``gopen`` (``flowmill.data.tario``).

``http(s)://`` goes through fsspec's HTTPFileSystem, not ``gopen``'s curl pipe: a connection that
drops mid-shard reaches fsspec's reader as an exception at the failing read (aiohttp's
``ClientPayloadError``), which is retried and continued after the bytes already read; through a
pipe it is only an early end of curl's output, which tarfile takes for the end of the shard
before curl's exit status says otherwise, and which cannot be continued where it stopped.

Credentials and endpoint come from the backend's standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``,
...) unless ``Storage.options`` (``data.storage_options``) gives them: those are the keyword
arguments of the fsspec filesystem (s3fs: ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``;
http: ``headers``, ``client_kwargs``).

Retries. A transient failure (connection refused, reset or dropped, timeout, HTTP 5xx, 429, 408)
while opening, listing or reading is tried again up to ``Storage.retries`` times, waiting
``backoff_s``, then twice as long each time (at most ``MAX_BACKOFF_S``). A read that fails
mid-object opens the object again and continues at the byte where the failed read started
(seeking where the store allows ranged reads, else reading and dropping the bytes before it),
so the reader above sees one unbroken stream: no sample is lost or repeated and a running
sha256 stays valid. The count restarts whenever a read succeeds. Answers that asking again
cannot change (not found, access denied) are not retried.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import aiohttp
import fsspec
from fsspec.core import url_to_fs

from flowmill.data.constants import DEFAULT_RETRIES

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
_SKIP_BYTES = 1 << 20
# Backends fsspec imports on demand, per scheme: (package, flowmill extra that installs it).
_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_RETRY_STATUSES = (408, 429)  # request timeout, too many requests; and every 5xx
_TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError, TimeoutError, http.client.IncompleteRead, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
)
try:  # botocore comes with s3fs (flowmill[s3]); without it no S3 error can occur
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, ResponseStreamingError

    _TRANSIENT += (BotoConnectionError, HTTPClientError, ResponseStreamingError)
except ImportError:
    pass

T = TypeVar("T")


class StorageError(OSError):
    """A remote dataset cannot be read: its backend is not installed, its store cannot be
    reached after the retries, or the store refuses the credentials. The message names the URL."""


@dataclass(frozen=True)
class Storage:
    """How remote shards and manifests are reached. Picklable (DataLoader workers get it)."""

    options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the fsspec filesystem
    retries: int = DEFAULT_RETRIES  # attempts after a transient failure before giving up (0: fail at once)
    backoff_s: float = 1.0  # seconds before the first retry; doubled for each further one


def is_remote(url: str) -> bool:
    """True for a URL with a scheme (``s3://``, ``http://``, ``file://``, ...); local paths and ``pipe:`` are not."""
    return "://" in url and not url.startswith("pipe:")


def _causes(exn: BaseException):
    # s3fs and fsspec's http wrap the client's own error (a 403 becomes PermissionError, an
    # unreachable http server FileNotFoundError), keeping it as the cause.
    while exn is not None:
        yield exn
        exn = exn.__cause__


def _status(exn: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp, botocore, gcsfs), None when it carries none."""
    status = getattr(exn, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exn, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = getattr(exn, "code", None)
    return code if isinstance(code, int) and code >= 100 else None


def is_transient(exn: BaseException) -> bool:
    """Whether trying again may succeed: the connection failed, dropped or timed out, or the
    server answered 5xx, 429 or 408. Not found and access denied are answers, not failures."""
    for error in _causes(exn):
        status = _status(error)
        if status is not None:
            return status >= 500 or status in _RETRY_STATUSES
        if isinstance(error, _TRANSIENT):
            return True
    return False


def describe(exn: BaseException) -> str:
    """One line on what went wrong: the client's own error where a backend wrapped it."""
    innermost = list(_causes(exn))[-1]
    text = " ".join(str(innermost).split()) or type(innermost).__name__
    return f"{type(innermost).__name__}: {text}"


def filesystem(url: str, storage: Storage) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` built with ``storage.options``, and the path inside it;
    ``StorageError`` naming the extra to install when its backend is missing."""
    try:
        return url_to_fs(url, **storage.options)
    except ImportError as exn:
        scheme = url.split("://", 1)[0]
        package, extra = _BACKENDS.get(scheme, (getattr(exn, "name", None) or "its backend", None))
        hint = f"pip install 'flowmill[{extra}]'" if extra else f"pip install {package}"
        raise StorageError(f"{url}: reading {scheme}:// URLs needs {package}, which is not installed: {hint}") from None


def _retry(url: str, exn: BaseException, failures: int, storage: Storage, doing: str, level: int) -> bool:
    """Whether to try ``doing`` on ``url`` again after its ``failures``-th failure in a row, ``exn``;
    logs it at ``level`` and sleeps the backoff first when so."""
    if not is_transient(exn) or failures > storage.retries:
        return False
    delay = min(storage.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
    log.log(level, "%s %s failed (%s); retry %d of %d in %.1f s", doing, url, describe(exn), failures, storage.retries, delay)
    time.sleep(delay)
    return True


def failure(url: str, exn: BaseException, storage: Storage) -> OSError:
    """The error a user sees for ``exn`` from ``url``: one line naming the URL (FileNotFoundError
    for what is not there, StorageError otherwise)."""
    if isinstance(exn, StorageError):
        return exn
    if is_transient(exn):
        attempts = storage.retries + 1
        return StorageError(f"{url}: cannot be read ({describe(exn)}), gave up after {attempts} attempt{'s' * (attempts > 1)}")
    statuses = [status for status in map(_status, _causes(exn)) if status is not None]
    if isinstance(exn, PermissionError) or statuses[:1] in ([401], [403]):
        return StorageError(f"{url}: access denied ({describe(exn)}); check the credentials in the environment or the storage options")
    if isinstance(exn, FileNotFoundError) or statuses[:1] == [404]:
        return FileNotFoundError(f"{url} does not exist ({describe(exn)})")
    return StorageError(f"{url}: {describe(exn)}")


def _checked(url: str, action: Callable[[], T], storage: Storage, doing: str) -> T:
    """``action()``, an operation on ``url``, tried again after transient failures; what fails for
    good is raised as ``failure`` says."""
    failures = 0
    while True:
        try:
            return action()
        except Exception as exn:  # noqa: BLE001 - every failure becomes one line naming the URL
            failures += 1
            # Quiet: these run at start-up, where what fails for good ends in one line that counts the attempts.
            if not _retry(url, exn, failures, storage, doing, logging.DEBUG):
                raise failure(url, exn, storage) from exn  # the cause keeps the client's own error for ``describe``


def read_text(url: str, storage: Storage) -> str:
    """The text of the object at ``url`` (a manifest), with retries; one-line errors naming the URL."""
    fs, path = filesystem(url, storage)
    return _checked(url, lambda: fs.cat_file(path).decode(), storage, "reading")


def glob(pattern: str, storage: Storage) -> list[str]:
    """URLs matching ``pattern``, sorted, with retries; one-line errors naming the pattern."""
    fs, path = filesystem(pattern, storage)
    matches = _checked(pattern, lambda: fs.glob(path), storage, "listing")
    return sorted(fs.unstrip_protocol(match) for match in matches)


def check_exists(url: str, storage: Storage) -> None:
    """Raise (one line naming ``url``) unless the object at ``url`` can be reached: the store
    answers, accepts the credentials and has it."""
    fs, path = filesystem(url, storage)
    _checked(url, lambda: fs.info(path), storage, "checking")


class RemoteFile:
    """A read-only binary stream of one remote object that survives transient failures: a read
    that fails is tried again on a newly opened object at the same byte (module docstring)."""

    def __init__(self, url: str, storage: Storage):
        self.url = url
        self.storage = storage
        self.fs, self.path = filesystem(url, storage)
        self.offset = 0  # bytes handed out so far
        self.stream: BinaryIO | None = None  # opened on the first read, so that opening is retried alike

    def _open(self) -> BinaryIO:
        # block_size=0: http(s) objects are streamed with one request, not fetched in ranged blocks
        # (servers that ignore Range requests, as Python's http.server does, are read too).
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        streamed = {"block_size": 0} if protocols & {"http", "https"} else {}
        stream = self.fs.open(self.path, "rb", **streamed)
        if self.offset:
            try:
                stream.seek(self.offset)
            except (ValueError, OSError):  # a streamed http object: read up to where the failed read started
                remaining = self.offset
                while remaining:
                    skipped = len(stream.read(min(remaining, _SKIP_BYTES)))
                    if not skipped:
                        raise ValueError(f"{self.url} is shorter than the {self.offset} bytes read before; it changed while being read")
                    remaining -= skipped
        return stream

    def read(self, size: int = -1) -> bytes:
        failures = 0
        while True:
            try:
                if self.stream is None:
                    self.stream = self._open()
                data = self.stream.read(size)
                self.offset += len(data)
                return data
            except Exception as exn:  # noqa: BLE001 - what is not worth another try is raised as ``failure`` says
                self._drop_stream()
                failures += 1
                if not _retry(self.url, exn, failures, self.storage, f"reading at byte {self.offset} of", logging.WARNING):
                    raise failure(self.url, exn, self.storage) from exn

    def _drop_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # noqa: BLE001 - the connection is already broken; closing it is a courtesy
                pass
            self.stream = None

    def close(self) -> None:
        self._drop_stream()
