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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmill.data.batches import collate
from flowmill.data.constants import ENCODE_SHARD_SAMPLES
from flowmill.data.pack import PackOptions, write_shards
from flowmill.data.parallel import warn
from flowmill.data.shards import dataset_shards
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


def _encoded_samples(source, encoder, batch_size: int, keep: tuple[str, ...], dtype: str | None,
                     rejected: list[dict], on_reject: Callable[[str], None]) -> Iterator[dict]:
    inputs: list[dict] = []
    raws: list[dict] = []

    def flush() -> Iterator[dict]:
        with torch.no_grad():
            outputs = encoder(collate(inputs, [raw["__key__"] for raw in raws]))
        for index, raw in enumerate(raws):
            sample = {"__key__": raw["__key__"], **{name: raw[name] for name in keep}}
            for name, values in outputs.items():
                # .npy has no bfloat16: such outputs are widened to float32 (then --dtype applies).
                array = values[index].detach().cpu()
                array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
                sample[f"{name}.npy"] = _npy(array.astype(DTYPES[dtype]) if dtype and array.dtype.kind == "f" else array)
            yield sample

    for shard in dataset_shards(source):
        reports: list[dict] = []
        for raw in read_samples(shard, reports):
            try:
                missing = [name for name in keep if name not in raw]
                if missing:
                    raise KeyError(f"no field {', '.join(missing)} to keep")
                inputs.append(encoder.decode(raw))
                raws.append(raw)
            except Exception as exn:  # a bad sample is left out and reported, as in training
                reports.append({"key": raw["__key__"], "shard": shard.url, "reason": f"{type(exn).__name__}: {exn}"})
            if len(inputs) == batch_size:
                yield from flush()
                inputs, raws = [], []
        for report in reports:
            what = report["key"] or "the rest of the shard"
            rejected.append({"input": f"{report['shard']}:{what}", "reason": report["reason"]})
            on_reject(f"skipping {what} in {report['shard']}: {report['reason']}")
    if inputs:
        yield from flush()


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
    options: PackOptions = PackOptions(),
    on_reject: Callable[[str], None] = warn,
) -> dict:
    """Write ``encoder``'s outputs for every sample of ``source`` as shards in ``out_dir``; returns the manifest.

    ``dtype`` (float16, float32) converts floating outputs before storing them. Shards hold
    ``ENCODE_SHARD_SAMPLES`` samples unless ``options`` set a limit; the encoder runs in this
    process, whatever ``options.processes`` allows. Samples the encoder rejects are reported with
    ``on_reject`` and listed in the manifest's notes. Idempotent for the same source shards,
    encoder and arguments.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
    samples = _encoded_samples(source, encoder, batch_size, keep, dtype, rejected, on_reject)
    return write_shards(
        samples, out_dir, source=ENCODE_SOURCE, args=args, total=total, notes={"rejected": rejected},
        **options.shard_keywords(ENCODE_SHARD_SAMPLES),
    )
