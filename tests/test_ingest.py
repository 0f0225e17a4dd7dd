"""The ingest pipeline end to end on a local Ray: real DICOM, slides read by OpenSlide, photos, npz; accounting,
de-identification, determinism, s3:// in and out."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ingest.config import IngestConfig
from ingest.deid import MissingKeyError, Pseudonymizer, load_key
from ingest.labels import LabelFileError
from ingest.pipeline import MANIFEST, QUARANTINE, IngestError, ShardWriter, run_ingest
from ingest.progress import Progress
from ingest.samples import copy_pydicom_testdata, make_sample_corpus
from ingest.schema import MODALITIES, ROW_SCHEMA, decode_image

KEY = b"unit-test-key-0123456789abcdef"


def _bad_files(root: Path) -> dict[str, str]:
    """Plant one file of each kind of bad input; returns {relative path: expected stage or error hint}."""
    bad = root / "cfp" / "bad"
    bad.mkdir(parents=True)
    (bad / "zero.png").write_bytes(b"")
    good_png = next((root / "cfp").glob("*.png")).read_bytes()
    (bad / "truncated.png").write_bytes(good_png[: len(good_png) // 3])
    (bad / "notes.dcm").write_text("this is a text file, not DICOM\n")
    (bad / "readme.txt").write_text("unsupported type\n")
    # a PNG header declaring 100000 x 100000 pixels: a decompression bomb
    ihdr = b"IHDR" + (100000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    bomb = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    (bad / "bomb.png").write_bytes(bomb)
    (bad / "dangling.png").symlink_to(bad / "does-not-exist.png")
    outside = root.parent / "outside.png"
    outside.write_bytes(good_png)
    (bad / "escape.png").symlink_to(outside)
    dcm = next((root / "cxr").glob("*.dcm")).read_bytes()
    (root / "cxr" / "truncated.dcm").write_bytes(dcm[: len(dcm) // 2])
    return {
        "cfp/bad/zero.png": "",
        "cfp/bad/truncated.png": "",
        "cfp/bad/notes.dcm": "",
        "cfp/bad/readme.txt": "UnsupportedFormat",
        "cfp/bad/bomb.png": "",
        "cfp/bad/dangling.png": "",
        "cfp/bad/escape.png": "PathOutsideRoot",
        "cxr/truncated.dcm": "",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "raw"
    info = make_sample_corpus(root, per_class=3, size=64, seed=0, slide_size=512)
    copy_pydicom_testdata(root / "pydicom")
    bad = _bad_files(root)
    return info, bad


@pytest.fixture(scope="module")
def ingested(ray_session, corpus, tmp_path_factory):
    info, _ = corpus
    out = tmp_path_factory.mktemp("out") / "shards"
    result = run_ingest(
        [str(info.root)], str(out), IngestConfig(dataset="sample"), labels_csv=str(info.labels_csv), key=KEY
    )
    return out, result


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_every_input_is_accounted_for(corpus, ingested):
    info, bad = corpus
    out, result = ingested
    m = json.loads((out / MANIFEST).read_text())
    n_inputs = sum(1 for p in info.root.rglob("*") if (p.is_file() or p.is_symlink()) and p != info.labels_csv)
    assert m["discovered"] == n_inputs
    assert m["discovered"] == m["ingested"] + m["quarantined"]
    assert set(m) >= {
        "discovered",
        "ingested",
        "quarantined",
        "duplicates",
        "rows",
        "modalities",
        "bytes",
        "versions",
        "config_hash",
        "started",
        "finished",
    }
    q = pq.read_table(out / QUARANTINE).to_pylist()
    pseud = Pseudonymizer(KEY)
    by_source = {r["source"]: r for r in q}
    for rel, error in bad.items():
        row = by_source.get(pseud.source(rel))
        assert row is not None, f"{rel} was not quarantined"
        assert row["message"] and row["stage"]
        if error:
            assert row["error_class"] == error
    assert m["quarantined"] == len({r["source"] for r in q})
    assert m["rows"] == sum(pq.read_table(out / s).num_rows for s in m["shards"])


def test_all_seven_modalities_with_schema(ingested):
    out, result = ingested
    m = result.manifest
    assert set(MODALITIES) <= set(m["modalities"])
    for shard in m["shards"]:
        t = pq.read_table(out / shard)
        assert t.schema.remove_metadata().equals(ROW_SCHEMA) or t.schema.names == ROW_SCHEMA.names
        modality = shard.split("/")[0].split("=")[1]
        assert set(t.column("modality").to_pylist()) == {modality}
        row = t.slice(0, 1).to_pylist()[0]
        pixels = decode_image(row["image"])
        assert pixels.shape[:2] == (row["height"], row["width"])
        assert row["source"].startswith("s-") and row["split"] in ("train", "val", "test")
    path = pq.read_table(out / next(s for s in m["shards"] if "PATH" in s)).to_pylist()
    assert all(r["tile_x"] is not None and r["mpp"] == pytest.approx(0.5) for r in path)


def test_patient_level_split(ingested):
    out, result = ingested
    rows = [
        r
        for s in result.manifest["shards"]
        for r in pq.read_table(out / s, columns=["patient_id", "split"]).to_pylist()
    ]
    splits: dict[str, set] = {}
    for r in rows:
        if r["patient_id"]:
            splits.setdefault(r["patient_id"], set()).add(r["split"])
    assert splits and all(len(s) == 1 for s in splits.values())


def test_no_phi_in_any_output(corpus, ingested):
    info, _ = corpus
    out, _ = ingested
    needles = [s for s in info.phi_strings if len(s) >= 4]
    assert needles
    for path in _all_files(out):
        blobs = [path.read_bytes()]
        if path.suffix == ".parquet":
            blobs.append(
                json.dumps(
                    pq.read_table(path)
                    .drop_columns([c for c in ("image",) if c in pq.read_schema(path).names])
                    .to_pylist(),
                    default=str,
                ).encode()
            )
        for blob in blobs:
            for s in needles:
                assert s.encode() not in blob, f"PHI found in {path.name}"


def test_rerun_changes_nothing_and_force_is_deterministic(corpus, ingested):
    info, _ = corpus
    out, result = ingested
    before = {p: p.read_bytes() for p in _all_files(out) if p.suffix == ".parquet"}
    again = run_ingest(
        [str(info.root)], str(out), IngestConfig(dataset="sample"), labels_csv=str(info.labels_csv), key=KEY
    )
    assert again.skipped
    forced = run_ingest(
        [str(info.root)], str(out), IngestConfig(dataset="sample"), labels_csv=str(info.labels_csv), key=KEY, force=True
    )
    assert not forced.skipped
    after = {p: p.read_bytes() for p in _all_files(out) if p.suffix == ".parquet"}
    assert after == before
    assert not [p for p in out.iterdir() if p.name.startswith("_staging")]


def test_crash_leaves_previous_output_visible(monkeypatch, corpus, tmp_path, ray_session):
    info, _ = corpus
    src = tmp_path / "raw"
    shutil.copytree(info.root / "oct", src / "oct")
    out = tmp_path / "out"
    run_ingest([str(src)], str(out), IngestConfig(), key=KEY)
    visible = sorted(p.relative_to(out) for p in _all_files(out) if not p.name.startswith("_"))
    manifest = (out / MANIFEST).read_bytes()
    shutil.copytree(info.root / "derm", src / "derm")  # new inputs: the next run really writes

    def crash(self):
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "close", crash)
    with pytest.raises(OSError, match="disk full"):
        run_ingest([str(src)], str(out), IngestConfig(), key=KEY)
    assert sorted(p.relative_to(out) for p in _all_files(out) if not p.name.startswith("_")) == visible
    assert (out / MANIFEST).read_bytes() == manifest


def test_refuses_without_key_and_bad_labels(monkeypatch, corpus, tmp_path):
    info, _ = corpus
    monkeypatch.delenv("MERMED_DEID_KEY", raising=False)
    monkeypatch.delenv("MERMED_DEID_KEY_FILE", raising=False)
    with pytest.raises(MissingKeyError):
        load_key()
    with pytest.raises(MissingKeyError):
        run_ingest([str(info.root)], str(tmp_path / "o"), IngestConfig())
    bad = tmp_path / "labels.csv"
    for text, match in [
        ("file,label\na.png,1\n", "missing column"),
        ("path,label,split\na.png,1,training\n", "line 2: split"),
        ("path,label,patient_id,split\na.png,1,P1,train\nb.png,0,P1,test\n", "two different splits"),
        ("path,label\na.png,1\na.png,0\n", "listed twice"),
    ]:
        bad.write_text(text)
        with pytest.raises(LabelFileError, match=match):
            run_ingest([str(info.root)], str(tmp_path / "o"), IngestConfig(), labels_csv=str(bad), key=KEY)
    with pytest.raises(IngestError, match="does not exist"):
        run_ingest([str(tmp_path / "nowhere")], str(tmp_path / "o"), IngestConfig(), key=KEY)


def test_medmnist_npz_keeps_split_and_labels(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    src = tmp_path / "in"
    src.mkdir()
    np.savez(src / "octmnist.npz", **arrays)
    out = tmp_path / "out"
    m = run_ingest([str(src)], str(out), IngestConfig(), key=KEY).manifest
    assert m["modalities"] == {"OCT": 11} and m["splits"]["OCT"] == {"test": 3, "train": 6, "val": 2}
    rows = pq.read_table(out / m["shards"][0]).to_pylist()
    train = sorted((r["frame"], r["label"]) for r in rows if r["split"] == "train")
    assert [lab for _, lab in train] == [str(int(v)) for v in arrays["train_labels"][:, 0]]


def test_s3_input_and_output(ray_session, s3_bucket, corpus, tmp_path):
    import s3fs

    info, _ = corpus
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(str(info.root / "derm"), f"{s3_bucket}/raw/derm", recursive=True)
    fs.put(str(info.root / "ct"), f"{s3_bucket}/raw/ct", recursive=True)
    local = run_ingest(
        [str(info.root / "derm"), str(info.root / "ct")],
        str(tmp_path / "local"),
        IngestConfig(modality="auto"),
        key=KEY,
    ).manifest
    remote = run_ingest(
        [f"s3://{s3_bucket}/raw/derm", f"s3://{s3_bucket}/raw/ct"],
        f"s3://{s3_bucket}/out",
        IngestConfig(modality="auto"),
        key=KEY,
    ).manifest
    assert remote["rows"] == local["rows"] > 0 and remote["modalities"] == local["modalities"]
    assert fs.exists(f"{s3_bucket}/out/{MANIFEST}")
    for shard in remote["shards"]:
        with fs.open(f"{s3_bucket}/out/{shard}", "rb") as fh:
            assert pq.read_table(fh).num_rows > 0


def test_manifest_holds_each_modalitys_exact_pixel_statistics(ingested):
    """Written in the pass that writes the rows; checked against the stored images decoded again."""
    import pyarrow.parquet as pq

    from ingest.schema import modality_normalization

    out, _ = ingested
    manifest = json.loads((out / MANIFEST).read_text())
    norm = modality_normalization([manifest])
    assert set(norm) == set(manifest["modalities"])
    for modality in ("CT", "DERM"):
        pixels = []
        for shard in sorted((out / f"modality={modality}").glob("*.parquet")):
            for data in pq.read_table(shard, columns=["image"]).column("image").to_pylist():
                im = decode_image(data).astype(np.float64) / 255
                pixels.append(np.repeat(im.reshape(-1, 1), 3, axis=1) if im.ndim == 2 else im.reshape(-1, 3))
        flat = np.concatenate(pixels)
        np.testing.assert_allclose(norm[modality]["mean"], flat.mean(axis=0), rtol=1e-9)
        np.testing.assert_allclose(norm[modality]["std"], flat.std(axis=0), rtol=1e-6)


def test_age_decades_follow_the_dicom_age_string():
    from ingest.dicom import age_decade

    assert [age_decade(a) for a in ("047Y", "009Y", "006M", "003W", "095Y", "090Y")] == [
        "40-49",
        "0-9",
        "0-9",
        "0-9",
        "90+",
        "90+",
    ]
    assert age_decade(None) is None and age_decade("47") is None and age_decade("04XY") is None


def _attributes_of(out: Path) -> list:
    shards = [p for p in sorted(out.rglob("*.parquet")) if p.name != QUARANTINE]
    return [a.as_py() for p in shards for a in pq.read_table(p, columns=["attributes"])["attributes"]]


def test_demographics_and_label_attributes_only_when_asked(ray_session, tmp_path):
    """DICOM sex and age decade reach the rows only with ``dicom.demographics``; label-CSV attribute columns only
    when named in ``attributes``. Neither setting lets the exact age, the name or the birth date through."""
    import pydicom
    from pydicom.data import get_testdata_file

    raw = tmp_path / "raw"
    (raw / "ct").mkdir(parents=True)
    for i, (sex, age) in enumerate((("F", "047Y"), ("M", "063Y"))):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientSex, ds.PatientAge = sex, age
        ds.PatientName, ds.PatientBirthDate, ds.PatientID = f"Planted^Name{i}", f"1961020{i}", f"PLANTED-{i}"
        ds.save_as(raw / "ct" / f"scan{i}.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,site\nct/scan0.dcm,a,north\nct/scan1.dcm,b,south\n")

    plain = tmp_path / "plain"  # the two scans share their pixels: keep both rows
    run_ingest([str(raw)], str(plain), IngestConfig(modality="CT", deduplicate=False), key=KEY)
    assert _attributes_of(plain) == [None, None]
    with pytest.raises(LabelFileError, match="site.*attributes"):
        run_ingest([str(raw)], str(tmp_path / "no"), IngestConfig(modality="CT"), labels_csv=str(labels), key=KEY)

    asked = {"modality": "CT", "deduplicate": False, "attributes": ["site"], "dicom": {"demographics": True}}
    cfg = IngestConfig.model_validate(asked)
    kept = tmp_path / "kept"
    run_ingest([str(raw)], str(kept), cfg, labels_csv=str(labels), key=KEY)
    found = sorted(_attributes_of(kept))
    assert [json.loads(a) for a in found] == [
        {"age_group": "40-49", "sex": "F", "site": "north"},
        {"age_group": "60-69", "sex": "M", "site": "south"},
    ]
    for path in _all_files(kept):
        blob = path.read_bytes()
        for planted in (b"047Y", b"063Y", b"Planted", b"19610200", b"PLANTED-0"):
            assert planted not in blob, f"{planted!r} in {path.name}"


def test_progress_lines_say_done_of_total_and_what_is_left(caplog):
    log = logging.getLogger("mermed.test-progress")
    with caplog.at_level("INFO", logger=log.name):
        progress = Progress(log, "ingest", 10, "files", every_s=0)
        progress.update(3)
        progress.update(7)
        progress.close()
        Progress(log, "sweep", None, "trials", every_s=0).update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("ingest: 3/10 files (") and "left)" in lines[0]
    assert lines[1].startswith("ingest: 10/10 files (") and "left" not in lines[1]
    assert lines[2].startswith("ingest: 10/10 files (") and " in " in lines[2]
    assert lines[3].startswith("sweep: 1 trials (")
