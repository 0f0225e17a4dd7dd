"""The probe library: frozen-encoder features, Ray Tune sweeps of probe heads, test AUROC with CIs, MLflow.

1. Every input check runs first, on the driver, from the shards' label columns and the encoders' tensor
   shapes (no image is decoded): a task without labelled rows, with a single class, with an empty or
   single-class split or with a patient in two splits, and an encoder of another architecture.
2. Features: Ray Data ``map_batches`` over the labelled rows with an actor pool; each actor builds the
   encoder once (weights from the object store, on GPU when there is one), decodes and normalises, and
   returns one embedding per row. They are cached in ``DIR/features/<encoder>/<data key>/`` with a JSON
   naming the weights' sha256 and the ingest manifest's hashes: each (encoder, dataset) is extracted once.
3. Per task, encoder, label fraction and label subset (``seeds`` stratified subsets per fraction below 1),
   a Ray Tune sweep (random search, ASHA on the validation AUROC) over head, lr, weight decay, width,
   dropout and epochs; the features reach the trials once through the object store. The best
   configuration is refit on the driver and scored once on the test split: AUROC, accuracy, and a 95% CI
   by bootstrap over patients.
4. One MLflow parent run per job holds the params, the test metrics, ``roc_<task>.png``,
   ``label_efficiency_<task>.png`` and the tables; every Tune trial is a nested run (Ray Tune's MLflow callback
   with the ``mlflow.parentRunId`` tag).

Outputs in DIR: ``summary.csv`` / ``summary.md`` (one row per task, encoder and fraction; below 100% of
the labels, AUROC and accuracy are means over the label subsets and the CI is that of the mean),
``results.csv`` (one row per sweep: subset seed, best configuration, validation and test scores),
``roc_<task>.png``, ``label_efficiency_<task>.png``, ``mlflow.db`` (unless tracking points elsewhere), ``tune/``
and ``features/``.

Modules: ``config`` (job and task files), ``tasks`` (input checks), ``encoders``, ``features`` (Ray Data),
``heads`` (probe heads and their training, no Ray), ``sweep`` (Ray Tune), ``report`` (tables, plots), ``job``.
The launcher is ``pipelines/probe.py`` (``mermed probe``).
"""

from mermed.probe.config import ProbeConfig, ProbeTask, ProbeTasksFile
from mermed.probe.encoders import Encoder, load_encoders, random_encoder, timm_encoder
from mermed.probe.features import EncoderActor, Features, embed_shards, extract_features, load_features
from mermed.probe.job import ProbeInputs, ProbeResult, check_inputs, run_probe_job
from mermed.probe.report import Fit, summarize
from mermed.probe.tasks import ProbeError, TaskData, inspect_task

__all__ = [
    "Encoder",
    "EncoderActor",
    "Features",
    "Fit",
    "ProbeConfig",
    "ProbeError",
    "ProbeInputs",
    "ProbeResult",
    "ProbeTask",
    "ProbeTasksFile",
    "TaskData",
    "check_inputs",
    "embed_shards",
    "extract_features",
    "inspect_task",
    "load_encoders",
    "load_features",
    "random_encoder",
    "run_probe_job",
    "summarize",
    "timm_encoder",
]
