"""Naming a dataset: manifest files and turning a source string into a list of shards.

A source is one of:
- a ``manifest.json`` path or URL, or a directory holding one (shards are listed by the
  manifest, relative to its folder, with their sha256 and sample count);
- a brace pattern, ``/data/shard-{000000..000099}.tar`` (expanded by webdataset);
- a glob, ``/data/*.tar`` or ``s3://bucket/data/*.tar`` (fsspec globs remote stores);
- a single ``.tar`` path or URL, or a list of shard paths/URLs.

URLs are local paths, ``s3://``/``gs://``/``http(s)://``/... URLs opened with fsspec
(``flowmill.data.remote``: credentials, endpoint, retries), or ``pipe:COMMAND`` (the shard is the
command's standard output). Naming a dataset checks that its first remote shard can be reached,
so a wrong endpoint, credentials or bucket is one line at start-up, not a failure mid-run.
"""

from __future__ import annotations

import glob as local_glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from flowmill.data.remote import Storage, check_exists, describe, glob, is_remote, read_text

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "flowmill-shards/1"


@dataclass(frozen=True)
class Shard:
    """One shard of a dataset: where it is and, when a manifest lists it, what it must hold."""

    url: str  # local path, fsspec URL or pipe: command
    sha256: str | None = None  # hex digest of the tar file from the manifest; None without a manifest
    samples: int | None = None  # samples in the shard from the manifest; None without a manifest


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_local(url: str) -> bool:
    """True for a plain filesystem path; pipe: commands and fsspec URLs (s3://, file://, ...) are not."""
    return not url.startswith("pipe:") and "://" not in url


def _parse_manifest(text: str, where: str) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ValueError(
            f"{where} is not valid JSON ({exn.msg} at line {exn.lineno} column {exn.colno}); "
            "restore the file or pack the dataset again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{where} is not a flowmill manifest (format {found!r}, expected {MANIFEST_FORMAT!r})")
    return manifest


def read_manifest(path: str | Path, storage: Storage | None = None) -> dict:
    """Load a manifest written by ``flowmill.data.pack``; ``path`` is the file, its folder or a URL
    (read with ``storage``: options and retries, see ``flowmill.data.remote``)."""
    text = str(path)
    if is_remote(text):
        url = text if text.endswith(MANIFEST_NAME) else text.rstrip("/") + "/" + MANIFEST_NAME
        try:
            return _parse_manifest(read_text(url, storage or Storage()), url)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"no dataset manifest at {url} ({describe(error)})") from None
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dataset manifest at {path}")
    return _parse_manifest(path.read_text(), str(path))


def _names_manifest(text: str) -> bool:
    if is_local(text):
        return Path(text).is_dir() or Path(text).name == MANIFEST_NAME
    return not text.startswith("pipe:") and (text.endswith("/" + MANIFEST_NAME) or text.endswith("/"))


def _manifest_shards(text: str, storage: Storage | None) -> list[Shard]:
    if is_local(text):
        path = Path(text)
        if path.is_dir() and not (path / MANIFEST_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is a folder without {MANIFEST_NAME}; pass a glob such as '{path}/*.tar' "
                "or a brace pattern to read shards that have no manifest"
            )
        folder = str(path if path.is_dir() else path.parent) + "/"
    else:
        folder = text if text.endswith("/") else text.rsplit("/", 1)[0] + "/"
    manifest = read_manifest(text, storage)
    return [Shard(folder + shard["name"], shard["sha256"], shard["samples"]) for shard in manifest["shards"]]


def _glob(text: str, storage: Storage | None) -> list[str]:
    urls = sorted(local_glob.glob(text)) if is_local(text) else glob(text, storage or Storage())
    if not urls:
        raise FileNotFoundError(f"the glob {text} matches no files")
    return urls


def dataset_shards(source: str | Path | list[str], storage: Storage | None = None) -> list[Shard]:
    """The shards named by ``source`` (see module docstring), in a fixed order; remote manifests,
    listings and shards are reached with ``storage`` (default: the environment's credentials).

    Shards listed by a manifest carry its sha256 and sample count. Raises
    FileNotFoundError naming the path when nothing is there, a local shard or the first remote
    shard is missing, ValueError when the source names no shards, ``StorageError`` naming the
    URL when a remote store cannot be used (backend not installed, unreachable after the
    retries, credentials refused).
    """
    if isinstance(source, list):
        shards = [Shard(str(url)) for url in source]
    else:
        text = str(source)
        if _names_manifest(text):
            shards = _manifest_shards(text, storage)
        elif not text.startswith("pipe:") and any(char in text for char in "*?["):
            shards = [Shard(url) for url in _glob(text, storage)]
        else:
            shards = [Shard(url) for url in wds.shardlists.expand_urls(text)]
    if not shards:
        raise ValueError(f"the source {source!r} names no shards")
    missing = [shard.url for shard in shards if is_local(shard.url) and not Path(shard.url).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards of {source} do not exist, first: {missing[0]}")
    remote = [shard.url for shard in shards if is_remote(shard.url)]
    if remote:  # one request: the endpoint answers, takes the credentials and holds the bucket
        check_exists(remote[0], storage or Storage())
    return shards


def resolve_shards(source: str | Path | list[str], storage: Storage | None = None) -> list[str]:
    """Shard URLs named by ``source`` (see ``dataset_shards``), in a fixed order."""
    return [shard.url for shard in dataset_shards(source, storage)]
