"""Features, computed once per (encoder, dataset): a Ray Data actor pool embeds the rows and caches them as Parquet
beside a JSON naming the weights' and the shards' hashes. Probes embed a task's labelled rows; ``embed_shards``
(``mermed embed``) every row of an ingest output, with the ids users join on, for their own downstream code."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
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
    """Ray Data actor: holds the frozen encoder; rows in the shape ``_tagged_rows`` gives them, their embeddings
    plus the label, the job index and ``columns`` out."""

    def __init__(
        self,
        model_name: str,
        img_size: int,
        weights: list,
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
        self.img_size = img_size
        self.embed_dim = embed_dim_of(model)
        self.amp = autocast_dtype(precision, self.device)
        self.normalization = normalization
        self.schema = features_schema(self.embed_dim, columns).append(pa.field(JOB, pa.int32()))

    def __call__(self, batch: pa.Table) -> pa.Table:
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
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.embed_dim)
        return pa.Table.from_arrays(
            [embedding, *(batch[f.name] for f in self.schema if f.name != "embedding")], schema=self.schema
        )


JOB = "job"  # the column telling, in the one pipeline of an extraction, which cache a row is for


@dataclass(frozen=True)
class _Selection:
    """Which rows of a shared read go to one cache: those of its shard files, labelled by ``label`` when one is
    named (and then of the train/val/test splits only)."""

    job: int
    paths: tuple[str, ...]
    label: str | None


def _tagged_rows(batch: pa.Table, selections: list[_Selection], columns: tuple[str, ...]) -> pa.Table:
    """Each selection's rows of ``batch`` in the one shape a pipeline's caches share: the label and ``columns`` as
    strings (frame is int32), the cache's index. A row two caches select is there twice, once for each."""
    parts = []
    for sel in selections:
        mask = pc.is_in(batch["path"], pa.array(sel.paths))
        if sel.label is not None:
            mask = pc.and_(mask, pc.and_(labelled_mask(batch[sel.label]), pc.is_in(batch["split"], pa.array(SPLITS))))
        rows = batch.filter(mask)
        label = rows[sel.label] if sel.label is not None else pa.nulls(rows.num_rows, pa.string())
        parts.append(
            pa.table(
                {
                    "image": rows["image"],
                    "label": pc.cast(label, pa.string()),
                    **{c: pc.cast(rows[c], pa.string()) for c in columns},
                    JOB: pa.array(np.full(rows.num_rows, sel.job, np.int32)),
                }
            )
        )
    return pa.concat_tables(parts)


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


@dataclass(frozen=True)
class _Cache:
    """One cache of embeddings to fill or reuse: the rows of ``data`` (of ``modality``; those with a ``label``
    when one is named), reused while its JSON names the same weights and ``identity``."""

    data: str
    out: Path
    identity: dict
    modality: str | None
    label: str | None
    expected_rows: int | None
    name: str


def extract_features(
    encoder: Encoder, datas: Sequence[TaskData], output: str | Path, cfg: ExtractConfig
) -> list[tuple[Path, bool]]:
    """Embeddings of each task's labelled rows under ``encoder``, in one Ray Data pipeline for all the tasks whose
    cache is missing or stale (the pipeline's start, the actors and the weights are paid once); returns (cache
    dir, True when it was reused) per task, in order."""
    caches = [
        _Cache(
            data.task.data,
            features_dir(output, encoder, data),
            data.identity,
            data.task.modality,
            data.task.label,
            sum(data.counts.values()),
            f"task {data.task.name}",
        )
        for data in datas
    ]
    return _cached_embeddings(encoder, caches, cfg, META_COLUMNS)


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
    expected = modalities[modality] if modality else manifest.get("rows")
    (done,) = _cached_embeddings(
        encoder, [_Cache(data, Path(output), identity, modality, None, expected, str(data))], cfg, EMBED_COLUMNS
    )
    return done


