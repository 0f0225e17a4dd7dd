"""The ingest graph: discover inputs, read them in Ray tasks (``flat_map``), deduplicate, write Parquet shards.

Accounting is per input file: every discovered file ends either ingested (its images written, or dropped as
duplicates of images already written) or quarantined with a reason, so ``discovered == ingested + quarantined``.

Reading and encoding, the costly part, run in parallel Ray tasks; the driver streams their rows in input order
(``preserve_order``) into shards, which gives deterministic shard names and contents and one place to deduplicate.
Shards, the quarantine table and the manifest are written under ``OUT/_staging-*`` (hidden from Parquet readers)
and moved into place, the manifest last: a crash, or a disk that fills up, leaves the previous output as it was.

A read task whose worker process dies (a native crash in a decoder, the OOM killer) is retried
``read_attempts`` times; then its block is dropped, its inputs are read again one per task, and a file whose own
task keeps dying is quarantined ("worker died while decoding"): one poison file never stops an archive.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest import dicom, image, npz, storage, vendor_oct, wsi
from ingest.config import IngestConfig
from ingest.deid import Pseudonymizer, load_key, scrub_message
from ingest.labels import LabelRow, parse_labels, patient_split
from ingest.progress import Progress
from ingest.schema import (
    INGEST_VERSION,
    MANIFEST,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    Image,
    PixelMoments,
    encode_image,
    pixel_sha256,
)

log = logging.getLogger("mermed.ingest")


# Folder names (any component of a file's path below its input root) that name a modality.
FOLDER_MODALITY = {
    "ct": "CT",
    "cxr": "CXR",
    "xray": "CXR",
    "x-ray": "CXR",
    "chest_xray": "CXR",
    "us": "US",
    "ultrasound": "US",
    "path": "PATH",
    "pathology": "PATH",
    "histology": "PATH",
    "wsi": "PATH",
    "cfp": "CFP",
    "fundus": "CFP",
    "oct": "OCT",
    "derm": "DERM",
    "dermatology": "DERM",
    "skin": "DERM",
}
DICOM_EXTENSIONS = {".dcm", ".dicom", ".ima", ""}
SLIDE_EXTENSIONS = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
NPZ_EXTENSIONS = {".npz"}
# Kinds of file that say what modality each of their images is: a modality need not be configured for them.
SELF_DESCRIBING = {"dicom", "vendor_oct"}
UNITS_PER_BLOCK = 256
_ERROR_COLUMNS = ("_status", "_input", "_stage", "_error_class", "_message")


class IngestError(RuntimeError):
    """A run that cannot start (no key, bad label file, no input); raised before any file is read."""


@dataclass
class InputFile:
    """One discovered file; ``rel`` is its path below its input root (what ``source`` pseudonymises)."""

    index: int
    uri: str
    rel: str
    kind: str  # dicom | slide | tiff | image | npz | vendor_oct | unsupported | outside_root
    modality: str | None
    label: LabelRow | None = None


@dataclass
class Unit:
    """Files read by one task: one file, or a directory's DICOM files (so a series is ordered as a whole)."""

    kind: str
    files: list[InputFile] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- discovery


def _kind_of(rel: str) -> str:
    ext = posixpath.splitext(rel)[1].lower()
    if ext in SLIDE_EXTENSIONS:
        return "slide"
    if ext in TIFF_EXTENSIONS:
        return "tiff"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in NPZ_EXTENSIONS:
        return "npz"
    if ext in vendor_oct.EXTENSIONS:
        return "vendor_oct"
    if ext in DICOM_EXTENSIONS:
        return "dicom"
    return "unsupported"


