"""Names and defaults of the data tools that the command line's help needs without importing them.

This module imports nothing: ``flowmill data ... --help`` reads it while the packers (which
load webdataset, torch, PyAV, sentencepiece) stay unimported until a command runs.
"""

from __future__ import annotations

# Pack sources: the SOURCE of ``flowmill data pack`` and the ``source`` recorded in a manifest.
DIGITS_SOURCE = "builtin:digits"
MOVING_DIGITS_SOURCE = "builtin:moving-digits"
IMAGES_SOURCE = "images"
TEXT_SOURCE = "text"
VIDEO_SOURCE = "video"
PACK_SOURCES = (DIGITS_SOURCE, MOVING_DIGITS_SOURCE, IMAGES_SOURCE, TEXT_SOURCE, VIDEO_SOURCE)

# Samples per shard when neither a sample nor a byte limit is given, per pack source.
DEFAULT_SHARD_SAMPLES = {
    DIGITS_SOURCE: 225, MOVING_DIGITS_SOURCE: 64, IMAGES_SOURCE: 1000, TEXT_SOURCE: 256, VIDEO_SOURCE: 100,
}
ENCODE_SHARD_SAMPLES = 1000  # the same default for the shards ``flowmill data encode`` writes

# Built-in texts, named where a text file is expected.
TINYSHAKESPEARE = "builtin:tinyshakespeare"  # the text corpus shipped beside the repository
DIGIT_CAPTIONS = "builtin:digit-captions"  # the 10 captions of builtin:digits
MOVING_DIGITS_CAPTIONS = "builtin:moving-digits-captions"  # every phrase of the builtin:moving-digits captions

MODEL_TYPES = ("unigram", "bpe")  # sentencepiece algorithms a text tokenizer is trained with

# Attempts after a transient failure of remote storage (data.retries, ``flowmill data inspect --retries``).
DEFAULT_RETRIES = 3
