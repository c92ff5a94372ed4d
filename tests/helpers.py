"""Helpers for tests: run the CLI, point the tiny config at test data, read what a run wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import psutil
import yaml

from flowmill.run_dir import step_tag

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "mmdit_tiny.yaml"


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, or None when it has none."""
    addresses = [entry.address for entries in psutil.net_if_addrs().values() for entry in entries
                 if entry.family == socket.AF_INET and not entry.address.startswith("127.")]
    return addresses[0] if addresses else None


def reachable(address: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``address:port``."""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) == 0


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


def flowmill_ok(*args: str, cwd: Path) -> str:
    """Run the CLI like ``flowmill``, assert it succeeded; returns its stdout.

    A tiny run takes a minute, mostly imports and DeepSpeed setup; a loaded machine stretches that.
    """
    result = flowmill(*args, cwd=cwd, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, samples.jsonl), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def fake_run(root: Path, task: str, family: str) -> Path:
    """A run dir of ``task`` with one complete checkpoint of ``family`` and no weights: as much as a
    lookup that refuses the run (a teacher, an export) reads."""
    step = root / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (step / "flowmill.json").write_text(json.dumps({"task": task, "family": family, "step": 1, "world_size": 1}))
    (root / "latest").write_text("checkpoints/step-00000001\n")
    (root / "run.json").write_text("{}")
    (root / "config.yaml").write_text(yaml.safe_dump({"task": task, "model": {}}))
    return root


def rewound_copy(run_dir: Path, step: int, dest: Path) -> Path:
    """A copy of ``run_dir`` as it was when its checkpoint of ``step`` was the latest: the later
    checkpoints removed and ``latest`` naming that one. A checkpoint does not depend on the steps
    after it, so resuming the copy and comparing with the original tests exact resume with one
    training run instead of two."""
    shutil.copytree(run_dir, dest)
    for checkpoint in (dest / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    (dest / "latest").write_text(f"checkpoints/{step_tag(step)}\n")
    return dest
