"""Features, computed once per (encoder, dataset): a Ray Data actor pool embeds the rows and caches them as Parquet
beside a JSON naming the weights' and the shards' hashes. Probes embed a task's labelled rows; ``embed_shards``
(``mermed embed``) every row of an ingest output, with the ids users join on, for their own downstream code."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ingest import storage
from ingest.progress import Progress
from ingest.schema import SPLITS, read_manifest
from mermed.data import decode_square
from mermed.models import build_backbone, embed_dim_of
from mermed.normalize import modality_mean_std
from mermed.probe.config import (
    ExtractConfig,
)
from mermed.probe.encoders import Encoder
from mermed.probe.heads import encode_labels
from mermed.probe.tasks import (
    FEATURES_VERSION,
    META_COLUMNS,
    ProbeError,
    TaskData,
    labelled_mask,
    patient_groups,
)

log = logging.getLogger("mermed.probe")

FEATURES_FILE = "features.parquet"
FEATURES_JSON = "features.json"


# What ``embed_shards`` keeps of each row besides its embedding: enough to join it back to the shards.
EMBED_COLUMNS = (*META_COLUMNS, "study_id", "tile_x", "tile_y", "tile_level", "dataset")


class EncoderActor:
    """Ray Data actor: holds the frozen encoder; shard rows in (those with a ``label`` when one is named),
    embeddings plus the label and ``columns`` (as strings) out."""

    def __init__(
        self,
        model_name: str,
        img_size: int,
        weights: list,
        label: str | None,
        precision: str,
        normalization: dict,
        threads: int | None = None,
        columns: tuple[str, ...] = META_COLUMNS,
    ) -> None:
        import ray

        from mermed.train import autocast_dtype

        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_backbone(model_name, img_size)
        model.load_state_dict(ray.get(weights[0]), strict=True)  # the ref is wrapped so that Ray passes it as is
        self.model = model.to(self.device).eval()
        self.img_size, self.label = img_size, label
        self.embed_dim = embed_dim_of(model)
        self.amp = autocast_dtype(precision, self.device)
        self.normalization = normalization
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.label is not None:
            batch = batch.filter(labelled_mask(batch[self.label]))
        images = batch["image"].to_pylist()
        if images:
            pixels = torch.from_numpy(np.stack([decode_square(b, self.img_size) for b in images]))
            mean, std = modality_mean_std(self.normalization, batch["modality"].to_pylist(), self.device)
            x = (pixels.to(self.device).permute(0, 3, 1, 2).float() / 255 - mean[:, :, None, None]) / std[
                :, :, None, None
            ]
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, self.amp, enabled=self.amp is not None),
            ):
                emb = self.model(x).float().cpu().numpy()
        else:
            emb = np.zeros((0, self.embed_dim), np.float32)
        label = batch[self.label] if self.label is not None else pa.nulls(batch.num_rows, pa.string())
        columns = [
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.embed_dim),
            pc.cast(label, pa.string()),
            *(pc.cast(batch[c], pa.string()) for c in self.columns),  # frame (int32) too
        ]
        return pa.Table.from_arrays(columns, schema=features_schema(self.embed_dim, self.columns))


def features_schema(embed_dim: int, columns: tuple[str, ...] = META_COLUMNS) -> pa.Schema:
    """The cached features: one fixed-size float32 embedding per row, its label and ``columns`` as strings."""
    return pa.schema(
        [("embedding", pa.list_(pa.float32(), embed_dim)), ("label", pa.string())] + [(c, pa.string()) for c in columns]
    )


def actor_pool(cfg: ExtractConfig) -> tuple[int, float, int]:
    """(actors, GPUs per actor, torch threads per actor): one actor per GPU when the cluster has GPUs, else one
    per 2 CPUs; each actor's threads as configured, else the cluster's CPUs shared among the actors.

    Actors never reserve every CPU: Ray Data's read tasks need one, and without it the pipeline stalls.
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
    actors = min(actors, limit)
    return actors, 1.0 if gpus else 0.0, cfg.threads_per_actor or max(1, int(cpus) // actors)


def features_dir(output: str | Path, encoder: Encoder, data: TaskData) -> Path:
    return Path(output) / "features" / encoder.tag / data.key


def extract_features(encoder: Encoder, data: TaskData, output: str | Path, cfg: ExtractConfig) -> tuple[Path, bool]:
    """Embeddings of a task's labelled rows under ``encoder``; returns (cache dir, True when it was reused)."""
    task = data.task
    return _cached_embeddings(
        encoder,
        task.data,
        features_dir(output, encoder, data),
        data.identity,
        cfg,
        modality=task.modality,
        label=task.label,
        columns=META_COLUMNS,
        expected_rows=sum(data.counts.values()),
        name=f"task {task.name}",
    )


def embed_shards(
    encoder: Encoder, data: str, output: str | Path, cfg: ExtractConfig, modality: str | None = None
) -> tuple[Path, bool]:
    """Embeddings of every row of the ingest output ``data`` (of ``modality``, all by default) in
    ``OUTPUT/features.parquet``, with ``EMBED_COLUMNS``; reused while the encoder and the shards are the same."""
    manifest = read_manifest(data)
    identity = {
        "version": FEATURES_VERSION,
        "data": data if storage.is_remote(data) else str(Path(data).resolve()),
        "modality": modality,
        **{k: manifest.get(k) for k in ("shards", "rows", "config_hash", "inputs_hash", "finished")},
    }
    modalities = manifest.get("modalities", {})
    if modality is not None and modality not in modalities:
        raise ProbeError(f"{data} has no rows of modality {modality} (it has {', '.join(sorted(modalities))})")
    return _cached_embeddings(
        encoder,
        data,
        Path(output),
        identity,
        cfg,
        modality=modality,
        label=None,
        columns=EMBED_COLUMNS,
        expected_rows=modalities[modality] if modality else manifest.get("rows"),
        name=str(data),
    )


def _cached_embeddings(
    encoder: Encoder,
    data: str,
    out: Path,
    identity: dict,
    cfg: ExtractConfig,
    *,
    modality: str | None,
    label: str | None,
    columns: tuple[str, ...],
    expected_rows: int | None,
    name: str,
) -> tuple[Path, bool]:
    """The cache ``out`` of ``data``'s rows embedded by ``encoder``: reused when its JSON names the same weights and
    ``identity``, else extracted again. The parquet is written beside the cache and moved into place, and the
    JSON goes last: a cache without its JSON, or with a JSON naming other weights or data, is extracted again."""
    import pyarrow.parquet as pq
    import ray

    from mermed.data import open_shards

    expected = {"encoder": encoder.fingerprint, "data": identity}
    meta_path = out / FEATURES_JSON
    if meta_path.is_file() and (out / FEATURES_FILE).is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in expected} == expected:
            log.info("features: reusing %s for %s", out, name)
            return out, True
    actors, gpus, threads = actor_pool(cfg)
    log.info("features: embedding %s with encoder %s on %d actor(s)", name, encoder.tag, actors)
    started = time.perf_counter()
    read = ["image", *([label] if label else []), *columns]
    ds = open_shards(
        [data], splits=None if label is None else SPLITS, modality=modality, columns=list(dict.fromkeys(read))
    )
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "model_name": encoder.model_name,
            "img_size": encoder.img_size,
            "weights": [ray.put(encoder.weights)],
            "label": label,
            "precision": cfg.precision,
            "normalization": encoder.normalization,
            "threads": threads,
            "columns": columns,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_actor,
    )
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    progress = Progress(log, f"features of {name}", expected_rows, "rows")
    try:
        schema = features_schema(encoder.embed_dim, columns)
        with pq.ParquetWriter(staging / FEATURES_FILE, schema, compression="zstd") as writer:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write_table(batch.cast(schema))
                progress.update(batch.num_rows)
        rows = progress.done
        if expected_rows is not None and rows != expected_rows:
            raise ProbeError(f"{name}: extracted {rows} rows but found {expected_rows}; did the data change?")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    progress.close()
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
    groups = patient_groups(*(table[c].to_pylist() for c in ("patient_id", "source", "split", "frame")))
    return Features(*({s: a[split == s] for s in SPLITS} for a in (x, y, groups)))
