"""Which MLflow store a run logs to, and whether that store is safe where it lies.

``tracking.uri`` when set; else ``$MLFLOW_TRACKING_URI`` (MLflow's own variable, so a cluster's
environment module or job script can point every run at its server); else the embedded store
shared by every run under the runs root (``default_tracking_uri``). SQLite locks files through
the file system, which network file systems (NFS, SMB, Lustre, GPFS, FUSE mounts) do not do
reliably across machines: a store there gets a one-line warning naming the server alternative.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("flowmill")

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "9p")  # and fuse.*
MOUNTS = Path("/proc/mounts")


def default_tracking_uri(runs_root: Path) -> str:
    """The embedded store shared by every run under ``runs_root``: ``sqlite:///<runs_root>/mlflow.db``.

    Experiments that ``MLflowTracker.start`` creates in it keep their artifacts in
    ``<runs_root>/mlartifacts``. The path is made absolute so every process resolves the same file.
    """
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, runs_root: Path) -> str:
    """The store a run logs to: ``configured`` (tracking.uri), else $MLFLOW_TRACKING_URI, else the embedded store."""
    return configured or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri(runs_root)


def sqlite_artifact_location(uri: str) -> str | None:
    """Artifact folder URI (``file://.../mlartifacts`` beside the database) for a ``sqlite:///`` URI, else None.

    None means the store decides (an MLflow server has its own artifact root).
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def filesystem_type(path: Path, mounts: Path | None = None) -> str | None:
    """The type (``ext4``, ``nfs4``, ``fuse.sshfs``, ...) of the mount holding ``path`` according to
    ``mounts`` (default /proc/mounts), None if unknown."""
    try:
        lines = (mounts or MOUNTS).read_text().splitlines()
    except OSError:
        return None
    path = Path(os.path.realpath(path))
    best, best_type = None, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces and tabs in mount points as octal.
        point = Path(fields[1].replace("\\040", " ").replace("\\011", "\t"))
        if (path == point or point in path.parents) and (best is None or len(point.parts) >= len(best.parts)):
            best, best_type = point, fields[2]
    return best_type


def is_network_filesystem(fs_type: str | None) -> bool:
    return fs_type is not None and (fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse."))


def warn_if_network_store(uri: str, mounts: Path | None = None) -> bool:
    """One warning if ``uri`` is a SQLite store on a network file system; returns whether it warned."""
    if not uri.startswith("sqlite:///"):
        return False
    database = Path(uri.removeprefix("sqlite:///"))
    fs_type = filesystem_type(database.parent, mounts)
    if not is_network_filesystem(fs_type):
        return False
    logger.warning(
        "MLflow store %s is on a %s file system, where SQLite's file locks are unreliable across machines; serve "
        "a store on a local disk with one `mlflow server --backend-store-uri sqlite:////LOCAL/DISK/mlflow.db "
        "--artifacts-destination %s --host 0.0.0.0` and set tracking.uri=http://HOST:5000 (or MLFLOW_TRACKING_URI).",
        database, fs_type, database.parent / "mlartifacts",
    )  # fmt: skip
    return True
