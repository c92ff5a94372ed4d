"""flowmill.train.tracking_params: config flattened into MLflow params, and the run's tags."""

from __future__ import annotations

import dataclasses
import enum
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flowmill.train import tracking_params


class Precision(enum.Enum):
    BF16 = "bf16"


@dataclasses.dataclass
class Inner:
    depth: int = 2
    widths: tuple[int, ...] = (64, 128)


@dataclasses.dataclass
class Config:
    model: Inner = dataclasses.field(default_factory=Inner)
    precision: Precision = Precision.BF16
    data: dict = dataclasses.field(default_factory=lambda: {"root": Path("/data"), "shards": ["a.tar", "b.tar"]})
    note: str = "x" * 7000
    lr: float = 3e-4
    resume: str | None = None


def test_flatten_config_dotted_string_params() -> None:
    flat = tracking_params.flatten_config(Config())
    assert {key: value for key, value in flat.items() if key != "note"} == {
        "model.depth": "2",
        "model.widths": "[64, 128]",
        "precision": "bf16",
        "data.root": "/data",
        "data.shards": '["a.tar", "b.tar"]',
        "lr": "0.0003",
        "resume": "None",
    }
    assert len(flat["note"]) == tracking_params.MAX_PARAM_VALUE_CHARS
    assert flat["note"].endswith("... [truncated, 7000 chars]")
    assert tracking_params.flatten_config({"a": {"b": 1}}) == {"a.b": "1"}
    with pytest.raises(TypeError, match="dataclass instance or a mapping"):
        tracking_params.flatten_config(Config)


def test_run_tags_name_commit_world_size_and_host(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    tags = tracking_params.run_tags(world_size=4, source_dir=repo)
    assert tags["flowmill.git_commit"] == tags["mlflow.source.git.commit"] == commit
    assert tags["flowmill.git_dirty"] == "false"
    assert tags["flowmill.world_size"] == "4"
    assert tags["flowmill.host"] == socket.gethostname()
    (repo / "f.txt").write_text("b")
    assert tracking_params.run_tags(world_size=1, source_dir=repo)["flowmill.git_dirty"] == "true"
    not_git = tmp_path / "plain"
    not_git.mkdir()
    assert tracking_params.run_tags(world_size=1, source_dir=not_git)["flowmill.git_commit"].startswith("unavailable: ")


def test_environment_tags_name_the_python_and_the_container_and_modules_when_there_are() -> None:
    python = f"{sys.executable} (Python {platform.python_version()})"
    assert tracking_params.environment_tags({}) == {"flowmill.python": python}
    inside = {"SINGULARITY_CONTAINER": "/images/old.sif", "APPTAINER_CONTAINER": "/images/flow.sif", "LOADEDMODULES": "cuda/12.4:nccl"}
    assert tracking_params.environment_tags(inside) == {
        "flowmill.python": python, "flowmill.container": "/images/flow.sif", "flowmill.modules": "cuda/12.4:nccl"}
    assert tracking_params.environment_tags({"SINGULARITY_CONTAINER": "/images/old.sif"})["flowmill.container"] == "/images/old.sif"
    assert "flowmill.container" in tracking_params.run_tags(world_size=1, environ=inside)
