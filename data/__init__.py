"""flowmill.data: WebDataset shards for training.

- ``pack``: write samples as tar shards + manifest.json (idempotent).
- ``shards``: name a dataset (manifest, folder, brace pattern, glob) and read manifests.
- ``loader``: ``StreamingLoader``, the resumable streaming loader training reads from.
- ``decode``: raw samples → tensors (``ImageTextDecoder`` for image+caption data).
- ``tokenizer``: train and use sentencepiece tokenizers.
- ``builtin``: datasets that need no download (scikit-learn digits).
- ``cli``: the ``flowmill data`` commands.
"""
