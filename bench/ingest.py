"""Ingest throughput: the Ray pipeline against the bare single-process loop, over the same files in one run.

The bare loop is the floor no pipeline beats per core: the pipeline's own ``read_unit`` (decode + encode) over the
same units in this process, writing the same Parquet through the pipeline's ``ShardWriter``, with no Ray. The
pipeline's cost per image at equal cores is (pipeline wall x N cores) / (bare wall x 1 core): 1.0 means Ray adds
nothing, and the target is <= 1.3.

    python bench/ingest.py [--quick] [--cpus N] [--keep DIR]

Files: drawn by ``ingest.samples`` (all seven modalities), pydicom's real test DICOMs, and the real SVS slides and
HAM10000 photos of ../shared/data when present. Ray is started and warmed on a tiny corpus before any timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# This file's folder on sys.path would shadow the ``ingest`` package, here and in the Ray workers (Ray passes the
# driver's script folder on to them only when it is on the driver's path).
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pyarrow as pa  # noqa: E402 - after the environment Ray reads
import pyarrow.compute as pc  # noqa: E402

from ingest.deid import Pseudonymizer  # noqa: E402
from ingest.pipeline import READ_SCHEMA, ReadContext, ShardWriter, discover, read_unit, run_ingest  # noqa: E402
from ingest.samples import copy_pydicom_testdata, make_sample_corpus  # noqa: E402
from ingest.schema import ROW_SCHEMA  # noqa: E402
from mermed import storage  # noqa: E402
from mermed.config import IngestConfig  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEY = b"bench-key-0123456789abcdef0123456789"
FOLDERS = {"ct": "CT", "cxr": "CXR", "us": "US", "path": "PATH", "cfp": "CFP", "oct": "OCT", "derm": "DERM"}
TARGET = 1.3


@dataclass
class Timing:
    images: int
    seconds: float
    read_seconds: float = 0.0  # bare loop only: read_unit (decode + encode); the rest is Arrow + Parquet


def build_corpus(root: Path, quick: bool) -> None:
    """Drawn samples of every modality, pydicom's real DICOMs (one folder each, as series arrive) and shared data."""
    make_sample_corpus(
        root,
        per_class=3 if quick else 8,
        size=512,
        ct_slices=8,
        slide_size=1024 if quick else 2048,
        seed=0,
    )
    (root / "labels.csv").unlink()  # not an input: the bench reads without labels
    with tempfile.TemporaryDirectory() as tmp:
        for path in copy_pydicom_testdata(Path(tmp), ("CT", "CR", "DX", "US")):
            folder = {"CT": "ct", "US": "us"}.get(path.parent.name, "cxr")
            dest = root / folder / f"pydicom_{path.stem}"
            dest.mkdir()
            shutil.copy(path, dest / path.name)
    if SHARED_DATA.is_dir():
        for slide in sorted((SHARED_DATA / "wsi").glob("*.svs")):
            shutil.copy(slide, root / "path" / slide.name)
        for photo in sorted((SHARED_DATA / "derm_ham10000_sample70").glob("*/*.jpg")):
            dest = root / "derm" / "ham10000" / photo.parent.name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, dest / photo.name)


def build_warmup(root: Path, warm: Path, n: int) -> None:
    """A tiny corpus with ``n`` entries of each modality folder, so every Ray worker imports every reader."""
    for folder in FOLDERS:
        (warm / folder).mkdir(parents=True)
        for entry in sorted((root / folder).iterdir())[:n]:
            if entry.is_dir():
                shutil.copytree(entry, warm / folder / entry.name)
            else:
                shutil.copy(entry, warm / folder / entry.name)


