"""Text encoders: clip, t5 and SD3-style clip+t5, random from config or loaded from local
transformers folders (written here by transformers itself, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from flowmill.models.text_encoder import (
    PretrainedTokenizer,
    PromptEncoder,
    TextEncoder,
    TextEncoderConfig,
    masked_mean,
    text_widths,
)

torch.set_num_threads(1)

WORDS = "a handwritten digit zero one two three four five six seven eight nine".split()
VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + WORDS
PAD, BOS, EOS = 0, 2, 3


def word_tokenizer(folder, bos: bool = True) -> None:
    """A word-level transformers tokenizer ('<s> words </s>', or T5-like 'words </s>') saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if bos else "$A </s>"
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def saved_clip(folder, dim: int = 24, positions: int = 10):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(5)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=dim, intermediate_size=2 * dim,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=positions,
                                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)).eval()
    model.save_pretrained(folder)
    word_tokenizer(folder)
    return model


def saved_t5(folder, dim: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(6)
    model = T5EncoderModel(T5Config(vocab_size=len(VOCAB), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=1, num_heads=2,
                                    pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)).eval()
    model.save_pretrained(folder)
    word_tokenizer(folder, bos=False)
    return model


def ids(rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for index, row in enumerate(rows):
        out[index, :len(row)] = torch.tensor(row)
        mask[index, :len(row)] = True
    return out, mask


ROWS = [[BOS, 4, 6, 9, EOS], [BOS, 7, EOS]]


def random_encoder(**fields) -> TextEncoder:
    cfg = TextEncoderConfig(**{"dim": 16, "t5_dim": 24, "depth": 1, "num_heads": 2, "max_length": 8, **fields})
    return TextEncoder(cfg, vocab_size=len(VOCAB), pad_id=PAD, bos_id=BOS, eos_id=EOS)


def test_clip_pools_at_the_end_of_sequence_and_is_frozen_and_seeded():
    encoder = random_encoder(kind="clip")
    txt, vec = encoder(*ids(ROWS, 8))
    assert txt.shape == (2, 8, 16) and vec.shape == (2, 16)
    assert torch.equal(vec[0], txt[0, 4]) and torch.equal(vec[1], txt[1, 2])
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    again, _ = random_encoder(kind="clip")(*ids(ROWS, 8))
    other, _ = random_encoder(kind="clip", seed=1)(*ids(ROWS, 8))
    assert torch.equal(again, txt) and not torch.allclose(other, txt)


def test_t5_pools_the_mean_of_real_tokens_whatever_the_padding():
    encoder = random_encoder(kind="t5")
    txt, vec = encoder(*ids(ROWS, 8))
    assert txt.shape == (2, 8, 16) and vec.shape == (2, 16)
    torch.testing.assert_close(vec[1], txt[1, :3].mean(dim=0))
    _, vec_longer = encoder(*ids(ROWS, 12))  # more padding, masked out: same pooled vector
    torch.testing.assert_close(vec_longer, vec, atol=1e-5, rtol=1e-5)


def test_clip_t5_concatenates_padded_clip_states_and_t5_states_like_sd3():
    both = random_encoder(kind="clip+t5")
    tokens = ids(ROWS, 8)
    txt, vec = both(*tokens, *tokens)
    assert txt.shape == (2, 16, 24) and vec.shape == (2, 16)
    clip_txt, clip_vec = random_encoder(kind="clip")(*tokens)  # the same seed builds the same CLIP first
    assert torch.equal(txt[:, :8, :16], clip_txt) and torch.equal(vec, clip_vec)
    assert not txt[:, :8, 16:].any()  # zero padding up to the T5 width
    assert torch.equal(txt[:, 8:], both.t5(input_ids=tokens[0], attention_mask=tokens[1].long()).last_hidden_state)
    with pytest.raises(ValueError, match="T5 tokenizer's ids"):
        both(*tokens)


def test_pretrained_folders_load_with_their_own_tokenizers(tmp_path):
    clip = saved_clip(tmp_path / "clip")
    t5 = saved_t5(tmp_path / "t5")
    cfg = TextEncoderConfig(kind="clip+t5", pretrained=str(tmp_path / "clip"), t5_pretrained=str(tmp_path / "t5"),
                            max_length=6)
    assert text_widths(cfg) == (32, 24)
    encoder = TextEncoder(cfg)
    tokenizers = [PretrainedTokenizer(tmp_path / "clip"), PretrainedTokenizer(tmp_path / "t5")]
    prompts = PromptEncoder(encoder, tokenizers, max_length=6)
    txt, vec = prompts(["a digit seven", "nine"])
    assert txt.shape == (2, 12, 32) and vec.shape == (2, 24)
    with torch.no_grad():
        clip_ids = torch.tensor([[BOS, 4, 6, 14, EOS, PAD], [BOS, 16, EOS, PAD, PAD, PAD]])
        clip_out = clip(input_ids=clip_ids, attention_mask=(clip_ids != PAD).long())
        t5_ids = torch.tensor([[4, 6, 14, EOS, PAD, PAD], [16, EOS, PAD, PAD, PAD, PAD]])
        t5_out = t5(input_ids=t5_ids, attention_mask=(t5_ids != PAD).long()).last_hidden_state
    torch.testing.assert_close(vec, clip_out.pooler_output)  # flowmill pools where CLIP pools
    torch.testing.assert_close(txt[:, :6, :24], clip_out.last_hidden_state)
    torch.testing.assert_close(txt[:, 6:], t5_out)
    # Longer than max_length: reported, then truncated with the end-of-sequence kept.
    long_prompt = "one two three four five six"
    assert prompts.too_long([long_prompt, "nine"]) == [(long_prompt, 8)]
    truncated, _ = tokenizers[0].encode_padded([long_prompt], 6)
    assert truncated.tolist() == [[BOS, 8, 9, 10, 11, EOS]]


def test_masked_mean_ignores_padding():
    hidden = torch.arange(12.0).view(1, 4, 3)
    assert masked_mean(hidden, torch.tensor([[True, True, False, False]])).tolist() == [[1.5, 2.5, 3.5]]


def test_bad_text_configs_are_refused_with_the_key(tmp_path):
    saved_clip(tmp_path / "clip", positions=10)
    saved_t5(tmp_path / "t5")
    cases = [
        (dict(kind="bert"), "text.kind: unknown text encoder kind 'bert'; choose one of: clip, t5, clip\\+t5"),
        (dict(kind="t5", pretrained=str(tmp_path / "clip")), "text.pretrained: .* holds a 'clip_text_model' model; expected one of: t5"),
        (dict(kind="clip", pretrained=str(tmp_path / "nowhere")), "not a transformers model folder"),
        (dict(kind="clip", pretrained=str(tmp_path / "clip"), max_length=12), "text.max_length: 12 exceeds the 10 positions"),
        (dict(kind="clip+t5", dim=32, t5_dim=16), "text.t5_dim: the T5 width 16 is smaller than the CLIP width 32"),
        (dict(kind="clip+t5", pretrained=str(tmp_path / "clip"), max_length=8), "loads both encoders or neither"),
        (dict(kind="clip", t5_pretrained=str(tmp_path / "t5")), "text.t5_pretrained: only kind clip\\+t5"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            text_widths(TextEncoderConfig(**fields))
    with pytest.raises(ValueError, match="random weights needs its tokenizer"):
        TextEncoder(TextEncoderConfig())
    with pytest.raises(ValueError, match="takes 2 tokenizer"):
        PromptEncoder(random_encoder(kind="clip+t5"), [object()], max_length=8)
