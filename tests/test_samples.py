"""The sample corpus is what the pipeline, the demo and the benchmarks eat: it must be in the real formats, carry
its planted PHI where a hospital's files would, be reproducible, and hold a class structure a probe can learn."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
from oct_converter.readers import FDS
from PIL import Image as PILImage
from pydicom.pixels import apply_modality_lut, pixel_array
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ingest.samples import (
    MODALITY_DIRS,
    copy_pydicom_testdata,
    make_sample_corpus,
    write_ct_series,
    write_dicom_image,
    write_pyramidal_tiff,
)

PHI_TAGS = (
    "PatientName",
    "PatientBirthDate",
    "PatientAddress",
    "InstitutionName",
    "ReferringPhysicianName",
    "OtherPatientIDs",
    "AccessionNumber",
)
PHI = {"PatientName": "DOE^JANE^Q", "PatientBirthDate": "19610423", "InstitutionName": "TEST HOSPITAL"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_sample_corpus(tmp_path_factory.mktemp("corpus"), per_class=24, seed=0)


@pytest.fixture(scope="module")
def rows(corpus) -> list[dict[str, str]]:
    with corpus.labels_csv.open(newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _load(path: Path) -> np.ndarray:
    """Pixels as a viewer shows them, float (H, W, C) in [0, 1]: CT windowed from HU, MONOCHROME1 inverted, the
    first frame of a cine loop or OCT volume, a slide's smallest level."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        if ds.Modality == "CT":
            img = np.clip((apply_modality_lut(arr, ds) + 160.0) / 400.0, 0, 1)  # abdominal window
        elif ds.Modality in ("CR", "DX"):
            img = arr / (2**ds.BitsStored - 1)
            img = 1.0 - img if ds.PhotometricInterpretation == "MONOCHROME1" else img
        else:
            img = (arr[0] if ds.get("NumberOfFrames", 1) > 1 else arr) / 255.0
    elif path.suffix == ".tiff":
        with openslide.OpenSlide(path) as slide:
            top = slide.level_count - 1
            img = np.asarray(slide.read_region((0, 0), top, slide.level_dimensions[top]).convert("RGB")) / 255.0
    elif path.suffix == ".fds":  # a Topcon volume: its first B-scan
        img = FDS(path).read_oct_volume().volume[0] / 65535.0
    else:
        img = np.asarray(PILImage.open(path)) / 255.0
    return img[..., None] if img.ndim == 2 else img


def test_layout_labels_and_patients(corpus, rows):
    root = corpus.root
    listed = {r["path"] for r in rows}
    on_disk = {p.relative_to(root).as_posix() for p in _files(root)} - {"labels.csv"}
    assert listed == on_disk, "labels.csv must list every sample file and only those"
    assert set(corpus.n_files) == set(MODALITY_DIRS)
    for folder in MODALITY_DIRS:
        mine = [r for r in rows if r["path"].startswith(f"{folder}/")]
        assert len(mine) == corpus.n_files[folder]
        assert Counter(r["label"] for r in mine) == {"0": len(mine) // 2, "1": len(mine) // 2}, folder
    assert corpus.n_files["ct"] == 24 * 2 * 4  # 24 series per class, 4 slices each
    assert corpus.n_files["path"] == 48
    assert {r["split"] for r in rows} == {""}, "the pipeline assigns the patient-level split"
    assert all(re.fullmatch(r"MRN-\d{6}", r["patient_id"]) for r in rows)
    samples_of = defaultdict(set)  # a CT series is one sample
    for r in rows:
        samples_of[r["patient_id"]].add(r["path"].rsplit("/slice_", 1)[0])
    counts = [len(s) for s in samples_of.values()]
    assert min(counts) >= 2 and max(counts) <= 12, "several samples per patient make the split patient-level"
    modalities_of = {p: {s.split("/")[0] for s in ss} for p, ss in samples_of.items()}
    assert sum(len(m) > 1 for m in modalities_of.values()) > len(modalities_of) // 2


def test_dicom_files_reread_with_planted_phi(corpus, rows):
    mrn_of = {r["path"]: r["patient_id"] for r in rows}
    phi = set(corpus.phi_strings)
    seen: dict[str, set] = defaultdict(set)
    for path in _files(corpus.root):
        if path.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(path)
        rel = path.relative_to(corpus.root).as_posix()
        assert ds.PatientID == mrn_of[rel]
        for tag in PHI_TAGS:
            assert str(ds[tag].value) in phi, f"{tag} of {rel} is not listed in phi_strings"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        arr = ds.pixel_array
        seen["modality"].add((rel.split("/")[0], ds.Modality))
        if ds.Modality == "CT":
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024) and arr.dtype == np.int16
            hu = apply_modality_lut(arr, ds)
            assert hu.min() >= -1024 and np.median(hu[:4]) < -900 and hu.max() > 300  # air at the top; bone
            assert len(ds.ImagePositionPatient) == 3 and list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        elif ds.Modality in ("CR", "DX"):
            assert ds.BitsStored == 12 and arr.max() <= 4095 and "WindowCenter" in ds and "WindowWidth" in ds
            seen["cxr"].add((ds.Modality, ds.PhotometricInterpretation))
        elif ds.Modality == "OPT":  # an OCT volume: B-scans as frames
            assert ds.SOPClassUID == pydicom.uid.OphthalmicTomographyImageStorage and arr.shape[0] == 3
            assert str(ds.AcquisitionDateTime) in phi
        elif ds.Modality in ("OP", "XC"):
            assert ds.PhotometricInterpretation == "RGB" and arr.ndim == 3 and arr.shape[-1] == 3
            assert str(ds.AcquisitionDateTime) in phi
        else:
            assert ds.Modality == "US" and ds.PhotometricInterpretation == "RGB" and arr.shape[-1] == 3
            seen["frames"].add(int(ds.get("NumberOfFrames", 1)))
    assert seen["modality"] == {
        ("ct", "CT"), ("cxr", "CR"), ("cxr", "DX"), ("us", "US"), ("cfp", "OP"), ("oct", "OPT"), ("derm", "XC")
    }  # fmt: skip
    assert seen["cxr"] == {(m, p) for m in ("CR", "DX") for p in ("MONOCHROME1", "MONOCHROME2")}
    assert seen["frames"] == {1, 3}


