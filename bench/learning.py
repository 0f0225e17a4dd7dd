"""Does pretraining learn? One encoder pretrained on all seven real labelled sets, probed on each set's test split.

    python bench/learning.py [--seeds 0,1,2] [--config configs/pretrain_cpu.yaml] [--work /tmp/mermed-learning]

For every pretraining seed: ingest the ``.npz`` sets of ``../shared/data/labelled`` (once), pretrain ONE encoder on
all their train and val rows with the given config through the real pipeline (Ray Train), then, per set, embed
the labelled rows with it and with a randomly initialised encoder of the same architecture drawn from ANOTHER
seed (``1000 + seed``: the pretraining initialisation is not the baseline), and run the same probe sweep on both
(MLP and linear heads x learning rates, picked by validation AUROC, scored once on test). A logistic regression
on raw pixels is the floor. Prints a Markdown table (mean and std over seeds) for bench/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run by path: the packages first on sys.path (not this folder's ingest.py)
    from pipelines.entrypoint import repository_first

    repository_first(__file__)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ingest.config import IngestConfig, load_config, parse_config
from ingest.pipeline import run_ingest
from mermed.config import PretrainConfig
from mermed.metrics import auroc
from mermed.monitor import KnnSettings
from mermed.probe import ProbeTask, extract_features, inspect_task, load_encoders, load_features
from mermed.probe.config import ExtractConfig, ProbeTrainConfig
from mermed.probe.heads import fit_probe, predict_scores
from pipelines.common import init_ray
from pipelines.pretrain import run_pretrain

LABELLED = Path(__file__).resolve().parents[2] / "shared" / "data" / "labelled"
MODALITY = {"path": "PATH", "derm": "DERM", "chest": "CT", "cxr": "CXR", "us": "US", "fundus": "CFP", "oct": "OCT"}
SWEEP = [  # the same probe sweep for every encoder
    ProbeTrainConfig(head=head, lr=lr, epochs=epochs, weight_decay=1e-4)
    for head, lr, epochs in itertools.product(("mlp", "linear"), (1e-3, 1e-2), (50,))
]


def ingest_sets(work: Path) -> dict[str, tuple[str, str, int]]:
    """name -> (shard dir, modality, number of classes) for every labelled set, ingested once."""
    os.environ.setdefault("MERMED_DEID_KEY", "bench-learning-key-0123456789abcdef")
    sets = {}
    for npz in sorted(LABELLED.glob("*.npz")):
        name = npz.stem
        modality = MODALITY[name.split("_")[0]]
        out = work / "shards" / name
        cfg = parse_config(IngestConfig, {"dataset": name, "modality": modality})
        run_ingest([str(npz)], str(out), cfg)
        with np.load(npz, allow_pickle=False) as f:
            n_classes = len(np.unique(f["train_labels"]))
        sets[name] = (str(out), modality, n_classes)
    return sets


def write_tasks(sets: dict[str, tuple[str, str, int]], path: Path) -> Path:
    """The sets as a probe task file, for the pretraining's kNN monitor."""
    import yaml

    tasks = [
        {"name": name, "data": shards, "type": "binary" if n == 2 else "multiclass", "modality": modality}
        for name, (shards, modality, n) in sets.items()
    ]
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


