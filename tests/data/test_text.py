"""Tests for flowmill.data.text: text files → fixed-length token sequences with a held-out split."""

import io
import tarfile

import numpy as np
import pytest

from flowmill.data import text as text_module
from flowmill.data.builtin import TINYSHAKESPEARE
from flowmill.data.pack import PackOptions
from flowmill.data.text import chunks, pack_text, split_at_line
from flowmill.data.text_tokenizer import EOS_ID, TextTokenizer, train_text_tokenizer

POEM = "".join(f"line {index}: the quick brown fox\n  jumps over the lazy dog {index % 7}\n" for index in range(60))


def sequences(folder) -> list[np.ndarray]:
    arrays = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            arrays.update({member.name: np.load(io.BytesIO(tar.extractfile(member).read())) for member in tar})
    return [arrays[name] for name in sorted(arrays)]


def test_split_and_chunks_keep_every_character():
    train, val = split_at_line(POEM, 0.1)
    assert train + val == POEM and train.endswith("\n")
    assert 0.08 < len(val) / len(POEM) < 0.13
    assert split_at_line(POEM, 0.0) == (POEM, "")
    pieces = chunks(POEM, 100)
    assert "".join(pieces) == POEM and len(pieces) > 10 and all(piece.endswith("\n") for piece in pieces)


def test_files_become_token_sequences_with_a_held_out_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_CHARS", 200)  # several tokenization jobs per file
    (tmp_path / "a.txt").write_text(POEM)
    (tmp_path / "b.txt").write_text(POEM.upper())
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    text_tokenizer_path = train_text_tokenizer(POEM.splitlines() + POEM.upper().splitlines(), tmp_path / "tok", vocab_size=120,
                                     newlines=True)
    tokenizer = TextTokenizer.load(text_tokenizer_path)
    inputs = [str(tmp_path / name) for name in ("a.txt", "latin.txt", "missing.txt", "b.txt")]
    lines = []
    manifests = pack_text(inputs, tmp_path / "out", text_tokenizer_path=text_tokenizer_path, seq_len=32, val_fraction=0.1,
                          options=PackOptions(shard_samples=8, processes=2, progress=False), on_reject=lines.append)
    assert sorted(manifests) == ["train", "val"] and manifests["train"]["fields"] == ["tokens.npy"]
    assert len(lines) == 2 and "latin.txt is not UTF-8" in lines[0] and "missing.txt does not exist" in lines[1]
    train = sequences(tmp_path / "out" / "train")
    assert all(sequence.shape == (32,) and sequence.dtype == np.int32 for sequence in train)
    ids = np.concatenate(train).tolist()
    first_eos = ids.index(EOS_ID)
    expected_train = split_at_line(POEM, 0.1)[0]
    assert tokenizer.decode(ids[:first_eos]) == expected_train  # line breaks and indentation survive
    notes = manifests["train"]["made"]["notes"]
    assert notes["tokens"] == len(ids) + notes["tokens_dropped"] and notes["tokens_dropped"] < 32
    val_ids = np.concatenate(sequences(tmp_path / "out" / "val")).tolist()
    assert tokenizer.decode(val_ids[: val_ids.index(EOS_ID)]) == split_at_line(POEM, 0.1)[1]
    again = pack_text(inputs[:1] + inputs[3:], tmp_path / "again", text_tokenizer_path=text_tokenizer_path, seq_len=32,
                      options=PackOptions(shard_samples=8, processes=1, progress=False), on_reject=lines.append)
    assert [s["sha256"] for s in again["train"]["shards"]] == [s["sha256"] for s in manifests["train"]["shards"]]


def test_too_little_text_says_so(tmp_path):
    (tmp_path / "a.txt").write_text("tiny text\n" * 3)
    text_tokenizer_path = train_text_tokenizer(["tiny text"], tmp_path / "tok", vocab_size=16)
    with pytest.raises(ValueError, match="the val split has \\d+ tokens, fewer than one sequence of 16"):
        pack_text([str(tmp_path / "a.txt")], tmp_path / "out", text_tokenizer_path=text_tokenizer_path, seq_len=16,
                  val_fraction=0.3, options=PackOptions(progress=False), on_reject=lambda line: None)
    with pytest.raises(ValueError, match="no usable text"):
        pack_text([str(tmp_path / "none.txt")], tmp_path / "out", text_tokenizer_path=text_tokenizer_path, seq_len=4,
                  options=PackOptions(progress=False), on_reject=lambda line: None)


def test_tinyshakespeare_is_the_built_in_corpus(tmp_path):
    text_tokenizer_path = train_text_tokenizer(["First Citizen", "Before we proceed"], tmp_path / "tok", vocab_size=40)
    manifests = pack_text([TINYSHAKESPEARE], tmp_path / "out", text_tokenizer_path=text_tokenizer_path, seq_len=4096,
                          options=PackOptions(progress=False), on_reject=lambda line: None)
    assert manifests["train"]["made"]["params"]["args"]["files"][0].endswith("shared/data/tinyshakespeare/input.txt")
    assert manifests["train"]["total_samples"] > 5 * manifests["val"]["total_samples"] > 0
    assert manifests["train"]["made"]["notes"]["newlines_kept"] is False
