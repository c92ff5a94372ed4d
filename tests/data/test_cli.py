"""Tests for flowmill.data.cli: the `flowmill data` commands, wired into a bare parser."""

import argparse
import json

import pytest

from flowmill.data import cli
from flowmill.data.tokenizer import Tokenizer


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowmill")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_pack_digits_then_again(tmp_path, capsys):
    assert run(["data", "pack", "builtin:digits", str(tmp_path / "d"), "--shard-samples", "600", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert [shard["samples"] for shard in manifest["shards"]] == [600, 600, 597]
    assert run(["data", "pack", "builtin:digits", str(tmp_path / "d"), "--shard-samples", "600", "--quiet"]) == 0
    assert "1797 samples in 3 shards" in capsys.readouterr().out


def test_unknown_pack_source_lists_the_valid_ones(tmp_path, capsys):
    assert run(["data", "pack", "imagenet", str(tmp_path / "d")]) == 2
    assert "choose one of: builtin:digits" in capsys.readouterr().err


def test_tokenizer_from_files_and_captions(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\nthat is the question\n")
    assert run(["data", "tokenizer", str(tmp_path / "tok"), "--text", str(corpus), "builtin:digit-captions",
                "--vocab-size", "40"]) == 0
    tokenizer = Tokenizer.load(tmp_path / "tok.model")
    assert tokenizer.decode(tokenizer.encode("that is the question")) == "that is the question"


def test_tokenizer_refuses_non_utf8_text(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SystemExit, match="latin1.txt is not UTF-8"):
        run(["data", "tokenizer", str(tmp_path / "tok"), "--text", str(bad), "--vocab-size", "8"])
