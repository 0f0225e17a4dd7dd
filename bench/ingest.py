"""Ingest throughput: the Ray pipeline against the bare single-process loop, over the same files in one run.

The bare loop is the floor no pipeline beats per core: the pipeline's own ``read_unit`` (decode + encode) over
the same units in this process, writing the same Parquet through the pipeline's ``ShardWriter``, with no Ray.
The pipeline's cost per image at equal cores is (pipeline wall x N cores) / (bare wall x 1 core); 1.0 means Ray
adds nothing, the target is <= 1.3.

Wall time on a shared machine also counts other people's work, so CPU time is measured beside it: the CPU
seconds of this process and of every process it started (Ray's workers and daemons) against the bare loop's,
and the cores that other processes kept busy meanwhile (from /proc/stat), so that a reader can tell a slow
pipeline from a busy machine.

    python bench/ingest.py [--quick] [--cpus N] [--keep DIR]
    python bench/ingest.py --files 2000,20000 [--cpus N]

``--files``: archives of that many small distinct photos (three modality folders) instead: the listing time,
the time to the first shard rows, the throughput and the driver's peak memory above its start, per archive
size, so that a reader sees how the driver's memory grows with the number of files.

Files: drawn by ``ingest.samples`` (all seven modalities), pydicom's real test DICOMs, and the real SVS slides
and HAM10000 photos of ../shared/data when present. Ray is started and warmed on a tiny corpus before timing.
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
import functools
import logging
import operator
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ingest import storage
from ingest.config import IngestConfig
from ingest.deid import Pseudonymizer
from ingest.pipeline import READ_SCHEMA, ReadContext, ShardWriter, discover, read_unit, run_ingest
from ingest.samples import copy_pydicom_testdata, make_sample_corpus
from ingest.schema import ROW_SCHEMA

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEY = b"bench-key-0123456789abcdef0123456789"
FOLDERS = {"ct": "CT", "cxr": "CXR", "us": "US", "path": "PATH", "cfp": "CFP", "oct": "OCT", "derm": "DERM"}
TARGET = 1.3
TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("read tasks", "driver", "Ray services")


# ------------------------------------------------------------------------------------------------ the corpus


def build_corpus(root: Path, quick: bool) -> None:
    """Drawn samples of every modality, pydicom's real DICOMs (a folder each, as series arrive), shared data."""
    make_sample_corpus(
        root, per_class=3 if quick else 8, size=512, ct_slices=8, slide_size=1024 if quick else 1536, seed=0
    )
    (root / "labels.csv").unlink()  # not an input: the bench reads without labels
    with tempfile.TemporaryDirectory() as tmp:
        for path in copy_pydicom_testdata(Path(tmp), ("CT", "CR", "DX", "US")):
            dest = root / {"CT": "ct", "US": "us"}.get(path.parent.name, "cxr") / f"pydicom_{path.stem}"
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
    """A tiny corpus with ``n`` entries of each modality folder, so that every worker imports every reader."""
    for folder in FOLDERS:
        (warm / folder).mkdir(parents=True)
        for entry in sorted((root / folder).iterdir())[:n]:
            if entry.is_dir():
                shutil.copytree(entry, warm / folder / entry.name)
            else:
                shutil.copy(entry, warm / folder / entry.name)


# ------------------------------------------------------------------------------------------------ the two runs


def bare_loop(src: Path, out: Path, cfg: IngestConfig) -> tuple[int, float]:
    """``run_ingest``'s discovery, decode, encode, deduplication and Parquet writing, in this process.

    Returns the images decoded and the CPU seconds spent in ``read_unit`` (the rest is Arrow and Parquet).
    """
    fs, root = storage.filesystem(str(src))
    _, units, _ = discover([root], cfg, {}, set())
    ctx = ReadContext(cfg, Pseudonymizer(KEY), fs)
    writer = ShardWriter(*storage.filesystem(str(out)), cfg)
    images, read_cpu, seen = 0, 0.0, set()
    for unit in units:
        start = time.process_time()
        rows = read_unit(unit, ctx)
        read_cpu += time.process_time() - start
        table = pa.Table.from_pylist(rows, schema=READ_SCHEMA)
        table = table.filter(pc.equal(table.column("_status"), "ok"))
        images += table.num_rows
        keep = []
        for i, digest in enumerate(table.column("pixel_sha256").to_pylist()):
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
        if keep:
            writer.write(table.take(keep).select(ROW_SCHEMA.names))
    writer.close()
    return images, read_cpu


def pipeline(src: Path, out: Path, cfg: IngestConfig) -> int:
    manifest = run_ingest([str(src)], str(out), cfg, key=KEY, force=True).manifest
    if manifest["quarantined"]:
        print(f"note: {manifest['quarantined']} files quarantined (see {out}/_quarantine.parquet)", file=sys.stderr)
    return manifest["rows"] + manifest["duplicates"]


