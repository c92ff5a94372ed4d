"""What a run records about itself in MLflow besides metrics: its config as params, and its tags.

``flatten_config`` turns the resolved config into flat string params (``{"model.depth": "24"}``)
within MLflow's length limit; ``run_tags`` names the code (git commit, dirty or not), the world
size, the host and the Python environment (``environment_tags``). Plain Python: nothing here
imports MLflow, so the values can be built and tested without a store.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_VALUE_CHARS = 6000
# Variables that name the container image a process runs in: Apptainer's, then Singularity's (both set inside).
CONTAINER_VARIABLES = ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")
# Variable that lists the loaded environment modules (`module load`, Environment Modules and Lmod alike).
MODULES_VARIABLE = "LOADEDMODULES"


def flatten_config(config: object) -> dict[str, str]:
    """Flatten a (nested) dataclass or mapping into MLflow params ``{"model.depth": "24", ...}``.

    Nested dataclasses and mappings become dotted keys; lists and tuples become one JSON value;
    every value is a string of at most ``MAX_PARAM_VALUE_CHARS`` characters, longer ones are cut
    and end with ``... [truncated, N chars]`` so the cut is visible.
    """
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)) and not isinstance(config, Mapping):
        raise TypeError(f"flatten_config takes a dataclass instance or a mapping, got {type(config).__name__}")
    flat: dict[str, str] = {}
    _flatten_into(flat, "", config)
    return flat


def _flatten_into(flat: dict[str, str], prefix: str, node: object) -> None:
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        items = [(field.name, getattr(node, field.name)) for field in dataclasses.fields(node)]
    elif isinstance(node, Mapping):
        items = [(str(key), value) for key, value in node.items()]
    else:
        flat[prefix] = _param_value(node)
        return
    if not items:
        flat[prefix] = "{}"
    for key, value in items:
        _flatten_into(flat, f"{prefix}.{key}" if prefix else key, value)


def _param_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        text = json.dumps(_plain(value), default=str)
    elif isinstance(value, enum.Enum):
        text = str(value.value)
    else:
        text = str(value)
    if len(text) <= MAX_PARAM_VALUE_CHARS:
        return text
    marker = f"... [truncated, {len(text)} chars]"
    return text[: MAX_PARAM_VALUE_CHARS - len(marker)] + marker


def _plain(value: object) -> object:
    """Dataclasses, enums and paths inside a list turned into JSON-friendly values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_tags(world_size: int, source_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags every run carries: git commit of the code, world size, host, and ``environment_tags(environ)``.

    ``source_dir`` is the git checkout to describe (default: the one holding flowmill). When git
    cannot tell, ``flowmill.git_commit`` says why instead of holding a commit.
    """
    source_dir = Path(__file__).resolve().parents[1] if source_dir is None else source_dir
    tags = {"flowmill.world_size": str(world_size), "flowmill.host": socket.gethostname(), **environment_tags(environ)}
    try:
        commit = _git(source_dir, "rev-parse", "HEAD")
        dirty = _git(source_dir, "status", "--porcelain", "--untracked-files=no") != ""
    except (OSError, subprocess.CalledProcessError) as exc:
        reason = exc.stderr.strip().splitlines()[0] if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        tags["flowmill.git_commit"] = f"unavailable: {reason}"
        return tags
    tags["flowmill.git_commit"] = commit
    tags["flowmill.git_dirty"] = str(dirty).lower()
    tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI beside the run
    return tags


def environment_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where this Python runs: ``flowmill.python`` (the interpreter and its version), and when ``environ``
    (default: this process's) names them, ``flowmill.container`` (the image) and ``flowmill.modules``."""
    environ = os.environ if environ is None else environ
    tags = {"flowmill.python": f"{sys.executable} (Python {platform.python_version()})"}
    container = next((environ[name] for name in CONTAINER_VARIABLES if environ.get(name)), None)
    if container:
        tags["flowmill.container"] = container
    if environ.get(MODULES_VARIABLE):
        tags["flowmill.modules"] = environ[MODULES_VARIABLE]
    return tags


def _git(source_dir: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(source_dir), *args], capture_output=True, text=True, check=True, timeout=10)
    return done.stdout.strip()
