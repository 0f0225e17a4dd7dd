"""The probe stage: frozen-encoder features, Ray Tune sweeps of probe heads, test AUROC with CIs, MLflow.

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
4. One MLflow parent run per job holds the params, the test metrics, ``roc_<task>.png`` and the tables;
   every Tune trial is a nested run (Ray Tune's MLflow callback with the ``mlflow.parentRunId`` tag).

Outputs in DIR: ``summary.csv`` / ``summary.md`` (one row per task, encoder and fraction; below 100% of
the labels, AUROC and accuracy are means over the label subsets and the CI is that of the mean),
``results.csv`` (one row per sweep: subset seed, best configuration, validation and test scores),
``roc_<task>.png``, ``mlflow.db`` (unless tracking points elsewhere), ``tune/`` and ``features/``.

Entry point for ``ray job submit --working-dir . -- python pipelines/probe.py --encoder ... --tasks ...
--output ...``; takes the same arguments as ``mermed probe``.
"""

# ruff: noqa: E402 - the repository goes onto sys.path first when this file runs as a script

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # ``python pipelines/probe.py``: the repository on sys.path, not this folder, whose
    _here = Path(__file__).resolve().parent  # ingest.py would shadow the ingest package (in Ray workers too)
    sys.path[:] = [str(_here.parent), *(p for p in sys.path if Path(p or ".").resolve() != _here)]

import csv
import hashlib
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mermed import storage
from mermed.config import (
    ExtractConfig,
    ProbeConfig,
    ProbeSearchConfig,
    ProbeTask,
    ProbeTasksFile,
    ProbeTrainConfig,
)
from mermed.data import decode_square, read_manifest, shard_uris
from mermed.metrics import accuracy, auroc, bootstrap_ci, mean_bootstrap_ci
from mermed.models import ENCODER_JSON, EncoderInfo, build_backbone, check_state_dict, embed_dim_of, load_encoder
from mermed.probe import encode_labels, fit_probe, predict_scores, subsample_labels

log = logging.getLogger("mermed.probe")

SPLITS = ("train", "val", "test")
FEATURES_VERSION = "mermed-features/1"  # bump when preprocessing or the file layout changes
FEATURES_FILE = "features.parquet"
FEATURES_JSON = "features.json"
SUMMARY_COLUMNS = (
    "task",
    "modality",
    "encoder",
    "fraction",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "accuracy",
    "n_test",
)
RESULT_COLUMNS = (
    "task",
    "modality",
    "encoder",
    "fraction",
    "seed",
    "n_train",
    "head",
    "lr",
    "weight_decay",
    "hidden",
    "dropout",
    "epochs",
    "val_auroc",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "accuracy",
    "n_test",
)
METRICS = ("auroc", "auroc_lo", "auroc_hi", "accuracy")  # logged on the parent run per task/encoder/fraction
_META_COLUMNS = ("split", "modality", "patient_id", "source")
_HYPER = ("head", "lr", "weight_decay", "hidden", "dropout", "epochs")  # what a sweep searches


class ProbeError(ValueError):
    """Input a probe job cannot use, found before any compute; the message names the task or the encoder."""


# --------------------------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class Encoder:
    """A frozen encoder to probe: ``tag`` is its name in the tables (pretrained, random, or a timm name)."""

    tag: str
    model_name: str
    img_size: int
    embed_dim: int
    fingerprint: str  # sha256 of the architecture, input size and every weight
    weights: dict[str, torch.Tensor] = field(repr=False, compare=False)


