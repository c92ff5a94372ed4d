"""MLflow tracking of training runs, spoken by rank 0 only.

Rank 0 builds its tracker with ``MLflowTracker.start(...)``; every other rank uses ``NullTracker()``,
so the training loop calls the same methods everywhere and never tests the rank itself.

Store. By default all runs under one ``runs/`` folder share one embedded store
(``default_tracking_uri``): a SQLite file ``runs/mlflow.db`` plus the artifact folder
``runs/mlartifacts``, so nothing has to be started and runs can be compared in ``mlflow ui``.
Any other URI (an ``http(s)://`` MLflow server; ``$MLFLOW_TRACKING_URI``) replaces it
(``flowmill.train.tracking_store``). An experiment flowmill creates may keep its artifacts in
object storage instead (``artifact_location``, e.g. ``s3://bucket/mlflow``): MLflow's clients
upload them there with boto3, which reads the standard AWS variables (``AWS_ENDPOINT_URL``, or
MLflow's ``MLFLOW_S3_ENDPOINT_URL``, for an S3-compatible server). The params and tags a run logs are built by
``flowmill.train.tracking_params``.

What a run shows. Its name is its run dir's name (unique: timestamped, or a sweep element's
index); its description is the ``mlflow.note.content`` tag; sample grids are MLflow images
(``log_samples``), one series per grid, so the UI's step slider walks through them; at the end
the EMA model is logged as an MLflow model (``log_model``, ``flowmill.train.tracking_model``).

Steps. The MLflow ``step`` of ``train/*`` metrics is the optimizer step, counting from 1.
System metrics (``system/*``) come from MLflow's own monitor and count its samples instead.

Resume. ``start(..., run_id=...)`` continues that run: same run id, status back to RUNNING.
Steps already logged are not logged again: the tracker reads the last step of
``train/loss`` when it starts (``resumed_through_step``) and ``log_metrics`` drops every step at or
below it, because MLflow cannot delete metric points and a resumed run recomputes the same values.
Params are immutable in MLflow, so a param whose value changed on resume is written as the
tag ``resume.changed_param.<key>`` instead.

Failures never stop training. ``start`` gives up after bounded HTTP timeouts and returns a
``NullTracker`` (one warning). After a successful start every call is guarded: a store that
cannot be reached (connection error, timeout, 5xx, 429, locked SQLite) prints one warning; the
call and the ones after it are queued in memory (bounded) and sent again, in order, once
``retry_after_s`` has passed, so a short outage loses nothing and a dead server costs one
timeout per ``retry_after_s``, not one per step. A call the store rejects (4xx, a missing local
file) is dropped; the first rejection prints one warning. Later failures are only counted
(``failures``, ``dropped``).

Nothing undelivered is lost. A tracker started with a run dir writes the calls it cannot deliver
into the run dir instead of dropping them (``flowmill.train.tracking_undelivered``): the oldest
queued call when the queue is full, and at ``finish`` every call still queued, the final status
last. The run then ends with one warning saying how many and that ``flowmill runs sync RUN_DIR``
sends them once the store answers again. A resumed run sends its earlier attempts' calls itself
when it starts.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

# MLflow starts its telemetry client when it is imported, so telemetry is turned off here, after
# every other import and before the mlflow ones, which therefore follow a statement (E402).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from mlflow.tracking.multimedia import convert_to_pil_image  # noqa: E402

from flowmill.run_dir import RunDir  # noqa: E402
from flowmill.train.tracking_store import sqlite_artifact_location, warn_if_network_store  # noqa: E402
from flowmill.train.tracking_undelivered import UndeliveredCalls, deliver, is_transient, send  # noqa: E402

logger = logging.getLogger("flowmill")

DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
END_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")

# Bounded HTTP behaviour for remote stores, applied unless the user set these variables: one retry,
# 5 s per attempt, so an unreachable server costs seconds, not MLflow's default of minutes.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


class Tracker(Protocol):
    """What the training loop calls; ``MLflowTracker`` on rank 0, ``NullTracker`` elsewhere."""

    run_id: str | None
    experiment_id: str | None
    tracking_uri: str | None

    def log_params(self, flat: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_image(self, image: Image.Image | np.ndarray, key: str, step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_model(self, run_dir: Path, step: int, register_as: str | None = None) -> None: ...

    def finish(self, status: RunStatus = "FINISHED") -> None: ...

    def last_logged_step(self, metric: str = "train/loss") -> int: ...


def _check_status(status: str) -> None:
    if status not in END_STATUSES:
        raise ValueError(f"unknown run status {status!r}; choose one of: {', '.join(END_STATUSES)}")


@dataclasses.dataclass
class NullTracker:
    """A tracker that records nothing: ranks other than 0, and rank 0 when MLflow was unreachable at start."""

    run_id: str | None = None  # kept so a checkpoint still names the run a resume should continue
    experiment_id: str | None = None  # None: nothing was created
    tracking_uri: str | None = None  # the store that was asked for, if any

    def log_params(self, flat: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_image(self, image: Image.Image | np.ndarray, key: str, step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(self, run_dir: Path, step: int, register_as: str | None = None) -> None:
        pass

    def finish(self, status: RunStatus = "FINISHED") -> None:
        _check_status(status)

    def last_logged_step(self, metric: str = "train/loss") -> int:
        return 0


class MLflowTracker:
    """One MLflow run driven through ``MlflowClient`` with an explicit run id (no global active run).

    Build it with ``MLflowTracker.start``. Attributes: ``run_id``, ``experiment_id``,
    ``tracking_uri``; ``resumed_through_step`` (last step logged before this process, 0 for a
    new run); ``failures`` (failed store calls), ``dropped`` (calls given up) and
    ``undelivered`` (calls written to the run dir for ``flowmill runs sync``).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        tracking_uri: str,
        resumed_through_step: int,
        logged_params: dict[str, str],
        monitor: SystemMetricsMonitor | None,
        retry_after_s: float,
        max_queued_calls: int,
        run_dir: RunDir | None = None,
    ) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.resumed_through_step = resumed_through_step
        self._logged_params = logged_params
        self._monitor = monitor
        self._retry_after_s = retry_after_s
        # Calls as records (flowmill.train.tracking_undelivered), each with its image if it logs one.
        self._queue: collections.deque[tuple[dict, Image.Image | None]] = collections.deque(maxlen=max_queued_calls)
        self._run_dir = run_dir
        self._undelivered_calls = UndeliveredCalls(run_dir) if run_dir is not None else None
        self._retry_at: float | None = None  # set while the store is unreachable
        self._warned_unreachable = False
        self._warned_rejected = False
        self._finished = False
        self.failures = 0
        self.dropped = 0
        self.undelivered = 0

    @classmethod
    def start(
        cls,
        uri: str,
        experiment_name: str,
        run_name: str,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        retry_after_s: float = 60.0,
        max_queued_calls: int = 10_000,
        run_dir: RunDir | None = None,
        artifact_location: str | None = None,
    ) -> Tracker:
        """Start a new run, or continue ``run_id``, in experiment ``experiment_name`` of store ``uri``.

        Returns an ``MLflowTracker``, or a ``NullTracker`` that keeps ``run_id`` when the store
        cannot be reached (one warning; training goes on). A ``run_id`` the store does not know
        starts a new run, with a warning. ``description`` (Markdown) is the run's description in
        the UI. A SQLite store on a network file system gets a warning. ``system_metrics``
        samples CPU, memory, disk, network (and GPU where present) every
        ``system_metrics_interval_s`` seconds into ``system/*``.
        ``retry_after_s`` is how long calls wait in memory (at most ``max_queued_calls``) after the
        store failed before they are sent again. ``run_dir``: where calls that cannot be delivered
        are kept (None: they are dropped); a resumed run first sends the ones its run dir holds.
        ``artifact_location`` (e.g. ``s3://bucket/mlflow``) is the artifact root of an experiment
        this call creates (default: ``mlartifacts`` beside a SQLite store, the server's own root for
        a server); an existing experiment keeps its own.
        """
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)
        warn_if_network_store(uri)
        tags = {**(tags or {}), **({DESCRIPTION_TAG: description} if description else {})}
        try:
            return cls._connect(
                uri, experiment_name, run_name, run_id, tags, system_metrics,
                system_metrics_interval_s, retry_after_s, max_queued_calls, run_dir, artifact_location,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - MLflow must never stop training
            logger.warning(
                "MLflow tracking at %s is unreachable (%s); training continues without tracking.", uri, _describe(exc)
            )
            return NullTracker(run_id=run_id, tracking_uri=uri)

    @classmethod
    def _connect(
        cls,
        uri: str,
        experiment_name: str,
        run_name: str,
        run_id: str | None,
        tags: dict[str, str],
        system_metrics: bool,
        system_metrics_interval_s: float,
        retry_after_s: float,
        max_queued_calls: int,
        run_dir: RunDir | None,
        artifact_location: str | None,
    ) -> MLflowTracker:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        artifact_location = artifact_location or sqlite_artifact_location(uri)
        client = MlflowClient(tracking_uri=uri)
        run = None
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning("MLflow run %s is not in %s; starting a new run instead.", run_id, uri)
        resumed = run is not None
        if not resumed:
            experiment_id = _get_or_create_experiment(client, experiment_name, artifact_location)
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            resumed_through_step = 0
        else:
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
            if run_dir is not None:
                _send_earlier_attempts(client, run_id, UndeliveredCalls(run_dir))
            resumed_through_step = _last_logged_step(client, run_id, "train/loss")
            logger.info(
                "Continuing MLflow run %s; steps up to %d are already logged and are not logged again.",
                run_id, resumed_through_step,
            )  # fmt: skip
        monitor = None
        if system_metrics:
            monitor = SystemMetricsMonitor(
                run.info.run_id, sampling_interval=system_metrics_interval_s, resume_logging=resumed, tracking_uri=uri
            )
            monitor.start()
        return cls(
            client, run.info.run_id, run.info.experiment_id, uri, resumed_through_step, dict(run.data.params), monitor,
            retry_after_s, max_queued_calls, run_dir,
        )  # fmt: skip

    def last_logged_step(self, metric: str = "train/loss") -> int:
        """Highest step of ``metric`` in this run's history, 0 if none.

        A query, not a training call: it raises ``MlflowException`` if the store is unreachable.
        """
        return _last_logged_step(self._client, self.run_id, metric)

    def log_params(self, flat: Mapping[str, str]) -> None:
        """Log params once; on a resumed run, values that changed go to ``resume.changed_param.<key>`` tags."""
        params, tags = {}, {}
        for key, value in flat.items():
            value = str(value)
            if key not in self._logged_params:
                params[key] = value
            elif self._logged_params[key] != value:
                tags[f"resume.changed_param.{key}"] = value
            self._logged_params[key] = value
        if params or tags:
            self._call({"call": "log_params", "params": params, "tags": tags})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at optimizer ``step`` in one ``log_batch``; steps already logged before a resume are skipped."""
        if step <= self.resumed_through_step:
            return
        metrics = {key: float(value) for key, value in metrics.items()}
        self._call({"call": "log_metrics", "step": step, "timestamp": int(time.time() * 1000), "metrics": metrics})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload the file or folder ``path`` under ``artifact_path`` (None: the run's artifact root)."""
        self._call({"call": "log_artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. ``config.yaml``)."""
        self._call({"call": "log_text", "text": text, "artifact_file": artifact_file})

    def log_image(self, image: Image.Image | np.ndarray, key: str, step: int) -> None:
        """Store ``image`` as a PNG artifact of the image series ``key`` at ``step`` (the UI shows it per step)."""
        if isinstance(image, np.ndarray):
            image = convert_to_pil_image(image)  # as MLflow converts it, so that a kept image is a PNG like the others
        self._call({"call": "log_image", "key": key, "step": step}, image)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) run tags."""
        self._call({"call": "set_tags", "tags": {key: str(value) for key, value in tags.items()}})

    def log_model(self, run_dir: Path, step: int, register_as: str | None = None) -> None:
        """Log the EMA weights of ``run_dir``'s latest checkpoint as this run's MLflow model at ``step``,
        registered as ``register_as`` when given; a run whose model cannot be logged says why (info)."""
        # Deliberately lazy: reading weights needs torch, which `flowmill runs` (it reads stores through
        # this module) must not pay for at start-up.
        from flowmill.train.tracking_model import not_loggable

        reason = not_loggable(run_dir)
        if reason is not None:
            logger.info("No MLflow model logged: %s.", reason)
            return
        self._call({"call": "log_model", "step": step, "register_as": register_as, "run_dir": str(Path(run_dir).resolve())})

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """Stop system metrics, send queued calls (ignoring the retry delay) and end the run with ``status``.

        Calls that still cannot be delivered go into the run dir, and one warning says how to send them."""
        _check_status(status)
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        self._call({"call": "finish", "status": status, "end_time": int(time.time() * 1000)}, ignore_retry_delay=True)
        if self._queue:  # the store still does not answer
            self._keep(list(self._queue))
            self._queue.clear()
        if self.failures or self.dropped:
            logger.info(
                "MLflow run %s ended with %d failed calls and %d dropped calls.", self.run_id, self.failures, self.dropped
            )
        if self.undelivered:
            logger.warning(
                "%d tracking calls could not be delivered to MLflow; send them with: flowmill runs sync %s",
                self.undelivered, self._run_dir,
            )  # fmt: skip

    def _call(self, record: dict, image: Image.Image | None = None, ignore_retry_delay: bool = False) -> None:
        """Queue the call ``record`` (``flowmill.train.tracking_undelivered``) and send the queue in order
        unless the store failed less than ``retry_after_s`` ago."""
        if len(self._queue) == self._queue.maxlen:
            self._keep([self._queue.popleft()])
        self._queue.append((record, image))
        if self._retry_at is not None and not ignore_retry_delay and time.monotonic() < self._retry_at:
            return
        while self._queue:
            queued, queued_image = self._queue[0]
            try:
                deliver(self._client, self.run_id, queued, self._run_dir, queued_image)
            except Exception as exc:  # noqa: BLE001 - MLflow must never stop training
                self.failures += 1
                if is_transient(exc):
                    self._on_unreachable(exc)
                    return
                self._queue.popleft()
                self.dropped += 1
                self._on_rejected(queued["call"], exc)
                continue
            self._queue.popleft()
        if self._retry_at is not None:
            self._retry_at = None
            logger.info("MLflow tracking at %s is reachable again; queued calls were sent.", self.tracking_uri)

    def _keep(self, calls: list[tuple[dict, Image.Image | None]]) -> None:
        """Write undeliverable calls into the run dir for ``flowmill runs sync``; without a run dir
        (or when the run dir cannot be written) they are dropped."""
        if self._undelivered_calls is not None:
            try:
                self.undelivered += self._undelivered_calls.append(calls)
                return
            except OSError as exc:
                logger.warning("could not keep %d undelivered MLflow calls in %s (%s); they are dropped",
                               len(calls), self._undelivered_calls.path, _describe(exc))
        self.dropped += len(calls)

    def _on_unreachable(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self._retry_after_s
        if not self._warned_unreachable:
            self._warned_unreachable = True
            logger.warning(
                "MLflow tracking at %s is unreachable (%s); training continues, calls are kept in memory and "
                "retried every %.0f s. Further failures are counted silently.",
                self.tracking_uri, _describe(exc), self._retry_after_s,
            )  # fmt: skip

    def _on_rejected(self, what: str, exc: BaseException) -> None:
        if not self._warned_rejected:
            self._warned_rejected = True
            logger.warning(
                "MLflow rejected %s (%s); the call is dropped and training continues. "
                "Further rejected calls are counted silently.",
                what, _describe(exc),
            )  # fmt: skip


def end_run(run_dir: RunDir, status: RunStatus) -> bool:
    """End the MLflow run that ``run_dir``'s run.json names with ``status`` (a launcher's word on how
    the job ended, which its stopped workers could not know). When the store does not answer, or calls
    of the run still wait for ``flowmill runs sync``, the status joins them, last. Returns whether it
    was delivered."""
    _check_status(status)
    info = run_dir.info()
    uri, run_id = info.get("tracking_uri"), info.get("run_id")
    if not uri or not run_id:
        return False
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
    record = {"call": "finish", "status": status, "end_time": int(time.time() * 1000)}
    calls = UndeliveredCalls(run_dir)
    if not calls.exists():
        try:
            deliver(MlflowClient(tracking_uri=uri), run_id, record, run_dir)
            return True
        except Exception as exc:  # noqa: BLE001 - the store being down is why calls are kept
            logger.debug("MLflow did not take status %s: %s", status, _describe(exc))
    calls.append([(record, None)])
    return False


def log_samples(tracker: Tracker, files: list[Path], step: int) -> None:
    """Sample files of ``step``: each PNG as an MLflow image of the series its name gives
    (``grid-00000010.png`` → ``grid``), every other file (GIF, text) as an artifact under ``samples/``."""
    for path in files:
        if path.suffix.lower() != ".png":
            tracker.log_artifact(path, "samples")
            continue
        with Image.open(path) as image:
            tracker.log_image(image.copy(), key=path.stem.removesuffix(f"-{step:08d}"), step=step)


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        # Another run created it between our two calls.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _last_logged_step(client: MlflowClient, run_id: str, metric: str) -> int:
    return max((point.step for point in client.get_metric_history(run_id, metric)), default=0)


def _send_earlier_attempts(client: MlflowClient, run_id: str, calls: UndeliveredCalls) -> None:
    """A resumed run first sends what its earlier attempts could not (their final statuses left out: the run
    goes on), so that the steps it then skips as already logged are the ones MLflow holds."""
    if not calls.exists():
        return
    result = send(client, run_id, calls, statuses=False)
    if result.remaining:
        logger.warning("%d tracking calls of an earlier attempt of this run could not be delivered; they stay in %s",
                       result.remaining, calls.path)
    else:
        logger.info("sent %d tracking calls an earlier attempt of this run could not deliver", result.sent)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
