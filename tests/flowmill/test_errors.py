"""flowmill.errors: any error said in one line, a data worker's error as the worker said it."""

from __future__ import annotations

import pytest
import torch.utils.data

from flowmill.errors import one_line


class Broken(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise FileNotFoundError("shard /data/shard-000003.tar is gone")


def test_an_error_is_one_line_and_a_data_workers_error_is_the_workers_own():
    assert one_line("RuntimeError: boom\n  while saving\n") == "RuntimeError: boom while saving"
    with pytest.raises(FileNotFoundError) as caught:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    wrapped = f"{type(caught.value).__name__}: {caught.value}"
    assert wrapped.count("\n") > 2  # torch puts the worker's traceback into the message
    assert one_line(wrapped) == "FileNotFoundError: shard /data/shard-000003.tar is gone"
