"""`flowmill sample`: PNG per sample, grid.png, samples.jsonl, from the EMA weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import flowmill

pytestmark = pytest.mark.slow


def test_sample_writes_pngs_grid_and_index(finished_run, tmp_path):
    out = tmp_path / "out"
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    result = flowmill(
        "sample", str(finished_run), "--prompt", prompts[0], "--prompt", prompts[1],
        "--num-samples", "3", "--steps", "2", "--cfg", "2.0", "--seed", "1", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [prompts[0]] * 3 + [prompts[1]] * 3
    for line in lines:
        image = Image.open(out / line["file"])
        assert image.size == (32, 32) and image.mode == "L"
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (3 * 34 + 2), 2 * (2 * 34 + 2))  # 3 per row, one row per prompt, upscaled 2x

    # Same seed, same images; a checkpoint folder works as the source too.
    again = tmp_path / "again"
    checkpoint = finished_run / "checkpoints" / "step-00000004"
    result = flowmill(
        "sample", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1],
        "--num-samples", "3", "--steps", "2", "--cfg", "2.0", "--seed", "1", "--out", str(again),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.asarray(Image.open(again / "grid.png")), np.asarray(grid))


def test_unknown_sampler_is_refused(finished_run, tmp_path):
    result = flowmill("sample", str(finished_run), "--prompt", "x", "--sampler", "eulr", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "eulr" in result.stderr and "euler" in result.stderr
