"""Reliability: bad input is refused with a clear error and a quarantine row; never a crash, a hang or garbage.

Every malformed file goes through its reader (error class and message checked) and, in one ``run_ingest`` over
the whole corpus, into the quarantine, with ``discovered == ingested + quarantined``. Decisions pinned here:
NaN or infinite pixel values are refused (``DecodeError``) rather than mapped to some grey; a photometric
interpretation that contradicts SamplesPerPixel is refused; 1-pixel and 100,000-pixel-wide images ingest.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from helpers import e2e_directory_loop
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ingest import dicom, image, npz, storage, vendor_oct, wsi
from ingest.config import IngestConfig
from ingest.deid import Pseudonymizer
from ingest.pipeline import MANIFEST, QUARANTINE, ReadContext, discover, read_unit, run_ingest
from ingest.samples import write_topcon_fds
from ingest.schema import DecodeError, Image, InputError, decode_image

KEY = b"malformed-test-key-0123456789abcdef"
# Slide thumbnails from level 1, so a level-0 tile can fail alone; a vendor OCT parse stopped after 10 s.
CFG = IngestConfig(wsi={"thumbnail_size": 256}, vendor_oct={"max_seconds": 10})
OK = "ok"
ANY = "ok or InputError"  # fuzzed files: whatever they decode to, as long as it is clean


# ------------------------------------------------------------------------------------------------- writers


def dataset(modality: str = "CT", uid: str | None = None) -> Dataset:
    """A DICOM dataset with file meta and identity, ready for pixel attributes; ``uid`` fixes the UIDs (and so
    the byte layout of the file), random otherwise."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    sop, study, series = (f"{uid}.{i}" for i in (1, 2, 3)) if uid else (generate_uid() for _ in range(3))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.Modality = modality
    ds.PatientID = "MALFORMED-0001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values are the point
        ds.save_as(path, enforce_file_format=True)
    return path


def dicom_image(
    path: Path, pixels: np.ndarray, modality: str = "CT", photometric: str = "MONOCHROME2", uid=None, **attrs
) -> Path:
    """A valid DICOM image of ``pixels``; ``attrs`` then overwrite header values (to break them)."""
    ds = dataset(modality, uid)
    bits = 8 if pixels.dtype == np.uint8 else 12
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return save(ds, path)


