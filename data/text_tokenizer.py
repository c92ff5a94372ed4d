"""Sentencepiece tokenizers: training one from texts, and a small wrapper to use it.

Special ids are fixed for every flowmill tokenizer: pad 0, unk 1, bos 2, eos 3, so a
padded batch is zeros after the text whatever the vocabulary.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch

from flowmill.data.constants import MODEL_TYPES

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_text_tokenizer(
    texts: Iterable[str],
    out_prefix: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = False,
    seed: int = 0,
    newlines: bool = False,
) -> Path:
    """Train a sentencepiece model on ``texts`` (one sentence each); returns the ``.model`` path.

    Writes ``{out_prefix}.model``. ``vocab_size`` counts the 4 special pieces. With
    ``hard_vocab_limit=False`` it is an upper bound: a tiny corpus (the 10 digit captions)
    yields fewer pieces than asked instead of failing. The same texts and arguments give
    a byte-identical model (one training thread, fixed seed). With ``newlines`` the model
    gets a piece for ``"\\n"``, keeps runs of spaces and adds no space before the first word,
    so multi-line text (a language-model corpus) decodes back exactly, also when it was
    encoded in pieces cut after line breaks.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown tokenizer model_type {model_type!r}; choose one of: {', '.join(MODEL_TYPES)}")
    sentences = [text for text in texts if text.strip()]
    if not sentences:
        raise ValueError("no non-empty text to train a tokenizer on")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        minloglevel=2,
        # No dummy "▁" before the first word either: text encoded in pieces then joins back exactly.
        **({"user_defined_symbols": ["\n"], "remove_extra_whitespaces": False, "add_dummy_prefix": False} if newlines else {}),
    )
    path = Path(f"{out_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


class TextTokenizer:
    """A trained sentencepiece model: text ↔ lists of int ids. Picklable (DataLoader workers)."""

    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a ``.model`` file written by ``train_text_tokenizer``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer model at {path}; train one with `flowmill data tokenizer`")
        return cls(path.read_bytes())

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, special pieces included."""
        return self._processor.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str, max_len: int | None = None, add_eos: bool = True, add_bos: bool = False) -> list[int]:
        """Ids of ``text``; at most ``max_len`` of them, truncating the text but keeping bos/eos."""
        ids = self._processor.encode(text)
        specials = int(add_bos) + int(add_eos)
        if max_len is not None:
            if max_len <= specials:
                raise ValueError(f"max_len={max_len} leaves no room for text next to {specials} special id(s)")
            ids = ids[: max_len - specials]
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def encode_padded(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids of each text (eos kept when truncated), padded: long (N, max_len) and bool mask (N, max_len)."""
        ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        for row, text in enumerate(texts):
            tokens = self.encode(text, max_len=max_len)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad, bos and eos are dropped."""
        return self._processor.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])
