"""Tests for flowmill.data.commands: the `flowmill data` commands, run through the CLI entry point."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flowmill.cli import main
from flowmill.data.pack import write_shards
from flowmill.data.text_tokenizer import TextTokenizer, train_text_tokenizer
from flowmill.data.video import encode_mp4
from tests.encode_helpers import caption_dataset, mmdit_run_dir
from tests.helpers import shard_members


def run(argv: list[str]) -> int:
    return main(argv)


def test_pack_digits_then_again(tmp_path, capsys):
    assert run(["data", "pack", "builtin:digits", str(tmp_path / "d"), "--shard-samples", "600", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert [shard["samples"] for shard in manifest["shards"]] == [600, 600, 597]
    assert run(["data", "pack", "builtin:digits", str(tmp_path / "d"), "--shard-samples", "600", "--quiet"]) == 0
    assert "1797 samples in 3 shards" in capsys.readouterr().out


def test_unknown_pack_source_lists_the_valid_ones(tmp_path, capsys):
    assert run(["data", "pack", "imagenet", str(tmp_path / "d")]) == 2
    assert "choose one of: builtin:digits, builtin:moving-digits, images, text, video" in capsys.readouterr().err


def test_tokenizer_from_files_and_captions(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\nthat is the question\n")
    assert run(["data", "tokenizer", str(tmp_path / "tok"), "--text", str(corpus), "builtin:digit-captions",
                "--vocab-size", "40"]) == 0
    tokenizer = TextTokenizer.load(tmp_path / "tok.model")
    assert tokenizer.decode(tokenizer.encode("that is the question")) == "that is the question"


def test_tokenizer_refuses_non_utf8_text(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert run(["data", "tokenizer", str(tmp_path / "tok"), "--text", str(bad), "--vocab-size", "8"]) == 2
    assert "latin1.txt is not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["video", "OUT"], "video takes one or more INPUTs before OUT_DIR, got 0"),
    (["builtin:digits", "x", "OUT"], "builtin:digits takes no INPUT before OUT_DIR, got 1: x"),
    (["images", "a", "b", "OUT"], "images takes one INPUT"),
    (["video", "a.mp4", "OUT", "--tokenizer", "t.model"], "--tokenizer applies to text, not to video"),
    (["builtin:digits", "OUT", "--frames", "8"], "--frames applies to builtin:moving-digits, video, not to builtin:digits"),
    (["text", "a.txt", "OUT"], "text needs --tokenizer"),
    (["images", "nowhere", "OUT"], "nowhere does not exist"),
])
def test_pack_usage_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / arg) if arg in ("OUT", "nowhere") else arg for arg in argv]
    assert run(["data", "pack", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_shard_bytes_limit_the_shards(tmp_path, capsys):
    assert run(["data", "pack", "builtin:moving-digits", str(tmp_path / "d"), "--num-clips", "12", "--frames", "2",
                "--shard-bytes", "40KB", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3 and manifest["made"]["params"]["shard_bytes"] == 40_000


def test_pack_every_source_from_the_command_line(tmp_path, capsys):
    assert run(["data", "pack", "builtin:moving-digits", str(tmp_path / "md"), "--num-clips", "10", "--frames", "4",
                "--size", "32", "--shard-samples", "4", "--processes", "2", "--quiet"]) == 0
    assert "10 samples in 3 shards, fields cls, json, npy, txt" in capsys.readouterr().out
    (tmp_path / "v.mp4").write_bytes(encode_mp4(np.zeros((9, 16, 16, 3), np.uint8)))
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    assert run(["data", "pack", "video", str(tmp_path / "v.mp4"), str(tmp_path / "bad.mp4"), str(tmp_path / "vid"),
                "--frames", "3", "--size", "8", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "3 samples in 1 shards" in captured.out and "1 inputs skipped" in captured.out
    assert captured.err.startswith("skipping ") and "bad.mp4: PyAV cannot open it" in captured.err
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"to be or not to be, line {index}\n" for index in range(200)))
    train_text_tokenizer(corpus.read_text().splitlines(), tmp_path / "tok", vocab_size=40, newlines=True)
    assert run(["data", "pack", "text", str(corpus), str(tmp_path / "txt"), "--tokenizer", str(tmp_path / "tok.model"),
                "--seq-len", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'txt' / 'train'}: " in out and f"{tmp_path / 'txt' / 'val'}: " in out
    (tmp_path / "imgs").mkdir()
    assert run(["data", "pack", "images", str(tmp_path / "imgs"), str(tmp_path / "i"), "--quiet"]) == 2
    assert "imgs holds no images" in capsys.readouterr().err


def pack_small(folder, count: int, per_shard: int) -> list[str]:
    """A dataset of ``count`` tiny png+txt samples; returns the keys."""
    png = io.BytesIO()
    Image.new("L", (4, 4), 9).save(png, format="PNG")
    samples = [{"__key__": f"k{index:03d}", "png": png.getvalue(), "txt": f"t{index}"} for index in range(count)]
    write_shards(samples, folder, source="test", args={}, shard_samples=per_shard, progress=False)
    return [sample["__key__"] for sample in samples]


def test_inspect_json_accounts_for_every_key(tmp_path, capsys):
    keys = pack_small(tmp_path / "d", count=100, per_shard=13)
    assert run(["data", "inspect", str(tmp_path / "d"), "--world-size", "3", "--num-workers", "2", "--batch-size", "4",
                "--drop-last", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result) == ["dropped", "ranks", "skipped"]
    assert [rank["rank"] for rank in result["ranks"]] == [0, 1, 2]
    delivered = [key for rank in result["ranks"] for key in rank["keys"]]
    dropped = [entry["key"] for entry in result["dropped"]]
    assert sorted(delivered + dropped) == keys
    assert result["skipped"] == [] and 0 < len(dropped) <= 3 * 2 * 3
    assert all(set(entry) == {"key", "reason"} for entry in result["dropped"])


def test_inspect_text_output_and_errors(tmp_path, capsys):
    pack_small(tmp_path / "d", count=25, per_shard=13)
    assert run(["data", "inspect", str(tmp_path / "d"), "--world-size", "2", "--num-workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  k0") and "skipped: 0" in lines and "dropped: 0" in lines
    assert sorted(line for line in lines if line.startswith("rank ")) in (
        ["rank 0: 12 samples", "rank 1: 13 samples"], ["rank 0: 13 samples", "rank 1: 12 samples"]
    )
    assert run(["data", "inspect", str(tmp_path / "d"), "--world-size", "2", "--num-workers", "2"]) == 2
    assert "needs at least 4" in capsys.readouterr().err
    shard = tmp_path / "d" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert run(["data", "inspect", str(tmp_path / "d"), "--world-size", "1", "--num-workers", "0"]) == 2
    assert "does not match its manifest" in capsys.readouterr().err
    assert run(["data", "inspect", str(tmp_path / "d"), "--world-size", "1", "--num-workers", "0", "--no-verify"]) == 0
    capsys.readouterr()
    os.truncate(shard, shard.stat().st_size // 2)
    assert run(["data", "inspect", str(tmp_path / "d"), "--world-size", "1", "--num-workers", "0", "--no-verify"]) == 0
    counts = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("rank 0:", "skipped:"))]
    delivered = int(counts[0].split()[2])
    assert counts[1] == f"skipped: {25 - delivered} ({25 - delivered} in unreadable shards)"


def test_encode_command(tmp_path, capsys):
    mmdit_run_dir(tmp_path / "run")
    caption_dataset(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        # k3 has no txt to keep: skipped, the rest is written
        assert run(["data", "encode", str(tmp_path / "data"), str(tmp_path / "emb"), "--encoder",
                    "flowmill.train.encoders:text_encoder", "--arg", f"run_dir={tmp_path / 'run'}",
                    "--dtype", "float16", "--keep", "txt", "--quiet", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "9 samples in 1 shards" in captured.out and "1 samples skipped" in captured.out
    assert "skipping k3" in captured.err
    assert np.load(io.BytesIO(shard_members(tmp_path / "emb")["k0.vec_emb.npy"])).dtype == np.float16


def test_encode_command_errors_are_one_line(tmp_path, capsys):
    caption_dataset(tmp_path / "data")
    assert run(["data", "encode", str(tmp_path / "data"), str(tmp_path / "emb"), "--encoder", "flowmill.data.encode"]) == 2
    assert "must be 'module:callable'" in capsys.readouterr().err
