"""Write samples into WebDataset tar shards plus a ``manifest.json``.

Packing is idempotent: the manifest records the parameters that made the folder
(source, args, shard size); re-running with the same ones finds the complete manifest
and returns it without writing. Shards are written into a temporary sibling folder that
is renamed into place at the end, so a crash never leaves a half-written dataset behind
a manifest, and ranks racing to pack the same dataset agree on one result.

Layout of ``manifest.json``::

    {"format": "flowmill-shards/1",
     "shards": [{"name": "shard-000000.tar", "samples": 225, "bytes": ..., "sha256": ...}, ...],
     "total_samples": 1797, "fields": ["cls", "png", "txt"],
     "made": {"params": {"source": ..., "args": {...}, "shard_samples": ..., "shard_bytes": ...},
              "flowmill_version": "0.1.0", "time": "2025-01-01T00:00:00+00:00",
              "notes": {"rejected": [{"input": ..., "reason": ...}], ...}}}

``params.args`` of a dataset packed from files holds a fingerprint of the inputs (paths,
sizes, modification times), so re-packing after an input changed writes a new dataset.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from flowmill.data.shards import MANIFEST_FORMAT, MANIFEST_NAME, sha256_file

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass(frozen=True)
class PackOptions:
    """How a packer writes its dataset, whatever the source: shard size, processes, progress, overwriting."""

    shard_samples: int | None = None  # close a shard after this many samples; None and no shard_bytes: the source's default
    shard_bytes: int | None = None  # close a shard once its tar file holds this many bytes; None: no byte limit
    processes: int = 1  # at most this many forked processes make samples; 1 makes them in this process
    progress: bool = True  # show a progress bar (tqdm, on stderr) while writing
    overwrite: bool = False  # replace an out_dir that holds something other than the same dataset

    def shard_keywords(self, default_samples: int) -> dict[str, Any]:
        """``write_shards``' ``shard_samples``, ``shard_bytes``, ``progress`` and ``overwrite`` for these
        options; ``shard_samples`` is ``default_samples`` when neither shard limit is set."""
        unlimited = self.shard_samples is None and self.shard_bytes is None
        return {
            "shard_samples": default_samples if unlimited else self.shard_samples, "shard_bytes": self.shard_bytes,
            "progress": self.progress, "overwrite": self.overwrite,
        }


def input_fingerprint(paths: Iterable[str | Path]) -> str:
    """Hex sha256 over (path, size, mtime) of every file in ``paths`` (folders recursively)."""
    digest = hashlib.sha256()
    for root in sorted(str(Path(path).resolve()) for path in paths):
        files = sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]
        for path in files:
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _normalized(params: dict) -> dict:
    # Compare parameters the way they read back from JSON (tuples become lists, keys strings).
    return json.loads(json.dumps(params, sort_keys=True))


def _manifest_made_with(out_dir: Path, params: dict) -> dict | None:
    """The manifest in ``out_dir`` if it was made with ``params``, else None."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:  # not JSON (or not UTF-8): no dataset of ours, whatever made the folder
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or manifest.get("made", {}).get("params") != params:
        return None
    return manifest


def _damage(out_dir: Path, manifest: dict) -> str | None:
    """Why the shards in ``out_dir`` are not the ones ``manifest`` records (size, then sha256:
    a damaged shard may keep its size), or None when they are."""
    for shard in manifest["shards"]:
        shard_path = out_dir / shard["name"]
        if not shard_path.is_file():
            return f"{shard_path} is missing"
        if shard_path.stat().st_size != shard["bytes"]:
            return f"{shard_path} holds {shard_path.stat().st_size} bytes, its manifest says {shard['bytes']}"
    for shard in manifest["shards"]:
        if sha256_file(out_dir / shard["name"]) != shard["sha256"]:
            return f"{out_dir / shard['name']} does not match the sha256 its manifest records"
    return None


def _complete_manifest(out_dir: Path, params: dict) -> dict | None:
    """The manifest in ``out_dir`` if it was made with ``params`` and every shard is intact."""
    manifest = _manifest_made_with(out_dir, params)
    return manifest if manifest is not None and _damage(out_dir, manifest) is None else None


def _check_sample(sample: dict) -> str:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ValueError(f"every sample needs a non-empty string '__key__', got {key!r}")
    if "." in key.rsplit("/", 1)[-1]:
        # webdataset splits "key.field" at the first dot of the file name; a dot in the key would split the sample.
        raise ValueError(f"sample key {key!r} contains a '.', which webdataset would read as a field separator")
    for field, value in sample.items():
        if not field.startswith("__") and not isinstance(value, (bytes, str)):
            raise TypeError(f"field {field!r} of sample {key!r} is {type(value).__name__}; encode it to bytes or str first")
    return key