def test_ct_series_must_be_ordered_by_position(corpus, tmp_path):
    rng = np.random.default_rng(1)
    paths = write_ct_series(tmp_path / "s", 6, 64, patient_id="MRN-000001", phi=PHI, rng=rng, lesion=True)
    assert [p.name for p in paths] == [f"slice_{k:03d}.dcm" for k in range(6)]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    assert z != sorted(z), "name order must not give slice order"
    assert np.allclose(np.diff(sorted(z)), headers[0].SliceThickness)
    assert [h.InstanceNumber for h in sorted(headers, key=lambda h: h.ImagePositionPatient[2])] == list(range(1, 7))
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == 6
    assert all(h.PatientName == "DOE^JANE^Q" for h in headers)
    # In the corpus too, most series are shuffled.
    shuffled = 0
    for series in (corpus.root / "ct").iterdir():
        zs = [
            float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in sorted(series.iterdir())
        ]
        shuffled += zs != sorted(zs)
    assert shuffled >= 24


def test_write_dicom_image_photometric_and_cine(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 4096, (40, 48))
    ident = {"patient_id": "MRN-000002", "phi": PHI, "rng": rng}
    m1 = pydicom.dcmread(
        write_dicom_image(tmp_path / "a.dcm", pixels, modality="CR", photometric="MONOCHROME1", **ident)
    )
    m2 = pydicom.dcmread(write_dicom_image(tmp_path / "b.dcm", pixels, modality="DX", **ident))
    assert m1.PhotometricInterpretation == "MONOCHROME1" and m2.PhotometricInterpretation == "MONOCHROME2"
    assert np.array_equal(4095 - m1.pixel_array, pixels) and np.array_equal(m2.pixel_array, pixels)
    assert (
        m2.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation and m1.SOPInstanceUID != m2.SOPInstanceUID
    )
    cine = rng.integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    us = pydicom.dcmread(write_dicom_image(tmp_path / "c.dcm", cine, modality="US", **ident))
    assert us.NumberOfFrames == 3 and us.SOPClassUID == pydicom.uid.UltrasoundMultiFrameImageStorage
    assert np.array_equal(us.pixel_array, cine)
    with pytest.raises(ValueError):
        write_dicom_image(tmp_path / "d.dcm", pixels, modality="MR", **ident)
    with pytest.raises(ValueError):
        write_dicom_image(tmp_path / "e.dcm", cine.astype(np.uint16), modality="US", **ident)


def test_slides_open_with_openslide(corpus):
    slides = sorted((corpus.root / "path").glob("*.tiff"))
    assert len(slides) == corpus.n_files["path"]
    for path in slides:
        assert openslide.OpenSlide.detect_format(path) == "generic-tiff"
        with openslide.OpenSlide(path) as slide:
            assert slide.level_count == 3 and slide.level_downsamples == (1.0, 2.0, 4.0)
            assert slide.dimensions == (1024, 1024)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)


