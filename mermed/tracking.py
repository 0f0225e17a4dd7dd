"""MLflow helpers: where the tracking store is, what may be logged as params, and logging that outlives a
tracking server that goes away.

No ``MLFLOW_TRACKING_URI`` and no URI in the config: a local sqlite store ``<workdir>/mlflow.db`` with artifacts
in ``<workdir>/mlartifacts``, which ``mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db`` shows.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ingest import storage
from mermed.config import TrackingConfig

log = logging.getLogger("mermed.tracking")
T = TypeVar("T")

RUN_FILE = "mlflow_run.json"  # beside a run's checkpoints: the MLflow run a resumed run keeps logging to

# Param names that look like credentials are never logged, whatever a config holds.
_SECRET = re.compile(r"(secret|token|password|passwd|credential|access_key|api_key|deid_key)", re.I)


def tracking_uri(configured: str | None, workdir: str | Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve()}/mlflow.db"


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def use_experiment(name: str, uri: str, workdir: str | Path) -> str:
    """Point MLflow at ``uri`` and return the id of experiment ``name``, creating it with local artifacts."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment; undo that, or the next stage run in this process (the
    # demo, a test session) would log into this stage's store instead of its own default.
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(workdir).resolve() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params (``optim.lr``), with credential-like fields left out."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _SECRET.search(name):
            continue
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    """``params`` on run ``run_id`` in batches of MLflow's limit (100 per call)."""
    from mlflow.entities import Param

    items = list(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])


def resumable_run(
    run_uri: str, cfg: TrackingConfig, name: str, workdir: str | Path, params: Mapping[str, str], stage: str
) -> tuple[str, str]:
    """(run id, tracking URI) of the MLflow run of the run stored at ``run_uri``: created once with ``params``, and
    found again from ``RUN/mlflow_run.json`` when the run resumes (a new one if the tracking store changed)."""
    import mlflow

    uri = tracking_uri(cfg.mlflow_uri, workdir)
    experiment_id = use_experiment(cfg.experiment, uri, workdir)
    fs, root = storage.filesystem(run_uri)
    marker = posixpath.join(root, RUN_FILE)
    if fs.exists(marker):
        with fs.open(marker, "rb") as fh:
            saved = json.loads(fh.read())
        if saved.get("tracking_uri") == uri:
            return saved["run_id"], uri
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name, tags={"mermed.stage": stage})
    log_params(client, run.info.run_id, params)
    fs.makedirs(root, exist_ok=True)
    with fs.open(marker, "wb") as fh:
        fh.write(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}).encode())
    return run.info.run_id, uri


# ----------------------------------------------------------------------------------------------- outages


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the tracking server could not be reached (worth retrying), rather than that it
    refused the request."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):  # MLflow wraps connection errors as INTERNAL_ERROR
        return err.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
    return isinstance(err, (requests.RequestException, ConnectionError, TimeoutError))


def retry_here() -> None:
    """Make MLflow's own HTTP retries short in this process (they back off for minutes per call): the callers
    of ``when_reachable`` and ``RunLogger`` do the retrying, without stalling the loop that logs."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def metric_batch(metrics: Mapping[str, float], step: int) -> list:
    """``metrics`` as MLflow entities for one ``log_batch`` at ``step``, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


def when_reachable(action: Callable[[], T], what: str, cfg: TrackingConfig, *, warned: bool = False) -> T | None:
    """``action()``, retried every ``cfg.retry_s`` while the tracking server is unreachable, for up to
    ``cfg.reconnect_timeout_s``; one warning when it first fails (unless the caller has ``warned`` of this
    outage), None (and a warning) when it never got through."""
    deadline = time.monotonic() + cfg.reconnect_timeout_s
    while True:
        try:
            return action()
        except Exception as err:
            if not unreachable(err):
                raise
            if time.monotonic() >= deadline:
                log.warning("tracking server still unreachable: %s was not recorded in MLflow", what)
                return None
            if not warned:
                log.warning("tracking server unreachable (%s); retrying %s until it is back", type(err).__name__, what)
                warned = True
            time.sleep(cfg.retry_s)


class RunLogger:
    """Sends one MLflow run's metrics from a background thread, so that a tracking server that goes away never
    stops or slows training: metrics wait in memory and are retried every ``retry_s``, with one warning when the
    server becomes unreachable and one when it is back. ``close`` waits for the backlog.

    MLflow's own HTTP retries are set short for the calling process (``retry_here``): this class does the
    retrying, and keeps the order of the metrics while it does.
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, uri: str, run_id: str, cfg: TrackingConfig) -> None:
        import mlflow

        retry_here()
        self._client, self._run_id, self._cfg = mlflow.MlflowClient(uri), run_id, cfg
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0  # metrics refused because the backlog was full
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-run-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        with self._cond:
            room = self._cfg.max_pending - len(self._pending)
            if room < len(metrics) and not self.dropped:
                log.warning("tracking backlog full (%d metrics): newer metrics are dropped", self._cfg.max_pending)
            self.dropped += max(0, len(metrics) - room)
            self._pending.extend(metric_batch(dict(itertools.islice(metrics.items(), room)), step))
            self._cond.notify()

    def _send_loop(self) -> None:
        down_since = None
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                chunk = list(itertools.islice(self._pending, self.BATCH))
            try:
                self._client.log_batch(self._run_id, metrics=chunk)
            except Exception as err:  # noqa: BLE001 - nothing may end this thread but close()
                if not unreachable(err):
                    log.warning("MLflow refused %d metrics (%s); they are dropped", len(chunk), err)
                else:
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning(
                            "tracking server unreachable (%s); metrics are kept and sent when it is back",
                            type(err).__name__,
                        )
                    time.sleep(self._cfg.retry_s)
                    continue
            with self._cond:
                for _ in chunk:
                    self._pending.popleft()
                backlog = len(self._pending)
            if down_since is not None:
                log.warning(
                    "tracking server back after %.0f s; sending the metrics kept meanwhile (%d left)",
                    time.monotonic() - down_since,
                    backlog,
                )
                down_since = None

    def close(self) -> int:
        """Send what is pending (for up to ``reconnect_timeout_s`` while the server is away); the number of
        metrics that could not be sent, warned about when not zero."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(self._cfg.reconnect_timeout_s)
        with self._cond:
            unsent = len(self._pending) + self.dropped
        if unsent:
            log.warning("%d metrics could not be sent to the tracking server and are lost", unsent)
        return unsent