def _fingerprint(model_name: str, img_size: int, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(f"{model_name}:{img_size}".encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _encoder(tag: str, model_name: str, img_size: int, model: torch.nn.Module) -> Encoder:
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return Encoder(tag, model_name, img_size, embed_dim_of(model), _fingerprint(model_name, img_size, state), state)


def random_encoder(model_name: str, img_size: int, seed: int) -> Encoder:
    """The same architecture with random weights (timm's initialisation under ``seed``): the floor to beat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _encoder("random", model_name, img_size, build_backbone(model_name, img_size))


def timm_encoder(model_name: str, path: str | Path, img_size: int) -> Encoder:
    """A timm model with a local state dict (safetensors, or a torch file read with ``weights_only``).

    The classifier's weights are dropped and timm's own checkpoint filter adapts the position embedding to
    ``img_size``, so timm's published weights load as they are; anything else must match exactly.
    """
    import timm.models

    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"baseline {model_name}: weights file {path.name} not found")
    try:
        model = build_backbone(model_name, img_size)
    except ValueError as err:
        raise ProbeError(f"baseline {model_name}: {err}") from None
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch, pickle and safetensors each raise their own
        raise ProbeError(f"baseline {model_name}: cannot read {path.name} as a state dict ({err})") from None
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ProbeError(f"baseline {model_name}: weights do not fit the architecture ({err})") from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    own = model.state_dict().keys()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(f"{c}." for c in heads))}
    try:
        check_state_dict(model, {k: v.shape for k, v in state.items()}, f"baseline {model_name}")
    except ValueError as err:
        raise ProbeError(str(err)) from None
    model.load_state_dict(state, strict=True)
    return _encoder(model_name, model_name, img_size, model)


def _load_exported(encoder: str | Path) -> tuple[torch.nn.Module, EncoderInfo]:
    """``load_encoder`` for a local path or an s3:// URI (copied with its encoder.json into a temporary folder)."""
    if not storage.is_remote(str(encoder)):
        return load_encoder(encoder)
    fs, path = storage.filesystem(str(encoder))
    with tempfile.TemporaryDirectory() as tmp:
        for remote in (path, posixpath.join(posixpath.dirname(path), ENCODER_JSON)):
            if not fs.exists(remote):
                raise FileNotFoundError(f"{posixpath.basename(remote)} not found beside the encoder")
            fs.get(remote, os.path.join(tmp, posixpath.basename(remote)))
        return load_encoder(os.path.join(tmp, posixpath.basename(path)))


def load_encoders(encoder: str | Path, baselines: Sequence[str], baseline_seed: int = 0) -> list[Encoder]:
    """The exported encoder (tag ``pretrained``; local or s3://) and the baselines: ``random`` or
    ``TIMM_NAME=PATH`` (a local file)."""
    try:
        model, info = _load_exported(encoder)
    except (ValueError, FileNotFoundError) as err:
        raise ProbeError(f"--encoder: {err}") from None
    encoders = [_encoder("pretrained", info.model_name, info.img_size, model)]
    for spec in baselines:
        if spec == "random":
            encoders.append(random_encoder(info.model_name, info.img_size, baseline_seed))
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ProbeError(f"--baseline {spec!r}: expected 'random' or TIMM_NAME=PATH (a local weights file)")
        encoders.append(timm_encoder(name, path, info.img_size))
    tags = [e.tag for e in encoders]
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise ProbeError(f"encoders repeat: {', '.join(repeated)}")
    return encoders


# --------------------------------------------------------------------------------------------- tasks


def labelled_mask(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Rows that carry a label: shards also hold unlabelled (pretraining) rows, which no task uses."""
    text = pc.cast(column, pa.string())
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(text), ""), False)


def patient_groups(patient_id: Sequence[str | None], source: Sequence[str | None]) -> np.ndarray:
    """Bootstrap and leakage groups: the patient pseudonym, else the input's pseudonym (patient unknown)."""
    return np.array([p if p is not None else s for p, s in zip(patient_id, source, strict=True)], dtype=object)


def _two_classes(y: np.ndarray, task: str) -> bool:
    if task == "multilabel":
        positives = y.sum(axis=0)
        return bool(((positives > 0) & (positives < y.shape[0])).any())
    return np.unique(y).size >= 2


@dataclass(frozen=True)
class TaskData:
    """What the checks found for one task: its classes, labelled rows per split, and its cache key."""

    task: ProbeTask
    key: str  # cache directory: hash of ``identity``
    identity: dict[str, Any]
    classes: list[str]
    counts: dict[str, int]
    modalities: list[str]

    @property
    def modality(self) -> str:
        return self.task.modality or "+".join(self.modalities)


def _data_uri(data: str) -> str:
    return data if storage.is_remote(data) else str(Path(data).resolve())


def inspect_task(task: ProbeTask) -> TaskData:
    """Read the label, split and patient columns (no images) and reject a task that cannot be probed."""
    import pyarrow.dataset as pads

    name = f"task {task.name}"
    try:
        manifest = read_manifest(task.data)
        uris = shard_uris([task.data], task.modality)
    except (FileNotFoundError, KeyError) as err:
        raise ProbeError(f"{name}: {err}") from None
    if not uris:
        raise ProbeError(f"{name}: no shards{f' of modality {task.modality}' if task.modality else ''} in its data")
    fs, _ = storage.filesystem(uris[0])
    dataset = pads.dataset(
        [storage.filesystem(u)[1] for u in uris], filesystem=storage.arrow_filesystem(fs), format="parquet"
    )
    missing = sorted({task.label, *_META_COLUMNS} - set(dataset.schema.names))
    if missing:
        raise ProbeError(f"{name}: the shards have no column {', '.join(missing)}")
    table = dataset.to_table(columns=list(dict.fromkeys([task.label, *_META_COLUMNS])))
    table = table.filter(labelled_mask(table[task.label]))
    if table.num_rows == 0:
        raise ProbeError(f"{name}: no labelled rows (column {task.label!r} is empty in every row)")
    outside = table.num_rows - int(pc.sum(pc.is_in(table["split"], pa.array(SPLITS))).as_py() or 0)
    if outside:
        log.warning("%s: %d labelled rows are in no train/val/test split and are left out", name, outside)
    table = table.filter(pc.is_in(table["split"], pa.array(SPLITS)))
    labels = pc.cast(table[task.label], pa.string()).to_pylist()
    split = np.asarray(table["split"].to_pylist(), dtype=object)
    try:
        y, classes = encode_labels(labels, task.type)
    except ValueError as err:
        raise ProbeError(f"{name}: {err}") from None
    counts = {s: int((split == s).sum()) for s in SPLITS}
    for s in SPLITS:
        if counts[s] == 0:
            raise ProbeError(f"{name}: the {s} split has no labelled rows")
        if not _two_classes(y[split == s], task.type):
            raise ProbeError(f"{name}: the labels of the {s} split are single-class (training and AUROC need two)")
    train = y[split == "train"]
    untrained = [c for k, c in enumerate(classes) if not (train[:, k] if train.ndim == 2 else train == k).any()]
    if untrained:
        raise ProbeError(f"{name}: no training row has class {', '.join(untrained)} (a probe cannot learn it)")
    groups = patient_groups(table["patient_id"].to_pylist(), table["source"].to_pylist())
    splits_of: dict[str, set[str]] = {}
    for g, s in zip(groups, split, strict=True):
        splits_of.setdefault(g, set()).add(s)
    leaking = sum(1 for s in splits_of.values() if len(s) > 1)
    if leaking:
        raise ProbeError(f"{name}: {leaking} patients have rows in more than one split (splits must be by patient)")
    identity = {
        "version": FEATURES_VERSION,
        "data": _data_uri(task.data),
        "modality": task.modality,
        "label": task.label,
        "shards": manifest.get("shards"),
        "rows": manifest.get("rows"),
        "config_hash": manifest.get("config_hash"),
        "inputs_hash": manifest.get("inputs_hash"),
        "finished": manifest.get("finished"),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    modalities = sorted(set(table["modality"].to_pylist()))
    return TaskData(task, key, identity, classes, counts, modalities)


# --------------------------------------------------------------------------------------------- features


class EncoderActor:
    """Ray Data actor: holds the frozen encoder; labelled shard rows in, embeddings plus metadata out."""

    def __init__(self, model_name: str, img_size: int, weights: list, label: str, precision: str) -> None:
        import ray
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from mermed.train import autocast_dtype

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_backbone(model_name, img_size)
        model.load_state_dict(ray.get(weights[0]), strict=True)  # the ref is wrapped so that Ray passes it as is
        self.model = model.to(self.device).eval()
        self.img_size, self.label = img_size, label
        self.embed_dim = embed_dim_of(model)
        self.amp = autocast_dtype(precision, self.device)
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = batch.filter(labelled_mask(batch[self.label]))
        images = batch["image"].to_pylist()
        if images:
            pixels = torch.from_numpy(np.stack([decode_square(b, self.img_size) for b in images]))
            x = (pixels.to(self.device).permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, self.amp, enabled=self.amp is not None),
            ):
                emb = self.model(x).float().cpu().numpy()
        else:
            emb = np.zeros((0, self.embed_dim), np.float32)
        columns = [
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.embed_dim),
            pc.cast(batch[self.label], pa.string()),
            *(batch[c] for c in _META_COLUMNS),
        ]
        return pa.Table.from_arrays(columns, schema=features_schema(self.embed_dim))


def features_schema(embed_dim: int) -> pa.Schema:
    """The cached features: one fixed-size float32 embedding per labelled row, with what the probes need."""
    return pa.schema(
        [("embedding", pa.list_(pa.float32(), embed_dim)), ("label", pa.string())]
        + [(c, pa.string()) for c in _META_COLUMNS]
    )


def _actor_pool(cfg: ExtractConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs, else one per 2 CPUs.

    Actors never take every CPU: Ray Data's read tasks need one, and without it the pipeline stalls.
    """
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    limit = max(1, int((cpus - 1) // cfg.cpus_per_actor))
    if gpus:
        limit = min(limit, gpus)
    actors = cfg.actors or (gpus if gpus else max(1, int(cpus) // 2))
    if actors > limit:
        log.warning("features: %d encoder actors do not fit this cluster; using %d", actors, limit)
    return min(actors, limit), 1.0 if gpus else 0.0


def features_dir(output: str | Path, encoder: Encoder, data: TaskData) -> Path:
    return Path(output) / "features" / encoder.tag / data.key


def extract_features(encoder: Encoder, data: TaskData, output: str | Path, cfg: ExtractConfig) -> tuple[Path, bool]:
    """Embeddings of a task's labelled rows under ``encoder``; returns (cache dir, True when it was reused).

    The parquet is written beside the cache and moved into place, and the JSON goes last: a cache without
    its JSON, or with a JSON naming other weights or another ingest, is extracted again.
    """
    import pyarrow.parquet as pq
    import ray

    from mermed.data import open_shards

    out = features_dir(output, encoder, data)
    expected = {"encoder": encoder.fingerprint, "data": data.identity}
    meta_path = out / FEATURES_JSON
    if meta_path.is_file() and (out / FEATURES_FILE).is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in expected} == expected:
            log.info("features: reusing %s/%s for task %s", encoder.tag, data.key, data.task.name)
            return out, True
    task = data.task
    actors, gpus = _actor_pool(cfg)
    log.info("features: extracting task %s with encoder %s on %d actor(s)", task.name, encoder.tag, actors)
    started = time.perf_counter()
    ds = open_shards(
        [task.data],
        splits=SPLITS,
        modality=task.modality,
        columns=list(dict.fromkeys(["image", task.label, *_META_COLUMNS])),
    )
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "model_name": encoder.model_name,
            "img_size": encoder.img_size,
            "weights": [ray.put(encoder.weights)],
            "label": task.label,
            "precision": cfg.precision,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_actor,
    )
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    rows = 0
    try:
        schema = features_schema(encoder.embed_dim)
        with pq.ParquetWriter(staging / FEATURES_FILE, schema, compression="zstd") as writer:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write_table(batch.cast(schema))
                rows += batch.num_rows
        expected_rows = sum(data.counts.values())
        if rows != expected_rows:
            raise ProbeError(f"task {task.name}: extracted {rows} rows but found {expected_rows}; did the data change?")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    meta = {
        **expected,
        "encoder_tag": encoder.tag,
        "model_name": encoder.model_name,
        "img_size": encoder.img_size,
        "embed_dim": encoder.embed_dim,
        "rows": rows,
        "seconds": round(seconds, 3),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("features: %d rows of task %s in %.1f s", rows, task.name, seconds)
    return out, False


@dataclass
class Features:
    """A task's embeddings with targets encoded against the task's classes, split by split."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]


def load_features(path: Path, data: TaskData) -> Features:
    import pyarrow.parquet as pq

    table = pq.read_table(path / FEATURES_FILE)
    emb = table["embedding"].combine_chunks()
    x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).astype(np.float32, copy=False)
    split = np.asarray(table["split"].to_pylist(), dtype=object)
    y, _ = encode_labels(table["label"].to_pylist(), data.task.type, classes=data.classes)
    groups = patient_groups(table["patient_id"].to_pylist(), table["source"].to_pylist())
    return Features(*({s: a[split == s] for s in SPLITS} for a in (x, y, groups)))


# --------------------------------------------------------------------------------------------- sweeps


@dataclass
class SweepData:
    """What every trial of a sweep trains on; it reaches them once, through the object store."""

    task: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    n_classes: int
    batch_size: int
    seed: int


def train_config(config: dict[str, Any], batch_size: int, seed: int) -> ProbeTrainConfig:
    """A trial's sampled hyperparameters as the probe's config."""
    return ProbeTrainConfig(**{k: config[k] for k in _HYPER}, batch_size=batch_size, seed=seed)


def probe_trial(config: dict[str, Any], *, data: SweepData) -> None:
    """Tune function trainable: one probe fit, reporting the val AUROC every epoch (ASHA may stop it)."""
    from ray import tune

    cfg = train_config(config, data.batch_size, data.seed)
    fit_probe(
        data.train_x,
        data.train_y,
        data.val_x,
        data.val_y,
        data.task,  # type: ignore[arg-type]
        cfg,
        report=lambda epoch, metrics: tune.report({"epoch": epoch, **metrics}),
        n_classes=data.n_classes,
    )


def search_space(cfg: ProbeSearchConfig) -> dict[str, Any]:
    from ray import tune

    def span(bounds: tuple[float, float], log: bool) -> Any:
        lo, hi = bounds
        if lo == hi:
            return lo
        return tune.loguniform(lo, hi) if log else tune.uniform(lo, hi)

    return {
        "head": tune.choice(cfg.heads),
        "lr": span(cfg.lr, log=True),
        "weight_decay": span(cfg.weight_decay, log=True),
        "hidden": tune.choice(cfg.hidden),
        "dropout": span(cfg.dropout, log=False),
        "epochs": tune.choice(cfg.epochs),
    }


def run_sweep(
    data: Any,
    cfg: ProbeConfig,
    *,
    name: str,
    storage_path: Path,
    callbacks: list,
    seed: int,
    trainable: Callable[..., None] = probe_trial,
) -> tuple[dict[str, Any], float]:
    """Random search with ASHA over ``cfg.search``; returns the best trial's config and its best val AUROC.

    ``trainable(config, data=data)`` runs one trial (bench/probe.py passes one that re-runs the encoder).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = cfg.search
    # Ray's newer console output prints a configuration table per sweep even at verbose=0; the classic one is
    # silent there (this job logs one line per fit itself). An explicit setting in the environment wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, data=data), {"cpu": 1}),
        param_space=search_space(search),
        tune_config=tune.TuneConfig(
            metric="val_auroc",
            mode="max",
            num_samples=cfg.trials,
            scheduler=ASHAScheduler(
                max_t=max(search.epochs),
                grace_period=search.grace_period,
                reduction_factor=search.reduction_factor,
            ),
            search_alg=BasicVariantGenerator(random_state=seed),
            trial_name_creator=lambda trial: f"{name}-{trial.trial_id}",
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path.resolve()), callbacks=callbacks, verbose=0),
    )
    grid = tuner.fit()
    if grid.errors:
        log.warning("sweep %s: %d of %d trials failed, e.g. %s", name, len(grid.errors), len(grid), grid.errors[0])
    if len(grid.errors) == len(grid):
        raise RuntimeError(f"sweep {name}: every trial failed; the first error: {grid.errors[0]}")
    best = grid.get_best_result(metric="val_auroc", mode="max", scope="all")
    return dict(best.config), float(best.metrics_dataframe["val_auroc"].max())


# --------------------------------------------------------------------------------------------- the job


@dataclass
class Fit:
    """One sweep's outcome: the refit probe's test scores and the configuration it was trained with."""

    task: str
    modality: str
    encoder: str
    fraction: float
    seed: int
    n_train: int
    config: dict[str, Any]
    val_auroc: float
    auroc: float
    auroc_lo: float
    auroc_hi: float
    accuracy: float
    y_test: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    groups: np.ndarray = field(repr=False)

    def row(self) -> dict[str, Any]:
        """The row of results.csv."""
        values = {**{k: self.config[k] for k in _HYPER}, "n_test": len(self.y_test)}
        return {c: values[c] if c in values else getattr(self, c) for c in RESULT_COLUMNS}


@dataclass
class ProbeResult:
    output: Path
    summary: list[dict[str, Any]]
    results: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    reused: dict[str, bool]  # "<encoder>/<task>" -> features came from the cache


def _ci(fn, *args, **kwargs) -> tuple[float, float]:
    """A bootstrap CI, or NaNs (with a warning) when too few patients of a class make it meaningless."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        log.warning("no confidence interval: %s", err)
        return math.nan, math.nan


@dataclass(frozen=True)
class Tracking:
    """Where the sweeps' trials go: nested runs under the job's parent run."""

    uri: str
    experiment: str
    parent_run_id: str
    storage_path: Path  # Ray Tune's experiment folders


def _fit_and_test(
    features: Features, data: TaskData, encoder: str, fraction: float, seed: int, cfg: ProbeConfig, tracking: Tracking
) -> Fit:
    """Sweep on a stratified ``fraction`` of the training labels (subset ``seed``), refit the best, test once."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    tags = {"task": data.task.name, "encoder": encoder, "fraction": str(fraction), "label_seed": str(seed)}
    callback = MLflowLoggerCallback(
        tracking_uri=tracking.uri,
        experiment_name=tracking.experiment,
        tags={"mlflow.parentRunId": tracking.parent_run_id, **tags},
        save_artifact=False,
    )
    name = f"{tracking.parent_run_id[:8]}-{data.task.name}-{encoder}-f{fraction:g}-s{seed}"
    task = data.task
    rows = subsample_labels(features.y["train"], fraction, seed, task.type)
    sweep_data = SweepData(
        task=task.type,
        train_x=features.x["train"][rows],
        train_y=features.y["train"][rows],
        val_x=features.x["val"],
        val_y=features.y["val"],
        n_classes=len(data.classes),
        batch_size=cfg.search.batch_size,
        seed=seed,
    )
    config, val_auroc = run_sweep(
        sweep_data, cfg, name=name, storage_path=tracking.storage_path, callbacks=[callback], seed=cfg.seed + seed
    )
    model, _ = fit_probe(
        sweep_data.train_x,
        sweep_data.train_y,
        sweep_data.val_x,
        sweep_data.val_y,
        task.type,
        train_config(config, cfg.search.batch_size, seed),
        n_classes=sweep_data.n_classes,
    )
    y, groups = features.y["test"], features.groups["test"]
    scores = predict_scores(model, features.x["test"])
    lo, hi = _ci(bootstrap_ci, y, scores, task.type, groups, n_boot=cfg.bootstrap)
    return Fit(
        task=task.name,
        modality=data.modality,
        encoder=encoder,
        fraction=fraction,
        seed=seed,
        n_train=len(rows),
        config=config,
        val_auroc=val_auroc,
        auroc=auroc(y, scores, task.type),
        auroc_lo=lo,
        auroc_hi=hi,
        accuracy=accuracy(y, scores, task.type),
        y_test=y,
        scores=scores,
        groups=groups,
    )


def summarize(fits: Sequence[Fit], task_types: dict[str, str], n_boot: int) -> list[dict[str, Any]]:
    """One row per (task, encoder, fraction): means over label subsets, and the patient CI of the mean."""
    cells: dict[tuple[str, str, float], list[Fit]] = {}
    for f in fits:
        cells.setdefault((f.task, f.encoder, f.fraction), []).append(f)
    rows = []
    for (task, encoder, fraction), group in cells.items():
        first = group[0]
        lo, hi = _ci(
            mean_bootstrap_ci,
            first.y_test,
            [f.scores for f in group],
            task_types[task],
            first.groups,
            n_boot=n_boot,
        )
        values = {
            "task": task,
            "modality": first.modality,
            "encoder": encoder,
            "fraction": fraction,
            "auroc": float(np.mean([f.auroc for f in group])),
            "auroc_lo": lo,
            "auroc_hi": hi,
            "accuracy": float(np.mean([f.accuracy for f in group])),
            "n_test": len(first.y_test),
        }
        rows.append({c: values[c] for c in SUMMARY_COLUMNS})
    return rows


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _markdown(rows: Sequence[dict[str, Any]], seeds: int) -> str:
    def num(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    lines = [
        "| task | modality | encoder | labels | AUROC (95% CI) | accuracy | n test |",
        "| --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        auroc_ci = f"{num(r['auroc'])} ({num(r['auroc_lo'])}-{num(r['auroc_hi'])})"
        lines.append(
            f"| {r['task']} | {r['modality']} | {r['encoder']} | {100 * r['fraction']:g}% | {auroc_ci} | "
            f"{num(r['accuracy'])} | {r['n_test']} |"
        )
    note = "\nAUROC: macro one-vs-rest for multi-class and multi-label tasks; 95% CI by bootstrap over patients."
    if any(r["fraction"] < 1 for r in rows):
        note += f" Below 100% of the labels: the mean over stratified label subsets ({seeds}; see results.csv)."
    return "\n".join(lines) + "\n" + note + "\n"


def _roc_points(y: np.ndarray, scores: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve; for multi-class and multi-label the macro average of the one-vs-rest curves."""
    from sklearn.metrics import roc_curve

    if task == "binary":
        fpr, tpr, _ = roc_curve(y, scores)
        return fpr, tpr
    positives = y[:, None] == np.arange(scores.shape[1]) if task == "multiclass" else y.astype(bool)
    grid = np.linspace(0, 1, 201)
    curves = [
        np.interp(grid, *roc_curve(positives[:, k], scores[:, k])[:2])
        for k in range(scores.shape[1])
        if 0 < positives[:, k].sum() < len(y)
    ]
    return grid, np.mean(curves, axis=0)


def plot_roc(path: Path, task: str, task_type: str, fits: Sequence[Fit]) -> None:
    """One PNG per task: a curve per encoder and label fraction (the first label subset)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5), dpi=110)
    ax = fig.subplots()
    for f in fits:
        fpr, tpr = _roc_points(f.y_test, f.scores, task_type)
        ax.plot(fpr, tpr, label=f"{f.encoder}, {f.fraction:.0%} labels (AUROC {f.auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task} ({task_type})")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def run_probe(
    encoder: str | Path,
    tasks: str | Path,
    output: str | Path,
    cfg: ProbeConfig,
    baselines: Sequence[str] = (),
) -> ProbeResult:
    """The whole probe job (see the module docstring); every input check runs before Ray starts any work."""
    import mlflow

    from mermed.config import load_config
    from mermed.tracking import flatten_params, tracking_uri, ui_command, use_experiment
    from pipelines.common import init_ray

    task_list = load_config(ProbeTasksFile, tasks).tasks
    encoders = load_encoders(encoder, baselines, cfg.baseline_seed)
    datas = [inspect_task(t) for t in task_list]
    for d in datas:
        log.info("task %s: %s, classes %s, labelled rows %s", d.task.name, d.task.type, d.classes, d.counts)

    init_ray()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.mlflow_uri, out)
    experiment_id = use_experiment(cfg.tracking.experiment, uri, out)
    fits: list[Fit] = []
    reused: dict[str, bool] = {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"probe-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        tracking = Tracking(uri, cfg.tracking.experiment, run.info.run_id, out / "tune")
        mlflow.log_params(
            flatten_params(
                {
                    "probe": cfg.model_dump(),
                    "encoders": {
                        e.tag: {"model": e.model_name, "img_size": e.img_size, "sha256": e.fingerprint}
                        for e in encoders
                    },
                    "tasks": {d.task.name: {**d.task.model_dump(), "classes": d.classes} for d in datas},
                }
            )
        )
        for data in datas:
            task = data.task
            for enc in encoders:
                path, reused[f"{enc.tag}/{task.name}"] = extract_features(enc, data, out, cfg.extract)
                features = load_features(path, data)
                for fraction in sorted(cfg.fractions):
                    for seed in range(cfg.seeds if fraction < 1 else 1):
                        fit = _fit_and_test(features, data, enc.tag, fraction, seed, cfg, tracking)
                        log.info(
                            "%s / %s / %g labels (subset %d): test AUROC %.3f (%.3f-%.3f), best %s",
                            *(task.name, enc.tag, fraction, seed, fit.auroc, fit.auroc_lo, fit.auroc_hi, fit.config),
                        )
                        fits.append(fit)
            roc = out / f"roc_{task.name}.png"
            plot_roc(roc, task.name, task.type, [f for f in fits if f.task == task.name and f.seed == 0])
            mlflow.log_artifact(str(roc))

        summary = summarize(fits, {d.task.name: d.task.type for d in datas}, cfg.bootstrap)
        results = [f.row() for f in fits]
        _write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
        _write_csv(out / "results.csv", results, RESULT_COLUMNS)
        (out / "summary.md").write_text(_markdown(summary, cfg.seeds))
        for r in summary:
            prefix = f"{r['task']}.{r['encoder']}.f{r['fraction']:g}"
            mlflow.log_metrics({f"{prefix}.test_{m}": r[m] for m in METRICS if not math.isnan(r[m])})
        for name in ("summary.csv", "summary.md", "results.csv"):
            mlflow.log_artifact(str(out / name))
    log.info("probe: %s; browse with: %s", out / "summary.md", ui_command(uri))
    return ProbeResult(out, summary, results, tracking.parent_run_id, uri, reused)


__all__ = [
    "Encoder",
    "EncoderActor",
    "ProbeError",
    "ProbeResult",
    "TaskData",
    "extract_features",
    "inspect_task",
    "load_encoders",
    "load_features",
    "run_probe",
    "summarize",
]


if __name__ == "__main__":
    from mermed.cli import app

    app(["probe", *sys.argv[1:]])
