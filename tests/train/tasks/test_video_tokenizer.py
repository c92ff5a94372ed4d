"""The video tokenizer end to end through the CLI: training with reconstruction metrics and GIFs,
`flowmill reconstruct` (in this process), exact resume under ZeRO-3 on 2 processes, tokens as data for an MMDiT
generator whose samples decode back to clips, and the inputs refused before any work."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowmill.cli import main
from flowmill.data.builtin import MovingDigitsSpec, moving_digits_caption_lines, moving_digits_clip, pack_moving_digits
from flowmill.data.pack import PackOptions
from flowmill.data.text_tokenizer import train_text_tokenizer
from flowmill.data.video import read_video
from flowmill.errors import UsageError
from flowmill.models.fsq import FSQ
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.tasks.video_tokenizer import VideoTokenizerTask
from flowmill.weights import load_flat, save_flat
from tests.helpers import REPO, flowmill, flowmill_ok, read_jsonl, rewound_copy, shard_members

pytestmark = pytest.mark.slow

VIDEO_TOKENIZER_TINY = REPO / "configs" / "video_tokenizer_tiny.yaml"
GENERATOR = REPO / "configs" / "mmdit_video_tokens.yaml"
SPEC = MovingDigitsSpec(frames=4, size=16)  # the clips video_tokenizer_tiny.yaml reads
K, LEVELS = 4, (5, 5, 5)  # its tokens per clip and FSQ levels


def video_tokenizer_overrides(clips: Path, run_dir: Path, **extra) -> list[str]:
    values = {"data.path": clips, "run.dir": run_dir, **extra}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("moving") / "clips"
    pack_moving_digits(folder, num_clips=48, spec=SPEC, options=PackOptions(shard_samples=16, progress=False))
    return folder


@pytest.fixture(scope="module")
def video_tokenizer_run(clips, tmp_path_factory) -> Path:
    """A finished 8-step tokenizer run, evaluated and sampled at steps 4 and 8 (read-only)."""
    root = tmp_path_factory.mktemp("tokenizer")
    flowmill_ok("train", str(VIDEO_TOKENIZER_TINY), *video_tokenizer_overrides(
        clips, root / "run", **{"trainer.eval_every_steps": 4, "trainer.sample_every_steps": 4}), cwd=root)
    return root / "run"


def test_training_logs_flow_loss_and_reconstruction_quality_per_token_count(video_tokenizer_run):
    records = {r["step"]: r for r in read_jsonl(video_tokenizer_run / "logs" / "metrics.jsonl")}
    assert sorted(records) == list(range(1, 9))
    for step in (4, 8):
        metrics = records[step]
        for k in (1, 2, 4):
            assert 0 < metrics[f"recon/psnr_k{k}"] < 60 and -1 <= metrics[f"recon/ssim_k{k}"] <= 1
            assert metrics[f"val/loss_k{k}"] > 0
        assert metrics["val/loss"] == metrics["val/loss_k4"]
    assert all(math.isfinite(r["train/loss"]) and r["data/skipped"] == 0 for r in records.values())

    gif = Image.open(video_tokenizer_run / "samples" / "recon-00000008.gif")
    assert gif.n_frames == SPEC.frames
    # Two clips (sample.num_per_prompt) by the input and its 3 reconstructions (k = 1, 2, 4), 16 px + 2 px borders, ×3.
    assert gif.size == ((4 * 18 + 2) * 3, (2 * 18 + 2) * 3)
    for name in ("psnr-00000008.png", "ssim-00000008.png"):
        assert Image.open(video_tokenizer_run / "samples" / name).size[0] > 100


def npy_clip(path: Path, index: int, spec: MovingDigitsSpec = SPEC) -> Path:
    clip, _ = moving_digits_clip(index, spec)
    np.save(path, clip)
    return path


def reconstruct(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    """`flowmill reconstruct ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(["reconstruct", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_reconstruct_writes_npy_and_mp4_of_the_input_shape(video_tokenizer_run, tmp_path, capsys):
    inputs = [npy_clip(tmp_path / "a.npy", 1), npy_clip(tmp_path / "b.npy", 2)]
    out = tmp_path / "recon"
    code, stdout, stderr = reconstruct(capsys, video_tokenizer_run, *inputs, "--num-tokens", "2", "--steps", "3", "--out", out)
    assert code == 0, stderr[-3000:]
    assert "from 2 of 4 tokens" in stdout
    for name in ("a", "b"):
        clip = np.load(out / f"{name}.npy")
        assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
        assert read_video(out / f"{name}.mp4").shape == (4, 16, 16, 3)
    # Same seed, same tokens: the same clip again.
    code, _, stderr = reconstruct(capsys, video_tokenizer_run, inputs[0], "--num-tokens", "2", "--steps", "3", "--out",
                                  tmp_path / "again")
    assert code == 0, stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "again" / "a.npy"), np.load(out / "a.npy"))


def test_reconstruct_refuses_or_crops_clips_of_another_shape(video_tokenizer_run, tmp_path, capsys):
    other = npy_clip(tmp_path / "big.npy", 3, MovingDigitsSpec(frames=6, size=24))
    code, _, stderr = reconstruct(capsys, video_tokenizer_run, other, "--num-tokens", "2", "--out", tmp_path / "o")
    assert code == 2
    assert "big.npy: clip is (6, 24, 24, 3), expected (4, 16, 16, 3)" in stderr
    assert not (tmp_path / "o").exists()
    code, _, stderr = reconstruct(capsys, video_tokenizer_run, other, "--num-tokens", "4", "--steps", "2", "--fit", "crop",
                                  "--out", tmp_path / "o")
    assert code == 0, stderr[-3000:]
    assert np.load(tmp_path / "o" / "big.npy").shape == (4, 16, 16, 3)

    short = npy_clip(tmp_path / "short.npy", 3, MovingDigitsSpec(frames=2, size=16))
    for args, message in [
        ((short, "--fit", "crop"), "short.npy: clip has 2 frames, fewer than the 4"),
        ((npy_clip(tmp_path / "ok.npy", 4), "--num-tokens", "5"), "--num-tokens: this tokenizer has K=4 tokens"),
        ((tmp_path / "missing.npy",), "missing.npy: no such file"),
    ]:
        code, _, stderr = reconstruct(capsys, video_tokenizer_run, *args,
                                      *(() if "--num-tokens" in args else ("--num-tokens", "2")), "--out", tmp_path / "x")
        assert code == 2 and message in stderr, stderr
    for args, message in [
        ((npy_clip(tmp_path / "ok.npy", 4),), "--num-tokens: decoding needs the number of tokens K; pass --num-tokens 1..4"),
        (("--num-tokens", "2"), "INPUT: a video tokenizer reconstructs the .mp4 files or .npy clips given"),
        ((npy_clip(tmp_path / "ok.npy", 4), "--num-tokens", "2", "--num-samples", "3"), "--data, --num-samples: only an "
         "autoencoder run reconstructs held-out images"),
    ]:
        code, _, stderr = reconstruct(capsys, video_tokenizer_run, *args, "--out", tmp_path / "x")
        assert code == 2 and message in stderr, stderr


def test_resume_under_zero3_on_two_processes_is_exact(clips, tmp_path):
    """6 steps straight vs resumed from its checkpoint of step 4, both ZeRO-3 on 2 gloo processes."""
    common = {"parallel.zero_stage": 3, "trainer.max_steps": 6, "optim.decay_steps": 6, "checkpoint.every_steps": 2,
              "data.num_workers": 1}
    flowmill_ok("launch", "local", "--nproc", "2", str(VIDEO_TOKENIZER_TINY),
           *video_tokenizer_overrides(clips, tmp_path / "straight", **common), cwd=tmp_path)
    flowmill_ok("resume", str(rewound_copy(tmp_path / "straight", 4, tmp_path / "stopped")), cwd=tmp_path)
    straight = [r["train/loss"] for r in read_jsonl(tmp_path / "straight" / "logs" / "metrics.jsonl")]
    resumed = [r["train/loss"] for r in read_jsonl(tmp_path / "stopped" / "logs" / "metrics.jsonl")]
    assert len(straight) == 6 and resumed == straight


def test_tokens_as_data_train_a_generator_whose_samples_decode_to_clips(clips, video_tokenizer_run, tmp_path, capsys):
    """video → tokens (data encode) → caption-conditioned MMDiT over the codes → generated tokens → clips."""
    tokens = tmp_path / "tokens"
    flowmill_ok("data", "encode", str(clips), str(tokens), "--encoder", "flowmill.train.tasks.video_tokenizer:token_encoder",
           "--arg", f"run_dir={video_tokenizer_run}", "--keep", "txt", "cls", cwd=tmp_path)
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["total_samples"] == 48 and {"tokens.npy", "codes.npy", "txt"} <= set(manifest["fields"])
    members = shard_members(tokens)
    first = sorted(name for name in members if name.endswith(".tokens.npy"))[0]
    ids = np.load(io.BytesIO(members[first]))
    codes = np.load(io.BytesIO(members[first.replace("tokens.npy", "codes.npy")]))
    assert ids.shape == (K,) and codes.shape == (len(LEVELS), 2, 2)
    # The codes image holds token i at grid cell i (row by row).
    fsq = FSQ(LEVELS)
    assert torch.equal(fsq.codes_to_indices(torch.from_numpy(codes).reshape(len(LEVELS), K).T), torch.from_numpy(ids))

    captions = train_text_tokenizer(moving_digits_caption_lines(), tmp_path / "captions", 60, model_type="bpe")
    generator = {
        "data.path": tokens, "text.tokenizer": captions, "flow.token_decoder": video_tokenizer_run,
        "model.in_channels": 3, "model.out_channels": 3, "model.sample_size": 2, "model.pos_embed_max_size": 2,
        "model.depth": 1, "model.txt_dim": 32, "model.vec_dim": 32, "text.dim": 32, "text.depth": 1,
        "trainer.max_steps": 3, "trainer.micro_batch_size": 8, "eval.num_samples": 8, "parallel.zero_stage": 0,
        "sample.steps": 2, "sample.num_per_prompt": 2, "tracking.system_metrics": False, "run.dir": tmp_path / "gen",
    }
    flowmill_ok("train", str(GENERATOR), *[f"{key}={value}" for key, value in generator.items()], cwd=tmp_path)
    assert (tmp_path / "gen" / "samples" / "clips-00000003.gif").is_file()

    out = tmp_path / "generated"
    flowmill_ok("sample", str(tmp_path / "gen"), "--prompt", "digit 3 moves right, digit 7 moves up", "--prompt",
           "digit 1 moves left, digit 2 moves down", "--num-samples", "2", "--steps", "2", "--out", str(out), cwd=tmp_path)
    for name in ("000-000", "000-001", "001-000", "001-001"):
        clip = np.load(out / f"{name}.npy")
        assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
        assert read_video(out / f"{name}.mp4").shape == (4, 16, 16, 3)
    assert Image.open(out / "grid.gif").n_frames == 4
    assert [r["prompt"] for r in read_jsonl(out / "samples.jsonl")][2] == "digit 1 moves left, digit 2 moves down"

    # Another tokenizer's weights cannot decode these tokens: refused before training.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(video_tokenizer_run, other)
    for shard in (other / (other / "latest").read_text().strip()).glob("ema-rank-*.safetensors"):
        save_flat({name: value + 0.01 if name.startswith("params/") else value
                   for name, value in load_flat(shard).items()}, shard)
    refused = flowmill("train", str(GENERATOR), *[f"{key}={value}" for key, value in
                                                  {**generator, "flow.token_decoder": other, "run.dir": tmp_path / "g2"}.items()],
                       cwd=tmp_path)
    assert refused.returncode == 2 and "was encoded by the tokenizer" in refused.stderr, refused.stderr[-2000:]

    # The generator is no tokenizer: reconstruct refuses it.
    code, _, stderr = reconstruct(capsys, tmp_path / "gen", npy_clip(tmp_path / "a.npy", 0), "--num-tokens", "1",
                                  "--out", tmp_path / "o")
    assert code == 2 and "reconstruct needs a video tokenizer run" in stderr


def test_reconstruction_metrics_decode_with_recon_steps(tmp_path):
    """recon.steps (1: the decoder's estimate of the clip, its best in PSNR) sets the decoder steps
    of the reconstruction metrics, apart from sample.steps; without it they use sample.steps."""
    clips = torch.rand(2, SPEC.frames, 3, SPEC.size, SPEC.size) * 2 - 1
    for overrides, steps in ((["recon.steps=1", "sample.steps=3"], 1), (["sample.steps=3"], 3)):
        task = VideoTokenizerTask(load_config(VIDEO_TOKENIZER_TINY, overrides), None, RunDir(tmp_path))
        model = task.build_model().eval()
        indices = model.encode(clips).indices
        expected = model.decode(indices[:, :2], steps=steps, generator=torch.Generator().manual_seed(task.cfg.trainer.seed))
        assert task.recon_steps == steps
        assert torch.equal(task.reconstructions(model, clips)[2], expected)
    with pytest.raises(UsageError, match="recon.steps: must be at least 1 decoder step"):
        load_config(VIDEO_TOKENIZER_TINY, ["recon.steps=0"])
