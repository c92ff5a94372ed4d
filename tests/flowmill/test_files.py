"""flowmill.files: small files written whole or not at all, leaving no temporary behind."""

from __future__ import annotations

import pytest

from flowmill.files import copy_atomic, write_atomic


def test_write_atomic_replaces_the_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    write_atomic(path, "checkpoints/step-00000002\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("flowmill.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "checkpoints/step-00000004\n")
    assert path.read_text() == "checkpoints/step-00000002\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_copy_atomic_copies_and_leaves_no_partial_file(tmp_path):
    source = tmp_path / "ema.safetensors"
    source.write_bytes(b"\x00weights" * 100)
    (tmp_path / "teacher").mkdir()
    copy_atomic(source, tmp_path / "teacher" / "ema.safetensors")
    assert (tmp_path / "teacher" / "ema.safetensors").read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "teacher").iterdir()] == ["ema.safetensors"]
    with pytest.raises(FileNotFoundError):
        copy_atomic(tmp_path / "missing", tmp_path / "teacher" / "other")
    assert [p.name for p in (tmp_path / "teacher").iterdir()] == ["ema.safetensors"]
