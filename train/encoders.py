"""Frozen encoders of a trained run, for ``flowmill data encode`` to cache their outputs.

``flowmill data encode DATASET OUT --encoder flowmill.train.encoders:text_encoder --arg run_dir=RUN``
calls ``text_encoder(run_dir=RUN)``; the encoder it returns follows the protocol of
``flowmill.data.encode`` (``decode``, ``__call__``, ``description``).
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file

from flowmill.data.text_tokenizer import TextTokenizer
from flowmill.errors import UsageError
from flowmill.models.text_encoder import TextEncoder, TextEncoderConfig
from flowmill.run_dir import RunDir


class CaptionEncoder:
    """The MMDiT's frozen text encoder over the ``txt`` captions: outputs ``txt_emb`` (L, D),
    ``txt_mask`` (L,) and ``vec_emb`` (D,) per sample."""

    def __init__(self, text_encoder: torch.nn.Module, tokenizer: TextTokenizer, max_length: int, description: dict):
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
    run = RunDir(run_dir)
    section = run.saved_config().get("text")
    if not section:
        raise UsageError(f"{run.config_file} has no text section: the run has no text encoder")
    cfg = TextEncoderConfig(**section)
    tokenizer = TextTokenizer.load(run.text_tokenizer)
    model = TextEncoder(cfg, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    model.load_state_dict(load_file(run.text_encoder))
    weights = hashlib.sha256(run.text_encoder.read_bytes()).hexdigest()
    return CaptionEncoder(model, tokenizer, cfg.max_length, {"text_encoder": section, "weights_sha256": weights})
