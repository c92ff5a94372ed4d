"""MLflow calls a run could not deliver: kept in its run dir, sent later by ``flowmill runs sync``.

A tracker with a run dir writes a call it cannot deliver into ``RUN_DIR/tracking/undelivered.jsonl``
instead of dropping it: a call its bounded in-memory queue gives up during a long outage, and at
the end of the run every call still queued, the run's final status last. One JSON object per line,
in the order the run made the calls, each named after the tracker method that made it::

    {"call": "log_metrics", "step": 16, "timestamp": 1767225600000, "metrics": {"train/loss": 0.41}}
    {"call": "log_params", "params": {"optim.lr": "0.001"}, "tags": {}}
    {"call": "set_tags", "tags": {"phase": "warmup"}}
    {"call": "log_artifact", "path": "/abs/run/samples/video-00000010.gif", "artifact_path": "samples"}
    {"call": "log_text", "text": "...", "artifact_file": "config.yaml"}
    {"call": "log_image", "key": "grid", "step": 10, "file": "images/000001.png"}   (relative to tracking/)
    {"call": "log_model", "step": 30, "register_as": null, "run_dir": "/abs/run"}
    {"call": "finish", "status": "FINISHED", "end_time": 1767225660000}

``send`` replays such calls in order and never logs a metric step twice: a step MLflow already
holds for a metric is skipped (a resumed run recomputes the same values), and a param already
set is not set again. A call the store rejects is skipped and counted. When the store stops
answering part-way, the calls not yet sent stay in the file, so running ``send`` again continues
where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from flowmill.files import write_atomic
from flowmill.run_dir import RunDir

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # before MLflow is imported (see flowmill.train.tracking)

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: store unreachable, timed out, overloaded (5xx, 429) or locked."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    elif isinstance(exc, requests.RequestException):
        status = exc.response.status_code if exc.response is not None else 503
    else:
        return False
    return status == 429 or status >= 500


def deliver(client: MlflowClient, run_id: str, record: dict[str, Any], run_dir: RunDir | None,
            image: Image.Image | None = None) -> None:
    """Make the MLflow call ``record`` describes in run ``run_id``; raises what MLflow raises.

    A ``log_image`` call takes ``image``, else its file under ``run_dir``'s ``tracking/``; a
    ``log_model`` call logs the latest checkpoint of the run dir it names."""
    call = record["call"]
    if call == "log_metrics":
        metrics = [Metric(key, float(value), record["timestamp"], record["step"]) for key, value in record["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif call in ("log_params", "set_tags"):
        params = [Param(key, value) for key, value in record.get("params", {}).items()]
        client.log_batch(run_id, params=params, tags=[RunTag(key, value) for key, value in record["tags"].items()])
    elif call == "log_artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif call == "log_text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif call == "log_image":
        if image is None:
            with Image.open(run_dir.undelivered_file.parent / record["file"]) as stored:
                image = stored.copy()
        client.log_image(run_id, image, key=record["key"], step=record["step"])
    elif call == "log_model":
        # Deliberately lazy: reading weights needs torch, which `flowmill runs` must not pay for at start-up.
        from flowmill.train.tracking_model import log_run_model

        log_run_model(client.tracking_uri, run_id, Path(record["run_dir"]), record["step"], record["register_as"])
    elif call == "finish":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown tracking call {call!r}")


class UndeliveredCalls:
    """The file of undelivered calls of one run dir (``RunDir.undelivered_file``) and its images."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.path = run_dir.undelivered_file

    def exists(self) -> bool:
        return self.path.is_file()

    def append(self, calls: Iterable[tuple[dict[str, Any], Image.Image | None]]) -> int:
        """Add ``(record, image)`` calls at the end (a ``log_image`` call's image as a PNG beside
        the file); returns how many."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for record, image in calls:
            if image is not None:
                images = self.path.parent / "images"
                images.mkdir(exist_ok=True)
                name = f"images/{len(list(images.iterdir())):06d}.png"
                image.save(self.path.parent / name)
                record = {**record, "file": name}
            lines.append(json.dumps(record) + "\n")
        with open(self.path, "a") as handle:
            handle.writelines(lines)
        return len(lines)

    def read(self) -> list[dict[str, Any]]:
        """The calls, oldest first."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep(self, records: list[dict[str, Any]]) -> None:
        """Leave only ``records`` in the file (the images stay until the file is gone)."""
        write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in records))

    def remove(self) -> None:
        """Delete the file and its images (every call was sent)."""
        shutil.rmtree(self.path.parent)


@dataclasses.dataclass
class Sent:
    """What ``send`` did."""

    sent: int = 0  # calls delivered
    already_held: int = 0  # metric points MLflow already held (not logged twice)
    rejected: list[str] = dataclasses.field(default_factory=list)  # one line per call the store refused
    remaining: int = 0  # calls left in the file because the store stopped answering
    status: str | None = None  # the final status set, if a finish call was sent


def send(client: MlflowClient, run_id: str, calls: UndeliveredCalls, statuses: bool = True) -> Sent:
    """Send the undelivered calls of ``calls`` to run ``run_id`` in order (see the module docstring);
    the file is removed once all are sent. ``statuses=False`` leaves out the final statuses (a run
    that is continued sends its earlier attempts' calls and stays RUNNING). Raises the store's
    error when it does not answer at all; ``Sent.remaining`` counts the calls it left when it
    stopped answering part-way."""
    records = calls.read()
    run = client.get_run(run_id)
    params = dict(run.data.params)
    held: dict[str, set[int]] = {}  # metric key -> steps MLflow holds, read once per key
    result = Sent()
    for index, record in enumerate(records):
        if record["call"] == "finish" and not statuses:
            continue
        try:
            record = _unsent_part(client, run_id, record, params, held, result)
            if record is None:
                continue
            deliver(client, run_id, record, calls.run_dir)
        except Exception as exc:  # noqa: BLE001 - a refused call must not block the ones after it
            if is_transient(exc):
                calls.keep(records[index:])
                result.remaining = len(records) - index
                return result
            result.rejected.append(f"{record['call']}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        result.sent += 1
        if record["call"] == "log_metrics":
            for key in record["metrics"]:
                held[key].add(record["step"])
        params.update(record.get("params", {}))
        if record["call"] == "finish":
            result.status = record["status"]
    calls.remove()
    return result


def _unsent_part(client: MlflowClient, run_id: str, record: dict[str, Any], params: dict[str, str],
                 held: dict[str, set[int]], result: Sent) -> dict[str, Any] | None:
    """``record`` without the metric points and params MLflow already holds; None when nothing is left."""
    if record["call"] == "log_metrics":
        for key in record["metrics"]:
            if key not in held:
                held[key] = {point.step for point in client.get_metric_history(run_id, key)}
        fresh = {key: value for key, value in record["metrics"].items() if record["step"] not in held[key]}
        result.already_held += len(record["metrics"]) - len(fresh)
        return {**record, "metrics": fresh} if fresh else None
    if record["call"] == "log_params":
        fresh = {key: value for key, value in record["params"].items() if key not in params}
        if not fresh and not record["tags"]:
            return None
        return {**record, "params": fresh}
    return record
