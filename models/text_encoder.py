"""Text conditioning: frozen transformers text encoders and the tokenizers that feed them.

The MMDiT consumes a sequence embedding ``txt`` (B, L, txt_dim) and a pooled embedding
``vec`` (B, vec_dim). ``TextEncoderConfig.kind`` chooses where they come from:

- ``clip``: a CLIPTextModel; txt = its last hidden states, vec = the hidden state at each
  prompt's end-of-sequence token (how CLIP pools).
- ``t5``: a T5EncoderModel; txt = its last hidden states, vec = their mean over the
  prompt's real tokens. T5 has no pooled output: SD3 takes its pooled vector from CLIP
  alone, but a T5-only MMDiT still needs one, and the mean is the usual choice.
- ``clip+t5``: SD3's arrangement. txt = the CLIP hidden states zero-padded to the T5 width,
  followed by the T5 hidden states along the token axis (B, 2·max_length, t5 width);
  vec = the CLIP pooled vector. (SD3 itself concatenates two CLIPs, L and G, on the
  channel axis before padding; flowmill has one CLIP.)

Each encoder either has random frozen weights built from the config (seeded; the digits
demo and the tests), reading flowmill's sentencepiece tokenizer, or is loaded from a
local transformers folder (``pretrained``, ``t5_pretrained``) that holds the weights and
the encoder's own tokenizer (``PretrainedTokenizer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TextEncoderConfig:
    kind: str = "clip"  # clip | t5 | clip+t5 (see the module docstring)
    tokenizer: str = "datasets/digits/text_tokenizer.model"  # sentencepiece model file of the random-weight encoders
    pretrained: str | None = None  # local transformers folder (weights + tokenizer) of the CLIP (clip, clip+t5) or the T5 (t5)
    t5_pretrained: str | None = None  # kind clip+t5: local transformers folder of the T5
    dim: int = 64  # random weights: width of the CLIP (clip, clip+t5) or of the T5 (t5)
    t5_dim: int = 128  # random weights, kind clip+t5: width of the T5 (>= dim; CLIP states are zero-padded to it)
    depth: int = 2  # random weights: transformer layers of each encoder
    num_heads: int = 4  # random weights: attention heads of each encoder
    max_length: int = 16  # tokens per prompt and encoder, end-of-sequence included; longer prompts are truncated
    seed: int = 0  # seeds the frozen random initialisation
    cached: bool = False  # read txt/vec embeddings cached in the shards (`flowmill data encode`) instead of encoding captions


TEXT_ENCODER_KINDS = ("clip", "t5", "clip+t5")
# transformers model_type values each pretrained folder may hold.
CLIP_MODEL_TYPES = ("clip_text_model", "clip")
T5_MODEL_TYPES = ("t5",)


def _folder_config(folder: str, key: str, model_types: tuple[str, ...]) -> dict:
    """The config.json of a pretrained encoder folder, refused unless its model_type fits."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"text.{key}: {folder} is not a transformers model folder (no config.json)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type == "clip":  # a full CLIPModel folder: the text tower's settings are nested
        config = {**config.get("text_config", {}), "model_type": model_type}
    if model_type not in model_types:
        raise ValueError(f"text.{key}: {folder} holds a {model_type!r} model; expected one of: {', '.join(model_types)}")
    return config


