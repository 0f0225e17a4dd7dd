"""MLflow helpers: where the tracking store is, and what may be logged as params.

No ``MLFLOW_TRACKING_URI`` and no URI in the config: a local sqlite store ``<workdir>/mlflow.db`` with artifacts
in ``<workdir>/mlartifacts``, which ``mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db`` shows.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ingest import storage
from mermed.config import TrackingConfig

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
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    fs.makedirs(root, exist_ok=True)
    with fs.open(marker, "wb") as fh:
        fh.write(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}).encode())
    return run.info.run_id, uri
