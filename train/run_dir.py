"""The run directory: resolved config, run.json, checkpoints, samples, logs.

``run.json`` keys are a public contract: tracking_uri, experiment_id, run_id, git_commit,
world_size, status (running | finished | failed | killed), plus step and timestamps.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flowmill.train.checkpoint import write_atomic
from flowmill.train.config import save_config, to_dict
from flowmill.errors import UsageError

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
SUBDIRS = ("checkpoints", "samples", "logs")


def default_run_dir(name: str) -> Path:
    """runs/<name>-<UTC timestamp> under the current directory."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RUN_JSON).is_file() and (Path(path) / CONFIG_YAML).is_file()


def create_run_dir(run_dir: Path, cfg: Any) -> None:
    """Make a fresh run dir; refuse one that already holds a run (that is what resume is for)."""
    run_dir = Path(run_dir)
    if is_run_dir(run_dir):
        raise UsageError(
            f"run.dir: {run_dir} already holds a run; continue it with `flowmill resume {run_dir}` "
            "or choose another run.dir"
        )
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"run.dir: {run_dir} exists and is not empty; choose another run.dir")
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_YAML)


def check_resumable(run_dir: Path, cfg: Any) -> None:
    """Refuse a resume whose model differs from the one the run's checkpoints hold."""
    import yaml

    saved = yaml.safe_load((Path(run_dir) / CONFIG_YAML).read_text())
    new = to_dict(cfg)
    for section in ("task", "model", "text"):
        if saved.get(section) != new.get(section):
            old_section, new_section = saved.get(section) or {}, new.get(section) or {}
            if not isinstance(old_section, dict):
                raise UsageError(f"{section}: the run was trained as {old_section!r}, not {new_section!r}")
            changed = sorted(k for k in set(old_section) | set(new_section) if old_section.get(k) != new_section.get(k))
            key = f"{section}.{changed[0]}" if changed else section
            raise UsageError(
                f"{key}: the checkpoints in {run_dir} were trained with {key}={old_section.get(changed[0]) if changed else old_section!r}, "
                f"not {new_section.get(changed[0]) if changed else new_section!r}; start a new run to change the model"
            )


def read_run_json(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a flowmill run dir (no {RUN_JSON}); pass the folder a run created")
    return json.loads(path.read_text())


def update_run_json(run_dir: Path, **fields: Any) -> dict:
    """Merge ``fields`` into run.json (atomically) and return the new content."""
    path = Path(run_dir) / RUN_JSON
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields, updated_at=time.time())
    write_atomic(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
