"""flowmill.train.tracking_store: tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded store; a
SQLite store on a network file system is warned about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flowmill.train import tracking_store
from flowmill.train.tracking_store import default_tracking_uri, filesystem_type, resolve_tracking_uri, warn_if_network_store

MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
server:/export /shared nfs4 rw,vers=4.2 0 0
/dev/sdb1 /shared/scratch xfs rw 0 0
sshfs#me@host: /mnt/my\\040files fuse.sshfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path: Path) -> Path:
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return path


def test_the_configured_uri_wins_then_the_environment_then_the_embedded_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("sqlite:///elsewhere.db", tmp_path) == "sqlite:///elsewhere.db"


@pytest.mark.parametrize("path, expected", [
    ("/home/me/runs", "ext4"),
    ("/shared/runs", "nfs4"),
    ("/shared", "nfs4"),
    ("/shared/scratch/runs", "xfs"),  # the deepest mount holding the path
    ("/sharedother/runs", "ext4"),  # a name that only starts like a mount point is not under it
    ("/mnt/my files/runs", "fuse.sshfs"),  # /proc/mounts writes spaces as \\040
])
def test_filesystem_type_is_the_deepest_mount_holding_the_path(mounts, path, expected):
    assert filesystem_type(Path(path), mounts) == expected


def test_a_sqlite_store_on_a_network_file_system_gets_one_warning_naming_the_server(mounts, caplog):
    with caplog.at_level(logging.WARNING, logger="flowmill"):
        assert warn_if_network_store("sqlite:////shared/runs/mlflow.db", mounts)
        assert warn_if_network_store("sqlite:////mnt/my files/runs/mlflow.db", mounts)
        assert not warn_if_network_store("sqlite:////shared/scratch/runs/mlflow.db", mounts)
        assert not warn_if_network_store("http://127.0.0.1:5000", mounts)
    first, second = [record.getMessage() for record in caplog.records if record.name == "flowmill"]
    assert "\n" not in first
    assert first.startswith("MLflow store /shared/runs/mlflow.db is on a nfs4 file system")
    assert "`mlflow server --backend-store-uri" in first and "tracking.uri=http://HOST:5000" in first
    assert "fuse.sshfs" in second


def test_an_unreadable_mount_table_warns_about_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_store, "MOUNTS", tmp_path / "missing")
    assert filesystem_type(tmp_path) is None
    assert not warn_if_network_store(f"sqlite:///{tmp_path}/mlflow.db")
