"""Helpers for the tests of `flowmill data encode`: a dataset of captions, a run dir with a text encoder, a tiny encoder."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from flowmill.data.pack import write_shards
from flowmill.data.text_tokenizer import TextTokenizer, train_text_tokenizer
from flowmill.models.text_encoder import TextEncoder, TextEncoderConfig

CAPTIONS = ["a red cat", "a blue dog", "two green birds", "one cat", "the dog sleeps"]


def caption_dataset(folder: Path) -> None:
    """10 samples k0..k9 with ``txt`` (the captions twice) and ``cls``; k3 has no caption, 4 samples a shard."""
    samples = [{"__key__": f"k{index}", "txt": caption, "cls": str(index)} for index, caption in enumerate(CAPTIONS * 2)]
    samples[3] = {"__key__": "k3", "cls": "3"}  # no caption: encoders that read txt reject it
    write_shards(samples, folder, source="test", args={}, shard_samples=4, progress=False)


def mmdit_run_dir(folder: Path) -> tuple[TextEncoder, TextTokenizer]:
    """A minimal MMDiT run dir: config.yaml with a text section, tokenizer, frozen text encoder weights."""
    folder.mkdir()
    tokenizer = TextTokenizer.load(train_text_tokenizer(CAPTIONS, folder / "text_tokenizer", vocab_size=40))
    section = {"dim": 16, "depth": 1, "num_heads": 2, "max_length": 8, "seed": 3}
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": "mmdit", "text": section}))
    model = TextEncoder(TextEncoderConfig(**section), tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id,
                        tokenizer.eos_id)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / "text_encoder.safetensors")
    return model, tokenizer


class ByteEncoder:
    """An encoder for the caching machinery alone: a caption's first ``width`` bytes as floats
    (``codes`` (width,), zero-padded) and their sum (``total``, a scalar per sample)."""

    def __init__(self, width: int = 8):
        self.width = width
        self.description = {"encoder": "bytes", "width": width}

    def decode(self, sample: dict) -> dict:
        data = sample["txt"][: self.width].ljust(self.width, b"\0")
        return {"codes": torch.tensor(list(data), dtype=torch.float32)}

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"codes": batch["codes"], "total": batch["codes"].sum(dim=1)}


def byte_encoder(width: int = 8) -> ByteEncoder:
    """Factory for ``--encoder tests.encode_helpers:byte_encoder``."""
    return ByteEncoder(width)