def bare_loop(src: Path, out: Path, cfg: IngestConfig) -> Timing:
    """The same discovery, decode, encode, deduplication and Parquet writing as ``run_ingest``, in this process."""
    start = time.perf_counter()
    fs, root = storage.filesystem(str(src))
    _, units, _ = discover([root], cfg, {}, set())
    ctx = ReadContext(cfg, Pseudonymizer(KEY), fs)
    writer = ShardWriter(*storage.filesystem(str(out)), cfg)
    images, read_seconds, seen = 0, 0.0, set()
    for unit in units:
        t = time.perf_counter()
        rows = read_unit(unit, ctx)
        read_seconds += time.perf_counter() - t
        table = pa.Table.from_pylist(rows, schema=READ_SCHEMA)
        table = table.filter(pc.equal(table.column("_status"), "ok"))
        images += table.num_rows
        keep = [
            i
            for i, d in enumerate(table.column("pixel_sha256").to_pylist())
            if not (d in seen or seen.add(d))
        ]
        if keep:
            writer.write(table.take(keep).select(ROW_SCHEMA.names))
    writer.close()
    return Timing(images, time.perf_counter() - start, read_seconds)


def pipeline(src: Path, out: Path, cfg: IngestConfig) -> Timing:
    start = time.perf_counter()
    manifest = run_ingest([str(src)], str(out), cfg, key=KEY, force=True).manifest
    seconds = time.perf_counter() - start
    if manifest["quarantined"]:
        print(f"warning: {manifest['quarantined']} files of {src.name} quarantined", file=sys.stderr)
    return Timing(manifest["rows"] + manifest["duplicates"], seconds)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"nproc {nproc}, {cpu}, no GPU used"


def table(results: dict[str, tuple[int, Timing, Timing]], cpus: int) -> str:
    head = (
        "| modality | files | images | bare s (decode+encode) | bare img/s | pipeline s | pipeline img/s "
        f"| speed-up on {cpus} cores | per-core cost |"
    )
    lines = [head, "|" + " --- |" * 9]
    for name, (files, bare, pipe) in results.items():
        cost = pipe.seconds * cpus / bare.seconds
        lines.append(
            f"| {name} | {files} | {bare.images} | {bare.seconds:.1f} ({bare.read_seconds:.1f}) "
            f"| {bare.images / bare.seconds:.1f} | {pipe.seconds:.1f} | {pipe.images / pipe.seconds:.1f} "
            f"| {bare.seconds / pipe.seconds:.2f}x | {cost:.2f}x{'' if cost <= TARGET else ' (miss)'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller corpus (about a minute on 2 cores)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--keep", type=Path, help="build the corpus here and keep it (reused when present)")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="mermed-bench-ingest-"))
    corpus = args.keep or work / "corpus"
    try:
        t = time.perf_counter()
        if not corpus.is_dir():
            build_corpus(corpus, args.quick)
        build_warmup(corpus, work / "warm", args.cpus)
        print(f"corpus ready in {time.perf_counter() - t:.0f} s; {machine()}", flush=True)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        warm_cfg = IngestConfig(dataset="bench")
        pipeline(work / "warm", work / "out-warm-ray", warm_cfg)
        bare_loop(work / "warm", work / "out-warm-bare", warm_cfg)

        results: dict[str, tuple[int, Timing, Timing]] = {}
        for folder, modality in FOLDERS.items():
            cfg = IngestConfig(
                dataset="bench", modality=modality
            )  # inputs below the folder carry no modality name
            files = sum(1 for p in (corpus / folder).rglob("*") if p.is_file())
            bare = bare_loop(corpus / folder, work / f"out-bare-{folder}", cfg)
            pipe = pipeline(corpus / folder, work / f"out-ray-{folder}", cfg)
            results[modality] = (files, bare, pipe)
            print(f"{modality}: bare {bare.seconds:.1f} s, pipeline {pipe.seconds:.1f} s", flush=True)
        # All modalities in one pipeline run; the bare loop being sequential, its total is the sum of its runs.
        everything = pipeline(corpus, work / "out-ray-all", IngestConfig(dataset="bench"))
        bare_total = Timing(
            sum(b.images for _, b, _ in results.values()),
            sum(b.seconds for _, b, _ in results.values()),
            sum(b.read_seconds for _, b, _ in results.values()),
        )
        results["all (one run)"] = (sum(f for f, _, _ in results.values()), bare_total, everything)
        ray.shutdown()
        print()
        print(f"Ray pipeline vs bare loop, {args.cpus} Ray CPUs; {machine()}")
        print(table(results, args.cpus))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
