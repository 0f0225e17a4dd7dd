"""What the feature cache buys: a Tune sweep of N trials on cached features against N trials that each re-run
the encoder over the images (the naive probe), on the same local Ray, data, search space and ASHA schedule.

    python bench/probe.py [--images 400] [--trials 8] [--model vit_small_patch16_224] [--img-size 64]

Prints the time of each path and the ratio naive / cached (extraction included on the cached side). The data is
a synthetic labelled ingest output (one shard and its manifest) written into a temporary folder. Extraction runs
as the pipeline runs it (one encoder actor per 2 CPUs on CPU), the naive side one trial per CPU. The naive side
pays the encoder once per trial (ASHA stops trials only after their first epoch), so the ratio grows with N and
with the encoder's cost; Tune's fixed per-sweep cost weighs on both.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run by path: the packages first on sys.path (not this folder's ingest.py)
    from pipelines.entrypoint import repository_first

    repository_first(__file__)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ingest.config import parse_config
from ingest.schema import ROW_SCHEMA, encode_image
from mermed.models import build_backbone, export_encoder
from mermed.probe import EncoderActor, extract_features, inspect_task, load_encoders, load_features
from mermed.probe.config import ProbeConfig, ProbeTask
from mermed.probe.heads import encode_labels, fit_probe
from mermed.probe.sweep import SweepData, run_sweep, train_config


def write_data(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` labelled images (a bright disc or not, on noise), four per patient, split 60/20/20 by patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    rows = []
    for i in range(n):
        label = i % 2
        pixels = np.clip(rng.normal(110, 30, (size, size)) + 60 * label * disc, 0, 255).astype(np.uint8)
        patient = i // 4
        split = ("train", "train", "train", "val", "test")[patient % 5]
        rows.append(
            {
                "image": encode_image(pixels),
                "height": size,
                "width": size,
                "channels": 1,
                "modality": "CT",
                "dataset": "bench",
                "source": f"s{i}",
                "patient_id": f"p{patient}",
                "label": str(label),
                "split": split,
            }
        )
    shard = "modality=CT/part-00000.parquet"
    (root / "modality=CT").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), root / shard)
    splits = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    manifest = {"rows": n, "modalities": {"CT": n}, "splits": {"CT": splits}, "shards": [shard]}
    (root / "_manifest.json").write_text(json.dumps(manifest))
    return root


@dataclass
class RawSweepData:
    """What a naive trial gets: encoded images and the encoder's weights, not features."""

    tables: dict[str, pa.Table]
    model_name: str
    img_size: int
    weights: object  # ObjectRef of the state dict
    classes: list[str]
    batch_size: int


def naive_trial(config: dict, *, data: RawSweepData) -> None:
    """One trial of a probe without a feature cache: build the encoder, embed train and val, fit the probe."""
    from ray import tune

    actor = EncoderActor(data.model_name, data.img_size, [data.weights], "label", "auto")
    x, y = {}, {}
    for split, table in data.tables.items():
        out = actor(table)
        emb = out["embedding"].combine_chunks()
        x[split] = emb.flatten().to_numpy().reshape(len(emb), -1)
        y[split], _ = encode_labels(out["label"].to_pylist(), "binary", classes=data.classes)
    fit_probe(
        x["train"],
        y["train"],
        x["val"],
        y["val"],
        "binary",
        train_config(config, data.batch_size, 0),
        report=lambda epoch, metrics: tune.report(metrics),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    from pipelines.common import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources()["CPU"])
    cfg = parse_config(
        ProbeConfig,
        {
            "trials": args.trials,
            "search": {"epochs": [args.epochs], "grace_period": max(1, args.epochs // 4), "hidden": [256]},
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root / "data", args.images, args.img_size)
        path = root / "run" / "encoder.safetensors"
        export_encoder(build_backbone(args.model, args.img_size), path, model_name=args.model, img_size=args.img_size)
        encoder = load_encoders(path, [])[0]
        task = inspect_task(ProbeTask(name="bench", data=str(data), type="binary"))
        sweep = {"storage_path": root / "tune", "callbacks": [], "seed": 0}

        started = time.perf_counter()
        cache, _ = extract_features(encoder, task, root / "out", cfg.extract)
        extracted = time.perf_counter() - started
        features = load_features(cache, task)
        cached = SweepData("binary", features.x["train"], features.y["train"], features.x["val"],
                           features.y["val"], 2, cfg.search.batch_size, 0)  # fmt: skip
        run_sweep(cached, cfg, name="cached", **sweep)
        cached_total = time.perf_counter() - started

        shard = pq.read_table(data / "modality=CT/part-00000.parquet")
        tables = {s: shard.filter(pa.compute.equal(shard["split"], s)) for s in ("train", "val")}
        raw = RawSweepData(tables, args.model, args.img_size, ray.put(encoder.weights), task.classes,
                           cfg.search.batch_size)  # fmt: skip
        started = time.perf_counter()
        run_sweep(raw, cfg, name="naive", trainable=naive_trial, **sweep)
        naive_total = time.perf_counter() - started

    n = sum(task.counts.values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.trials} trials, {n} images, {args.model} at {args.img_size}px, {args.epochs} epochs, {device}, "
          f"{cpus} CPUs")  # fmt: skip
    sweep_s = cached_total - extracted
    print(f"cached features : {cached_total:7.1f} s  (extraction {extracted:.1f} s + sweep {sweep_s:.1f} s)")
    print(f"encoder re-run  : {naive_total:7.1f} s")
    print(f"ratio           : {naive_total / cached_total:7.2f}x")


if __name__ == "__main__":
    main()
