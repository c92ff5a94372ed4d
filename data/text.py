"""Packing plain text for a language model: text files → fixed-length token sequences.

Each file is read as UTF-8 and split in two at a line boundary: the first
``1 - val_fraction`` of its characters go to the ``train`` split, the rest to ``val``
(held-out text). Per split, the files are tokenized with a sentencepiece ``TextTokenizer``,
concatenated with an eos id after each file, and cut into back-to-back sequences of
``seq_len`` ids; the last ``< seq_len`` ids of a split do not fill a sequence and are
dropped (their count is in the manifest's notes). A sample is
``{"__key__": "seq-0000042", "tokens.npy": int32 (seq_len,)}``. The splits are written as
two datasets, ``OUT/train`` and ``OUT/val``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from flowmill.data.builtin import tinyshakespeare_path
from flowmill.data.constants import DEFAULT_SHARD_SAMPLES, TEXT_SOURCE, TINYSHAKESPEARE
from flowmill.data.pack import PackOptions, input_fingerprint, write_shards
from flowmill.data.parallel import parallel_map, warn
from flowmill.data.shards import sha256_file
from flowmill.data.text_tokenizer import EOS_ID, TextTokenizer

SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 16  # characters per tokenization job (cut at a line end): ~16 jobs for tinyshakespeare


def resolve_text_path(name: str) -> Path:
    """The file behind a text input: a path, or ``builtin:tinyshakespeare``."""
    return tinyshakespeare_path() if name == TINYSHAKESPEARE else Path(name)


def read_text(name: str) -> str:
    """A text input's contents; ValueError with one clear line for a missing, non-UTF-8 or empty file."""
    path = resolve_text_path(name)
    if not path.is_file():
        raise ValueError(f"{name} does not exist" if not path.exists() else f"{name} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exn:
        raise ValueError(f"{name} is not UTF-8 text ({exn.reason} at byte {exn.start})") from None
    if not text.strip():
        raise ValueError(f"{name} holds no text")
    return text


def split_at_line(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): ``text`` cut at the line end nearest before ``(1 - val_fraction)`` of its characters."""
    if val_fraction == 0:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    line_end = text.rfind("\n", 0, cut)
    cut = line_end + 1 if line_end >= 0 else cut
    return text[:cut], text[cut:]


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut after the first line end past every ``size`` characters; the pieces join back to ``text``."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


class _Encode:
    """Picklable ``text -> ids`` for pack worker processes."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_eos=False)


def token_stream(texts: list[str], tokenizer: TextTokenizer, processes: int) -> np.ndarray:
    """Ids of every text followed by eos, concatenated: int32 (N,)."""
    jobs = [(index, piece) for index, text in enumerate(texts) for piece in chunks(text, CHUNK_CHARS)]
    encoded = parallel_map(_Encode(tokenizer), [piece for _, piece in jobs], processes)
    ids: list[int] = []
    for position, piece_ids in enumerate(encoded):
        ids.extend(piece_ids)
        if position + 1 == len(jobs) or jobs[position + 1][0] != jobs[position][0]:
            ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int32)


def sequence_samples(ids: np.ndarray, seq_len: int) -> list[dict]:
    """Back-to-back ``seq_len`` windows of ``ids`` as samples ``{"__key__", "tokens.npy"}``; the tail is left out."""
    samples = []
    for index in range(len(ids) // seq_len):
        buffer = io.BytesIO()
        np.save(buffer, ids[index * seq_len : (index + 1) * seq_len])
        samples.append({"__key__": f"seq-{index:07d}", "tokens.npy": buffer.getvalue()})
    return samples


def keeps_newlines(tokenizer: TextTokenizer) -> bool:
    """True if the tokenizer has a piece for line breaks (trained with ``newlines=True``)."""
    return tokenizer.decode(tokenizer.encode("a\nb", add_eos=False)) == "a\nb"


def pack_text(
    inputs: list[str],
    out_dir: str | Path,
    *,
    text_tokenizer_path: str | Path,
    seq_len: int,
    val_fraction: float = 0.1,
    options: PackOptions = PackOptions(),
    on_reject=warn,
) -> dict[str, dict]:
    """Pack text files (or ``builtin:tinyshakespeare``) as token sequences into ``out_dir/train`` and
    ``out_dir/val``; returns ``{split: manifest}`` (no ``val`` when ``val_fraction`` is 0).

    Shards hold ``DEFAULT_SHARD_SAMPLES["text"]`` sequences unless ``options`` set a limit;
    ``options.processes`` tokenize the text. Unusable inputs (missing, not UTF-8, empty) are
    reported with ``on_reject`` and left out.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 token, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokenizer = TextTokenizer.load(text_tokenizer_path)
    texts, used, rejected = [], [], []
    for name in inputs:
        try:
            texts.append(read_text(name))
            used.append(name)
        except ValueError as exn:
            rejected.append({"input": name, "reason": str(exn)})
            on_reject(f"skipping text input: {exn}")
    if not texts:
        raise ValueError(f"no usable text in {', '.join(inputs)}")
    newlines = keeps_newlines(tokenizer)
    if not newlines:
        on_reject(f"note: {text_tokenizer_path} has no line-break piece, line breaks become spaces (train it with --newlines)")
    splits = [split_at_line(text, val_fraction) for text in texts]
    manifests = {}
    for index, split in enumerate(SPLITS if val_fraction > 0 else SPLITS[:1]):
        ids = token_stream([parts[index] for parts in splits], tokenizer, options.processes)
        if len(ids) < seq_len:
            raise ValueError(
                f"the {split} split has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
                "lower --seq-len or change --val-fraction"
            )
        args = {
            "files": [str(resolve_text_path(name).resolve()) for name in used],
            "inputs": input_fingerprint([resolve_text_path(name) for name in used]),
            "text_tokenizer_sha256": sha256_file(text_tokenizer_path), "seq_len": seq_len, "val_fraction": val_fraction,
            "split": split,
        }
        notes = {
            "rejected": rejected, "tokens": int(len(ids)), "tokens_dropped": int(len(ids) % seq_len),
            "vocab_size": tokenizer.vocab_size, "newlines_kept": newlines,
        }
        manifests[split] = write_shards(
            sequence_samples(ids, seq_len), Path(out_dir) / split, source=TEXT_SOURCE, args=args,
            total=len(ids) // seq_len, notes=notes, **options.shard_keywords(DEFAULT_SHARD_SAMPLES[TEXT_SOURCE]),
        )
    return manifests
