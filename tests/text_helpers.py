"""Helpers for the flow-LM tests: a tiny packed text dataset and overrides for configs/flm_tiny.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

FLM_TINY = REPO / "configs" / "flm_tiny.yaml"
FMLM_TINY = REPO / "configs" / "fmlm_tiny.yaml"
MDLM_TINY = REPO / "configs" / "mdlm_tiny.yaml"
SEQ_LEN = 16
# 6 steps on one LR curve, evaluated and sampled at 3 and 6: a stopped run resumes at step 3.
SIX_STEPS = {
    "trainer.max_steps": 6, "optim.decay_steps": 6, "checkpoint.every_steps": 3,
    "trainer.eval_every_steps": 3, "trainer.sample_every_steps": 3,
}


@dataclass
class TinyText:
    """Packed text: ``root/train``, ``root/val`` and the tokenizer they were packed with."""

    root: Path
    tokenizer: Path
    vocab_size: int

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def val(self) -> Path:
        return self.root / "val"


def pack_tiny_text(root: Path, chars: int = 40_000, vocab_size: int = 64, seq_len: int = SEQ_LEN) -> TinyText:
    """The first ``chars`` characters of tinyshakespeare: a sentencepiece tokenizer and shards of ``seq_len`` tokens."""
    from flowmill.data.builtin import tinyshakespeare_path
    from flowmill.data.pack import PackOptions
    from flowmill.data.text import pack_text
    from flowmill.data.text_tokenizer import TextTokenizer, train_text_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    text = tinyshakespeare_path().read_text(encoding="utf-8")[:chars]
    (root / "corpus.txt").write_text(text)
    tokenizer = train_text_tokenizer(text.splitlines(), root / "text_tokenizer", vocab_size=vocab_size, newlines=True)
    pack_text([str(root / "corpus.txt")], root, text_tokenizer_path=tokenizer, seq_len=seq_len,
              options=PackOptions(shard_samples=128, progress=False))
    return TinyText(root, tokenizer, TextTokenizer.load(tokenizer).vocab_size)


def flm_overrides(data: TinyText, run_dir: Path, **extra) -> list[str]:
    """Overrides pointing configs/flm_tiny.yaml (or fmlm_tiny.yaml, mdlm_tiny.yaml) at ``data`` and ``run_dir``."""
    values = {
        "data.path": str(data.train),
        "eval.path": str(data.val),
        "run.dir": str(run_dir),
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def flm_model_overrides(data: TinyText) -> dict:
    """The overrides of a run that trains its own text model (FLM, MDLM): tokenizer and the model's vocabulary and length."""
    return {"text.tokenizer": str(data.tokenizer), "model.vocab_size": data.vocab_size, "model.seq_len": SEQ_LEN}
