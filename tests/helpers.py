"""Helpers for tests: run the CLI, point the tiny config at test data."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "mmdit_tiny.yaml"


def flowmill(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the ``flowmill`` CLI in a subprocess; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "flowmill.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def tiny_overrides(digits_dir: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides pointing the tiny config at the test data, a run dir and a store in tmp."""
    values = {
        "data.path": str(digits_dir),
        "text.tokenizer": str(digits_dir / "text_tokenizer.model"),
        "run.dir": str(run_dir),
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def shard_members(folder: Path) -> dict[str, bytes]:
    """Every member of the ``*.tar`` shards in ``folder``, by name (bytes)."""
    out = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.update({member.name: tar.extractfile(member).read() for member in tar})
    return out
