"""Data pipeline throughput: raw tar reading vs. the flowmill loader, side by side in one run.

For each kind of sample (pre-decoded ``.npy`` arrays, PNG images, JPEG images) the same
shards are read twice per worker count (0, 1, 2):

  (a) raw: the standard library's ``tarfile`` reads every member's bytes, one process per
      worker (a single process for 0 and 1 workers), each reading its share of the shards;
  (b) flowmill: the training loader (``StreamingLoader``, resampled: shard split,
      256-sample shuffle buffer, decoding to tensors, batches of 64) delivers one epoch's
      worth of samples. Its workers live as long as training and hash each shard against its
      manifest's sha256 on their first read only: "flowmill/s" is the steady state (the
      second epoch's worth, after an untimed first), "1st epoch/s" the first epoch's worth
      timed from the loader's creation (worker start and hashing every shard included).

It prints samples/s, the medians of ``--repeats`` interleaved runs, and the ratios to (a):
the median of the ratios taken within each repeat, so that a burst of load elsewhere, which
hits the runs of one repeat alike, does not pair a lucky raw run with an unlucky one; for 0
workers also the CPU ratio, raw CPU time per sample over flowmill's (steady state), which the
machine's load barely moves.
Run: ``.venv/bin/python bench/data_throughput.py`` (about 7 minutes on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
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


def raw_rate(urls: list[str], workers: int) -> tuple[float, int, float]:
    """(samples/s, samples, this process's CPU seconds per sample)."""
    started, cpu = time.perf_counter(), time.process_time()
    if workers <= 1:
        count = raw_count(urls)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            count = sum(pool.map(raw_count, [urls[index::workers] for index in range(workers)]))
    return count / (time.perf_counter() - started), count, (time.process_time() - cpu) / count


def pipeline_rate(folder: Path, kind: str, workers: int, first_epoch: bool, count: int) -> tuple[float, int, float]:
    """(samples/s, samples, this process's CPU seconds per sample) of the training loader
    (resampled) over ``count`` samples (one epoch's worth).

    ``first_epoch``: timed from the loader's creation, so worker start and hashing every shard
    count. Otherwise the first epoch's worth runs untimed in the same workers and the next is timed.
    """
    if first_epoch:
        forget_verified()  # forked workers inherit the empty record and hash every shard
    loader = StreamingLoader(
        folder, rank=0, world_size=1, batch_size=BATCH, num_workers=workers, seed=0, decode=DECODERS[kind],
        shuffle_buffer=256, resampled=True,
    )
    batches = iter(loader)
    if not first_epoch:
        warmed = 0
        while warmed < count:
            warmed += len(next(batches)["__key__"])
    started, cpu = time.perf_counter(), time.process_time()
    delivered = 0
    while delivered < count:
        batch = next(batches)
        assert isinstance(batch["x"], torch.Tensor)
        delivered += len(batch["__key__"])
    rate = delivered / (time.perf_counter() - started)
    cpu = (time.process_time() - cpu) / delivered
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
                raws, flows, firsts = [], [], []
                for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits all sides
                    raws.append(raw_rate(urls, workers))
                    firsts.append(pipeline_rate(folder, kind, workers, first_epoch=True, count=count))
                    flows.append(pipeline_rate(folder, kind, workers, first_epoch=False, count=count))
                assert all(result[1] == count for result in raws + flows + firsts)
                rates = [[result[0] for result in results] for results in (raws, flows, firsts)]
                # A ratio is taken within one repeat, whose runs follow each other within seconds.
                ratios = [[side / raw for side, raw in zip(rates[index], rates[0])] for index in (1, 2)]
                # With 0 workers both sides run in this process only: their CPU time per sample
                # compares the work done, whatever share of the cores the machine's load leaves.
                cpu = statistics.median(raw[2] / flow[2] for raw, flow in zip(raws, flows)) if workers == 0 else None
                rows.append((kind, workers, count, megabytes, *map(statistics.median, rates + ratios), cpu))
    print(f"{'samples':<7} {'workers':>7} {'count':>5} {'MB':>6} {'raw tar/s':>9} {'flowmill/s':>10}"
          f" {'1st epoch/s':>11} {'ratio':>5} {'1st ratio':>9} {'CPU ratio':>9}")
    for kind, workers, count, megabytes, raw, flow, first, ratio, first_ratio, cpu in rows:
        print(f"{kind:<7} {workers:>7} {count:>5} {megabytes:>6.1f} {raw:>9.0f} {flow:>10.0f} {first:>11.0f}"
              f" {ratio:>5.2f} {first_ratio:>9.2f} {'-' if cpu is None else f'{cpu:.2f}':>9}")
    print(f"load average after the run: {' '.join(f'{load:.1f}' for load in os.getloadavg())} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
