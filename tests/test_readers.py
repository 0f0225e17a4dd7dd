"""The four source readers on files the tests write, plus every DICOM file pydicom ships for its own tests."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from helpers import e2e_directory_loop
from PIL import Image as PILImage
from pydicom.data import data_manager, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.misc import is_dicom
from pydicom.pixels import pixel_array
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ingest import dicom, image, npz, vendor_oct, wsi
from ingest.config import IngestConfig
from ingest.samples import write_topcon_fds, write_zeiss_img
from ingest.schema import DecodeError, Image, InputError

PHI = ("Doe^Jane", "19700101", "St Elsewhere")


def run(reader, paths, modality, cfg) -> tuple[dict[int, list[Image]], dict[int, Exception]]:
    """Images and errors by index into ``paths``; a file may fail at most once."""
    images: dict[int, list[Image]] = collections.defaultdict(list)
    errors: dict[int, Exception] = {}
    for i, result in reader(paths, modality, cfg):
        if isinstance(result, Exception):
            assert i not in errors, "a failed file must be reported once"
            errors[i] = result
        else:
            assert isinstance(result, Image)
            images[i].append(result)
    return dict(images), errors


def assert_no_path(err: Exception, *paths: str | Path) -> None:
    for p in paths:
        assert str(p) not in str(err) and Path(p).name not in str(err)


# ------------------------------------------------------------------------------------------------- DICOM


def write_dicom(path: Path, frames: np.ndarray, modality: str = "CT", photometric: str = "MONOCHROME2", **attrs):
    """A minimal but valid DICOM image; ``frames`` is (H, W) or (N, H, W)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientBirthDate, ds.InstitutionName = PHI
    ds.PatientID = "PID-0042"
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", "1.2.3.4")
    ds.SeriesInstanceUID = attrs.pop("SeriesInstanceUID", generate_uid())
    bits = 8 if frames.dtype == np.uint8 else 16
    ds.set_pixel_data(frames, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def pydicom_corpus() -> list[str]:
    """pydicom's test files as installed (pydicom and pydicom-data), without reaching for its download mirror."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_manager, "online_test_file_dummy_paths", dict)
        return sorted(p for p in get_testdata_files("*") if Path(p).is_file())


def expected_modality(ds: Dataset) -> str:
    by_class = {
        "1.2.840.10008.5.1.4.1.1.77.1.5.1": "CFP",
        "1.2.840.10008.5.1.4.1.1.77.1.5.2": "CFP",
        "1.2.840.10008.5.1.4.1.1.77.1.5.4": "OCT",
        "1.2.840.10008.5.1.4.1.1.77.1.7": "DERM",
        "1.2.840.10008.5.1.4.1.1.77.1.4": "DERM",
    }.get(str(ds.get("SOPClassUID") or ""))
    code = str(ds.get("Modality") or "OT")
    return by_class or {"CT": "CT", "CR": "CXR", "DX": "CXR", "US": "US", "OP": "CFP", "OPT": "OCT", "XC": "DERM"}.get(
        code, code
    )


def test_dicom_reads_every_pydicom_test_file(pydicom_corpus):
    cfg = IngestConfig(dicom={"max_frames": 3, "frame_stride": 1})
    decoded: collections.Counter[str] = collections.Counter()
    images_by_modality: collections.Counter[str] = collections.Counter()
    no_pixels, not_dicom, undecodable = [], [], []
    for path in pydicom_corpus:
        images, errors = run(dicom.read, [path], None, cfg)
        name = Path(path).name
        if not is_dicom(path) and 0 in errors:  # no DICM preamble and refused (old files without it may pass)
            assert isinstance(errors[0], InputError), name
            not_dicom.append(name)
            continue
        ds = pydicom.dcmread(path, force=True)
        has_pixels = any(k in ds for k in dicom.PIXEL_KEYWORDS)
        if 0 in errors:
            err = errors[0]
            assert 0 not in images, name
            assert_no_path(err, path)
            if has_pixels:
                # A genuine decoder failure: pydicom cannot decode it either, and the reason names the syntax.
                assert isinstance(err, DecodeError), (name, err)
                with pytest.raises(Exception):  # noqa: B017 - any pydicom failure
                    pixel_array(ds, index=0)
                syntax = ds.file_meta.get("TransferSyntaxUID")
                assert f"transfer syntax {syntax or ''}" in str(err), (name, err)
                undecodable.append(f"{name} ({syntax}): {err}")
            else:
                assert isinstance(err, InputError) and "no pixel data" in str(err), (name, err)
                no_pixels.append(name)
            continue
        frames = pydicom.pixels.utils.get_nr_frames(ds, warn=False)
        assert len(images[0]) == min(frames, 3), name
        for img in images[0]:
            assert img.pixels.dtype == np.uint8 and img.pixels.ndim in (2, 3)
            assert img.pixels.shape[:2] == (ds.Rows, ds.Columns)
            assert img.modality == expected_modality(ds), name
            assert img.pixels.max() > img.pixels.min() or ds.get("Modality") == "RTDOSE", f"{name} is blank"
        assert [img.frame for img in images[0]] == list(range(len(images[0])))
        decoded[images[0][0].modality] += 1
        images_by_modality[images[0][0].modality] += len(images[0])
    print(f"\npydicom corpus: {len(pydicom_corpus)} paths")
    print(f"decoded files by modality: {dict(decoded)} (images: {dict(images_by_modality)})")
    print(f"no pixel data: {len(no_pixels)}; not DICOM: {len(not_dicom)}; undecodable: {len(undecodable)}")
    for line in undecodable:
        print("  undecodable:", line)
    assert decoded["CT"] >= 5 and decoded["US"] >= 15 and decoded["CXR"] >= 5 and decoded["MR"] >= 10
    assert sum(decoded.values()) >= 100 and len(no_pixels) >= 8 and len(not_dicom) >= 5
    assert len(undecodable) <= 8


CT_SLOPE, CT_INTERCEPT = 1, -1024


def write_ct_series(tmp_path: Path, n: int, *, positions: bool = True, numbers: bool = True) -> list[Path]:
    """``n`` CT slices whose HU (-1000 + 25 k) grows along z; InstanceNumber runs the other way."""
    series = generate_uid()
    paths = []
    for k in range(n):
        stored = np.full((8, 8), -1000 + 25 * k - CT_INTERCEPT, dtype=np.uint16)
        attrs = {"SeriesInstanceUID": series, "RescaleSlope": CT_SLOPE, "RescaleIntercept": CT_INTERCEPT}
        if positions:  # axial slices, z = 2.5 k, orientation along x and y
            attrs |= {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ImagePositionPatient": [-10, 5, 2.5 * k]}
        if numbers:
            attrs["InstanceNumber"] = n - k
        paths.append(write_dicom(tmp_path / f"slice_{k:02d}.dcm", stored, **attrs))
    return paths


def lung_channel(hu: float) -> int:
    center, width = -600, 1500
    return int(np.clip(math.floor((hu - (center - width / 2)) / width * 255 + 0.5), 0, 255))


@pytest.mark.parametrize("positions,numbers", [(True, True), (False, True), (False, False)])
def test_dicom_ct_series_is_ordered(tmp_path, positions, numbers):
    n = 6
    paths = write_ct_series(tmp_path, n, positions=positions, numbers=numbers)
    shuffled = [paths[i] for i in (3, 0, 5, 1, 4, 2)]
    images, errors = run(dicom.read, [str(p) for p in shuffled], None, IngestConfig())
    assert not errors
    by_slice = {int(shuffled[i].stem.split("_")[1]): imgs for i, imgs in images.items()}
    assert sorted(by_slice) == list(range(n)) and all(len(v) == 1 for v in by_slice.values())
    for k, (img,) in by_slice.items():
        if positions:  # by position along z
            expected_frame = k
        elif numbers:  # by InstanceNumber, which runs against z
            expected_frame = n - 1 - k
        else:  # as listed
            expected_frame = shuffled.index(paths[k])
        assert img.frame == expected_frame
        assert img.modality == "CT" and img.pixels.shape == (8, 8, 3)
        hu = -1000 + 25 * k
        assert img.pixels[0, 0, 0] == lung_channel(hu)  # rescaled to HU, then the lung window
        assert img.pixels[0, 0, 1] == 0  # -1000..-875 HU is below the mediastinal window
        assert img.patient_key == "PID-0042" and img.study_key == "1.2.3.4"
        for field in dataclasses.fields(img):
            value = getattr(img, field.name)
            if field.name != "pixels":
                assert not any(p.split("^")[0] in str(value) for p in PHI), field.name


def test_dicom_multiframe_stride_and_cap(tmp_path):
    frames = np.stack([np.full((4, 5), 10 * k, dtype=np.uint16) for k in range(7)])
    path = write_dicom(tmp_path / "mf.dcm", frames, modality="MR", WindowCenter=50, WindowWidth=100)
    cfg = IngestConfig(dicom={"frame_stride": 2, "max_frames": 3})
    images, errors = run(dicom.read, [str(path)], None, cfg)
    assert not errors
    assert [img.frame for img in images[0]] == [0, 2, 4]
    assert [int(img.pixels[0, 0]) for img in images[0]] == [0, round(20 * 2.55), round(40 * 2.55)]
    assert all(img.modality == "MR" and img.pixels.shape == (4, 5) for img in images[0])
    images, _ = run(dicom.read, [str(path)], "CXR", IngestConfig())
    assert [img.frame for img in images[0]] == list(range(7)) and images[0][0].modality == "CXR"


def test_dicom_ophthalmic_and_skin_objects_map_to_our_modalities(tmp_path):
    """OP -> CFP (fundus-cropped like a photo file), OPT -> OCT (a row per B-scan, frame_stride honoured), XC and
    the dermoscopic / VL photographic SOP classes -> DERM; a SOP class wins over a vaguer Modality code."""
    rgb = np.zeros((24, 30, 3), dtype=np.uint8)
    rgb[4:20, 6:24] = 180  # the camera's bright field of view inside a black surround
    bscans = np.stack([np.full((16, 20), 20 * k, dtype=np.uint8) for k in range(5)])
    cases = {
        "op.dcm": (rgb, "OP", None, "CFP"),
        "op_class.dcm": (rgb, "OT", "1.2.840.10008.5.1.4.1.1.77.1.5.1", "CFP"),
        "opt.dcm": (bscans, "OPT", "1.2.840.10008.5.1.4.1.1.77.1.5.4", "OCT"),
        "xc.dcm": (rgb, "XC", None, "DERM"),
        "dermoscope.dcm": (rgb, "XC", "1.2.840.10008.5.1.4.1.1.77.1.7", "DERM"),
        "photo.dcm": (rgb, "OT", "1.2.840.10008.5.1.4.1.1.77.1.4", "DERM"),
    }
    paths = []
    for name, (pixels, code, sop_class, _) in cases.items():
        attrs = {"SOPClassUID": sop_class} if sop_class else {}
        photometric = "RGB" if pixels.ndim == 3 and pixels.shape[-1] == 3 else "MONOCHROME2"
        paths.append(str(write_dicom(tmp_path / name, pixels, modality=code, photometric=photometric, **attrs)))
    images, errors = run(dicom.read, paths, None, IngestConfig(dicom={"frame_stride": 2}))
    assert not errors
    for i, (name, (_, _, _, modality)) in enumerate(cases.items()):
        assert {img.modality for img in images[i]} == {modality}, name
        for img in images[i]:
            assert not any(
                p.split("^")[0] in str(getattr(img, f.name))
                for p in PHI
                for f in dataclasses.fields(img)
                if f.name != "pixels"
            )
    assert images[0][0].pixels.shape == (16, 18, 3)  # cropped to the field of view, as fundus image files are
    assert images[4][0].pixels.shape == (24, 30, 3)  # other photos whole
    assert [img.frame for img in images[2]] == [0, 2, 4] and images[2][0].pixels.shape == (16, 20)


def test_dicom_monochrome1_is_inverted(tmp_path):
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    mono1 = write_dicom(tmp_path / "m1.dcm", ramp, modality="CR", photometric="MONOCHROME1")
    mono2 = write_dicom(tmp_path / "m2.dcm", ramp, modality="CR")
    images, errors = run(dicom.read, [str(mono1), str(mono2)], None, IngestConfig())
    assert not errors
    (inv,), (plain,) = images[0], images[1]
    assert inv.modality == plain.modality == "CXR"
    assert plain.pixels[0, 0] == 0 and plain.pixels[-1, -1] == 255
    np.testing.assert_array_equal(inv.pixels.astype(int), 255 - plain.pixels.astype(int))


def test_dicom_bad_files_fail_cleanly_and_alone(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8), modality="DX")
    data = good.read_bytes()
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.dcm"
    text.write_text("Patient Doe^Jane, not an image\n" * 20)
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(data[:-40])
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # just before (7FE0,0010) Pixel Data
    bomb = write_dicom(tmp_path / "bomb.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(bomb)
    ds.Rows = ds.Columns = 60000  # declares 3.6e9 pixels, holds 16
    ds.save_as(bomb)
    paths = [empty, good, text, cut_pixels, cut_header, bomb]
    images, errors = run(dicom.read, [str(p) for p in paths], None, IngestConfig())
    assert list(images) == [1] and images[1][0].modality == "CXR"
    assert sorted(errors) == [0, 2, 3, 4, 5]
    assert isinstance(errors[0], InputError) and "not a DICOM file" in str(errors[0])
    assert isinstance(errors[2], InputError) and "not a DICOM file" in str(errors[2])
    assert isinstance(errors[3], DecodeError) and ExplicitVRLittleEndian in str(errors[3])
    assert isinstance(errors[4], DecodeError) and "truncated" in str(errors[4])
    assert type(errors[5]) is InputError and "max_pixels" in str(errors[5])
    for i, err in errors.items():
        assert_no_path(err, paths[i])
        assert not any(p in str(err) for p in PHI)


# ------------------------------------------------------------------------------------------------- images


def png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width`` x ``height`` but whose data is a few bytes: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def read_image(path: Path, modality: str = "DERM", **image_cfg) -> list[Image]:
    return list(image.read_one(str(path), modality, IngestConfig(image=image_cfg)))


def test_image_8bit_formats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    for name, pixels in [("g.png", grey), ("c.png", rgb), ("c.bmp", rgb), ("g.tif", grey)]:
        PILImage.fromarray(pixels).save(tmp_path / name)
        (img,) = read_image(tmp_path / name)
        np.testing.assert_array_equal(img.pixels, pixels)
        assert img.frame is None and img.modality == "DERM"
    smooth = np.stack(np.broadcast_arrays(*np.mgrid[0:200:10, 0:240:8], 100), axis=-1).astype(np.uint8)
    PILImage.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    (img,) = read_image(tmp_path / "c.jpg")
    assert img.pixels.shape == (20, 30, 3) and np.abs(img.pixels.astype(int) - smooth).mean() < 3


def test_image_16bit_is_windowed_at_percentiles(tmp_path):
    values = np.linspace(0, 60000, 100 * 40).astype(np.uint16).reshape(100, 40)
    values[0, 0] = 65535  # an outlier that the 99.5th percentile ignores
    PILImage.fromarray(values).save(tmp_path / "d.png")
    tifffile.imwrite(tmp_path / "d.tif", values)
    lo, hi = np.percentile(values, [0.5, 99.5])
    expected = np.clip(np.round((values.astype(float) - lo) / (hi - lo) * 255), 0, 255)
    for name in ("d.png", "d.tif"):
        (img,) = read_image(tmp_path / name)
        assert img.pixels.dtype == np.uint8 and img.pixels.shape == (100, 40)
        assert np.abs(img.pixels.astype(int) - expected).max() <= 1
        assert img.pixels[0, 0] == 255 and img.pixels[0, 1] == 0


def test_image_alpha_and_palette_become_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red, bottom transparent
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (img,) = read_image(tmp_path / "a.png")
    assert img.pixels.shape == (4, 4, 3)
    assert (img.pixels[:2] == (200, 0, 0)).all() and (img.pixels[2:] == 255).all()
    palette = PILImage.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png")
    (img,) = read_image(tmp_path / "p.png")
    assert img.pixels.shape == (2, 3, 3) and tuple(img.pixels[1, 1]) == (10, 200, 30)
    assert tuple(img.pixels[0, 0]) == (0, 0, 0)


def test_image_multipage_tiff_gives_frames(tmp_path):
    pages = np.stack([np.full((5, 6), 40 * k, np.uint8) for k in range(3)])
    with tifffile.TiffWriter(tmp_path / "oct.tif") as tw:
        for page in pages:
            tw.write(page)
    images = read_image(tmp_path / "oct.tif", "OCT")
    assert [img.frame for img in images] == [0, 1, 2]
    assert [int(img.pixels[0, 0]) for img in images] == [0, 40, 80]


def test_image_bad_files_fail_cleanly(tmp_path):
    rng = np.random.default_rng(1)
    PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    for name in ("ok.png", "ok.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    png_with_declared_size(tmp_path / "bomb.png", 100_000, 100_000)
    png_with_declared_size(tmp_path / "big.png", 12_000, 12_000)  # under PIL's own limit, over ours
    names = ["cut_ok.png", "cut_ok.jpg", "empty.png", "bomb.png", "big.png", "ok.png"]
    cfg = IngestConfig(image={"max_pixels": 100_000_000})
    images, errors = run(image.read, [str(tmp_path / n) for n in names], "DERM", cfg)
    assert list(images) == [5]
    assert isinstance(errors[0], DecodeError) and isinstance(errors[1], DecodeError)
    assert type(errors[2]) is InputError and "not a PNG" in str(errors[2])
    assert type(errors[3]) is InputError and "decompression-bomb" in str(errors[3])
    assert type(errors[4]) is InputError and "max_pixels" in str(errors[4])
    for i, err in errors.items():
        assert_no_path(err, tmp_path / names[i])


def test_image_fundus_is_cropped_to_field_of_view(tmp_path):
    h, w, r = 200, 300, 80
    yy, xx = np.mgrid[:h, :w]
    photo = np.zeros((h, w, 3), np.uint8)
    photo[(yy - 100) ** 2 + (xx - 140) ** 2 <= r**2] = (180, 90, 40)
    photo[5, 5] = 255  # a stray bright pixel in the surround does not widen the box
    PILImage.fromarray(photo).save(tmp_path / "f.png")
    (img,) = read_image(tmp_path / "f.png", "CFP")
    # the disc's extreme rows and columns hold too few bright pixels to count: a box a little inside the circle
    assert 2 * r - 4 <= img.pixels.shape[0] == img.pixels.shape[1] <= 2 * r + 1
    assert tuple(img.pixels[img.pixels.shape[0] // 2, img.pixels.shape[1] // 2]) == (180, 90, 40)
    assert (img.pixels[0] == 0).any() and (img.pixels[img.pixels.shape[0] // 2] != 0).all()
    assert read_image(tmp_path / "f.png", "CFP", fundus_crop=False)[0].pixels.shape == (h, w, 3)
    assert read_image(tmp_path / "f.png", "DERM")[0].pixels.shape == (h, w, 3)


# ------------------------------------------------------------------------------------------------- MedMNIST npz


def test_npz_yields_every_sample_with_split_and_label(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    arrays = {
        "train_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 9, (5, 1)),
        "val_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "val_labels": rng.integers(0, 9, (2, 1)),
        "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 9, (3, 1)),
    }
    np.savez_compressed(tmp_path / "m.npz", **arrays)
    monkeypatch.setattr(npz, "CHUNK_BYTES", 2000)  # a chunk of two samples: reads cross chunk boundaries
    images = list(npz.read_one(str(tmp_path / "m.npz"), "CXR", IngestConfig()))
    assert [(img.split, img.frame) for img in images] == [("train", i) for i in range(5)] + [
        ("val", 0),
        ("val", 1),
    ] + [("test", i) for i in range(3)]
    for img in images:
        np.testing.assert_array_equal(img.pixels, arrays[f"{img.split}_images"][img.frame])
        assert img.label == str(arrays[f"{img.split}_labels"][img.frame, 0]) and img.modality == "CXR"


def test_npz_rgb_and_multilabel(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    labels = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=np.uint8)
    np.savez(tmp_path / "m.npz", test_images=pixels, test_labels=labels)
    images = list(npz.read_one(str(tmp_path / "m.npz"), "CXR", IngestConfig()))
    assert [json.loads(img.label) for img in images] == labels.tolist()
    assert all(img.pixels.shape == (8, 8, 3) and img.split == "test" for img in images)


def test_npz_bad_archives_fail_cleanly(tmp_path):
    ok = np.zeros((2, 4, 4), np.uint8)
    cases = {
        "missing_labels.npz": {"train_images": ok},
        "mismatch.npz": {"train_images": ok, "train_labels": np.zeros((3, 1), np.int64)},
        "volumes.npz": {"train_images": np.zeros((2, 4, 4, 4), np.uint8), "train_labels": np.zeros((2, 1))},
        "floats.npz": {"train_images": ok.astype(np.float32), "train_labels": np.zeros((2, 1), np.int64)},
        "objects.npz": {"train_images": np.array([{"a": 1}, None], dtype=object), "train_labels": np.zeros(2)},
        "no_splits.npz": {"x": ok},
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "text.npz").write_text("not an archive")
    names = [*cases, "text.npz"]
    images, errors = run(npz.read, [str(tmp_path / n) for n in names], "CXR", IngestConfig())
    assert not images and sorted(errors) == list(range(len(names)))
    for i, err in errors.items():
        assert type(err) is InputError, (names[i], err)
        assert_no_path(err, tmp_path / names[i])


# ------------------------------------------------------------------------------------------------- whole slides

SLIDE = 2048
TISSUE = (180, 60, 150)  # an H&E-like purple


def write_slide(path: Path, mpp: float | None = 0.25, tissue: bool = True) -> Path:
    """A pyramidal tiled TIFF OpenSlide reads as generic-tiff: levels 1, 2, 4; tissue in whole 448-px tiles.

    Tissue covers the level-0 rectangle x 448..1344, y 448..1792 (2 x 3 tiles of 448 px) and a quarter of the
    tile at the origin (not enough to keep it).
    """
    slide = np.full((SLIDE, SLIDE, 3), 255, np.uint8)
    if tissue:
        slide[448:1792, 448:1344] = TISSUE
        slide[:224, :224] = TISSUE
    with tifffile.TiffWriter(path) as tw:
        for level in range(3):
            extra = {} if mpp is None else {"resolution": (1e4 / (mpp * 2**level),) * 2, "resolutionunit": "CENTIMETER"}
            pixels = slide[:: 2**level, :: 2**level]
            tw.write(
                pixels, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=int(level > 0), **extra
            )
    return path


def wsi_cfg(**kw) -> IngestConfig:
    return IngestConfig(wsi={"tile_size": 224, "target_mpp": 0.5, "thumbnail_size": 512, **kw})


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(900, 10), np.full(100, 200)]).astype(np.uint8)
    assert 10 <= wsi.otsu_threshold(values) < 200


def test_tissue_mask_keeps_dense_tissue():
    """A slide that is mostly tissue: Otsu alone would split pale eosin from dense nuclei and drop the eosin."""
    rgb = np.full((100, 100, 3), (240, 150, 200), np.uint8)  # pink eosin, HSV saturation ~95
    rgb[::2] = (90, 40, 140)  # purple nuclei on every other row, saturation ~180
    rgb[:, :10] = 245  # a strip of glass
    mask = wsi.tissue_mask(PILImage.fromarray(rgb))
    assert mask[:, 10:].all() and not mask[:, :10].any()


def test_wsi_tiles_tissue_at_target_resolution(tmp_path):
    path = write_slide(tmp_path / "s.tif")
    assert wsi.is_slide(str(path))
    images = list(wsi.read_one(str(path), "PATH", wsi_cfg()))
    corners = [(img.tile_x, img.tile_y) for img in images]
    assert corners == [(x, y) for y in (448, 896, 1344) for x in (448, 896)]  # row-major, tissue only
    for img in images:
        assert img.pixels.shape == (224, 224, 3) and img.pixels.dtype == np.uint8
        assert (np.abs(img.pixels.astype(int) - TISSUE) <= 2).all()
        assert img.tile_level == 1 and img.mpp == 0.5 and img.encoding == "jpeg" and img.modality == "PATH"
    # 0.25 um/px target: read at level 0 with 224-px tiles; a finer target than the scan still uses level 0
    fine = list(wsi.read_one(str(path), "PATH", wsi_cfg(target_mpp=0.2)))
    assert {img.tile_level for img in fine} == {0} and fine[0].pixels.shape == (224, 224, 3)
    coarse = list(wsi.read_one(str(path), "PATH", wsi_cfg(target_mpp=1.0, min_tissue=0.2)))
    assert {img.tile_level for img in coarse} == {2}
    assert (0, 0) in {(img.tile_x, img.tile_y) for img in coarse}  # the quarter-tissue corner passes at 0.2


def test_dicom_whole_slide_image_tiles_like_the_same_slide_as_tiff(tmp_path):
    """A DICOM WSI (SM: a TILED_FULL instance per level and a label image, as a scanner exports it) goes through
    OpenSlide and gives the tiles the TIFF of the same pixels gives; the lower level is read through the base, the
    label (the patient's name as text) is left out with a reason; the patient and study come from the header."""
    from ingest.samples import write_dicom_slide

    tiff = write_slide(tmp_path / "s.tif")
    pixels = tifffile.imread(tiff, level=0)
    phi = {"PatientName": PHI[0], "PatientBirthDate": PHI[1], "InstitutionName": PHI[2]}
    rng = np.random.default_rng(0)
    paths = [
        str(p) for p in write_dicom_slide(tmp_path / "dcm", pixels, patient_id="PID-7", phi=phi, rng=rng, mpp=0.25)
    ]
    assert [Path(p).name for p in paths] == ["level_0.dcm", "level_1.dcm", "label.dcm"]
    images, errors = run(dicom.read, paths, None, wsi_cfg())
    expected = list(wsi.read_one(str(tiff), "PATH", wsi_cfg()))
    assert set(images) == {0} and set(errors) == {1, 2}
    assert [(i.tile_x, i.tile_y) for i in images[0]] == [(e.tile_x, e.tile_y) for e in expected]
    for got, want in zip(images[0], expected, strict=True):
        assert got.modality == "PATH" and got.mpp == 0.5 and got.pixels.shape == (224, 224, 3)
        assert np.abs(got.pixels.astype(int) - want.pixels.astype(int)).max() <= 2  # levels resampled alike
        assert got.patient_key == "PID-7" and got.study_key and got.study_key != "1.2.3.4"
    assert "lower pyramid level" in str(errors[1]) and "LABEL" in str(errors[2]) and "burned-in" in str(errors[2])
    assert not any(p.split("^")[0] in str(e) for e in errors.values() for p in PHI)


def test_wsi_cap_is_deterministic(tmp_path):
    path = str(write_slide(tmp_path / "s.tif"))
    full = [(img.tile_x, img.tile_y) for img in wsi.read_one(path, "PATH", wsi_cfg())]

    def capped(seed: int) -> list[tuple[int, int]]:
        return [(i.tile_x, i.tile_y) for i in wsi.read_one(path, "PATH", wsi_cfg(max_tiles_per_slide=3, seed=seed))]

    first = capped(0)
    assert len(first) == 3 and set(first) <= set(full) and first == sorted(first, key=lambda c: (c[1], c[0]))
    assert capped(0) == first
    assert len({tuple(capped(seed)) for seed in range(6)}) > 1


def test_wsi_without_resolution_uses_assumed_mpp(tmp_path):
    path = str(write_slide(tmp_path / "s.tif", mpp=None))
    images = list(wsi.read_one(path, "PATH", wsi_cfg(assumed_mpp=0.5)))
    assert {img.tile_level for img in images} == {0}
    side = 224  # at 0.5 um/px assumed and 0.5 target, tiles are 224 level-0 pixels
    assert len(images) == sum(
        1
        for y in range(0, SLIDE - side + 1, side)
        for x in range(0, SLIDE - side + 1, side)
        if 448 <= x < 1344 and 448 <= y < 1792 or (x, y) == (0, 0)
    )


def test_wsi_refuses_non_slides_and_blank_slides(tmp_path):
    PILImage.new("RGB", (64, 64)).save(tmp_path / "photo.tif")  # a strip TIFF: not a slide
    blank = write_slide(tmp_path / "blank.tif", tissue=False)
    (tmp_path / "empty.svs").write_bytes(b"")
    names = ["photo.tif", "blank.tif", "empty.svs"]
    assert not wsi.is_slide(str(tmp_path / "photo.tif")) and wsi.is_slide(str(blank))
    images, errors = run(wsi.read, [str(tmp_path / n) for n in names], "PATH", wsi_cfg())
    assert not images and sorted(errors) == [0, 1, 2]
    assert "not a whole-slide image" in str(errors[0]) and "not a whole-slide image" in str(errors[2])
    assert "tissue" in str(errors[1])
    for i, err in errors.items():
        assert isinstance(err, InputError)
        assert_no_path(err, tmp_path / names[i])


def test_tile_grid_counts_match_geometry(tmp_path):
    """Without tissue filtering every whole tile that fits is kept."""
    import openslide

    with openslide.OpenSlide(str(write_slide(tmp_path / "s.tif"))) as slide:
        corners, side, level = wsi.tile_grid(slide, wsi_cfg(min_tissue=0.0).wsi)
    assert side == 448 and level == 1 and len(corners) == math.floor(SLIDE / 448) ** 2


# ------------------------------------------------------------------------------------------------- vendor OCT

TOPCON_PHI = {
    "patient_id": "MRN4711",
    "name": ("Jane", "Doe"),
    "birth_date": (1970, 1, 1),
    "captured": (2024, 5, 6, 9, 30, 15),
}


def _no_phi_fields(img: Image) -> None:
    values = [str(getattr(img, f.name)) for f in dataclasses.fields(img) if f.name not in ("pixels", "patient_key")]
    for planted in ("Jane", "Doe", "1970", "2024", "OD", "OS"):
        assert not any(planted in v for v in values), planted


def test_topcon_fds_gives_a_row_per_kept_bscan_and_its_fundus_photo(tmp_path):
    """B-scans windowed over the whole volume (Topcon stores 16 bits), frame_stride honoured, the patient ID as
    the key, the fundus photo inside the file as a CFP image; names, birth date, scan date and eye never leave."""
    rng = np.random.default_rng(0)
    bscans = rng.integers(0, 40_000, (5, 40, 30), dtype=np.uint16)
    photo = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    path = write_topcon_fds(tmp_path / "scan.fds", bscans, photo, **TOPCON_PHI)
    images, errors = run(vendor_oct.read, [str(path)], None, IngestConfig(dicom={"frame_stride": 2}))
    assert not errors
    octs = [img for img in images[0] if img.modality == "OCT"]
    (cfp,) = [img for img in images[0] if img.modality == "CFP"]
    assert [img.frame for img in octs] == [0, 2, 4]
    lo, hi = image.percentile_window(bscans[::2])
    for img, raw in zip(octs, bscans[::2], strict=True):
        np.testing.assert_array_equal(img.pixels, image.scale_to_uint8(raw, lo, hi))
    np.testing.assert_array_equal(cfp.pixels, photo)  # bright everywhere: the fundus crop keeps it whole
    assert {img.patient_key for img in images[0]} == {"MRN4711"}
    for img in images[0]:
        _no_phi_fields(img)


def test_zeiss_img_reads_by_the_scan_pattern_in_its_name(tmp_path):
    rng = np.random.default_rng(1)
    bscans = rng.integers(0, 256, (4, 1024, 30), dtype=np.uint8)
    named = write_zeiss_img(tmp_path / "P1234_Macular Cube 30x4_05-06-2024_09-30-15_OD_sn99_cube_z.img", bscans)
    unnamed = write_zeiss_img(tmp_path / "volume.img", bscans)
    short = tmp_path / "cut_Macular Cube 30x4_.img"
    short.write_bytes(named.read_bytes()[:-7])
    images, errors = run(vendor_oct.read, [str(named), str(unnamed), str(short)], None, IngestConfig())
    assert [img.frame for img in images[0]] == [0, 1, 2, 3] and {img.modality for img in images[0]} == {"OCT"}
    for img, raw in zip(images[0], bscans, strict=True):
        np.testing.assert_array_equal(img.pixels, raw)  # 8-bit samples are stored as they are
        _no_phi_fields(img)
    assert {img.patient_key for img in images[0]} == {"P1234"}
    assert set(errors) == {1, 2} and "vendor_oct.zeiss_ascans" in str(errors[1])
    assert "whole number" in str(errors[2])
    images, errors = run(vendor_oct.read, [str(unnamed)], None, IngestConfig(vendor_oct={"zeiss_ascans": 30}))
    assert not errors and len(images[0]) == 4


def test_vendor_oct_files_that_cannot_be_read_fail_cleanly(tmp_path):
    """No writer exists for Heidelberg .e2e or Topcon .fda: damaged and foreign files of those types (and a
    truncated .fds) each give one clean error without the file's name, never a crash."""
    good = write_topcon_fds(tmp_path / "good.fds", np.ones((2, 8, 8), np.uint16), **TOPCON_PHI)
    files = {
        "truncated_Doe.fds": good.read_bytes()[:60],
        "empty_Doe.e2e": b"",
        "foreign_Doe.e2e": b"E2EMultipleVolumeFile" + bytes(300),
        "foreign_Doe.fda": b"FOCTFDA" + bytes(8) + b"\x05@JUNK" + bytes(3),
        "png_Doe.e2e": b"\x89PNG\r\n\x1a\n" + bytes(64),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    images, errors = run(vendor_oct.read, paths, None, IngestConfig())
    assert not images and set(errors) == set(range(len(paths)))
    for path, err in zip(paths, errors.values(), strict=True):
        assert isinstance(err, InputError)
        assert_no_path(err, path)
        assert "Doe" not in str(err)


def test_a_parser_sent_round_a_loop_by_a_damaged_file_is_stopped(tmp_path):
    """An .e2e whose directory chain points back at itself would keep oct-converter's reader walking it for ever:
    reading stops after vendor_oct.max_seconds with a clean error."""
    path = tmp_path / "loop.e2e"
    path.write_bytes(e2e_directory_loop())
    outer = signal.setitimer(signal.ITIMER_REAL, 300)  # a caller's own alarm (pytest-timeout's) ...
    try:
        images, errors = run(vendor_oct.read, [str(path)], None, IngestConfig(vendor_oct={"max_seconds": 1}))
        assert 200 < signal.getitimer(signal.ITIMER_REAL)[0] < 300  # ... is put back
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
    assert not images and isinstance(errors[0], vendor_oct.TimeLimit)


def test_a_time_limit_a_parser_wraps_in_its_own_error_is_still_reported_as_one(tmp_path, monkeypatch):
    """construct re-raises whatever interrupts its parsing as a FormatFieldError: it is still a time limit."""

    def wrapping_parser(readers, path, cfg):
        try:
            while True:
                struct.unpack("<I", bytes(4))
        except Exception as err:
            raise RuntimeError("a format field could not be parsed") from err

    monkeypatch.setattr(vendor_oct, "_open", wrapping_parser)
    path = tmp_path / "any.e2e"
    path.write_bytes(bytes(8))
    _, errors = run(vendor_oct.read, [str(path)], None, IngestConfig(vendor_oct={"max_seconds": 0.5}))
    assert isinstance(errors[0], vendor_oct.TimeLimit)