# ------------------------------------------------------------------------------------------------ measuring


def _our_processes() -> dict[int, tuple[float, str]]:
    """CPU seconds (own plus reaped children's) and title of this process and of each of its descendants."""
    stats: dict[int, tuple[int, float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd (state) on
        stats[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / TICK, title)
    ours = {os.getpid()}
    while grown := {pid for pid, (ppid, _, _) in stats.items() if ppid in ours and pid not in ours}:
        ours |= grown
    return {pid: stats[pid][1:] for pid in ours}


def _machine_busy() -> float:
    """CPU seconds the machine has been busy since boot (all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICK


def _part(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "driver"
    if title.startswith(("ray::MapBatches", "ray::IDLE")):  # Ray Data read workers, busy or between tasks
        return "read tasks"
    return "Ray services"  # raylet, GCS, Ray Data's actors, dashboard agent, log monitor...


@dataclass
class Timing:
    images: int
    seconds: float  # wall
    split: Counter[str]  # CPU seconds by part (PARTS); the bare loop's work is all in "driver"
    others: float  # CPU seconds of processes that are not ours, meanwhile
    cpu: float = 0.0  # CPU seconds the run needed: the bare loop's process, or every process of the pipeline

    def __add__(self, other: Timing) -> Timing:
        return Timing(
            self.images + other.images,
            self.seconds + other.seconds,
            self.split + other.split,
            self.others + other.others,
            self.cpu + other.cpu,
        )


class Meter:
    """Wall time, CPU seconds of our processes by part, and other processes' CPU seconds over a block."""

    def __enter__(self) -> Meter:
        self._procs, self._busy, self._start = _our_processes(), _machine_busy(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        busy = _machine_busy() - self._busy
        self.split: Counter[str] = Counter()
        for pid, (total, title) in _our_processes().items():
            self.split[_part(pid, title)] += total - self._procs.get(pid, (0.0, ""))[0]
        self.others = max(0.0, busy - sum(self.split.values()))


def timed_bare(src: Path, out: Path, cfg: IngestConfig) -> tuple[Timing, float]:
    with Meter() as m:
        images, read_cpu = bare_loop(src, out, cfg)
    return Timing(images, m.seconds, m.split, m.others, cpu=m.split["driver"]), read_cpu


def timed_pipeline(src: Path, out: Path, cfg: IngestConfig) -> Timing:
    with Meter() as m:
        images = pipeline(src, out, cfg)
    return Timing(images, m.seconds, m.split, m.others, cpu=sum(m.split.values()))


# ------------------------------------------------------------------------------------------------ report


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return f"nproc {nproc}, CPU {model}, no GPU"


def table(results: dict[str, tuple[int, int, Timing, Timing]], cpus: int) -> str:
    """Markdown table; "cost" columns are the pipeline's cost per image over the bare loop's at equal cores."""
    lines = [
        "| modality | files (tasks) | images | bare s | bare img/s | pipeline s | pipeline img/s "
        f"| cost: wall x {cpus} / bare | cost: CPU / bare CPU | pipeline CPU: read tasks / driver / Ray "
        "| others' load, cores (bare / pipeline) |",
        "|" + " --- |" * 11,
    ]
    for name, (files, units, bare, pipe) in results.items():
        wall_cost = pipe.seconds * cpus / bare.seconds
        split = " / ".join(f"{pipe.split[p] / pipe.cpu:.0%}" for p in PARTS)
        lines.append(
            f"| {name} | {files} ({units}) | {pipe.images} | {bare.seconds:.1f} | {bare.images / bare.seconds:.1f} "
            f"| {pipe.seconds:.1f} | {pipe.images / pipe.seconds:.1f} "
            f"| {wall_cost:.2f}{'' if wall_cost <= TARGET else ' (miss)'} | {pipe.cpu / bare.cpu:.2f} | {split} "
            f"| {bare.others / bare.seconds:.1f} / {pipe.others / pipe.seconds:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ big archives


def build_archive(root: Path, n: int) -> None:
    """``n`` distinct 32 x 32 noise PNGs spread over three modality folders, a hundred per sub-folder."""
    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(n)
    for i in range(n):
        folder = root / ("derm", "cfp", "oct")[i % 3] / f"batch{i // 300:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def archive_run(src: Path, out: Path) -> dict[str, float]:
    """One ingest of a big archive: listing seconds, seconds to the first shard rows, total seconds, files, and
    the driver's peak RSS above its level before the run (sampled every 50 ms)."""
    import threading

    cfg = IngestConfig(dataset="bench")
    start = time.perf_counter()
    files, _, _ = discover([str(src)], cfg, {}, set())
    listing = time.perf_counter() - start
    del files
    base, peak, first = _rss_mb(), [0.0], [float("nan")]
    done = threading.Event()

    def sample() -> None:
        began = time.perf_counter()
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb() - base)
            if first[0] != first[0] and any(out.glob("_staging-*/modality=*/part-*.parquet")):
                first[0] = time.perf_counter() - began
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    began = time.perf_counter()
    manifest = run_ingest([str(src)], str(out), cfg, key=KEY, force=True).manifest
    total = time.perf_counter() - began
    done.set()
    thread.join()
    if manifest["quarantined"]:
        print(f"note: {manifest['quarantined']} files quarantined", file=sys.stderr)
    return {
        "files": manifest["discovered"],
        "rows": manifest["rows"],
        "listing": listing,
        "first": first[0],
        "total": total,
        "peak_mb": peak[0],
    }


def archive_bench(sizes: list[int], cpus: int) -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="mermed-bench-archive-"))
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        build_archive(work / "warm", 30)
        archive_run(work / "warm", work / "out-warm")
        lines = [
            "| files | listing s | first shard rows s | total s | files/s | driver peak MB | MB per 1,000 files |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for n in sizes:
            started = time.perf_counter()
            build_archive(work / f"archive-{n}", n)
            print(f"{n} files written in {time.perf_counter() - started:.0f} s", flush=True)
            r = archive_run(work / f"archive-{n}", work / f"out-{n}")
            lines.append(
                f"| {r['files']} | {r['listing']:.1f} | {r['first']:.1f} | {r['total']:.1f} "
                f"| {r['files'] / r['total']:.0f} | {r['peak_mb']:.0f} | {1000 * r['peak_mb'] / r['files']:.2f} |"
            )
            print(lines[-1], flush=True)
            shutil.rmtree(work / f"archive-{n}")
            shutil.rmtree(work / f"out-{n}")
        ray.shutdown()
        print(f"\nBig archives, Ray pipeline ({cpus} CPUs); {machine()}")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller corpus")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray (N)")
    parser.add_argument("--keep", type=Path, help="build the corpus here and keep it; reused when present")
    parser.add_argument("--files", help="comma-separated archive sizes: the big-archive bench instead")
    args = parser.parse_args()
    if args.files:
        archive_bench([int(n) for n in args.files.split(",")], args.cpus)
        return

    import ray

    work = Path(tempfile.mkdtemp(prefix="mermed-bench-ingest-"))
    corpus = args.keep or work / "corpus"
    try:
        start = time.perf_counter()
        if not corpus.is_dir():
            build_corpus(corpus, args.quick)
        build_warmup(corpus, work / "warm", args.cpus)
        print(f"corpus ready in {time.perf_counter() - start:.0f} s", flush=True)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        pipeline(work / "warm", work / "out-warm-ray", IngestConfig(dataset="bench"))
        bare_loop(work / "warm", work / "out-warm-bare", IngestConfig(dataset="bench"))

        results: dict[str, tuple[int, int, Timing, Timing]] = {}
        read_cpu = 0.0
        for folder, modality in FOLDERS.items():
            # Paths below a modality folder do not name it: the run is told its modality.
            cfg = IngestConfig(dataset="bench", modality=modality)
            files, units, _ = discover([str(corpus / folder)], cfg, {}, set())
            bare, read = timed_bare(corpus / folder, work / f"out-bare-{folder}", cfg)
            pipe = timed_pipeline(corpus / folder, work / f"out-ray-{folder}", cfg)
            if bare.images != pipe.images:
                print(f"warning: {modality}: bare loop {bare.images} images, pipeline {pipe.images}", file=sys.stderr)
            results[modality] = (len(files), len(units), bare, pipe)
            read_cpu += read
            print(f"{modality}: bare {bare.seconds:.1f} s, pipeline {pipe.seconds:.1f} s", flush=True)
        # Every modality in one pipeline run; the bare loop being sequential, its total is the sum of its runs.
        everything = timed_pipeline(corpus, work / "out-ray-all", IngestConfig(dataset="bench"))
        rows = list(results.values())
        bare = functools.reduce(operator.add, (bare for _, _, bare, _ in rows))
        results["all, one run"] = (sum(r[0] for r in rows), sum(r[1] for r in rows), bare, everything)
        ray.shutdown()

        print(f"\nRay pipeline ({args.cpus} CPUs) against the bare loop (1 process); {machine()}")
        print(table(results, args.cpus))
        print(
            f"\nbare loop CPU: {read_cpu / bare.cpu:.0%} in read_unit (decode + encode), "
            f"{1 - read_cpu / bare.cpu:.0%} in Arrow and Parquet; target cost <= {TARGET}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
