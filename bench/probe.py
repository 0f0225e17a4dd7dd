"""What a probe sweep costs against one probe trained alone, and feature extraction against the encoder's bare
forward, in one run on the same local Ray and data.

    python bench/probe.py [--images 400] [--sweeps 4,16,64] [--model vit_small_patch16_224] [--img-size 64]

1. Extraction: ``extract_features`` (Ray Data, the pipeline's actor pool) against a bare loop in this process
   that decodes the same images and runs the same encoder in batches of the same size; rows/s and their ratio.
2. Sweeps: one head fitted alone in a bare loop (no Ray: the baseline, T1), then ``run_sweeps`` (Ray Tune, ASHA,
   the job's path) with N heads for each N; prints each sweep's time over T1 beside the budget
   1 + 0.2 (N - 1), and the fixed cost of a sweep (a 1-head sweep minus T1), which the budget allows on top.

The data is a synthetic labelled ingest output (one shard and its manifest) written into a temporary folder.
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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ingest.config import parse_config
from ingest.schema import ROW_SCHEMA, encode_image
from mermed.data import decode_square
from mermed.models import build_backbone, export_encoder
from mermed.normalize import modality_mean_std
from mermed.probe import extract_features, inspect_task, load_encoders, load_features
from mermed.probe.config import ProbeConfig, ProbeTask
from mermed.probe.heads import fit_probe
from mermed.probe.sweep import SweepData, run_sweeps, train_config


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


def bare_forward(encoder, shard: Path, batch_size: int) -> float:
    """Rows/s of decode + normalise + forward over the shard's images, in batches, in this process."""
    model = build_backbone(encoder.model_name, encoder.img_size)
    model.load_state_dict(encoder.weights)
    model.eval()
    table = pq.read_table(shard, columns=["image", "modality"])
    started = time.perf_counter()
    for batch in table.to_batches(max_chunksize=batch_size):
        pixels = torch.from_numpy(np.stack([decode_square(b, encoder.img_size) for b in batch["image"].to_pylist()]))
        mean, std = modality_mean_std(encoder.normalization, batch["modality"].to_pylist(), torch.device("cpu"))
        x = (pixels.permute(0, 3, 1, 2).float() / 255 - mean[:, :, None, None]) / std[:, :, None, None]
        with torch.inference_mode():
            model(x)
    return table.num_rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--sweeps", default="4,16,64", help="heads per sweep, comma-separated")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    args = parser.parse_args()
    sizes = [int(n) for n in args.sweeps.split(",")]

    import ray

    from pipelines.common import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources()["CPU"])
    search = {"epochs": [args.epochs], "hidden": [256]}  # the job's default schedule: rungs at 5, 15, 45 epochs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root / "data", args.images, args.img_size)
        path = root / "run" / "encoder.safetensors"
        export_encoder(build_backbone(args.model, args.img_size), path, model_name=args.model, img_size=args.img_size)
        encoder = load_encoders(path, [])[0]
        task = inspect_task(ProbeTask(name="bench", data=str(data), type="binary"))
        extract = parse_config(ProbeConfig, {}).extract

        started = time.perf_counter()
        ((cache, _),) = extract_features(encoder, [task], root / "out", extract)
        pipeline_rate = args.images / (time.perf_counter() - started)
        bare_rate = bare_forward(encoder, data / "modality=CT/part-00000.parquet", extract.batch_size)

        f = load_features(cache, task)
        sweep_data = SweepData("binary", f.x["train"], f.y["train"], f.x["val"], f.y["val"], 2, 256, 0)
        one = parse_config(ProbeConfig, {"trials": 1, "search": search})
        head = {"head": "mlp", "lr": 1e-3, "weight_decay": 1e-4, "hidden": 256, "dropout": 0.1, "epochs": args.epochs}
        started = time.perf_counter()
        fit_probe(sweep_data.train_x, sweep_data.train_y, sweep_data.val_x, sweep_data.val_y, "binary",
                  train_config(head, 256, 0))  # fmt: skip
        alone = time.perf_counter() - started
        times = {}
        for n in [1, *sizes]:
            cfg = one.model_copy(update={"trials": n})
            started = time.perf_counter()
            run_sweeps({"bench": sweep_data}, cfg, name=f"sweep{n}", storage_path=root / "tune", callbacks=[])
            times[n] = time.perf_counter() - started

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"{args.images} images, {args.model} at {args.img_size}px, {args.epochs} epochs per head, {device}, {cpus} CPUs"
    )
    print(f"extraction: pipeline {pipeline_rate:.0f} rows/s, bare forward {bare_rate:.0f} rows/s, "
          f"ratio {pipeline_rate / bare_rate:.2f}x (target >= 0.8x)")  # fmt: skip
    fixed = times[1] - alone
    print(f"one head alone (T1): {alone:.2f} s; a 1-head sweep {times[1]:.1f} s, so a sweep's fixed cost {fixed:.1f} s")
    for n in sizes:
        budget = 1 + 0.2 * (n - 1)
        print(f"sweep of {n:3d} heads: {times[n]:6.1f} s = {times[n] / alone:6.1f} x T1, "
              f"{(times[n] - fixed) / alone:6.1f} x T1 beyond the fixed cost (budget {budget:.1f} x T1)")  # fmt: skip


if __name__ == "__main__":
    main()
