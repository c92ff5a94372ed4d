"""Frozen encoders of a trained run, for ``flowmill data encode`` to cache their outputs.

``flowmill data encode DATASET OUT --encoder flowmill.train.encoders:text_encoder --arg run_dir=RUN``
calls ``text_encoder(run_dir=RUN)``; the encoder it returns follows the protocol of
``flowmill.data.encode`` (``decode``, ``__call__``, ``description``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from flowmill.data.tokenizer import Tokenizer
from flowmill.models.text_encoder import TextEncoder, TextEncoderConfig
from flowmill.train.run_dir import CONFIG_YAML
from flowmill.train.tasks.mmdit import TEXT_ENCODER_FILE, TOKENIZER_FILE


class CaptionEncoder:
    """The MMDiT's frozen text encoder over the ``txt`` captions: outputs ``txt_emb`` (L, D),
    ``txt_mask`` (L,) and ``vec_emb`` (D,) per sample."""

    def __init__(self, text_encoder: torch.nn.Module, tokenizer: Tokenizer, max_length: int, description: dict):
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.description = description

    def decode(self, sample: dict) -> dict:
        ids, mask = self.tokenizer.encode_padded([sample["txt"].decode("utf-8")], self.max_length)
        return {"ids": ids[0], "mask": mask[0]}

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        txt, vec = self.text_encoder(batch["ids"], batch["mask"])
        return {"txt_emb": txt, "txt_mask": batch["mask"], "vec_emb": vec}


def text_encoder(run_dir: str) -> CaptionEncoder:
    """The text encoder of an MMDiT run: its config's ``text`` section, tokenizer and frozen weights."""
    folder = Path(run_dir)
    config_path = folder / CONFIG_YAML
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a flowmill run dir (no {CONFIG_YAML})")
    section = yaml.safe_load(config_path.read_text()).get("text")
    if not section:
        raise ValueError(f"{config_path} has no text section: the run has no text encoder")
    cfg = TextEncoderConfig(**section)
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
    model = TextEncoder(cfg, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    model.load_state_dict(load_file(folder / TEXT_ENCODER_FILE))
    weights = hashlib.sha256((folder / TEXT_ENCODER_FILE).read_bytes()).hexdigest()
    return CaptionEncoder(model, tokenizer, cfg.max_length, {"text_encoder": section, "weights_sha256": weights})
