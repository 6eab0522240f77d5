"""MLflow tracking from rank 0, resilient to a tracking server that goes away.

Every call is queued and sent in order; when the server does not answer, the queue is
kept (bounded) and retried at a later call (10 s after the failure, doubling up to 5 min
while it stays down), so a server restarted mid-run receives the metrics it missed, and
training never stops for tracking. What could not be delivered by
the end is reported, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_QUEUED_CALLS = 100_000
RETRY_INTERVAL_S = 10.0
MAX_RETRY_INTERVAL_S = 300.0
# MLflow's own client retries a refused request 7 times with exponential backoff (minutes) and waits
# 120 s for an answer: with the server down, every call would stall training that long. The queue
# below is the retry, so a request fails fast unless the user set these variables.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SEGMENT = "segment"
"""Tag and metric: which start of the run (1, then 2, 3 … for each resume) is being recorded."""


def sqlite_uri(path: Path) -> str:
    """The ``sqlite:///`` URI of a database file.

    SQLAlchemy unquotes the path of a URI and cuts it at ``?``, so a directory named ``a%41``
    or ``a?b`` would otherwise open ``aA`` or ``a``: a store at the wrong place, or an error.
    Only those two characters are quoted: MLflow makes the store's directory from the URI
    without unquoting it, so every quoted character leaves it an empty directory of that name.
    """
    return "sqlite:///" + str(path).replace("%", "%25").replace("?", "%3F")


def default_tracking_uri(output_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else an embedded SQLite store beside the runs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(output_dir.resolve() / "mlflow.db")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded ``sqlite:///`` store, read as SQLAlchemy reads it; ``None`` for a server."""
    if not uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    return Path(make_url(uri).database)


def create_sqlite_store(uri: str) -> None:
    """Create a new ``sqlite:///`` store whole or not at all.

    MLflow builds a store's schema by a series of migrations that SQLite does not run as one
    transaction: a process killed among them leaves a file every later run fails on
    ("index … already exists"), and two runs creating the same store at once collide in them.
    So the schema is built in a private file and linked into place, which succeeds for exactly
    one creator; the others (and every later run) find it complete.
    """
    path = _sqlite_path(uri)
    if path is None or path.exists():
        return
    import mlflow

    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(f".{path.name}.{os.getpid()}.creating")
    try:
        mlflow.MlflowClient(tracking_uri=sqlite_uri(private)).search_experiments()  # runs the migrations
        try:
            os.link(private, path)
        except FileExistsError:
            pass  # another run created it first: theirs is complete too
    finally:
        private.unlink(missing_ok=True)


def artifact_location(uri: str) -> str | None:
    """Artifacts of an embedded store beside it (``mlartifacts/`` next to ``mlflow.db``), not in the working
    directory's ``./mlruns``, MLflow's default, which every store started from that directory would share.
    A server decides for itself (``None``)."""
    path = _sqlite_path(uri)
    return None if path is None else (path.resolve().parent / "mlartifacts").as_uri()


