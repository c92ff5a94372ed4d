"""Tests for flowmill.data.decode: image+caption batches of the digits, npy, generic, clip and token decoding."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from flowmill.data.builtin import digit_captions, pack_builtin_digits
from flowmill.data.decode import ClipDecoder, GenericDecoder, ImageTextDecoder, TokenDecoder, npy_array
from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import PackOptions
from flowmill.data.text_tokenizer import TextTokenizer, train_text_tokenizer
from flowmill.data.video import encode_mp4


def test_digit_batches_for_a_text_to_image_model(tmp_path):
    pack_builtin_digits(tmp_path / "digits", options=PackOptions(progress=False))
    tokenizer = TextTokenizer.load(train_text_tokenizer(digit_captions(), tmp_path / "tok", vocab_size=32))
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


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.int32), np.zeros((2, 3, 4), np.uint8), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.ones((), np.float16), np.zeros((0, 3), np.float32),
])
def test_npy_array_reads_what_numpy_wrote(array):
    decoded = npy_array(npy(array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape and (decoded == array).all()


def test_npy_array_refuses_objects_and_garbage():
    with pytest.raises(ValueError, match="Python objects"):
        npy_array(npy(np.array([{"a": 1}], dtype=object)))
    with pytest.raises(ValueError, match="bad magic"):
        npy_array(b"PK\x03\x04 not numpy")
    with pytest.raises(ValueError, match=r"truncated: 15 bytes for a \(2, 2\) float32 array of 16"):
        npy_array(npy(np.zeros((2, 2), np.float32))[:-1])


def test_generic_decoder_decodes_every_known_field():
    grey = png(8)
    rgb = io.BytesIO()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(rgb, format="JPEG")
    sample = {
        "__key__": "k", "__url__": "u", "png": grey, "jpg": rgb.getvalue(), "npy": npy(np.eye(2)), "txt": b"hi",
        "json": b'{"a": [1, 2]}', "cls": b" 7\n", "tokens.npy": npy(np.array([5, 6], np.int32)), "bin": b"\x00\x01",
        "mp4": encode_mp4(np.full((3, 16, 16, 3), 90, np.uint8)),
    }
    out = GenericDecoder()(sample)
    assert out["png"].shape == (1, 8, 8) and out["png"].dtype == torch.uint8
    assert out["jpg"].shape == (3, 4, 6) and out["jpg"][0].float().mean() > 200
    assert (out["npy"] == np.eye(2)).all() and out["tokens.npy"].tolist() == [5, 6]
    assert out["txt"] == "hi" and out["json"] == {"a": [1, 2]} and out["cls"] == 7 and out["bin"] == b"\x00\x01"
    assert out["mp4"].shape == (3, 16, 16, 3) and abs(float(out["mp4"].mean()) - 90) < 4
    assert "__key__" not in out
    with pytest.raises(ValueError, match="field 'jpg' does not decode"):
        GenericDecoder()({"__key__": "k", "jpg": b"not a jpeg"})
    with pytest.raises(ValueError, match="field 'mp4' does not decode"):
        GenericDecoder()({"__key__": "k", "mp4": b"not a video"})


def test_clip_and_token_decoders_check_shapes():
    clip = np.full((4, 8, 8, 3), 255, np.uint8)
    video = ClipDecoder(frames=4, size=8)({"npy": npy(clip)})["video"]
    assert video.shape == (4, 3, 8, 8) and video.dtype == torch.float32 and torch.all(video == 1.0)
    with pytest.raises(ValueError, match=r"expected \(16, 8, 8, 3\) \(fit crop cuts"):
        ClipDecoder(frames=16, size=8)({"npy": npy(clip)})
    with pytest.raises(ValueError, match="fewer than the 16"):
        ClipDecoder(frames=16, size=8, fit="crop")({"npy": npy(clip)})
    with pytest.raises(ValueError, match=r"expected uint8 \(T, H, W, 3\)"):
        ClipDecoder(frames=4, size=8)({"npy": npy(clip[..., 0])})
    # crop: the first T frames, shorter side resized, centre-cropped (a 2:1 frame keeps its middle half).
    wide = np.zeros((6, 16, 32, 3), np.uint8)
    wide[:, :, 8:24] = 255
    video = ClipDecoder(frames=4, size=8, fit="crop")({"npy": npy(wide)})["video"]
    assert video.shape == (4, 3, 8, 8) and torch.all(video[..., 1:-1] > 0.9)  # squashing would keep the black sides
    tokens = TokenDecoder(seq_len=3, vocab_size=10)({"tokens.npy": npy(np.array([1, 2, 9], np.int32))})["tokens"]
    assert tokens.dtype == torch.long and tokens.tolist() == [1, 2, 9]
    with pytest.raises(ValueError, match="outside the vocabulary of 10"):
        TokenDecoder(seq_len=3, vocab_size=10)({"tokens.npy": npy(np.array([1, 2, 10], np.int32))})
    with pytest.raises(ValueError, match=r"expected integers \(4,\)"):
        TokenDecoder(seq_len=4)({"tokens.npy": npy(np.array([1, 2, 3], np.int32))})
