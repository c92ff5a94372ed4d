"""flowmill.data: WebDataset shards for training.

- ``pack``: write samples as tar shards + manifest.json (idempotent); ``PackOptions``, how every packer writes.
- ``parallel``: make pack samples on all cores, in an order independent of the process count.
- ``builtin``: datasets that need no download (digits, moving digits, tinyshakespeare).
- ``images``, ``text``, ``video``: pack a folder of captioned images, text files as token
  sequences, videos (.mp4 or frame folders) as clips.
- ``shards``: name a dataset (manifest, folder, brace pattern, glob, pipe:, fsspec URL).
- ``remote``: shards and manifests on s3://, gs://, http(s)://: credentials, retries, one-line errors.
- ``tario``: read a tar shard as samples with webdataset, checking its manifest sha256.
- ``streams``: which raw samples each rank and worker reads per epoch; re-sharding.
- ``batches``: one worker's raw samples → decoded, collated batches, each with its stream position.
- ``loader``: ``StreamingLoader``, the resumable streaming loader training reads from.
- ``handoff``: batches from the loader's DataLoader workers through reused shared memory.
- ``decode``: raw samples → tensors (image+caption, clips, token sequences, any field).
- ``audit``: which keys each rank reads in an epoch (``flowmill data inspect``).
- ``encode``: cache a frozen encoder's outputs as shards (``flowmill data encode``); the
  encoders of a trained run are in ``flowmill.train.encoders``.
- ``tokenizer``: train and use sentencepiece tokenizers.
- ``constants``: pack source names and defaults, readable without importing the packers.
- ``cli``: the ``flowmill data`` parsers; ``commands``: what they run.
"""