def test_write_pyramidal_tiff_is_lossless_and_tiled(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (520, 600, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "x.tiff", image, levels=2, mpp=0.25)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((600, 520), (300, 260))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert slide.properties["openslide.level[0].tile-width"] == "256"
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (600, 520)).convert("RGB")), image)
    with pytest.raises(ValueError):
        write_pyramidal_tiff(tmp_path / "y.tiff", image.astype(np.float32))


def test_same_seed_same_bytes(tmp_path):
    small = {"per_class": 2, "size": 48, "slide_size": 256}
    a = make_sample_corpus(tmp_path / "a", seed=5, **small)
    b = make_sample_corpus(tmp_path / "b", seed=5, **small)
    c = make_sample_corpus(tmp_path / "c", seed=6, **small)
    files_a = [p.relative_to(a.root) for p in _files(a.root)]
    assert files_a == [p.relative_to(b.root) for p in _files(b.root)]
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files_a)
    assert a.phi_strings == b.phi_strings and a.n_files == b.n_files
    assert a.phi_strings != c.phi_strings
    same_names = [f for f in files_a if (c.root / f).is_file()]
    assert same_names and all((a.root / f).read_bytes() != (c.root / f).read_bytes() for f in same_names)


def test_phi_strings_cover_headers_and_file_names(corpus, rows):
    phi = set(corpus.phi_strings)
    planted: set[str] = {r["patient_id"] for r in rows}
    for f in corpus.root.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        planted |= {str(ds[t].value) for t in PHI_TAGS if t in ds} | {ds.PatientID}
        planted |= {str(ds.AcquisitionDateTime)} if "AcquisitionDateTime" in ds else set()
    for f in corpus.root.rglob("*.fds"):
        volume = FDS(f).read_oct_volume()
        planted |= {volume.patient_id, volume.first_name, volume.surname, f"{volume.DOB:%Y%m%d}"}
        planted.add(f"{volume.acquisition_date:%Y%m%d%H%M%S}")
    assert planted <= phi
    named = [r["path"] for r in rows if any(s in r["path"] for s in planted if s.startswith("MRN-"))]
    assert {p.split("/")[0] for p in named} == set(MODALITY_DIRS), "every modality has file names carrying PHI"
    assert all(any(part in phi for part in p.split("/")) for p in named), "PHI file names are listed"
    # Nothing listed is invented: each string occurs in a header, a path, or labels.csv.
    parts = {s for p in planted for s in p.split("^")}
    paths = "\n".join(r["path"] for r in rows)
    assert all(s in planted or s in parts or s in paths for s in phi)


def _features(img: np.ndarray) -> np.ndarray:
    """A deliberately trivial feature: an 8x8 thumbnail plus a 16-bin histogram per channel."""
    thumb = np.asarray(PILImage.fromarray((img * 255).astype(np.uint8).squeeze()).resize((8, 8), PILImage.BOX))
    hist = [np.histogram(img[..., c], bins=16, range=(0, 1))[0] / img[..., c].size for c in range(img.shape[-1])]
    return np.concatenate([thumb.ravel() / 255.0, *hist])


@pytest.mark.parametrize("folder", MODALITY_DIRS)
def test_class_structure_is_learnable(corpus, rows, folder):
    """A linear model on a trivial feature beats chance on held-out samples, so the classes are really visual."""
    one_per_sample = {}
    for r in rows:
        if r["path"].startswith(f"{folder}/"):
            one_per_sample.setdefault(r["path"].rsplit("/slice_", 1)[0], r)  # one slice per CT series
    X = np.stack([_features(_load(corpus.root / r["path"])) for r in one_per_sample.values()])
    y = np.asarray([int(r["label"]) for r in one_per_sample.values()])
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.5, stratify=y, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(X_tr, y_tr)
    # 24 held-out samples: a coin reaches 0.75 with probability ~1%; the drawn classes reach ~1.0.
    assert model.score(X_te, y_te) >= 0.75


def test_copy_pydicom_testdata(tmp_path):
    copied = copy_pydicom_testdata(tmp_path)
    assert {p.parent.name for p in copied} >= {"CT", "CR", "US"}
    transfer_syntaxes = set()
    for path in copied:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Modality == path.parent.name and path.suffix == ".dcm"
        assert pixel_array(path, index=0).size > 0
        transfer_syntaxes.add(ds.file_meta.TransferSyntaxUID)
    assert any(ts.is_compressed for ts in transfer_syntaxes), "real vendors' compressed files are part of it"
    assert len(copied) == len(set(copied))
    only_us = copy_pydicom_testdata(tmp_path / "us", modalities=("US",))
    assert {p.name for p in only_us} == {p.name for p in copied if p.parent.name == "US"}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_sample_corpus(tmp_path, per_class=0)