def float_dicom(path: Path, values: np.ndarray, modality: str = "CR") -> Path:
    """Float (32-bit) or Double Float (64-bit) Pixel Data, as parametric maps store it."""
    ds = dataset(modality)
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = values.dtype.itemsize * 8
    if values.dtype == np.float32:
        ds.FloatPixelData = values.tobytes()
    else:
        ds.DoubleFloatPixelData = values.tobytes()
    return save(ds, path)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` and that holds no image data."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big"))
    return path


def set_tiff_photometric(path: Path, value: int) -> Path:
    """Overwrite the PhotometricInterpretation tag in place (tifffile refuses to write a contradiction)."""
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["PhotometricInterpretation"].valueoffset
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def slide(path: Path) -> Path:
    """A two-level tiled TIFF of 1024 px (8 x 8 tiles of 128 px at level 0, 0.5 um/px) of noisy H&E-like tissue
    on glass: 4 x 4 tissue tiles of 224 px at the default target."""
    rng = np.random.default_rng(0)
    pixels = np.full((1024, 1024, 3), 255, np.uint8)
    pixels[32:992, 32:992] = rng.integers(0, 30, (960, 960, 3), dtype=np.uint8) + np.uint8([160, 50, 130])
    with tifffile.TiffWriter(path) as tw:
        for level in range(2):
            tw.write(
                pixels[:: 2**level, :: 2**level],
                tile=(128, 128),
                photometric="rgb",
                compression="zlib",
                subfiletype=int(level > 0),
                resolution=(1e4 / (0.5 * 2**level),) * 2,
                resolutionunit="CENTIMETER",
            )
    return path


def broken_slides(good: Path) -> tuple[Path, Path]:
    """The slide cut inside its level-0 tiles, and the slide with its level-0 tiles zeroed from row 5 on (after
    the reader has yielded the tissue tiles above)."""
    with tifffile.TiffFile(good) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = good.read_bytes()
    truncated = good.with_name("truncated.tif")
    truncated.write_bytes(data[: offsets[40] + counts[40] // 2])
    zeroed = bytearray(data)
    for offset, count in zip(offsets[40:], counts[40:], strict=True):
        zeroed[offset : offset + count] = bytes(count)
    corrupt = good.with_name("corrupt_tiles.tif")
    corrupt.write_bytes(bytes(zeroed))
    return truncated, corrupt


def fuzz_variants(base: Path, out: Path, n: int) -> list[Path]:
    """``n`` copies of ``base`` with 1-8 bytes of the header overwritten or bit-flipped (seeded)."""
    data = base.read_bytes()
    header_end = data.index(b"\xe0\x7f\x10\x00") + 12  # through the Pixel Data element's own header
    paths = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        fuzzed = bytearray(data)
        for pos in rng.integers(132, header_end, int(rng.integers(1, 9))):  # after preamble and "DICM"
            fuzzed[pos] = int(rng.integers(256)) if rng.random() < 0.5 else fuzzed[pos] ^ (1 << int(rng.integers(8)))
        path = out / f"fuzz_{seed:02d}.dcm"
        path.write_bytes(bytes(fuzzed))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- the corpus


@dataclass
class Corpus:
    root: Path
    expected: dict[str, str]  # path below root -> OK, ANY, or the error class the file must fail with

    def path(self, rel: str) -> str:
        return str(self.root / rel)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """Every malformed (and edge-case valid) file, in modality folders as a hospital would hand them over."""
    root = tmp_path_factory.mktemp("malformed")
    for folder in ("ct", "cxr", "us", "path", "oct", "derm", "fuzz"):
        (root / folder).mkdir()
    hu = np.arange(16, dtype=np.int16).reshape(4, 4) * 100 - 800
    dicom_image(root / "ct/one_pixel.dcm", np.array([[1024]], np.int16), RescaleIntercept=-1024, RescaleSlope=1)
    dicom_image(root / "ct/rows_zero.dcm", hu, Rows=0)
    dicom_image(root / "ct/rgb_on_one_sample.dcm", hu, PhotometricInterpretation="RGB")
    dicom_image(root / "ct/rescale_overflow.dcm", hu + 800, RescaleSlope="1e308", RescaleIntercept="0")
    dicom_image(root / "cxr/one_pixel.dcm", np.array([[700]], np.uint16), modality="CR")
    wide = (np.arange(65535, dtype=np.uint32) % 4096).astype(np.uint16)[None, :]
    dicom_image(root / "cxr/wide.dcm", wide, modality="CR")  # Columns is 16-bit: 65535 is the widest
    dicom_image(root / "cxr/declared_huge.dcm", (hu + 800).astype(np.uint16), modality="CR", Rows=65535, Columns=65535)
    nan = np.arange(16, dtype=np.float32).reshape(4, 4)
    nan[1, 2] = np.nan
    float_dicom(root / "cxr/float_nan.dcm", nan)
    extreme = np.concatenate([np.linspace(-1e308, 0, 8), np.linspace(0, 1e308, 8)]).reshape(4, 4)  # max - min > 1.8e308
    float_dicom(root / "cxr/double_extreme.dcm", extreme)
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    dicom_image(root / "us/mono_on_three_samples.dcm", rgb, "US", "RGB", PhotometricInterpretation="MONOCHROME2")
    dicom_image(root / "us/ybr_on_three_samples.dcm", rgb, "US", "RGB", PhotometricInterpretation="YBR_FULL")

    good = slide(root / "path/good.tif")
    broken_slides(good)

    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    tifffile.imwrite(root / "oct/float_ok.tif", values)
    for name, bad in (("float_nan", np.nan), ("float_inf", np.inf)):
        poisoned = values.copy()
        poisoned[3, 3] = bad
        tifffile.imwrite(root / f"oct/{name}.tif", poisoned)
    tifffile.imwrite(root / "oct/rgb_on_one_sample.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    set_tiff_photometric(root / "oct/rgb_on_one_sample.tif", 2)  # RGB
    tifffile.imwrite(root / "oct/one_pixel.tif", np.array([[40000]], np.uint16))
    tifffile.imwrite(root / "oct/wide.tif", (np.arange(100_000) % 251).astype(np.uint8)[None, :])
    np.savez(root / "oct/zero_size.npz", train_images=np.zeros((2, 0, 4), np.uint8), train_labels=np.zeros(2, int))
    np.savez(root / "oct/one_pixel.npz", test_images=np.full((1, 1, 1), 9, np.uint8), test_labels=np.ones(1, int))

    fds = write_topcon_fds(root / "oct/whole.fds", np.ones((2, 8, 8), np.uint16), patient_id="1", name=("A", "B"),
                           birth_date=(1970, 1, 1), captured=(2024, 1, 1, 0, 0, 0))  # fmt: skip
    (root / "oct/truncated.fds").write_bytes(fds.read_bytes()[:-40])
    (root / "oct/directory_loop.e2e").write_bytes(e2e_directory_loop())

    PILImage.new("RGB", (1, 1), (200, 10, 10)).save(root / "derm/one_pixel.png")
    PILImage.new("RGB", (1, 1), (10, 200, 10)).save(root / "derm/one_pixel.jpg")
    PILImage.fromarray((np.arange(100_000) % 256).astype(np.uint8)[None, :]).save(root / "derm/wide.png")
    png_header_only(root / "derm/zero_width.png", 0, 16)
    png_header_only(root / "derm/declared_huge.png", 100_000, 100_000)

    base = dicom_image(
        root / "fuzz_base.dcm",
        hu,
        uid="1.2.826.0.1.3680043.10.1",  # fixed, so that the seeds hit the same bytes on every run
        ImagePositionPatient=[0, 0, 1],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        WindowCenter=40,
        WindowWidth=400,
    )
    fuzzed = fuzz_variants(base, root / "fuzz", 20)
    base.unlink()

    expected = {
        "ct/one_pixel.dcm": OK,
        "ct/rows_zero.dcm": "DecodeError",
        "ct/rgb_on_one_sample.dcm": "DecodeError",
        "ct/rescale_overflow.dcm": "DecodeError",
        "cxr/one_pixel.dcm": OK,
        "cxr/wide.dcm": OK,
        "cxr/declared_huge.dcm": "InputError",
        "cxr/float_nan.dcm": "DecodeError",
        "cxr/double_extreme.dcm": OK,
        "us/mono_on_three_samples.dcm": "DecodeError",
        "us/ybr_on_three_samples.dcm": OK,
        "path/good.tif": OK,
        "path/truncated.tif": "InputError",
        "path/corrupt_tiles.tif": "DecodeError",
        "oct/float_ok.tif": OK,
        "oct/float_nan.tif": "DecodeError",
        "oct/float_inf.tif": "DecodeError",
        "oct/rgb_on_one_sample.tif": "InputError",
        "oct/one_pixel.tif": OK,
        "oct/wide.tif": OK,
        "oct/zero_size.npz": "DecodeError",
        "oct/one_pixel.npz": OK,
        "oct/whole.fds": OK,
        "oct/truncated.fds": "DecodeError",
        "oct/directory_loop.e2e": "TimeLimit",
        "derm/one_pixel.png": OK,
        "derm/one_pixel.jpg": OK,
        "derm/wide.png": OK,
        "derm/zero_width.png": "InputError",
        "derm/declared_huge.png": "InputError",
        **{p.relative_to(root).as_posix(): ANY for p in fuzzed},
    }
    assert sorted(expected) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return Corpus(root, expected)


READERS = {".dcm": dicom.read, ".tif": image.read, ".png": image.read, ".jpg": image.read, ".npz": npz.read}
READERS |= {ext: vendor_oct.read for ext in vendor_oct.EXTENSIONS}


def read(corpus: Corpus, rel: str, cfg: IngestConfig = CFG) -> tuple[list[Image], Exception | None]:
    """What the file's reader yields for it: its images, or the one exception it failed with."""
    folder = rel.split("/")[0]
    reader = wsi.read if folder == "path" else READERS[Path(rel).suffix]
    modality = {"ct": None, "cxr": None, "us": None, "fuzz": None, "path": "PATH"}.get(folder, folder.upper())
    images, errors = [], []
    for _, result in reader([corpus.path(rel)], modality, cfg):
        (errors if isinstance(result, Exception) else images).append(result)
    assert len(errors) <= 1
    return images, errors[0] if errors else None


def assert_fails(corpus: Corpus, rel: str, error: type[InputError], *words: str) -> InputError:
    images, err = read(corpus, rel)
    assert type(err) is error, (rel, err)
    for word in words:
        assert word in str(err), (rel, str(err))
    assert rel.split("/")[-1] not in str(err) and str(corpus.root) not in str(err)
    return err


def assert_reads(corpus: Corpus, rel: str, shape: tuple[int, ...]) -> list[Image]:
    images, err = read(corpus, rel)
    assert err is None, (rel, err)
    assert images and all(img.pixels.dtype == np.uint8 and img.pixels.shape == shape for img in images), rel
    return images


# ------------------------------------------------------------------------------------------------- tests

# The fuzz child: each variant through the DICOM reader in a separate process, so that a crash or a hang fails
# the test instead of killing pytest. One JSON line per file.
FUZZ_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
from ingest import dicom
from ingest.schema import Image, InputError
from ingest.config import IngestConfig
for path in sys.argv[1:]:
    out = {"images": [], "errors": []}
    for _, result in dicom.read([path], None, IngestConfig()):
        if isinstance(result, Image):
            out["images"].append([str(result.pixels.dtype), result.pixels.ndim, result.modality])
        else:
            out["errors"].append([type(result).__name__, isinstance(result, InputError), str(result)])
    print(json.dumps(out), flush=True)
"""
CHILD_MEMORY = 4 * 1024**3


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


@pytest.mark.faults
def test_fuzzed_dicom_headers_read_or_fail_cleanly(corpus):
    paths = sorted((corpus.root / "fuzz").glob("*.dcm"))
    done = subprocess.run(
        [sys.executable, "-c", FUZZ_CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
        preexec_fn=_limit_memory,  # so does a header that makes the reader allocate gigabytes
    )
    assert done.returncode == 0, done.stderr[-2000:]  # a crash of the process fails here
    outcomes = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(outcomes) == len(paths) == 20
    for path, out in zip(paths, outcomes, strict=True):
        assert (out["images"] or out["errors"]) and len(out["errors"]) <= 1, (path.name, out)
        for dtype, ndim, modality in out["images"]:
            assert dtype == "uint8" and ndim in (2, 3) and modality.isprintable(), (path.name, out)
        for name, is_input_error, message in out["errors"]:
            assert is_input_error, (path.name, name, message)  # InputError or DecodeError, nothing else
            assert message.isprintable() and str(corpus.root) not in message, (path.name, message)
    read_ok = sum(not out["errors"] for out in outcomes)
    assert 0 < read_ok < len(outcomes)  # the seeds both break headers and leave some readable


def test_slide_with_cut_or_corrupt_tiles(corpus):
    assert len(read(corpus, "path/good.tif")[0]) > 6  # the intact slide gives tiles
    assert_fails(corpus, "path/truncated.tif", InputError, "truncated")
    assert_fails(corpus, "path/corrupt_tiles.tif", DecodeError, "cannot read a tile")
    # The reader had yielded the intact tiles before failing; a file counts whole or not at all.
    cfg = CFG.model_copy(update={"modality": "PATH"})
    _, units, _ = discover([corpus.path("path")], cfg, {}, set())
    ctx = ReadContext(cfg, Pseudonymizer(KEY), storage.filesystem(corpus.path("path"))[0])
    rows = {u.files[0].rel: read_unit(u, ctx) for u in units}
    assert [r["_status"] for r in rows["corrupt_tiles.tif"]] == ["failed"]
    assert rows["corrupt_tiles.tif"][0]["_error_class"] == "DecodeError"
    assert {r["_status"] for r in rows["good.tif"]} == {"ok"}


def test_vendor_oct_files_need_no_configured_modality(corpus, tmp_path):
    """A Topcon export in a folder that names no modality: the file says what its images are (B-scans, fundus
    photo), where a photo beside it, which says nothing, is refused for want of a modality; Bioptigen files are
    not read."""
    export = tmp_path / "export_2024"
    export.mkdir()
    (export / "scan.fds").write_bytes((corpus.root / "oct/whole.fds").read_bytes())
    PILImage.new("L", (4, 4), 90).save(export / "photo.png")
    (export / "bioptigen.oct").write_bytes(bytes(64))  # not read: see ingest.vendor_oct
    _, units, _ = discover([str(export)], CFG, {}, set())
    ctx = ReadContext(CFG, Pseudonymizer(KEY), storage.filesystem(str(export))[0])
    rows = {u.files[0].rel: read_unit(u, ctx) for u in units}
    assert [(r["_status"], r["modality"], r["frame"]) for r in rows["scan.fds"]] == [("ok", "OCT", 0), ("ok", "OCT", 1)]
    assert [(r["_status"], r["_error_class"]) for r in rows["photo.png"]] == [("failed", "UnknownModality")]
    assert [(r["_status"], r["_error_class"]) for r in rows["bioptigen.oct"]] == [("failed", "UnsupportedFormat")]


def test_photometric_interpretation_contradicting_samples_is_refused(corpus):
    assert_fails(corpus, "ct/rgb_on_one_sample.dcm", DecodeError, "RGB needs 3 samples", "says 1")
    assert_fails(corpus, "us/mono_on_three_samples.dcm", DecodeError, "MONOCHROME2 needs 1 sample", "says 3")
    assert_fails(corpus, "oct/rgb_on_one_sample.tif", InputError)
    assert_reads(corpus, "us/ybr_on_three_samples.dcm", (4, 4, 3))  # a consistent colour header still reads


def test_nan_and_inf_pixels_are_refused_not_mapped(corpus):
    for rel in ("oct/float_nan.tif", "oct/float_inf.tif"):
        assert_fails(corpus, rel, DecodeError, "1 of 64 pixel values are NaN or infinite")
    assert_fails(corpus, "cxr/float_nan.dcm", DecodeError, "1 of 16 pixel values are NaN or infinite")
    assert_fails(corpus, "ct/rescale_overflow.dcm", DecodeError, "NaN or infinite")  # slope 1e308 overflows
    (ok,) = assert_reads(corpus, "oct/float_ok.tif", (8, 8))
    assert ok.pixels[0, 0] == 0 and ok.pixels[-1, -1] == 255 and (np.diff(ok.pixels.ravel().astype(int)) >= 0).all()
    (extreme,) = assert_reads(corpus, "cxr/double_extreme.dcm", (4, 4))
    flat = extreme.pixels.ravel().astype(int)
    assert flat[0] == 0 and flat[-1] == 255 and (np.diff(flat) >= 0).all()  # not the all-black of an overflow


def test_zero_sized_images_are_refused(corpus):
    assert_fails(corpus, "ct/rows_zero.dcm", DecodeError, "Rows")
    assert_fails(corpus, "derm/zero_width.png", InputError)
    assert_fails(corpus, "oct/zero_size.npz", DecodeError, "empty image")


def test_one_pixel_images_ingest(corpus):
    shapes = {
        "ct/one_pixel.dcm": (1, 1, 3),  # three CT windows
        "cxr/one_pixel.dcm": (1, 1),
        "oct/one_pixel.tif": (1, 1),
        "oct/one_pixel.npz": (1, 1),
        "derm/one_pixel.png": (1, 1, 3),
        "derm/one_pixel.jpg": (1, 1, 3),
    }
    for rel, shape in shapes.items():
        assert_reads(corpus, rel, shape)
    (ct,) = read(corpus, "ct/one_pixel.dcm")[0]
    assert tuple(ct.pixels[0, 0]) == (230, 102, 71)  # 0 HU in the lung (-600/1500), soft (40/400), bone windows
    assert tuple(read(corpus, "derm/one_pixel.png")[0][0].pixels[0, 0]) == (200, 10, 10)


def test_very_wide_images_ingest_within_bounded_memory(corpus):
    tracemalloc.start()
    try:
        for rel, width in (("derm/wide.png", 100_000), ("oct/wide.tif", 100_000), ("cxr/wide.dcm", 65_535)):
            (img,) = assert_reads(corpus, rel, (1, width))
            assert len(np.unique(img.pixels)) > 200  # the content survived, not a constant row
        peak_wide = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        # Headers that declare billions of pixels over a few bytes of data: refused before anything is allocated.
        assert_fails(corpus, "derm/declared_huge.png", InputError)
        assert_fails(corpus, "cxr/declared_huge.dcm", InputError, "above image.max_pixels")
        peak_huge = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_wide < 32 * 1024**2 and peak_huge < 8 * 1024**2, (peak_wide, peak_huge)
    small = IngestConfig(image={"max_pixels": 50_000})
    for rel in ("derm/wide.png", "cxr/wide.dcm"):
        _, err = read(corpus, rel, small)
        assert isinstance(err, InputError) and "max_pixels" in str(err), (rel, err)


def test_malformed_corpus_is_accounted_for(ray_session, corpus, tmp_path):
    cfg = CFG.model_copy(update={"dataset": "malformed", "deduplicate": False})  # fuzzed variants share pixels
    result = run_ingest([str(corpus.root)], str(tmp_path / "out"), cfg, key=KEY)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest == result.manifest
    assert manifest["discovered"] == len(corpus.expected) == manifest["ingested"] + manifest["quarantined"]
    pseud = Pseudonymizer(KEY)
    quarantined = {r["source"]: r for r in pq.read_table(tmp_path / "out" / QUARANTINE).to_pylist()}
    rows = pq.read_table(tmp_path / "out", columns=["source", "image"], partitioning=None).to_pylist()
    ingested = {r["source"] for r in rows}
    for rel, expected in corpus.expected.items():
        source = pseud.source(rel)
        if expected == OK:
            assert source in ingested and source not in quarantined, rel
        elif expected == ANY:
            assert (source in quarantined) != (source in ingested), rel
            if source in quarantined:
                assert quarantined[source]["error_class"] in ("InputError", "DecodeError"), quarantined[source]
        else:
            assert quarantined[source]["error_class"] == expected, (rel, quarantined.get(source))
            assert source not in ingested, rel
    assert manifest["quarantined"] == len(quarantined) >= 14
    for row in rows:
        assert decode_image(row["image"]).dtype == np.uint8


# ------------------------------------------------------------------------------------------------- windowing


def _number():
    """Header numbers as files hold them: ordinary, zero, negative, huge, tiny, and the non-finite."""
    return st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False),
        st.sampled_from([0.0, -1.0, 1e-300, 1e38, -1e38, 1e300, -1e300, 1e308, math.nan, math.inf, -math.inf]),
    )


def _ds_value(value: float) -> str:
    return f"{value:.6g}"  # DS holds at most 16 characters


@st.composite
def windowing_headers(draw) -> dict:
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    window = st.one_of(st.none(), _number(), st.lists(_number(), min_size=1, max_size=3))
    return {
        "Modality": draw(st.sampled_from(["CT", "CR", "DX"])),
        "PhotometricInterpretation": draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
        "Rows": rows,
        "Columns": cols,
        "BitsStored": draw(st.sampled_from([1, 8, 12, 15, 16, 17, 0])),
        "PixelRepresentation": draw(st.sampled_from([0, 1])),
        "RescaleSlope": draw(st.one_of(st.none(), _number())),
        "RescaleIntercept": draw(st.one_of(st.none(), _number())),
        "WindowCenter": draw(window),
        "WindowWidth": draw(window),
        "pixels": draw(st.lists(st.integers(0, 65535), min_size=rows * cols, max_size=rows * cols)),
    }


def _windowing_file(header: dict, path: Path) -> Path:
    ds = dataset(header["Modality"])
    ds.SamplesPerPixel, ds.BitsAllocated = 1, 16
    ds.HighBit = max(header["BitsStored"] - 1, 0)
    for keyword in ("PhotometricInterpretation", "Rows", "Columns", "BitsStored", "PixelRepresentation"):
        setattr(ds, keyword, header[keyword])
    ds.PixelData = np.asarray(header["pixels"], np.uint16).tobytes()
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        value = header[keyword]
        if value is not None:
            setattr(ds, keyword, [_ds_value(v) for v in value] if isinstance(value, list) else _ds_value(value))
    return save(ds, path)


def _header(modality: str, slope, intercept, center, width, photometric: str = "MONOCHROME2") -> dict:
    pixels = [0, 1, 100, 4095]
    return {
        "Modality": modality,
        "PhotometricInterpretation": photometric,
        "Rows": 2,
        "Columns": 2,
        "BitsStored": 12,
        "PixelRepresentation": 0,
        "RescaleSlope": slope,
        "RescaleIntercept": intercept,
        "WindowCenter": center,
        "WindowWidth": width,
        "pixels": pixels,
    }


@pytest.mark.faults
@settings(max_examples=50, deadline=None)
@given(header=windowing_headers())
@example(header=_header("CT", math.nan, 0.0, None, None))  # NaN rescale: refused, never a grey
@example(header=_header("CR", 1e308, 0.0, 40.0, 400.0))  # overflowing rescale
@example(header=_header("DX", 1.0, 0.0, [math.inf, 40.0], [10.0, 10.0], "MONOCHROME1"))  # unusable windows:
@example(header=_header("CR", 1.0, 0.0, 40.0, math.inf))  # the image's own range instead
@example(header=_header("CR", 1.0, 0.0, 40.0, 0.0))
@example(header=_header("CR", -1.0, 1e300, [-1e300], [1e300]))  # negative slope, huge window
def test_windowing_is_total_and_monotonic(header):
    """Any header values: uint8 of the right shape, monotonic in the modality values, or an InputError.

    pydicom itself is the oracle for what the stored values and their rescale are: where it cannot decode, we
    must fail cleanly; where the rescale is not finite, we must refuse (never NaN cast to some grey).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = _windowing_file(header, Path(tmp) / "w.dcm")
        results = list(dicom.read([str(path)], None, CFG))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path)
                values = apply_modality_lut(pixel_array(ds), ds)
        except Exception:  # noqa: BLE001 - pydicom cannot decode it either
            values = None
    assert len(results) == 1
    result = results[0][1]
    if values is None or not np.isfinite(values).all():
        event("undecodable" if values is None else "non-finite rescale")
        assert isinstance(result, InputError), (header, result)
        if values is not None:
            assert "NaN or infinite" in str(result)
        return
    event("read")
    assert isinstance(result, Image), (header, result)
    ct = header["Modality"] == "CT"
    pixels = result.pixels
    assert pixels.dtype == np.uint8 and pixels.shape == (header["Rows"], header["Columns"], *((3,) if ct else ()))
    order = np.argsort(values.ravel(), kind="stable")
    inverted = not ct and header["PhotometricInterpretation"] == "MONOCHROME1"
    for channel in pixels.reshape(values.size, -1).T:
        steps = np.diff(channel[order].astype(int))
        assert (steps <= 0).all() if inverted else (steps >= 0).all(), header
