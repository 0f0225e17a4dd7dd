"""The ``mermed`` command: each subcommand runs one stage on a local Ray (or the cluster in ``RAY_ADDRESS``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ingest.config import ConfigError, IngestConfig, load_config, parse_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("mermed")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def ingest(
    input: Annotated[list[str], typer.Option("--input", "-i", help="file, folder or s3:// prefix; repeatable")],
    output: Annotated[str, typer.Option("--output", "-o", help="output folder or s3:// prefix")],
    labels: Annotated[str | None, typer.Option(help="label CSV: path,label[,split,patient_id,modality]")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset name stored in every row")] = None,
    modality: Annotated[str, typer.Option(help="auto|CT|CXR|US|PATH|CFP|OCT|DERM")] = "auto",
    config: Annotated[Path | None, typer.Option(help="YAML IngestConfig (windows, tiling, shard size...)")] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="de-identification key file (else $MERMED_DEID_KEY or $MERMED_DEID_KEY_FILE)")
    ] = None,
    force: Annotated[bool, typer.Option(help="re-ingest even when the output is up to date")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Raw DICOM, slides, photos and MedMNIST npz to modality-tagged Parquet shards, de-identified."""
    from ingest.deid import MissingKeyError, load_key
    from ingest.labels import LabelFileError
    from ingest.pipeline import IngestError, run_ingest
    from pipelines.common import init_ray, setup_logging

    setup_logging(verbose)
    try:
        overrides = {
            k: v
            for k, v in {
                "dataset": dataset,
                "modality": modality if modality.lower() == "auto" else modality.upper(),
            }.items()
            if v
        }
        cfg = load_config(IngestConfig, config, overrides) if config else parse_config(IngestConfig, overrides)
        key = load_key(key_file)
    except (ConfigError, MissingKeyError, OSError) as err:
        _fail(str(err))
    init_ray()
    try:
        result = run_ingest(input, output, cfg, labels_csv=labels, key=key)
    except (IngestError, LabelFileError) as err:
        _fail(str(err))
    m = result.manifest
    state = "up to date" if result.skipped else "written"
    typer.echo(
        f"{output}: {state}; {m['discovered']} discovered, {m['ingested']} ingested, {m['quarantined']} quarantined, "
        f"{m['rows']} rows, {m['duplicates']} duplicates; by modality {json.dumps(m['modalities'])}"
    )


@app.command()
def trace(
    path: Annotated[str, typer.Argument(help="an input path relative to its ingest root")],
    key_file: Annotated[
        Path | None, typer.Option(help="de-identification key file (else $MERMED_DEID_KEY or $MERMED_DEID_KEY_FILE)")
    ] = None,
) -> None:
    """Print the pseudonym that rows from PATH carry in their ``source`` column (to trace a row back)."""
    from ingest.deid import MissingKeyError, Pseudonymizer, load_key

    try:
        typer.echo(Pseudonymizer(load_key(key_file)).source(path.lstrip("./")))
    except MissingKeyError as err:
        _fail(str(err))