def text_widths(cfg: TextEncoderConfig) -> tuple[int, int]:
    """(txt width, vec width) the encoder produces; the MMDiT's txt_dim and vec_dim must equal them.

    Raises ValueError naming the ``text.*`` key when the kind, a folder or a width is invalid.
    """
    if cfg.kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text.kind: unknown text encoder kind {cfg.kind!r}; choose one of: {', '.join(TEXT_ENCODER_KINDS)}")
    if cfg.t5_pretrained is not None and cfg.kind != "clip+t5":
        raise ValueError(f"text.t5_pretrained: only kind clip+t5 has a second encoder; kind {cfg.kind} uses text.pretrained")
    if cfg.max_length < 2:
        raise ValueError(f"text.max_length: need room for a token and the end-of-sequence, got {cfg.max_length}")
    first_types = T5_MODEL_TYPES if cfg.kind == "t5" else CLIP_MODEL_TYPES
    if cfg.pretrained is not None:
        first = _folder_config(cfg.pretrained, "pretrained", first_types)
        first_dim = first["d_model"] if cfg.kind == "t5" else first["hidden_size"]
        positions = first.get("max_position_embeddings")
        if positions is not None and cfg.max_length > positions:
            raise ValueError(f"text.max_length: {cfg.max_length} exceeds the {positions} positions of {cfg.pretrained}")
    else:
        first_dim = cfg.dim
    if cfg.kind != "clip+t5":
        return first_dim, first_dim
    if (cfg.pretrained is None) != (cfg.t5_pretrained is None):
        raise ValueError("text.pretrained, text.t5_pretrained: kind clip+t5 loads both encoders or neither")
    t5_dim = _folder_config(cfg.t5_pretrained, "t5_pretrained", T5_MODEL_TYPES)["d_model"] if cfg.t5_pretrained else cfg.t5_dim
    if t5_dim < first_dim:
        raise ValueError(f"text.t5_dim: the T5 width {t5_dim} is smaller than the CLIP width {first_dim}; "
                         "clip+t5 pads the CLIP states to the T5 width")
    return t5_dim, first_dim


def _random_clip(cfg: TextEncoderConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel  # deliberately lazy (start-up time): transformers is slow to import

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.dim, intermediate_size=4 * cfg.dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    ))


def _random_t5(cfg: TextEncoderConfig, dim: int, vocab_size: int, pad_id: int, eos_id: int) -> nn.Module:
    from transformers import T5Config, T5EncoderModel  # deliberately lazy (start-up time): transformers is slow to import

    if dim % cfg.num_heads:
        raise ValueError(f"text.num_heads: {cfg.num_heads} heads do not divide the T5 width {dim}")
    # T5 v1.1's gated GELU, the variant SD3's T5-XXL uses.
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=dim, d_kv=dim // cfg.num_heads, d_ff=4 * dim, num_layers=cfg.depth,
        num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", pad_token_id=pad_id, eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
    ))


def _pretrained(folder: str, t5: bool) -> nn.Module:
    from transformers import CLIPTextModel, T5EncoderModel  # deliberately lazy (start-up time): transformers is slow to import

    model_class = T5EncoderModel if t5 else CLIPTextModel
    return model_class.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