def raw_pixel_auroc(npz: Path, task: str) -> float:
    """Logistic regression on 32x32 pixels: what a probe must beat to show the encoder adds anything."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with np.load(npz, allow_pickle=False) as f:

        def pixels(split: str) -> np.ndarray:
            images = f[f"{split}_images"]
            small = [np.asarray(Image.fromarray(im).convert("RGB").resize((32, 32))) for im in images]
            return np.stack(small).reshape(len(images), -1).astype(np.float32) / 255

        x_train, y_train = pixels("train"), f["train_labels"].ravel()
        x_test, y_test = pixels("test"), f["test_labels"].ravel()
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x_train), y_train)
    scores = model.predict_proba(scaler.transform(x_test))
    return auroc(y_test, scores[:, 1] if task == "binary" else scores, task)


def probe_auroc(features, task: str, n_classes: int, train_rows: np.ndarray | None = None) -> float:
    """The sweep on the train split (or its ``train_rows``), picked by validation AUROC, scored once on test."""
    rows = slice(None) if train_rows is None else train_rows
    best = None
    for cfg in SWEEP:
        model, history = fit_probe(
            features.x["train"][rows], features.y["train"][rows], features.x["val"], features.y["val"], task, cfg,
            n_classes=n_classes,
        )  # fmt: skip
        val = max(h["val_auroc"] for h in history)
        if best is None or val > best[0]:
            best = (val, model)
    return auroc(features.y["test"], predict_scores(best[1], features.x["test"]), task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "pretrain_cpu.yaml"))
    parser.add_argument("--work", default="/tmp/mermed-learning")
    parser.add_argument("--steps", type=int, default=None, help="override run.steps")
    args = parser.parse_args()
    if not LABELLED.is_dir():
        sys.exit(f"{LABELLED} is absent: the learning table needs the project's real labelled sets")
    work = Path(args.work)
    init_ray()
    sets = ingest_sets(work)
    monitor_tasks = write_tasks(sets, work / "tasks.yaml")
    seeds = [int(s) for s in args.seeds.split(",")]
    # Each seed's results are kept in WORK/learning.json as it finishes: a later call with more seeds adds only
    # the new ones (a finished pretraining run would resume at its last step and time nothing).
    record_path = work / "learning.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for seed in seeds:
        if str(seed) in record:
            continue
        overrides = {"run.seed": seed} | ({"run.steps": args.steps} if args.steps else {})
        cfg = load_config(PretrainConfig, args.config, overrides)
        started = time.perf_counter()
        result = run_pretrain(
            cfg,
            [d for d, _, _ in sets.values()],
            str(work / "runs"),
            f"cpu-seed{seed}",
            monitor=monitor_tasks,
            monitor_settings=KnnSettings(train_rows=400, eval_rows=200),
        )
        minutes = (time.perf_counter() - started) / 60
        print(f"seed {seed}: pretrained {result.steps} steps in {minutes:.1f} min", file=sys.stderr)
        encoders = load_encoders(result.encoder_uri, ["random"], baseline_seed=1000 + seed)
        scores: dict[str, dict[str, float]] = {}
        for name, (shards, modality, n_classes) in sets.items():
            kind = "binary" if n_classes == 2 else "multiclass"
            data = inspect_task(ProbeTask(name=name, data=shards, type=kind, modality=modality))
            for enc in encoders:
                cache = work / f"features-seed{seed}"
                ((path, _),) = extract_features(enc, [data], cache, ExtractConfig(batch_size=128))
                score = probe_auroc(load_features(path, data), kind, n_classes)
                scores.setdefault(name, {})[enc.tag] = score
                print(f"seed {seed} {name} {enc.tag}: test AUROC {score:.3f}", file=sys.stderr)
        record[str(seed)] = {"minutes": minutes, "steps": result.steps, "auroc": scores}
        record_path.write_text(json.dumps(record, indent=1))
    print(table(sets, {s: record[str(s)] for s in seeds}))


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(sets: dict, runs: dict[int, dict]) -> str:
    """The learning table: per set, the raw-pixel floor, and random init and pretrained over the seeds."""
    minutes = statistics.mean(r["minutes"] for r in runs.values())
    lines = [
        "| task | modality | raw-pixel LR | random init | pretrained | difference | seeds | pretraining min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    diffs = []
    for name, (_, modality, n_classes) in sets.items():
        raw = raw_pixel_auroc(LABELLED / f"{name}.npz", "binary" if n_classes == 2 else "multiclass")
        rand = [r["auroc"][name]["random"] for r in runs.values()]
        pre = [r["auroc"][name]["pretrained"] for r in runs.values()]
        diff = [p - r for p, r in zip(pre, rand, strict=True)]
        diffs.append(statistics.mean(diff))
        lines.append(
            f"| {name} | {modality} | {raw:.3f} | {_spread(rand)} | {_spread(pre)} | {_spread(diff)} | "
            f"{len(runs)} | {minutes:.1f} |"
        )
    lines.append(f"\nmean difference over the {len(sets)} sets: {statistics.mean(diffs):+.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