def modality_from_path(rel: str) -> str | None:
    """The modality named by the deepest folder of ``rel`` that names one (``fundus/``, ``ct/``...)."""
    for part in reversed(rel.lower().split("/")[:-1]):
        if part in FOLDER_MODALITY:
            return FOLDER_MODALITY[part]
    stem = posixpath.basename(rel).lower()
    for alias, modality in FOLDER_MODALITY.items():  # MedMNIST files carry the modality in their name
        if stem.startswith(f"{alias}mnist") or stem.startswith(f"{alias}_"):
            return modality
    return None


def _walk(fs, root: str) -> Iterator[tuple[str, str]]:
    """(full path, path relative to root) of every non-hidden file under ``root`` (or ``root`` itself)."""
    if fs.isfile(root):
        yield root, posixpath.basename(root)
        return
    for path in sorted(fs.find(root, withdirs=False)):
        rel = posixpath.relpath(path, root) if not storage.is_remote(root) else path[len(root) :].lstrip("/")
        rel = rel.replace(os.sep, "/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files and our own outputs (_manifest.json...) are not inputs
        yield path, rel


def _inside_root(fs, path: str, root: str) -> bool:
    """Refuse symlinks and ``..`` that lead out of the input root (local files; object stores have no links)."""
    if storage.is_remote(root):
        return True
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def discover(
    inputs: list[str], cfg: IngestConfig, labels: dict[str, LabelRow], exclude: set[str]
) -> tuple[list[InputFile], list[Unit], int]:
    """List every input file, decide its reader and modality hint, group DICOM files by directory."""
    files: list[InputFile] = []
    for src in inputs:
        fs, root = storage.filesystem(src)
        if not storage.is_remote(src):
            # `raw/cfp/x/..` is raw/cfp, whose name may name the modality; links stay (containment uses realpath)
            root = os.path.normpath(root)
        if not fs.exists(root):
            raise IngestError(f"input {src} does not exist")
        base = root if not fs.isfile(root) else posixpath.dirname(root)
        for path, rel in _walk(fs, root):
            uri = storage.to_uri(fs, path)
            if uri in exclude or path in exclude:
                continue
            kind = _kind_of(rel) if _inside_root(fs, path, base) else "outside_root"
            label = labels.get(rel)
            modality = None if cfg.modality == "auto" else cfg.modality
            named = posixpath.basename(base.rstrip("/")) + "/" + rel  # the root's own name may name the modality
            modality = modality or (label.modality if label else None) or modality_from_path(named)
            files.append(InputFile(len(files), uri, rel, kind, modality, label))
    matched = sum(1 for f in files if f.label is not None)
    units: list[Unit] = []
    dicom_dirs: dict[str, Unit] = {}
    for f in files:
        if f.kind == "dicom":
            unit = dicom_dirs.get(posixpath.dirname(f.uri))
            if unit is None:
                unit = dicom_dirs[posixpath.dirname(f.uri)] = Unit("dicom")
                units.append(unit)
            unit.files.append(f)
        else:
            units.append(Unit(f.kind, [f]))
    return files, units, len(labels) - matched


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class ReadContext:
    """What every read task needs; pickled into the tasks (the key travels inside the Pseudonymizer)."""

    cfg: IngestConfig
    pseudonymize: Pseudonymizer
    fs: object  # the fsspec filesystem of the inputs (inputs of one run share a protocol)


def _reader_for(kind: str, local_path: str, modality: str | None):
    if kind == "dicom":
        return dicom.read
    if kind == "slide" or (kind == "tiff" and (modality == "PATH" or wsi.is_slide(local_path))):
        return wsi.read
    if kind in ("tiff", "image"):
        return image.read
    if kind == "npz":
        return npz.read
    if kind == "vendor_oct":
        return vendor_oct.read
    raise AssertionError(kind)


# Every block the read step emits has this schema: the shard row plus what the driver needs for accounting.
READ_SCHEMA = pa.schema(
    list(ROW_SCHEMA)
    + [
        pa.field("_input", pa.int64()),
        pa.field("_status", pa.string()),
        pa.field("_moments", pa.list_(pa.float64(), 7)),  # PixelMoments: total (3), squares (3), pixels
        pa.field("_stage", pa.string()),
        pa.field("_error_class", pa.string()),
        pa.field("_message", pa.string()),
    ]
)
_NOT_READ = {
    "unsupported": ("UnsupportedFormat", "file type not supported (expected DICOM, slide, image, npz or vendor OCT)"),
    "outside_root": ("PathOutsideRoot", "path leads outside the input root (symlink or ..); refused"),
}


def _failure(f: InputFile, ctx: ReadContext, stage: str, error_class: str, message: str) -> dict:
    return {
        "_input": f.index,
        "_status": "failed",
        "_stage": stage,
        "_error_class": error_class,
        "_message": message,
        "source": ctx.pseudonymize.source(f.rel),
    }


def _exception_failure(f: InputFile, ctx: ReadContext, stage: str, err: BaseException, local: str) -> dict:
    """A failure row for an exception, its message scrubbed of the input's path and name."""
    name = posixpath.basename(f.rel)
    hide = [f.uri, f.rel, name, posixpath.splitext(name)[0], local]
    message = scrub_message(str(err) or type(err).__name__, hide)
    return _failure(f, ctx, getattr(err, "stage", stage), type(err).__name__, message)


def _attributes_json(label: LabelRow | None, img: Image) -> str | None:
    """The row's attributes as a JSON object (the file's, then the label CSV's, which win), or None."""
    merged = {**(img.attributes or {}), **dict(label.attributes if label else ())}
    return json.dumps(merged, sort_keys=True) if merged else None


def _row(f: InputFile, img: Image, ctx: ReadContext) -> dict:
    cfg, pseud = ctx.cfg, ctx.pseudonymize
    label = f.label
    patient = pseud.patient((label.patient_id if label else None) or img.patient_key)
    source = pseud.source(f.rel)
    split = (label.split if label else None) or img.split
    split = split or patient_split(patient or source, cfg.val_fraction, cfg.test_fraction)
    pixels = img.pixels
    moments = PixelMoments.of(pixels)
    return {
        "_input": f.index,
        "_status": "ok",
        "_moments": [*moments.total, *moments.squares, float(moments.pixels)],
        "image": encode_image(pixels, img.encoding or cfg.image_format, cfg.jpeg_quality),
        "height": pixels.shape[0],
        "width": pixels.shape[1],
        "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
        "modality": img.modality,
        "dataset": cfg.dataset,
        "source": source,
        "frame": img.frame,
        "tile_x": img.tile_x,
        "tile_y": img.tile_y,
        "tile_level": img.tile_level,
        "mpp": img.mpp,
        "patient_id": patient,
        "study_id": pseud.study(img.study_key),
        "label": (label.label if label else None) or img.label,
        "split": split,
        "attributes": _attributes_json(label, img),
        "pixel_sha256": pixel_sha256(pixels),
        "ingest_version": INGEST_VERSION,
    }


def _fetch(f: InputFile, ctx: ReadContext, tmp: str, n: int) -> str:
    """A local path for the file: itself, or a temporary copy of an object-store input under its own name (some
    formats keep facts in it: a Zeiss OCT export its scan pattern)."""
    if not storage.is_remote(f.uri):
        return f.uri
    local = os.path.join(tmp, str(n), posixpath.basename(f.rel))
    os.makedirs(os.path.dirname(local))
    ctx.fs.get(storage.filesystem(f.uri)[1], local)
    return local


def read_unit(unit: Unit, ctx: ReadContext) -> list[dict]:
    """Read one unit into rows, plus one failure row per file that could not be ingested.

    A file either contributes all its images or none (a failure halfway drops what it had produced).
    """
    out: list[dict] = []
    # Library warnings quote file paths and header values (pydicom: "... in file <path>"); none may reach a log.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="mermed-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        readable: list[tuple[InputFile, str]] = []
        for f in unit.files:
            if f.kind in _NOT_READ:
                out.append(_failure(f, ctx, "discover", *_NOT_READ[f.kind]))
            elif f.modality is None and unit.kind not in SELF_DESCRIBING:
                out.append(
                    _failure(
                        f,
                        ctx,
                        "discover",
                        "UnknownModality",
                        "modality unknown: pass --modality, a label CSV modality or a modality folder",
                    )
                )
            else:
                try:
                    readable.append((f, _fetch(f, ctx, tmp, len(readable))))
                except Exception as err:  # noqa: BLE001 - every failure becomes a quarantine row
                    out.append(_exception_failure(f, ctx, "fetch", err, ""))
        if not readable:
            return out
        paths = [local for _, local in readable]
        hints = {f.modality for f, _ in readable}
        modality = hints.pop() if len(hints) == 1 else None  # DICOM: None lets each header decide
        try:
            reader = _reader_for(unit.kind, paths[0], modality)
        except Exception as err:  # noqa: BLE001 - e.g. format detection on an unreadable file
            return out + [_exception_failure(f, ctx, "open", err, local) for f, local in readable]
        produced: dict[int, list[dict]] = {i: [] for i in range(len(readable))}
        failed: dict[int, dict] = {}
        for i, result in reader(paths, modality, ctx.cfg):
            f, local = readable[i]
            if i in failed:
                continue
            if isinstance(result, Exception):
                failed[i] = _exception_failure(f, ctx, "read", result, local)
                continue
            try:
                produced[i].append(_row(f, result, ctx))
            except Exception as err:  # noqa: BLE001
                failed[i] = _exception_failure(f, ctx, "encode", err, local)
        for i, (f, _) in enumerate(readable):
            if i in failed:
                out.append(failed[i])
            elif not produced[i]:
                out.append(
                    _failure(
                        f, ctx, "read", "NoImages", "the input produced no image (e.g. no tissue found on a slide)"
                    )
                )
            else:
                out.extend(produced[i])
    return out


def _unit_to_json(unit: Unit) -> str:
    return json.dumps(asdict(unit))


def _unit_from_json(text: str) -> Unit:
    data = json.loads(text)
    files = [InputFile(**{**f, "label": LabelRow(**f["label"]) if f["label"] else None}) for f in data["files"]]
    return Unit(data["kind"], files)


def _read_batch(batch: dict, ctx: ReadContext) -> pa.Table:
    """The read step: units in, a typed Arrow block of their rows out (a slide fans out into many tiles).

    ``map_batches`` with one unit per batch rather than ``flat_map``: a typed block keeps the column types when it
    holds only failures (all-null image columns), and no Python dict is built per tile on the way out.
    """
    rows = [row for text in batch["unit"] for row in read_unit(_unit_from_json(str(text)), ctx)]
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


# ----------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Rolls zstd Parquet shards of about ``shard_bytes`` per modality, with deterministic names."""

    def __init__(self, fs, staging: str, cfg: IngestConfig) -> None:
        self.fs, self.staging, self.cfg = fs, staging, cfg
        self._open: dict[str, tuple[pq.ParquetWriter, object, int]] = {}
        self._count: Counter[str] = Counter()
        self.written: list[str] = []  # shard paths relative to the output root
        self.bytes = 0

    def write(self, table: pa.Table) -> None:
        for modality in sorted(set(table.column("modality").to_pylist())):
            part = table.filter(pa.compute.equal(table.column("modality"), modality))
            writer, handle, size = self._open.get(modality) or self._start(modality)
            writer.write_table(part, row_group_size=self.cfg.row_group_rows)
            size += pa.compute.sum(pa.compute.binary_length(part.column("image"))).as_py() or 0
            self._open[modality] = (writer, handle, size)
            if size >= self.cfg.shard_bytes:
                self._close(modality)

    def _start(self, modality: str):
        rel = f"modality={modality}/part-{self._count[modality]:05d}.parquet"
        self._count[modality] += 1
        path = posixpath.join(self.staging, rel)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        handle = self.fs.open(path, "wb")
        writer = pq.ParquetWriter(handle, ROW_SCHEMA, compression="zstd", write_statistics=False)
        self.written.append(rel)
        return writer, handle, 0

    def _close(self, modality: str) -> None:
        writer, handle, _ = self._open.pop(modality)
        writer.close()
        handle.close()

    def close(self) -> None:
        for modality in list(self._open):
            self._close(modality)
        self.bytes = sum(self.fs.size(posixpath.join(self.staging, rel)) for rel in self.written)


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class _Tally:
    """What the driver keeps while the read blocks stream in: the shard writer, the manifest's counts, the pixel
    digests seen (for deduplication), the quarantine rows, and one flag per input that has reported back (rows or
    a failure), by which the inputs lost with a task that kept dying are found."""

    writer: ShardWriter
    deduplicate: bool
    reported: np.ndarray
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0
    failed_rows: list[dict] = field(default_factory=list)
    modalities: Counter[str] = field(default_factory=Counter)
    splits: Counter[tuple[str, str]] = field(default_factory=Counter)  # (modality, split) -> rows
    moments: dict[str, PixelMoments] = field(default_factory=dict)

    def add(self, batch: pa.Table) -> int:
        """Account for a block; returns how many inputs reported for the first time."""
        inputs = np.unique(np.asarray(batch.column("_input")))
        new = int((~self.reported[inputs]).sum())
        self.reported[inputs] = True
        failed = pa.compute.equal(batch.column("_status"), "failed")
        self.failed_rows.extend(batch.filter(failed).select(["source", *_ERROR_COLUMNS[1:]]).to_pylist())
        ok = batch.filter(pa.compute.invert(failed))
        keep = []
        for i, digest in enumerate(ok.column("pixel_sha256").to_pylist()):
            if self.deduplicate and digest in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(digest)
            keep.append(i)
        if keep:
            kept = ok.take(keep)
            _add_moments(self.moments, kept)
            table = kept.select([c.name for c in ROW_SCHEMA])
            modality, split = table.column("modality").to_pylist(), table.column("split").to_pylist()
            self.modalities.update(modality)
            self.splits.update(zip(modality, split, strict=True))
            self.writer.write(table)
        return new


def _read_isolated(lost: list[Unit], ctx: ReadContext, attempts: int) -> Iterator[pa.Table]:
    """Read each lost unit in a Ray task of its own (``attempts`` tries), in input order; yields its block, or a
    quarantine row per file for a unit whose own task dies every time (the poison input that killed its block)."""
    import ray

    read = ray.remote(num_cpus=1, max_retries=attempts - 1)(_read_batch)
    shared = ray.put(ctx)
    refs = [read.remote({"unit": [_unit_to_json(u)]}, shared) for u in lost]
    for unit, ref in zip(lost, refs, strict=True):
        try:
            yield ray.get(ref)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
            cause = "ran out of memory" if isinstance(err, ray.exceptions.OutOfMemoryError) else "died"
            message = f"worker {cause} while decoding ({attempts} attempts in a task of its own)"
            rows = [_failure(f, ctx, "read", "WorkerDied", message) for f in unit.files]
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


@dataclass
class IngestResult:
    output: str
    manifest: dict
    skipped: bool = False


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"mermed": INGEST_VERSION}
    for dist in ("ray", "pyarrow", "pydicom", "openslide-python", "openslide-bin", "pillow", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _inputs_hash(inputs: list[str], files: list[InputFile], labels_text: str) -> str:
    h = hashlib.sha256(labels_text.encode())
    for src in inputs:
        fs, root = storage.filesystem(src)
        for f in files:
            h.update(f.rel.encode())
        info = {
            p: (d.get("size"), d.get("mtime") or d.get("LastModified") or d.get("ETag"))
            for p, d in (fs.find(root, detail=True).items() if fs.isdir(root) else [(root, fs.info(root))])
        }
        h.update(json.dumps(sorted((k, str(v)) for k, v in info.items())).encode())
    return h.hexdigest()


def _add_moments(moments: dict[str, PixelMoments], rows: pa.Table) -> None:
    """Add the rows' pixel moments to their modality's: exact, in the same pass that writes them."""
    values = np.asarray(rows.column("_moments").combine_chunks().flatten(), dtype=np.float64).reshape(-1, 7)
    for modality in set(rows.column("modality").to_pylist()):
        mask = np.asarray(pa.compute.equal(rows.column("modality"), modality))
        s = values[mask].sum(axis=0)
        part = PixelMoments(tuple(s[:3]), tuple(s[3:6]), int(s[6]))
        moments[modality] = moments[modality] + part if modality in moments else part


def _read_manifest(fs, out: str) -> dict | None:
    path = posixpath.join(out, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def run_ingest(
    inputs: list[str],
    output: str,
    cfg: IngestConfig,
    *,
    labels_csv: str | None = None,
    key: bytes | None = None,
    force: bool = False,
) -> IngestResult:
    """Ingest ``inputs`` (local paths or s3:// URIs) into ``output``; see the module docstring."""
    import ray

    if not inputs:
        raise IngestError("no --input given")
    pseud = Pseudonymizer(key if key is not None else load_key())
    labels_text = ""
    if labels_csv:
        lfs, lpath = storage.filesystem(labels_csv)
        with lfs.open(lpath, "rb") as fh:
            labels_text = fh.read().decode("utf-8-sig")
    labels = parse_labels(labels_text, name="label CSV", attributes=cfg.attributes) if labels_csv else {}
    out_fs, out = storage.filesystem(output)
    exclude = {labels_csv} if labels_csv else set()
    if labels_csv:
        labels_path = storage.filesystem(labels_csv)[1]
        exclude |= {labels_path, os.path.normpath(labels_path)}
    files, units, unmatched = discover(inputs, cfg, labels, exclude)
    if not files:
        raise IngestError("no input file found under the given --input paths")

    config_hash = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()
    inputs_hash = _inputs_hash(inputs, files, labels_text)
    previous = _read_manifest(out_fs, out)
    if (
        not force
        and previous
        and previous.get("config_hash") == config_hash
        and previous.get("inputs_hash") == inputs_hash
        and previous.get("versions", {}).get("mermed") == INGEST_VERSION
    ):
        log.info("ingest: %s is up to date (%d rows); nothing to do", output, previous["rows"])
        return IngestResult(output, previous, skipped=True)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log.info("ingest: %d files in %d read units", len(files), len(units))
    ctx = ReadContext(cfg, pseud, storage.filesystem(inputs[0])[0])
    # Several units per block: a task per file would cost more in Ray overhead than a photo costs to decode.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = min(len(units), max(4 * cpus, math.ceil(len(units) / UNITS_PER_BLOCK)))
    ds = ray.data.from_items([{"unit": _unit_to_json(u)} for u in units], override_num_blocks=blocks)
    with warnings.catch_warnings():  # Ray 2.60 deprecates **ray_remote_args but names no parameter for retries
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            _read_batch, fn_kwargs={"ctx": ctx}, batch_size=1, batch_format="numpy", max_retries=cfg.read_attempts - 1
        )
    ds.context.execution_options.preserve_order = True  # rows reach the writer in input order: deterministic shards
    # A block whose task died read_attempts times is dropped here, not the run: its inputs never report back,
    # and _read_isolated reads them again one per task.
    ds.context.max_errored_blocks = -1

    staging = posixpath.join(out, f"_staging-{uuid.uuid4().hex[:12]}")
    tally = _Tally(ShardWriter(out_fs, staging, cfg), cfg.deduplicate, np.zeros(len(files), dtype=bool))
    progress = Progress(log, "ingest", len(files), "files")
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=256):
            progress.update(tally.add(batch))
        lost = [u for u in units if not tally.reported[[f.index for f in u.files]].all()]
        if lost:
            log.warning("ingest: %d read units were lost with their dying tasks; reading them one per task", len(lost))
            for block in _read_isolated(lost, ctx, cfg.read_attempts):
                progress.update(tally.add(block))
        tally.writer.close()
        progress.close()
        quarantined = sorted({r["_input"] for r in tally.failed_rows})
        manifest = {
            "discovered": len(files),
            "ingested": len(files) - len(quarantined),
            "quarantined": len(quarantined),
            "duplicates": tally.duplicates,
            "rows": sum(tally.modalities.values()),
            "modalities": dict(sorted(tally.modalities.items())),
            "splits": {
                m: {sp: n for (mm, sp), n in sorted(tally.splits.items()) if mm == m} for m in sorted(tally.modalities)
            },
            "pixel_moments": {m: v.to_manifest() for m, v in sorted(tally.moments.items())},
            "bytes": tally.writer.bytes,
            "shards": tally.writer.written,
            "labels_unmatched": unmatched,
            "dataset": cfg.dataset,
            "versions": _versions(),
            "config_hash": config_hash,
            "inputs_hash": inputs_hash,
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _commit(out_fs, out, staging, tally.writer.written, tally.failed_rows, manifest, previous)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise IngestError(
            f"ingest: no space left on the device of {output} while writing the new shards; the previous output "
            "there is unchanged (nothing was moved into place). Free space and run again."
        ) from None
    finally:
        _remove_staging(out_fs, staging)
    log.info(
        "ingest: %d discovered, %d ingested, %d quarantined, %d rows, %d duplicates",
        manifest["discovered"],
        manifest["ingested"],
        manifest["quarantined"],
        manifest["rows"],
        tally.duplicates,
    )
    return IngestResult(output, manifest)


def _remove_staging(fs, staging: str) -> None:
    """Best effort: a store that is down must not replace the error that ended the run by one about cleaning
    up (the folder is hidden from readers, and the next successful run removes it)."""
    try:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    except Exception as err:  # noqa: BLE001
        log.warning("ingest: could not remove the staging folder (%s); the next run removes it", type(err).__name__)


def _commit(
    fs, out: str, staging: str, shards: list[str], failed: list[dict], manifest: dict, previous: dict | None
) -> None:
    """Write the quarantine table and the manifest into the staging folder, then move the new shards into place
    and those two files after them, the manifest last; then remove what crashed runs left in their staging
    folders. Everything that needs space is written before the visible output changes (moves are renames)."""
    rows = sorted(
        (
            {"source": r["source"], "stage": r["_stage"], "error_class": r["_error_class"], "message": r["_message"]}
            for r in failed
        ),
        key=lambda r: (r["source"], r["stage"]),
    )
    with fs.open(posixpath.join(staging, QUARANTINE), "wb") as fh:
        pq.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), fh, compression="zstd")
    with fs.open(posixpath.join(staging, MANIFEST), "wb") as fh:
        fh.write(json.dumps(manifest, indent=2, sort_keys=False).encode())
    stale = set(previous.get("shards", [])) if previous else set()
    stale |= {posixpath.relpath(p, out) for p in fs.glob(posixpath.join(out, "modality=*", "part-*.parquet"))}
    for rel in sorted(stale - set(shards)):
        fs.rm(posixpath.join(out, rel))
    for rel in [*shards, QUARANTINE, MANIFEST]:
        dest = posixpath.join(out, rel)
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        fs.mv(posixpath.join(staging, rel), dest)
    for leftover in fs.glob(posixpath.join(out, "_staging-*")):  # of runs that crashed before their commit
        if posixpath.normpath(leftover) != posixpath.normpath(staging):
            fs.rm(leftover, recursive=True)