class TextEncoder(nn.Module):
    """Frozen text encoder(s); ``forward(input_ids, attention_mask[, t5_ids, t5_mask]) -> (txt, vec)``.

    ``model`` is the CLIP (kinds clip, clip+t5) or the T5 (kind t5); ``t5`` the T5 of kind
    clip+t5. The vocabulary arguments describe the sentencepiece tokenizer of random-weight
    encoders and are unused for pretrained ones.
    """

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int | None = None, pad_id: int | None = None,
                 bos_id: int | None = None, eos_id: int | None = None):
        super().__init__()
        self.txt_dim, self.vec_dim = text_widths(cfg)
        self.kind = cfg.kind
        random_weights = cfg.pretrained is None
        if random_weights and None in (vocab_size, pad_id, bos_id, eos_id):
            raise ValueError("a text encoder with random weights needs its tokenizer's vocab_size, pad_id, bos_id and eos_id")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.kind == "t5":
                self.model = (_pretrained(cfg.pretrained, t5=True) if not random_weights
                              else _random_t5(cfg, cfg.dim, vocab_size, pad_id, eos_id))
            else:
                self.model = (_pretrained(cfg.pretrained, t5=False) if not random_weights
                              else _random_clip(cfg, vocab_size, pad_id, bos_id, eos_id))
            self.t5 = None
            if cfg.kind == "clip+t5":
                self.t5 = (_pretrained(cfg.t5_pretrained, t5=True) if not random_weights
                           else _random_t5(cfg, cfg.t5_dim, vocab_size, pad_id, eos_id))
        self.eval().requires_grad_(False)

    @property
    def num_tokenizers(self) -> int:
        """How many (ids, mask) pairs ``forward`` takes: 2 for clip+t5, else 1."""
        return 2 if self.t5 is not None else 1

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, t5_ids: torch.Tensor | None = None,
                t5_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and bool mask (+ the T5's for clip+t5) → txt (B, L', txt_dim), vec (B, vec_dim)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state  # (B, L, D)
        if self.kind == "t5":
            return hidden, masked_mean(hidden, attention_mask)
        # Pool at the last real token (the end-of-sequence), whatever the tokenizer's ids are.
        last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
        vec = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.t5 is None:
            return hidden, vec
        if t5_ids is None or t5_mask is None:
            raise ValueError("a clip+t5 text encoder needs the T5 tokenizer's ids and mask too (t5_ids, t5_mask)")
        t5_hidden = self.t5(input_ids=t5_ids, attention_mask=t5_mask.long()).last_hidden_state  # (B, L2, D_t5)
        padded = F.pad(hidden, (0, t5_hidden.shape[-1] - hidden.shape[-1]))  # (B, L, D_t5)
        return torch.cat([padded, t5_hidden], dim=1), vec


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) states over the positions where the (B, L) mask is true → (B, D)."""
    weights = mask.to(hidden.dtype)[:, :, None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class PretrainedTokenizer:
    """A local transformers tokenizer folder behind flowmill's tokenizer interface
    (``encode``, ``encode_padded``), so prompts reach any encoder the same way."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer  # deliberately lazy (start-up time): transformers is slow to import

        self.folder = str(folder)
        self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        if self._tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer in {folder} has no pad token; prompts of different lengths cannot be batched")

    def encode(self, text: str) -> list[int]:
        """All ids of ``text``, special tokens included, untruncated."""
        return self._tokenizer(text)["input_ids"]

    def encode_padded(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids of each text truncated and padded to ``max_len``: long (N, max_len), bool mask (N, max_len)."""
        out = self._tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].bool()


class PromptEncoder:
    """Prompts → (txt, vec): the tokenizer(s) and the frozen ``TextEncoder``.

    ``tokenizers`` has one entry per ``TextEncoder.num_tokenizers``; a random-weight
    clip+t5 passes its one sentencepiece tokenizer twice. Each tokenizer offers
    ``encode(text) -> ids`` and ``encode_padded(texts, max_len) -> (ids, mask)``.
    """

    def __init__(self, encoder: TextEncoder, tokenizers: list, max_length: int):
        if len(tokenizers) != encoder.num_tokenizers:
            raise ValueError(f"a {encoder.kind} text encoder takes {encoder.num_tokenizers} tokenizer(s), got {len(tokenizers)}")
        self.encoder = encoder
        self.tokenizers = tokenizers
        self.max_length = max_length

    def too_long(self, texts: list[str]) -> list[tuple[str, int]]:
        """(text, token count) of the texts some tokenizer must truncate to ``max_length``."""
        found = {}
        for tokenizer in self.tokenizers:
            for text in texts:
                count = len(tokenizer.encode(text))
                if count > self.max_length:
                    found[text] = max(count, found.get(text, 0))
        return list(found.items())

    def __call__(self, texts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """B texts → txt (B, L', txt_dim), vec (B, vec_dim) on ``device``; long texts are truncated."""
        tokens = []
        for tokenizer in self.tokenizers:
            ids, mask = tokenizer.encode_padded(list(texts), self.max_length)
            tokens += [ids.to(device), mask.to(device)]
        return self.encoder(*tokens)
