"""Where fine-tuning pays: full fine-tuning (``mermed.finetune``, the authors' protocol sized for CPU) against the
frozen-feature probe of ``bench/learning.py``, for the encoder pretrained there and a random initialisation, on
the seven real labelled sets, at 10% and 100% of the training labels, over 3 seeds.

    python bench/finetune.py [--work /tmp/mermed-learning] [--pretrain-seed 0] [--seeds 0,1,2] [--epochs 3] \
        [--sets chest_ct4_128,fundus_odir7_128]

Needs a finished ``bench/learning.py`` run in WORK (its shards, its encoder ``runs/cpu-seed<S>/`` and its feature
cache). The random encoder is the one bench/learning.py probes (seed 1000 + S). Each seed draws its own stratified
label subset, the same one for the probe and the fine-tuning. Prints a Markdown table for bench/RESULTS.md.
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
import json
import statistics
import time
from pathlib import Path

from bench.learning import LABELLED, MODALITY, probe_auroc, write_tasks
from ingest.config import load_config
from mermed.finetune import FinetuneConfig
from mermed.probe import ProbeTask, extract_features, inspect_task, load_encoders, load_features
from mermed.probe.config import ExtractConfig
from mermed.probe.heads import subsample_labels
from pipelines.common import init_ray
from pipelines.finetune import run_finetune

ROOT = Path(__file__).resolve().parents[1]


def _sets(work: Path, names: list[str] | None) -> dict[str, tuple[str, str, int]]:
    """The sets bench/learning.py ingested into WORK/shards (or those ``names``), as name -> (shards, modality,
    classes)."""
    sets = {}
    for shards in sorted((work / "shards").iterdir()):
        if names and shards.name not in names:
            continue
        modality = MODALITY[shards.name.split("_")[0]]
        data = inspect_task(ProbeTask(name=shards.name, data=str(shards), type="multiclass", modality=modality))
        sets[shards.name] = (str(shards), modality, len(data.classes))
    return sets


def probes(work: Path, sets: dict, encoder: Path, pretrain_seed: int, fractions, seeds) -> dict:
    """(set, encoder, fraction, seed) -> test AUROC of bench/learning.py's probe sweep on the label subset."""
    encoders = load_encoders(encoder, ["random"], baseline_seed=1000 + pretrain_seed)
    scores = {}
    for name, (shards, modality, n_classes) in sets.items():
        kind = "binary" if n_classes == 2 else "multiclass"
        data = inspect_task(ProbeTask(name=name, data=shards, type=kind, modality=modality))
        for enc in encoders:
            cache = work / f"features-seed{pretrain_seed}"
            ((path, _),) = extract_features(enc, [data], cache, ExtractConfig(batch_size=128))
            features = load_features(path, data)
            for fraction in fractions:
                for seed in seeds:
                    rows = subsample_labels(features.y["train"], fraction, seed, kind) if fraction < 1 else None
                    scores[(name, enc.tag, fraction, seed)] = probe_auroc(features, kind, n_classes, rows)
    return scores


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/mermed-learning")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.1,1.0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sets", default=None, help="comma-separated set names (default: all seven)")
    args = parser.parse_args()
    work = Path(args.work)
    encoder = work / "runs" / f"cpu-seed{args.pretrain_seed}" / "encoder.safetensors"
    if not LABELLED.is_dir() or not encoder.is_file():
        sys.exit(f"needs the real labelled sets and a finished bench/learning.py run in {work} ({encoder.name})")
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    init_ray()
    sets = _sets(work, args.sets.split(",") if args.sets else None)
    tasks = write_tasks(sets, work / "finetune-tasks.yaml")
    overrides = {
        "fractions": fractions,
        "seeds": seeds,
        "train.epochs": args.epochs,
        "baseline_seed": 1000 + args.pretrain_seed,
    }
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune_tiny.yaml", overrides)
    started = time.perf_counter()
    result = run_finetune(encoder, tasks, work / "finetune", cfg, baselines=["random"])
    minutes = (time.perf_counter() - started) / 60
    tuned = {
        (r["task"], r["encoder"], r["fraction"], r["seed"]): r["auroc"]
        for r in result.results
        if r["test_set"] == "test"
    }
    probed = probes(work, sets, encoder, args.pretrain_seed, fractions, seeds)
    (work / "finetune-vs-probe.json").write_text(
        json.dumps(
            {"|".join(map(str, k)): v for k, v in (tuned | {("probe", *k): v for k, v in probed.items()}).items()},
            indent=1,
        )
    )
    lines = [
        "| task | modality | labels | probe, pretrained | probe, random | fine-tune, pretrained | fine-tune, random | "
        "fine-tune - probe (pretrained) |",
        "| --- | --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for name, (_, modality, _) in sets.items():
        for fraction in fractions:
            cell = {
                (how, tag): [src[(name, tag, fraction, s)] for s in seeds if (name, tag, fraction, s) in src]
                for how, src in (("probe", probed), ("tune", tuned))
                for tag in ("pretrained", "random")
            }
            gain = [t - p for t, p in zip(cell[("tune", "pretrained")], cell[("probe", "pretrained")], strict=False)]
            lines.append(
                f"| {name} | {modality} | {100 * fraction:g}% | {_cell(cell[('probe', 'pretrained')])} | "
                f"{_cell(cell[('probe', 'random')])} | {_cell(cell[('tune', 'pretrained')])} | "
                f"{_cell(cell[('tune', 'random')])} | {_cell(gain)} |"
            )
    print("\n".join(lines))
    print(f"\nfine-tuning: {len(result.results)} scored runs in {minutes:.1f} min ({args.epochs} epochs each); "
          f"{result.failed} unfinished")  # fmt: skip
    for c in result.comparisons:
        print(
            f"fine-tuned pretrained vs {c['versus']}: {c['mean_diff']:+.3f} over {int(c['pairs'])} runs, "
            f"p = {c['p_value']:.3g}"
        )


if __name__ == "__main__":
    main()