def _write_all(samples: Iterable[dict], folder: Path, shard_samples: int | None, shard_bytes: int | None,
               total: int | None, progress: bool) -> tuple[list[dict], set[str]]:
    """Write shards into ``folder``; returns per-shard entries (name, samples, bytes, sha256) and the field names."""
    shards: list[dict] = []
    fields: set[str] = set()
    seen_keys: set[str] = set()
    stream = writer = None
    count = 0

    def close_shard() -> None:
        writer.close()
        stream.close()
        path = folder / shards[-1]["name"]
        shards[-1].update(samples=count, bytes=path.stat().st_size, sha256=sha256_file(path))

    for sample in tqdm(samples, total=total, disable=not progress, unit="sample", desc=f"packing {folder.name}"):
        key = _check_sample(sample)
        if key in seen_keys:
            raise ValueError(f"duplicate sample key {key!r}; keys must be unique within a dataset")
        seen_keys.add(key)
        full = writer is not None and (
            (shard_samples is not None and count >= shard_samples)
            or (shard_bytes is not None and stream.tell() >= shard_bytes)
        )
        if full:
            close_shard()
            writer = None
        if writer is None:
            shards.append({"name": SHARD_PATTERN.format(len(shards))})
            stream = open(folder / shards[-1]["name"], "wb")
            # mtime fixed so the same samples give byte-identical shards (and the same sha256), and
            # an integer: a float one makes tarfile write a pax header before every member, two more
            # 512-byte blocks per member that every reader must parse (docs/data.md, Performance).
            writer = wds.TarWriter(stream, encoder=False, mtime=0)
            count = 0
        writer.write({
            name: value.encode("utf-8") if isinstance(value, str) and not name.startswith("__") else value
            for name, value in sample.items()
        })
        fields.update(field for field in sample if not field.startswith("__"))
        count += 1
    if writer is not None:
        close_shard()
    return shards, fields


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    *,
    source: str,
    args: dict,
    shard_samples: int | None = None,
    shard_bytes: int | None = None,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    notes: dict | None = None,
    sections: dict | None = None,
) -> dict:
    """Pack ``samples`` into ``out_dir/shard-NNNNNN.tar`` and write ``out_dir/manifest.json``.

    Each sample is a dict with ``"__key__"`` (unique, no ``.``) and fields ``{ext: bytes | str}``
    (str is stored as UTF-8).
    A shard is closed after ``shard_samples`` samples or once it holds ``shard_bytes`` bytes,
    whichever comes first (at least one must be given). ``source`` and ``args`` describe how
    the samples were made and decide idempotency: if ``out_dir`` already holds a complete
    dataset made with the same parameters, nothing is written. ``total`` sizes the progress bar.
    ``notes`` (e.g. rejected inputs) may be filled while ``samples`` runs; it is stored as
    ``manifest["made"]["notes"]``. ``sections`` (e.g. the measured ``latents`` of an encoded
    dataset), filled the same way, become top-level manifest entries. Returns the manifest dict.
    """
    if shard_samples is None and shard_bytes is None:
        raise ValueError("give shard_samples (samples per shard) or shard_bytes (bytes per shard)")
    for name, value in (("shard_samples", shard_samples), ("shard_bytes", shard_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    params = _normalized({"source": source, "args": args, "shard_samples": shard_samples, "shard_bytes": shard_bytes})
    existing = _manifest_made_with(out_dir, params)
    if existing is not None:
        damage = _damage(out_dir, existing)
        if damage is None:
            return existing
        # A damaged copy of the same dataset (a shard deleted, cut short or altered) is ours to repair.
        log.warning("%s holds this dataset damaged (%s); packing it again", out_dir, damage)
        overwrite = True
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty and holds no dataset made with these parameters; "
            "choose another folder or pass overwrite=True (--overwrite) to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        shards, fields = _write_all(samples, partial, shard_samples, shard_bytes, total, progress)
        if not shards:
            raise ValueError(f"no samples to pack into {out_dir}")
        manifest = {
            "format": MANIFEST_FORMAT,
            "shards": shards,
            "total_samples": sum(shard["samples"] for shard in shards),
            "fields": sorted(fields),
            "made": {
                "params": params,
                "flowmill_version": importlib.metadata.version("flowmill"),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "notes": notes or {},
            },
        }
        clashes = sorted(set(sections or {}) & set(manifest))
        if clashes:
            raise ValueError(f"manifest sections {clashes} would replace the manifest's own entries")
        manifest.update(sections or {})
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        return _move_into_place(partial, out_dir, params, manifest, overwrite)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _move_into_place(partial: Path, out_dir: Path, params: dict, manifest: dict, overwrite: bool) -> dict:
    """Rename the finished ``partial`` folder to ``out_dir``; returns the manifest that ends up there."""
    try:
        # Renaming onto a missing or empty folder is atomic on POSIX.
        os.rename(partial, out_dir)
        return manifest
    except OSError:
        pass
    winner = _complete_manifest(out_dir, params)
    if winner is not None:
        # Another process packed the same dataset first; keep its copy.
        return winner
    if not overwrite:
        raise FileExistsError(f"{out_dir} was filled by another process with a different dataset while packing; pass overwrite=True to replace it")
    retired = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
    os.rename(out_dir, retired)
    os.rename(partial, out_dir)
    shutil.rmtree(retired)
    return manifest