def _param_value(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a parameter value


@dataclass(frozen=True)
class DatasetRecord:
    """One data set a run reads, as MLflow records it (``mlflow.entities.Dataset`` plus the input's context)."""

    name: str
    digest: str
    """At most 36 characters (MLflow's column)."""
    source: str | dict[str, Any]
    """A path or URI of the files, or, for generated data, what generates it."""
    context: str
    """``training`` or ``evaluation``."""
    profile: dict[str, Any] = field(default_factory=dict)


class Tracker:
    """Logs one run. Use :meth:`start` once, then the ``log_*`` methods, then :meth:`finish`."""

    def __init__(self, uri: str, experiment: str) -> None:
        import mlflow

        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.mlflow = mlflow
        create_sqlite_store(uri)
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.segment = 1
        self._first_params: dict[str, str] = {}
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()
        self._dropped = 0
        self._next_retry = 0.0
        self._retry_interval = RETRY_INTERVAL_S
        self._warned = False
        self._system_monitor = None

    def start(self, run_name: str, tags: dict[str, str], resume_run_id: str | None = None,
              system_metrics: bool = False) -> str:
        """Create the run (or reopen ``resume_run_id`` as its next segment); needs the server up, so it fails loudly.

        ``tags`` describe this segment (code, layout, host …); on a resumed run they replace the previous values.
        """
        if resume_run_id is not None:
            self.run_id = resume_run_id
            run = self.client.get_run(resume_run_id)
            self.segment = int(run.data.tags.get(SEGMENT, "1")) + 1
            self._first_params = dict(run.data.params)
            self.client.update_run(resume_run_id, status="RUNNING")
            self.set_tags(tags)
        else:
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.uri))
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        if system_metrics:
            self._start_system_metrics()
        return self.run_id

    def record_segment(self, params: dict[str, Any], config_file: Path, step: int) -> None:
        """Record this start of the run: its parameters, its config file, and where it began.

        One MLflow run holds the whole training (every metric on one curve, one model); each
        start of it, the first and every resume, is a *segment*, numbered by the ``segment`` tag
        and marked on the ``segment`` metric at the step it began. MLflow parameters cannot
        change, so the run's parameters are the first segment's; a later segment N logs each
        value that differs from those as ``segment_N.<key>`` (new keys under their own name) and
        its whole config as ``segment_N/config.yaml``, beside the first one's ``config.yaml``.
        The tags (:meth:`start`) hold the current segment's code, layout and host. Nested runs
        were the alternative: they split the curves over runs, which the UI then cannot plot as one.
        """
        if self.segment == 1:
            self.log_params(params)
            self.log_artifact(config_file)
        else:
            values = {key: _param_value(value) for key, value in params.items()}
            self.log_params({**{k: v for k, v in values.items() if k not in self._first_params},
                             **{f"segment_{self.segment}.{k}": v for k, v in values.items()
                                if k in self._first_params and self._first_params[k] != v}})
            self.log_artifact(config_file, f"segment_{self.segment}")
        self.set_tags({SEGMENT: str(self.segment)})
        self.log_metrics({SEGMENT: self.segment}, step)

    def log_datasets(self, datasets: list[DatasetRecord]) -> None:
        """The data the run reads, as MLflow dataset inputs (what ``mlflow.log_input`` logs, for this run)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for record in datasets:
            source = (resolve_dataset_source(record.source) if isinstance(record.source, str)
                      else CodeDatasetSource(record.source))
            entity = Dataset(name=record.name, digest=record.digest, source_type=source._get_source_type(),
                             source=source.to_json(), profile=json.dumps(record.profile))
            inputs.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, record.context)]))
        self._call("log_inputs", lambda: self.client.log_inputs(self.run_id, datasets=inputs))

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # The run's own store: without tracking_uri the monitor writes to MLflow's default
            # (a stray ./mlflow.db) and never finds the run.
            self._system_monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
            self._system_monitor.start()
        except Exception as err:  # psutil missing, or the API moved: tracking goes on without them
            log.warning("system metrics are not logged: %s", err)

    # -- queued calls --------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if len(self._queue) >= MAX_QUEUED_CALLS:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append((what, fn))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is queued; ``False`` if the server is still unreachable."""
        if not force and time.monotonic() < self._next_retry:
            return False
        while self._queue:
            what, fn = self._queue[0]
            try:
                fn()
            except Exception as err:
                self._next_retry = time.monotonic() + self._retry_interval
                self._retry_interval = min(2 * self._retry_interval, MAX_RETRY_INTERVAL_S)
                if not self._warned:
                    log.warning("MLflow at %s unreachable (%s: %s); keeping %d queued call(s) and retrying",
                                self.uri, what, err, len(self._queue))
                    self._warned = True
                return False
            self._queue.popleft()
        self._retry_interval = RETRY_INTERVAL_S
        if self._warned:
            log.warning("MLflow at %s reachable again; queued calls delivered", self.uri)
            self._warned = False
        return True

    @property
    def pending(self) -> int:
        return len(self._queue)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            batch = items[start:start + 100]
            self._call("log_params", lambda batch=batch: self.client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("set_tag", lambda k=key, v=value: self.client.set_tag(self.run_id, k, v))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def register_model(self, artifact_path: str, name: str) -> None:
        self._call("register_model",
                   lambda: self.mlflow.register_model(f"runs:/{self.run_id}/{artifact_path}", name))

    def finish(self, status: str = "FINISHED", wait_s: float = 30.0) -> int:
        """End the run; returns how many calls could not be delivered (and says so)."""
        if self._system_monitor is not None:
            self._system_monitor.finish()
        self._call("set_terminated", lambda: self.client.set_terminated(self.run_id, status))
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(1.0)
        lost = len(self._queue) + self._dropped
        if lost:
            log.error("MLflow at %s: %d tracking call(s) could not be delivered for run %s", self.uri, lost, self.run_id)
        return lost
