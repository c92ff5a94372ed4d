"""Caching a frozen encoder's outputs: run it over a dataset once and write them as new shards.

An encoder is any object with

- ``decode(sample) -> dict``: a raw sample (``{"__key__", field: bytes}``) → the tensors
  of one sample the encoder reads (raise to reject the sample);
- ``__call__(batch) -> dict[str, Tensor]``: those tensors stacked to (B, ...) → outputs
  (B, ...), one entry per output name;
- ``description``: a JSON-able dict saying what the encoder is (kept in the manifest).

It is named by ``"module:callable"``; the callable is called with the ``--arg`` keywords
and returns the encoder. Each output sample has the source sample's key, one
``{name}.npy`` field per output and a copy of the ``keep`` fields (e.g. the caption), so
training reads the cached outputs instead of recomputing them every step.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmill.data.batches import collate
from flowmill.data.constants import ENCODE_SHARD_SAMPLES
from flowmill.data.pack import PackOptions, write_shards
from flowmill.data.parallel import warn
from flowmill.data.shards import Shard, dataset_shards
from flowmill.data.tario import read_samples

ENCODE_SOURCE = "encode"
DTYPES = {"float32": np.float32, "float16": np.float16}  # .npy has no bfloat16


def load_encoder(spec: str, kwargs: dict[str, Any]) -> Any:
    """The encoder ``module:callable`` returns when called with ``kwargs``."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"encoder {spec!r} must be 'module:callable', e.g. flowmill.train.encoders:text_encoder")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exn:
        raise ValueError(f"cannot load encoder {spec!r}: {exn}") from None
    encoder = factory(**kwargs)
    missing = [name for name in ("decode", "description") if not hasattr(encoder, name)]
    if missing or not callable(encoder):
        what = ", ".join(repr(name) for name in missing) or "__call__"
        raise TypeError(f"encoder {spec!r} has no {what}; see flowmill.data.encode for what an encoder provides")
    return encoder


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def encode_device(rank: int) -> torch.device:
    """Where the encoder of encoding process ``rank`` runs: a GPU when present (one per process, round
    robin), as training chooses, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class ShardEncoding:
    """What encoding one source shard gives: output samples in shard order, the rejected inputs, and
    the sums of the encoder's ``sums`` hook over its batches (None: the encoder has none)."""

    samples: list[dict]
    rejected: list[dict]
    sums: np.ndarray | None


@dataclass
class ShardEncoder:
    """Encodes one source shard with ``encoder``; batches never span shards, so the outputs are the
    same whichever process encodes which shard."""

    encoder: Any
    batch_size: int
    keep: tuple[str, ...]
    dtype: str | None

    def _outputs(self, inputs: list[dict], raws: list[dict], sums: list[np.ndarray]) -> list[dict]:
        with torch.no_grad():
            outputs = self.encoder(collate(inputs, [raw["__key__"] for raw in raws]))
        if hasattr(self.encoder, "sums"):
            sums.append(self.encoder.sums(outputs))
        samples = []
        for index, raw in enumerate(raws):
            sample = {"__key__": raw["__key__"], **{name: raw[name] for name in self.keep}}
            for name, values in outputs.items():
                # .npy has no bfloat16: such outputs are widened to float32 (then --dtype applies).
                array = values[index].detach().cpu()
                array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
                sample[f"{name}.npy"] = _npy(array.astype(DTYPES[self.dtype]) if self.dtype and array.dtype.kind == "f" else array)
            samples.append(sample)
        return samples

    def __call__(self, shard: Shard) -> ShardEncoding:
        samples: list[dict] = []
        sums: list[np.ndarray] = []
        inputs: list[dict] = []
        raws: list[dict] = []
        reports: list[dict] = []
        for raw in read_samples(shard, reports):
            try:
                missing = [name for name in self.keep if name not in raw]
                if missing:
                    raise KeyError(f"no field {', '.join(missing)} to keep")
                inputs.append(self.encoder.decode(raw))
                raws.append(raw)
            except Exception as exn:  # a bad sample is left out and reported, as in training
                reports.append({"key": raw["__key__"], "shard": shard.url, "reason": f"{type(exn).__name__}: {exn}"})
            if len(inputs) == self.batch_size:
                samples.extend(self._outputs(inputs, raws, sums))
                inputs, raws = [], []
        if inputs:
            samples.extend(self._outputs(inputs, raws, sums))
        rejected = [{"input": f"{report['shard']}:{report['key'] or 'the rest of the shard'}", "reason": report["reason"]}
                    for report in reports]
        return ShardEncoding(samples, rejected, np.sum(sums, axis=0) if sums else None)


# The encoder of this encoding process (set in each pool worker by _start_worker).
_worker: ShardEncoder | None = None


