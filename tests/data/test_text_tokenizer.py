"""Tests for flowmill.data.text_tokenizer on the digit captions."""

import pickle

import pytest

from flowmill.data.builtin import digit_captions
from flowmill.data.text_tokenizer import TextTokenizer, train_text_tokenizer


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_digit_captions_round_trip(tmp_path, model_type):
    tokenizer = TextTokenizer.load(train_text_tokenizer(digit_captions(), tmp_path / "digits", vocab_size=48, model_type=model_type))
    assert 4 < tokenizer.vocab_size <= 48
    for caption in digit_captions():
        ids = tokenizer.encode(caption)
        assert ids[-1] == tokenizer.eos_id and tokenizer.unk_id not in ids
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == caption
    assert len({tuple(tokenizer.encode(caption)) for caption in digit_captions()}) == 10


def test_training_is_deterministic(tmp_path):
    first = train_text_tokenizer(digit_captions(), tmp_path / "a", vocab_size=40, model_type="bpe")
    second = train_text_tokenizer(digit_captions(), tmp_path / "b", vocab_size=40, model_type="bpe")
    assert first.read_bytes() == second.read_bytes()


def test_max_len_truncates_text_but_keeps_specials(tmp_path):
    tokenizer = TextTokenizer.load(train_text_tokenizer(digit_captions(), tmp_path / "t", vocab_size=32))
    full = tokenizer.encode("a handwritten digit seven", add_bos=True)
    short = tokenizer.encode("a handwritten digit seven", max_len=5, add_bos=True)
    assert len(short) == 5 and short[0] == tokenizer.bos_id and short[-1] == tokenizer.eos_id
    assert short[1:4] == full[1:4]
    assert tokenizer.encode("seven", add_eos=False)[-1] != tokenizer.eos_id
    with pytest.raises(ValueError, match="no room"):
        tokenizer.encode("seven", max_len=1)


def test_pickles_for_dataloader_workers(tmp_path):
    tokenizer = TextTokenizer.load(train_text_tokenizer(digit_captions(), tmp_path / "t", vocab_size=32))
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode("a handwritten digit two") == tokenizer.encode("a handwritten digit two")


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="choose one of: unigram, bpe"):
        train_text_tokenizer(digit_captions(), tmp_path / "t", vocab_size=32, model_type="wordpiece")
    with pytest.raises(ValueError, match="no non-empty text"):
        train_text_tokenizer(["", "  "], tmp_path / "t", vocab_size=32)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        TextTokenizer.load(tmp_path / "missing.model")


def test_newlines_tokenizer_keeps_layout_exactly(tmp_path):
    lines = ["First Citizen:", "  Before we proceed any further, hear me speak.", "", "All:", "Speak, speak."]
    tokenizer = TextTokenizer.load(train_text_tokenizer(lines, tmp_path / "t", vocab_size=60, newlines=True))
    text = "First Citizen:\n  Before we proceed,  hear me.\n\nAll:\nSpeak.\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    pieces = text.split("\n", 2)
    joined = tokenizer.encode(pieces[0] + "\n", add_eos=False) + tokenizer.encode("\n".join(pieces[1:]), add_eos=False)
    assert tokenizer.decode(joined) == text
    plain = TextTokenizer.load(train_text_tokenizer(lines, tmp_path / "p", vocab_size=60))
    assert plain.decode(plain.encode(text)) != text  # without newlines, line breaks are lost
