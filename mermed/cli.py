"""The ``mermed`` command: each subcommand runs one stage on a local Ray (or the cluster in ``RAY_ADDRESS``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from mermed.config import ConfigError, IngestConfig, load_config, parse_config

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
    key_file: Annotated[Path | None, typer.Option(help="de-identification key file (else $MERMED_DEID_KEY)")] = None,
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
        overrides = {k: v for k, v in {"dataset": dataset, "modality": modality.upper()}.items() if v}
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
    key_file: Annotated[Path | None, typer.Option(help="de-identification key file (else $MERMED_DEID_KEY)")] = None,
) -> None:
    """Print the pseudonym that rows from PATH carry in their ``source`` column (to trace a row back)."""
    from ingest.deid import MissingKeyError, Pseudonymizer, load_key

    try:
        typer.echo(Pseudonymizer(load_key(key_file)).source(path.lstrip("./")))
    except MissingKeyError as err:
        _fail(str(err))


def main() -> None:
    app()
