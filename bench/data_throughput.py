"""Data pipeline throughput: raw tar reading vs. the flowmill loader, side by side in one run.

For each kind of sample (pre-decoded ``.npy`` arrays, PNG images, JPEG images) the same
shards are read three ways per worker count (0, 1, 2):

  (a) raw: the standard library's ``tarfile`` reads every member's bytes (stream mode,
      ``extractfile``, as webdataset's reader does), one process per worker (a single
      process for 0 and 1 workers), each reading its share of the shards;
      the processes for 2 workers are started before the clock starts, like flowmill's;
  (a') raw+dec: the same loop gathering each sample's members and decoding it with the
      loader's decoder below (``npy_array`` + ``class_id``; PIL for images), one sample at a
      time: the work a hand-written loop delivering the same arrays does, without batches;
  (b) flowmill: the training loader (``StreamingLoader``, resampled: shard split,
      256-sample shuffle buffer, decoding to tensors, batches of 64) delivers one epoch's
      worth of samples. Its workers live as long as training and hash each shard against its
      manifest's sha256 on their first read only: "flowmill/s" is the steady state (the
      second epoch's worth, after an untimed first), "1st epoch/s" the first epoch's worth
      timed from the loader's creation (worker start and hashing every shard included).

It prints samples/s, the medians of ``--repeats`` interleaved runs, and the ratios (b)/(a)
("ratio"), (b)/(a') ("dec ratio") and first epoch/(a): the median of the ratios taken within
each repeat, so that a burst of load elsewhere, which hits the runs of one repeat alike, does
not pair a lucky raw run with an unlucky one; and the CPU ratio, (a)'s CPU time per sample
over (b)'s (steady state), each summed over all the processes of its side, which the
machine's load moves far less than the wall clock.
Run: ``.venv/bin/python bench/data_throughput.py`` (about 2 minutes on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import functools
import io
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from flowmill.data.decode import class_id, image_uint8, npy_array
from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import write_shards
from flowmill.data.shards import resolve_shards
from flowmill.data.tario import forget_verified

SHARDS = 8
BATCH = 64


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def make_samples(kind: str, count: int, rng: np.random.Generator):
    # Smooth random images so PNG/JPEG sizes are those of natural-ish images, not of noise.
    base = rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    for index in range(count):
        small = base[index % 16]
        if kind == "npy":
            payload = {"npy": npy_bytes(rng.standard_normal((4, 32, 32)).astype(np.float16))}  # a VAE latent
        else:
            image = np.asarray(Image.fromarray(small).resize((64, 64), Image.BICUBIC))
            payload = {kind: image_bytes(image, "PNG" if kind == "png" else "JPEG")}
        yield {"__key__": f"s{index:07d}", "cls": str(index % 10), **payload}


def decode_npy(sample: dict) -> dict:
    return {"x": npy_array(sample["npy"]), "cls": class_id(sample["cls"])}


def decode_png(sample: dict) -> dict:
    return {"x": image_uint8(sample["png"], 3), "cls": class_id(sample["cls"])}


def decode_jpg(sample: dict) -> dict:
    return {"x": image_uint8(sample["jpg"], 3), "cls": class_id(sample["cls"])}


DECODERS = {"npy": decode_npy, "png": decode_png, "jpg": decode_jpg}


def raw_count(urls: list[str]) -> int:
    """Samples in ``urls`` read with the standard library only (every member's bytes)."""
    keys = 0
    last = None
    for url in urls:
        with tarfile.open(url, mode="r|") as archive:
            for member in archive:
                if member.isreg():
                    archive.extractfile(member).read()
                    key = member.name.split(".", 1)[0]
                    keys += key != last
                    last = key
    return keys


def raw_decoded_count(urls: list[str], decode) -> int:
    """Samples in ``urls`` read as ``raw_count`` does, each also decoded by ``decode`` (the
    loader's decoder) from its members' bytes, one sample at a time."""
    keys = 0
    sample: dict = {}
    for url in urls:
        with tarfile.open(url, mode="r|") as archive:
            for member in archive:
                if member.isreg():
                    data = archive.extractfile(member).read()
                    key, field = member.name.split(".", 1)
                    if key != sample.get("__key__"):
                        if sample:
                            decode(sample)
                        keys += 1
                        sample = {"__key__": key}
                    sample[field] = data
    if sample:
        decode(sample)
    return keys


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU time (user + system) the processes have used so far."""
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def raw_rate(urls: list[str], workers: int, pool, decode=None) -> tuple[float, int, float]:
    """(samples/s, samples, CPU seconds per sample of all its processes) of ``raw_count``, or of
    ``raw_decoded_count`` with ``decode``; ``pool``: ``workers`` processes started beforehand (2+
    workers), so that starting them is not timed."""
    read = raw_count if decode is None else functools.partial(raw_decoded_count, decode=decode)
    processes = [psutil.Process()] + ([] if pool is None else psutil.Process().children())
    started, cpu = time.perf_counter(), cpu_seconds(processes)
    if pool is None:
        count = read(urls)
    else:
        count = sum(pool.map(read, [urls[index::workers] for index in range(workers)]))
    return count / (time.perf_counter() - started), count, (cpu_seconds(processes) - cpu) / count


def pipeline_rate(folder: Path, kind: str, workers: int, first_epoch: bool, count: int) -> tuple[float, int, float]:
    """(samples/s, samples, CPU seconds per sample of the main process and its workers) of the
    training loader (resampled) over ``count`` samples (one epoch's worth).

    ``first_epoch``: timed from the loader's creation, so worker start and hashing every shard
    count. Otherwise the first epoch's worth runs untimed in the same workers and the next is timed.
    """
    if first_epoch:
        forget_verified()  # forked workers inherit the empty record and hash every shard
    others = set(psutil.Process().children())  # the raw side's pool, if any
    loader = StreamingLoader(
        folder, rank=0, world_size=1, batch_size=BATCH, num_workers=workers, seed=0, decode=DECODERS[kind],
        shuffle_buffer=256, resampled=True,
    )
    batches = iter(loader)
    if not first_epoch:
        warmed = 0
        while warmed < count:
            warmed += len(next(batches)["__key__"])
    processes = [psutil.Process()] + [child for child in psutil.Process().children() if child not in others]
    started, cpu = time.perf_counter(), cpu_seconds(processes)
    delivered = 0
    while delivered < count:
        batch = next(batches)
        assert isinstance(batch["x"], torch.Tensor)
        delivered += len(batch["__key__"])
    rate = delivered / (time.perf_counter() - started)
    cpu = (cpu_seconds(processes) - cpu) / delivered
    batches.close()
    return rate, delivered, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=6144, help="array samples (images: a twelfth of it)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell; medians are printed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("npy", "png", "jpg"):
            count = args.samples if kind == "npy" else args.samples // 12
            folder = Path(tmp) / kind
            write_shards(make_samples(kind, count, rng), folder, source=f"bench-{kind}", args={},
                         shard_samples=-(-count // SHARDS), progress=False)
            urls = resolve_shards(folder)
            megabytes = sum(Path(url).stat().st_size for url in urls) / 1e6
            raw_count(urls)  # warm the page cache so both sides read from memory
            for workers in (0, 1, 2):
                raws, decodeds, flows, firsts = [], [], [], []
                pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
                for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits all sides
                    raws.append(raw_rate(urls, workers, pool))
                    decodeds.append(raw_rate(urls, workers, pool, DECODERS[kind]))
                    firsts.append(pipeline_rate(folder, kind, workers, first_epoch=True, count=count))
                    flows.append(pipeline_rate(folder, kind, workers, first_epoch=False, count=count))
                if pool is not None:
                    pool.close()
                    pool.join()
                assert all(result[1] == count for result in raws + decodeds + flows + firsts)
                rates = [[result[0] for result in results] for results in (raws, decodeds, flows, firsts)]
                # A ratio is taken within one repeat, whose runs follow each other within seconds.
                pairs = ((2, 0), (2, 1), (3, 0))  # flowmill / raw, flowmill / raw+dec, 1st epoch / raw
                ratios = [[top / bottom for top, bottom in zip(rates[upper], rates[lower])] for upper, lower in pairs]
                # CPU time per sample over all the processes of each side compares the work done,
                # whatever share of the cores the machine's load leaves.
                cpu = statistics.median(raw[2] / flow[2] for raw, flow in zip(raws, flows))
                rows.append((kind, workers, count, megabytes, *map(statistics.median, rates + ratios), cpu))
    print(f"{'samples':<7} {'workers':>7} {'count':>5} {'MB':>6} {'raw tar/s':>9} {'raw+dec/s':>9} {'flowmill/s':>10}"
          f" {'1st epoch/s':>11} {'ratio':>5} {'dec ratio':>9} {'1st ratio':>9} {'CPU ratio':>9}")
    for kind, workers, count, megabytes, raw, decoded, flow, first, ratio, decoded_ratio, first_ratio, cpu in rows:
        print(f"{kind:<7} {workers:>7} {count:>5} {megabytes:>6.1f} {raw:>9.0f} {decoded:>9.0f} {flow:>10.0f}"
              f" {first:>11.0f} {ratio:>5.2f} {decoded_ratio:>9.2f} {first_ratio:>9.2f} {cpu:>9.2f}")
    print(f"load average after the run: {' '.join(f'{load:.1f}' for load in os.getloadavg())} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
