"""The optional label CSV (path, label, split, patient_id[, modality], attribute columns) and the patient-level split.

A CSV is checked whole before any file is read, so a malformed one fails at start with its line named.
Rows without a split get one from a keyed hash of the patient, so no patient ever lands in two splits.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from ingest.schema import MODALITIES, SPLITS

REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("split", "patient_id", "modality")


class LabelFileError(ValueError):
    """A label CSV that cannot be used; the message names the line and column."""


@dataclass(frozen=True)
class LabelRow:
    label: str | None
    split: str | None
    patient_id: str | None
    modality: str | None
    attributes: tuple[tuple[str, str], ...] = ()  # the non-empty values of the attribute columns


def _attributes(rec: dict[str, str | None], names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    return tuple((n, v) for n in names if (v := (rec.get(n) or "").strip()))


def parse_labels(text: str, name: str = "labels", attributes: Sequence[str] = ()) -> dict[str, LabelRow]:
    """Parse a label CSV into {relative path: LabelRow}, keeping the ``attributes`` columns; raise LabelFileError
    on any malformed line or on a column that is neither known nor an attribute."""
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise LabelFileError(f"{name}: missing column(s) {', '.join(missing)} (have: {', '.join(columns) or 'none'})")
    unknown = [c for c in columns if c not in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *attributes)]
    if unknown:
        raise LabelFileError(
            f"{name}: unknown column(s) {', '.join(unknown)} (list attribute columns in the config's attributes)"
        )
    rows: dict[str, LabelRow] = {}
    split_of_patient: dict[str, str] = {}
    for lineno, rec in enumerate(reader, start=2):
        if None in rec:
            raise LabelFileError(f"{name} line {lineno}: more fields than columns")
        path = (rec.get("path") or "").strip().lstrip("./")
        if not path:
            raise LabelFileError(f"{name} line {lineno}: empty path")
        if path in rows:
            raise LabelFileError(f"{name} line {lineno}: path listed twice")
        split = (rec.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise LabelFileError(f"{name} line {lineno}: split must be one of {', '.join(SPLITS)} or empty")
        modality = (rec.get("modality") or "").strip().upper() or None
        if modality is not None and modality not in MODALITIES + ("MR",):
            raise LabelFileError(f"{name} line {lineno}: unknown modality (expected one of {', '.join(MODALITIES)})")
        patient = (rec.get("patient_id") or "").strip() or None
        if patient and split and split_of_patient.setdefault(patient, split) != split:
            raise LabelFileError(f"{name} line {lineno}: a patient is given two different splits")
        label = (rec.get("label") or "").strip() or None
        rows[path] = LabelRow(label, split, patient, modality, _attributes(rec, attributes))
    # rows of a patient without a split inherit the split given for the patient's other rows
    return {
        p: dataclasses.replace(r, split=r.split or split_of_patient.get(r.patient_id or "")) for p, r in rows.items()
    }


def patient_split(patient_pseudonym: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a patient (by pseudonym, so it is keyed and stable across runs)."""
    bucket = int.from_bytes(hashlib.sha256(patient_pseudonym.encode()).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"