@app.command()
def pretrain(
    config: Annotated[Path, typer.Option(help="YAML PretrainConfig, e.g. configs/pretrain_tiny.yaml")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="ingest output (local or s3://); repeatable")],
    storage: Annotated[str, typer.Option(help="folder or s3:// prefix for checkpoints and the encoder")],
    name: Annotated[str, typer.Option(help="run name: outputs go to STORAGE/NAME; the same name resumes")],
    steps: Annotated[int | None, typer.Option(help="override run.steps")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers (one per GPU with --gpus)")] = 1,
    gpus: Annotated[bool, typer.Option("--gpus", help="one GPU per worker")] = False,
    include_test: Annotated[bool, typer.Option("--include-test", help="also train on rows of the test split")] = False,
    max_failures: Annotated[int, typer.Option(help="worker-group restarts before the run fails")] = 3,
    monitor: Annotated[
        Path | None,
        typer.Option(help="probe task YAML: kNN accuracy/AUROC of the teacher at step 0 and every checkpoint"),
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="backbone weights to start from (sets model.init; ignored on resume)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Self-supervised MerMED-FM pretraining (DINO + memory) on Ray Train."""
    from mermed.config import PretrainConfig
    from mermed.tracking import ui_command
    from pipelines.common import init_ray, setup_logging

    setup_logging(verbose)
    overrides: dict = {"run.steps": steps} if steps else {}
    if init:
        if not init.is_file():
            _fail(f"--init {init}: no such file")
        overrides["model.init"] = str(init.resolve())  # the workers run in another directory
    try:
        cfg = load_config(PretrainConfig, config, overrides)
    except (ConfigError, OSError) as err:
        _fail(str(err))
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        _fail("--name may hold letters, digits, '-', '_' and '.' only")
    init_ray()
    from pipelines.pretrain import PretrainError, run_pretrain

    try:
        result = run_pretrain(
            cfg,
            data,
            storage,
            name,
            workers=workers,
            use_gpu=gpus,
            include_test=include_test,
            max_failures=max_failures,
            monitor=monitor,
        )
    except (ValueError, FileNotFoundError, PretrainError) as err:
        _fail(str(err))
    typer.echo(f"pretrained {result.steps} steps; encoder: {result.encoder_uri}")
    typer.echo(f"MLflow run {result.mlflow_run_id}: {ui_command(result.tracking_uri)}")


@app.command()
def probe(
    encoder: Annotated[str, typer.Option(help="exported encoder: STORAGE/RUN/encoder.safetensors")],
    tasks: Annotated[Path, typer.Option(help="YAML task list: name, data, type[, label, modality] per task")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for tables, plots, features, MLflow")],
    trials: Annotated[int | None, typer.Option(help="Tune trials per sweep (default 20)")] = None,
    fractions: Annotated[str | None, typer.Option(help="training-label fractions, e.g. 0.01,0.1,1.0")] = None,
    seeds: Annotated[int | None, typer.Option(help="label subsets per fraction below 1 (default 3)")] = None,
    baseline: Annotated[
        list[str] | None, typer.Option(help="'random' or TIMM_NAME=PATH (local weights); repeatable")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML ProbeConfig (search space, extraction...)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Frozen-encoder probes: features on Ray Data, Ray Tune sweeps, test AUROC with CIs, MLflow."""
    from mermed.probe.config import ProbeConfig
    from mermed.tracking import ui_command
    from pipelines.common import setup_logging
    from pipelines.probe import run_probe

    setup_logging(verbose)
    overrides: dict = {"trials": trials, "seeds": seeds, "fractions": _numbers("--fractions", fractions, float)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = load_config(ProbeConfig, config, overrides) if config else parse_config(ProbeConfig, overrides)
        result = run_probe(encoder, tasks, output, cfg, baselines=baseline or [])
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo((result.output / "summary.md").read_text())
    typer.echo(f"MLflow run {result.parent_run_id}: {ui_command(result.tracking_uri)}")


@app.command()
def embed(
    encoder: Annotated[str, typer.Option(help="exported encoder: STORAGE/RUN/encoder.safetensors")],
    data: Annotated[str, typer.Option(help="an ingest output (folder or s3:// prefix)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for features.parquet and features.json")],
    modality: Annotated[str | None, typer.Option(help="only the rows of this modality (default: all)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per forward pass")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Features for your own code: every row's embedding with its ids and split, as Parquet (reused when the
    encoder and the data are unchanged)."""
    from mermed.probe import embed_shards, load_encoders
    from mermed.probe.config import ExtractConfig
    from pipelines.common import init_ray, setup_logging

    setup_logging(verbose)
    try:
        cfg = parse_config(ExtractConfig, {"batch_size": batch_size} if batch_size else {})
        (enc,) = load_encoders(encoder, [])
        init_ray()
        out, reused = embed_shards(enc, data, output, cfg, modality.upper() if modality else None)
    except (ValueError, OSError) as err:
        _fail(str(err))
    meta = json.loads((out / "features.json").read_text())
    typer.echo(
        f"{meta['rows']} embeddings of dimension {meta['embed_dim']} in {out / 'features.parquet'}"
        f"{' (reused)' if reused else ''}"
    )


def _numbers(option: str, text: str | None, kind: type) -> list | None:
    """A comma-separated option as a list of numbers, or a clear exit."""
    if not text:
        return None
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        _fail(f"{option} must be comma-separated numbers, not {text!r}")


@app.command()
def finetune(
    encoder: Annotated[str, typer.Option(help="exported encoder: STORAGE/RUN/encoder.safetensors")],
    tasks: Annotated[Path, typer.Option(help="YAML task list (the probe's format; external: DATA optional)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for tables, figures, runs, MLflow")],
    fractions: Annotated[str | None, typer.Option(help="training-label fractions, e.g. 0.1,0.3,0.5,1.0")] = None,
    seeds: Annotated[str | None, typer.Option(help="seeds, e.g. 0,1,42,123,2025")] = None,
    baseline: Annotated[
        list[str] | None, typer.Option(help="'random' or TIMM_NAME=PATH (local weights); repeatable")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML FinetuneConfig (configs/finetune_vitb.yaml)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Full fine-tuning: a Ray Train run per (task, encoder, fraction, seed), scheduled by Ray Tune, MLflow."""
    from mermed.finetune import FinetuneConfig
    from mermed.tracking import ui_command
    from pipelines.common import setup_logging
    from pipelines.finetune import run_finetune

    setup_logging(verbose)
    overrides = {"fractions": _numbers("--fractions", fractions, float), "seeds": _numbers("--seeds", seeds, int)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = load_config(FinetuneConfig, config, overrides) if config else parse_config(FinetuneConfig, overrides)
        result = run_finetune(encoder, tasks, output, cfg, baselines=baseline or [])
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo((result.output / "summary.md").read_text())
    typer.echo(f"MLflow run {result.parent_run_id}: {ui_command(result.tracking_uri)}")
    if result.failed:
        _fail(f"{result.failed} fine-tuning runs did not finish")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="corpus, shards, runs, MLflow")] = Path("demo_work"),
    steps: Annotated[int | None, typer.Option(help="override the tiny config's pretraining steps")] = None,
    per_class: Annotated[int, typer.Option(help="generated images per class and modality")] = 32,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The whole pipeline on a sample corpus on this machine: ingest, pretrain, probes, AUROC per modality."""
    from mermed.tracking import ui_command
    from pipelines.common import setup_logging
    from pipelines.demo import run_demo

    setup_logging(verbose)
    result = run_demo(workdir, steps=steps, per_class=per_class)
    typer.echo("\nTest AUROC per modality (binary finding vs none; MLP/linear probe on the frozen encoder):\n")
    typer.echo(result.table)
    typer.echo("\nkNN AUROC of the teacher during pretraining (step 0 = the random initialisation):\n")
    typer.echo(result.knn_curves)
    typer.echo(f"\nsummary table: {result.summary_csv} (and summary.md beside it)")
    typer.echo(f"encoder:       {result.encoder}")
    typer.echo(f"MLflow:        {ui_command(result.tracking_uri)}")


def main() -> None:
    app()