def _is_current(cache: _Cache, encoder: Encoder) -> bool:
    meta_path = cache.out / FEATURES_JSON
    if not (meta_path.is_file() and (cache.out / FEATURES_FILE).is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("encoder") == encoder.fingerprint and meta.get("data") == cache.identity


def _cached_embeddings(
    encoder: Encoder, caches: list[_Cache], cfg: ExtractConfig, columns: tuple[str, ...]
) -> list[tuple[Path, bool]]:
    """Fill the stale ``caches`` in one pipeline: their shard files are read once, each cache's rows tagged with
    its index, and they go through one pool of encoder actors. Each parquet is written beside its cache and moved
    into place, and its JSON goes last: a cache without its JSON, or with a JSON naming other weights or data, is
    extracted again."""
    import pyarrow.parquet as pq
    import ray

    from mermed.data import read_shards, shard_uris

    stale: list[int] = []  # a cache two tasks share (the same encoder and data) is filled once
    for i, c in enumerate(caches):
        if not _is_current(c, encoder) and all(caches[j].out != c.out for j in stale):
            stale.append(i)
    for c in caches:
        if all(caches[i].out != c.out for i in stale):
            log.info("features: reusing %s for %s", c.out, c.name)
    if not stale:
        return [(c.out, True) for c in caches]
    actors, gpus, threads = actor_pool(cfg)
    names = ", ".join(caches[i].name for i in stale)
    log.info("features: embedding %s with encoder %s on %d actor(s)", names, encoder.tag, actors)
    started = time.perf_counter()
    # One read of every shard file any stale cache needs (once each, however many caches select it), per kind of
    # filesystem: a Ray Data pipeline per cache, or a union of one read per cache, costs its start over again.
    selections: dict[bool, list[_Selection]] = {}
    uris: dict[bool, set[str]] = {}
    for i in stale:
        c = caches[i]
        remote = storage.is_remote(c.data)
        files = shard_uris([c.data], c.modality)
        uris.setdefault(remote, set()).update(files)
        selections.setdefault(remote, []).append(_Selection(i, tuple(storage.filesystem(u)[1] for u in files), c.label))
    labels = [caches[i].label for i in stale if caches[i].label]
    read = list(dict.fromkeys(["image", "split", *labels, *columns]))
    parts = [
        read_shards(sorted(uris[remote]), columns=read, include_paths=True).map_batches(
            _tagged_rows, fn_kwargs={"selections": sels, "columns": columns}, batch_format="pyarrow", batch_size=None
        )
        for remote, sels in selections.items()
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "model_name": encoder.model_name,
            "img_size": encoder.img_size,
            "weights": [ray.put(encoder.weights)],
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
    staging = {i: caches[i].out.with_name(f".{caches[i].out.name}.tmp-{uuid.uuid4().hex[:8]}") for i in stale}
    expected = [caches[i].expected_rows for i in stale]
    what = caches[stale[0]].name if len(stale) == 1 else f"{len(stale)} sets"
    progress = Progress(log, f"features of {what}", None if None in expected else sum(expected), "rows")
    rows = dict.fromkeys(stale, 0)
    schema = features_schema(encoder.embed_dim, columns)
    try:
        with contextlib.ExitStack() as stack:
            writers = {}
            for i, d in staging.items():
                d.mkdir(parents=True)
                writers[i] = stack.enter_context(pq.ParquetWriter(d / FEATURES_FILE, schema, compression="zstd"))
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                job = batch[JOB].to_numpy()
                for i in np.unique(job):
                    part = batch.filter(pa.array(job == i)).drop_columns([JOB])
                    writers[int(i)].write_table(part.cast(schema))
                    rows[int(i)] += part.num_rows
                progress.update(batch.num_rows)
        for i in stale:
            c = caches[i]
            if c.expected_rows is not None and rows[i] != c.expected_rows:
                found = f"extracted {rows[i]} rows but found {c.expected_rows}"
                raise ProbeError(f"{c.name}: {found}; did the data change?")
        seconds = time.perf_counter() - started
        for i in stale:
            c = caches[i]
            shutil.rmtree(c.out, ignore_errors=True)
            staging[i].rename(c.out)
            meta = {
                "encoder": encoder.fingerprint,
                "data": c.identity,
                "encoder_tag": encoder.tag,
                "model_name": encoder.model_name,
                "img_size": encoder.img_size,
                "embed_dim": encoder.embed_dim,
                "rows": rows[i],
                "seconds": round(seconds, 3),  # of the whole pipeline, shared by the caches it filled
                "filled_with": len(stale),
            }
            (c.out / FEATURES_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        for d in staging.values():
            shutil.rmtree(d, ignore_errors=True)
    progress.close()
    filled = {caches[i].out for i in stale}
    return [(c.out, c.out not in filled) for c in caches]


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