def _start_worker(spec: str, kwargs: dict, ranks: Any, threads: int, batch_size: int, keep: tuple[str, ...],
                  dtype: str | None) -> None:
    """Pool initializer: build this process's own encoder on its own device."""
    global _worker
    with ranks.get_lock():
        rank = ranks.value
        ranks.value += 1
    torch.set_num_threads(threads)
    encoder = load_encoder(spec, kwargs)
    if hasattr(encoder, "to"):
        encoder.to(encode_device(rank))
    _worker = ShardEncoder(encoder, batch_size, keep, dtype)


def _encode_in_worker(shard: Shard) -> ShardEncoding:
    return _worker(shard)


def _shard_encodings(shards: list[Shard], encoder: Any, spec: str, kwargs: dict, processes: int, batch_size: int,
                     keep: tuple[str, ...], dtype: str | None) -> Iterator[ShardEncoding]:
    """Every shard's encoding, in shard order, by ``processes`` processes (1: this one, with ``encoder``)."""
    if processes == 1 or len(shards) == 1:
        if hasattr(encoder, "to"):
            encoder.to(encode_device(0))
        yield from map(ShardEncoder(encoder, batch_size, keep, dtype), shards)
        return
    # CUDA cannot be used in a forked child of a process that may have touched it: spawn then.
    context = multiprocessing.get_context("spawn" if torch.cuda.is_available() else "fork")
    threads = max(1, torch.get_num_threads() // processes)
    initargs = (spec, kwargs, context.Value("i", 0), threads, batch_size, keep, dtype)
    with context.Pool(min(processes, len(shards)), initializer=_start_worker, initargs=initargs) as pool:
        yield from pool.imap(_encode_in_worker, shards)


def _encoded_samples(encodings: Iterator[ShardEncoding], rejected: list[dict], totals: list[np.ndarray],
                     on_reject: Callable[[str], None]) -> Iterator[dict]:
    for encoding in encodings:
        yield from encoding.samples
        if encoding.sums is not None:
            totals.append(encoding.sums)
        for report in encoding.rejected:
            rejected.append(report)
            shard, _, what = report["input"].rpartition(":")
            on_reject(f"skipping {what} in {shard}: {report['reason']}")


def encode_dataset(
    source: str | Path,
    out_dir: str | Path,
    encoder: Any,
    *,
    encoder_spec: str,
    encoder_args: dict[str, Any],
    batch_size: int = 64,
    keep: tuple[str, ...] = (),
    dtype: str | None = None,
    processes: int = 1,
    options: PackOptions = PackOptions(),
    on_reject: Callable[[str], None] = warn,
) -> dict:
    """Write ``encoder``'s outputs for every sample of ``source`` as shards in ``out_dir``; returns the manifest.

    ``dtype`` (float16, float32) converts floating outputs before storing them. Shards hold
    ``ENCODE_SHARD_SAMPLES`` samples unless ``options`` set a limit. ``processes`` > 1 encodes
    the source shards data-parallel: each process builds its own encoder from ``encoder_spec``
    and ``encoder_args`` (on its own GPU when there are GPUs) and encodes its share of the
    shards; the samples are written in shard order, so the dataset is the same for any number
    of processes. The encoder runs on a GPU when present if it has ``to(device)``. Samples the
    encoder rejects are reported with ``on_reject`` and listed in the manifest's notes. An
    encoder with ``sums(outputs) -> float64 array`` and ``summary(total) -> dict`` summarises
    its outputs over the dataset: the sums of every batch are added (in shard order) and
    ``summary`` gives top-level manifest sections (the VAE encoder's measured ``latents``).
    Idempotent for the same source shards, encoder and arguments.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    shards = dataset_shards(source)
    total = sum(shard.samples for shard in shards) if all(shard.samples is not None for shard in shards) else None
    fingerprint = hashlib.sha256("\n".join(f"{shard.url} {shard.sha256}" for shard in shards).encode()).hexdigest()
    args = {
        "dataset": str(source), "shards": fingerprint, "encoder": encoder_spec, "encoder_args": encoder_args,
        "description": encoder.description, "keep": list(keep), "dtype": dtype,
    }
    rejected: list[dict] = []
    totals: list[np.ndarray] = []
    sections: dict[str, Any] = {}
    encodings = _shard_encodings(shards, encoder, encoder_spec, encoder_args, processes, batch_size, keep, dtype)

    def samples() -> Iterator[dict]:
        yield from _encoded_samples(encodings, rejected, totals, on_reject)
        if hasattr(encoder, "summary") and totals:
            sections.update(encoder.summary(np.sum(totals, axis=0)))

    return write_shards(
        samples(), out_dir, source=ENCODE_SOURCE, args=args, total=total, notes={"rejected": rejected},
        sections=sections, **options.shard_keywords(ENCODE_SHARD_SAMPLES),
    )
