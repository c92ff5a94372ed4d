"""Tests for flowmill.data.decode through the loader on the built-in digits."""

import io

import pytest
import torch
from PIL import Image, UnidentifiedImageError

from flowmill.data.builtin import digit_captions, pack_builtin_digits
from flowmill.data.decode import ImageTextDecoder
from flowmill.data.loader import StreamingLoader
from flowmill.data.tokenizer import Tokenizer, train_tokenizer


def test_digit_batches_for_a_text_to_image_model(tmp_path):
    pack_builtin_digits(tmp_path / "digits", progress=False)
    tokenizer = Tokenizer.load(train_tokenizer(digit_captions(), tmp_path / "tok", vocab_size=32))
    decode = ImageTextDecoder(tokenizer=tokenizer, max_len=24)
    loader = StreamingLoader(tmp_path / "digits", rank=0, world_size=2, batch_size=4, num_workers=1, seed=0,
                             decode=decode, shuffle_buffer=16)
    batch = next(iter(loader))
    assert batch["img"].shape == (4, 1, 32, 32) and batch["img"].dtype == torch.float32
    assert -1.0 <= batch["img"].min() < 0 < batch["img"].max() <= 1.0
    assert batch["txt_ids"].shape == (4, 24) and batch["txt_mask"].shape == (4, 24)
    for ids, mask, caption, label in zip(batch["txt_ids"], batch["txt_mask"], batch["txt"], batch["cls"]):
        assert caption == digit_captions()[int(label)]
        assert tokenizer.decode(ids[mask].tolist()) == caption
        assert (ids[~mask] == tokenizer.pad_id).all()


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def test_wrong_size_and_missing_fields_raise():
    decode = ImageTextDecoder(size=32)
    assert decode({"png": png(32), "txt": b"a"})["img"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"expected \(32, 32\)"):
        decode({"png": png(16), "txt": b"a"})
    with pytest.raises(KeyError, match="missing field 'png' .*has: txt"):
        decode({"__key__": "k", "txt": b"a"})
    with pytest.raises(UnidentifiedImageError):
        decode({"png": b"not an image", "txt": b"a"})
