"""``mermed demo``: the whole system on one machine, from raw files to an AUROC table, on embedded defaults.

1. a sample corpus in real formats: pydicom's own test DICOMs plus a generated, labelled corpus of all seven
   modalities (DICOM CT/CXR/US with planted PHI, pyramidal TIFF slides read by OpenSlide, PNG/JPEG photos);
2. ingest (Ray Data) -> pretrain ``configs/pretrain_tiny.yaml`` (Ray Train) -> probes (Ray Data + Ray Tune);
3. a table of test AUROC per modality, pretrained encoder against the random-weights baseline.

Everything lives under the work directory (default ``demo_work/``), MLflow in ``demo_work/mlflow.db``. A second
run reuses every stage that is already done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

log = logging.getLogger("mermed.demo")
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain_tiny.yaml"
PROBE_CONFIG = ROOT / "configs" / "probe_demo.yaml"
MODALITY_ORDER = ("CT", "CXR", "US", "PATH", "CFP", "OCT", "DERM")
T = TypeVar("T")


@dataclass
class DemoResult:
    table: str
    summary_csv: Path
    encoder: str
    tracking_uri: str
    knn_curves: str  # the pretraining monitor's kNN AUROC per task, from step 0 to the last checkpoint


def _stage(name: str, fn: Callable[[], T]) -> T:
    log.info("== %s ...", name)
    started = time.perf_counter()
    out = fn()
    log.info("== %s done in %.0f s", name, time.perf_counter() - started)
    return out


def _assign_splits(labels_csv: Path) -> None:
    """Give every patient one split in the label CSV: 60/20/20 in the order of a hash of the MRN, then patients
    move out of train, where train can spare them, until validation and test hold both labels of every modality
    (AUROC needs two classes; a small corpus would otherwise draw single-class splits by chance).

    Ingest would split by the keyed patient pseudonym, and the demo's key is random per machine; explicit splits
    make the demo's small validation and test sets the same everywhere, as a published dataset's splits are.
    """
    with labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    has: dict[str, set[tuple[str, str]]] = {}  # patient -> (modality folder, label) pairs
    for row in rows:
        has.setdefault(row["patient_id"], set()).add((row["path"].split("/")[0], row["label"]))
    patients = sorted(has, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    split = {
        p: "train" if i < 0.6 * len(patients) else "val" if i < 0.8 * len(patients) else "test"
        for i, p in enumerate(patients)
    }

    def covered(where: str, pair: tuple[str, str], without: str = "") -> bool:
        return any(split[q] == where and pair in has[q] for q in patients if q != without)

    for target in ("val", "test"):
        for pair in sorted(set().union(*has.values())):
            if covered(target, pair):
                continue
            donor = next(
                (
                    p
                    for p in patients
                    if split[p] == "train"
                    and pair in has[p]
                    and all(covered("train", other, without=p) for other in has[p])
                ),
                None,
            )
            if donor is not None:
                split[donor] = target
    for row in rows:
        row["split"] = split[row["patient_id"]]
    with labels_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _corpus(workdir: Path, per_class: int) -> Path:
    from ingest.samples import copy_pydicom_testdata, make_sample_corpus

    raw = workdir / "raw"
    done = raw / ".complete"
    if not done.exists():
        info = make_sample_corpus(raw, per_class=per_class, size=128, seed=0, slide_size=768)
        _assign_splits(info.labels_csv)
        copy_pydicom_testdata(raw / "pydicom_testdata")
        done.write_text("ok\n")
    return raw


def _table(summary: list[dict]) -> str:
    """Test AUROC [95% CI] per modality at 100% of the labels, pretrained against random weights."""
    cell: dict[tuple[str, str], str] = {}
    for row in summary:
        if row["fraction"] == 1.0 and row["encoder"] in ("pretrained", "random"):
            # The patient bootstrap has no interval where a class has too few test patients (nan in summary.csv).
            interval = (
                "[no CI: few patients]"
                if math.isnan(row["auroc_lo"])
                else f"[{row['auroc_lo']:.2f}, {row['auroc_hi']:.2f}]"
            )
            cell[(row["modality"], row["encoder"])] = f"{row['auroc']:.3f} {interval}"
    lines = [
        f"{'modality':<9}{'pretrained AUROC [95% CI]':<30}{'random weights AUROC [95% CI]':<30}",
        "-" * 69,
    ]
    for modality in MODALITY_ORDER:
        if any(m == modality for m, _ in cell):
            lines.append(
                f"{modality:<9}{cell.get((modality, 'pretrained'), '-'):<30}{cell.get((modality, 'random'), '-'):<30}"
            )
    return "\n".join(lines)


def _knn_curves(uri: str, run_dir: Path) -> str:
    """One line per monitored task: its kNN AUROC at step 0 (random init) and at each checkpoint."""
    import mlflow

    from mermed.tracking import RUN_FILE

    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    client = mlflow.MlflowClient(uri)
    lines = []
    for key in sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("knn_auroc/")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        curve = " -> ".join(f"{m.value:.3f} (step {m.step})" for m in history)
        lines.append(f"{key.split('/', 1)[1]:<16}{curve}")
    return "\n".join(lines)


def run_demo(workdir: str | Path = "demo_work", *, steps: int | None = None, per_class: int = 32) -> DemoResult:
    import ray

    from ingest.config import IngestConfig, load_config
    from ingest.deid import create_local_key, load_key
    from ingest.pipeline import MANIFEST, run_ingest
    from mermed.checkpoints import ENCODER_FILE
    from mermed.config import PretrainConfig
    from mermed.probe.config import ProbeConfig
    from mermed.tracking import tracking_uri
    from pipelines.common import init_ray
    from pipelines.pretrain import run_pretrain
    from pipelines.probe import run_probe

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(None, workdir)
    # The demo alone may create its key: a local random file readable by its owner only.
    key = load_key(create_local_key(workdir / "deid.key"))

    raw = _stage("1/4 sample corpus (real DICOM + generated 7-modality corpus)", lambda: _corpus(workdir, per_class))
    init_ray()
    # The demo logs its own progress per stage; Ray Data's live bars would interleave with it on a terminal and
    # fill a log file with carriage returns.
    ray.data.DataContext.get_current().enable_progress_bars = False
    shards = workdir / "shards"
    ingest = _stage(
        "2/4 ingest (Ray Data)",
        lambda: run_ingest(
            [str(raw)], str(shards), IngestConfig(dataset="demo"), labels_csv=str(raw / "labels.csv"), key=key
        ),
    )
    m = ingest.manifest
    log.info(
        "ingest: %d files -> %d rows %s; %d quarantined", m["discovered"], m["rows"], m["modalities"], m["quarantined"]
    )

    tasks = workdir / "tasks.yaml"
    tasks.write_text(
        yaml.safe_dump(
            {
                "tasks": [
                    {"name": f"{mod.lower()}_finding", "data": str(shards), "type": "binary", "modality": mod}
                    for mod in MODALITY_ORDER
                    if mod in m["modalities"]
                ]
            }
        )
    )
    overrides = {"tracking.mlflow_uri": uri} | ({"run.steps": steps} if steps else {})
    pretrain_cfg = load_config(PretrainConfig, PRETRAIN_CONFIG, overrides)
    runs = workdir / "runs"
    encoder = runs / "demo" / ENCODER_FILE
    if not encoder.exists():
        _stage(
            "3/4 pretrain (Ray Train)",
            lambda: run_pretrain(
                pretrain_cfg, [str(shards)], str(runs), "demo", workers=1, workdir=str(workdir), monitor=tasks
            ),
        )
    else:
        log.info("== 3/4 pretrain: %s exists; reusing it", encoder)

    probe_cfg = load_config(ProbeConfig, PROBE_CONFIG, {"tracking.mlflow_uri": uri})
    probe_out = workdir / "probe"
    done = probe_out / "demo_table.json"
    inputs = hashlib.sha256()
    manifest = (shards / MANIFEST).read_bytes()
    for part in (encoder.read_bytes(), tasks.read_bytes(), probe_cfg.model_dump_json().encode(), manifest):
        inputs.update(hashlib.sha256(part).digest())
    previous = json.loads(done.read_text()) if done.exists() else {}
    if previous.get("inputs") == inputs.hexdigest():
        log.info("== 4/4 probes: done for this encoder, data and probe config; reusing %s", done)
        table = previous["table"]
    else:
        result = _stage(
            "4/4 probes (Ray Data features + Ray Tune sweeps)",
            lambda: run_probe(encoder, tasks, probe_out, probe_cfg, baselines=["random"]),
        )
        table = _table(result.summary)
        done.write_text(json.dumps({"inputs": inputs.hexdigest(), "table": table}) + "\n")
    return DemoResult(table, probe_out / "summary.csv", str(encoder), uri, _knn_curves(uri, runs / "demo"))
