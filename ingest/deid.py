"""De-identification: keyed pseudonyms for identifiers and input paths, and the policy on what a reader may keep.

Pseudonyms are HMAC-SHA256 under a site key, so the same patient maps to the same pseudonym across runs and
datasets of one site, and nobody without the key can test a guessed MRN against a shard. The key comes from
``MERMED_DEID_KEY`` (the key itself) or ``MERMED_DEID_KEY_FILE`` (a file holding it); a run refuses to start without
one. Only the demo creates a key, in a local file readable by its owner alone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

KEY_ENV = "MERMED_DEID_KEY"
KEY_FILE_ENV = "MERMED_DEID_KEY_FILE"
MIN_KEY_BYTES = 16

# DICOM attributes a reader may use. Everything else in a header (names, birth dates, addresses, institution,
# physicians, device serials, free text) is never copied out of the reader: rows carry pixels plus these, and
# the identifiers among them only as pseudonyms.
IDENTIFIER_TAGS = ("PatientID", "StudyInstanceUID")
TECHNICAL_TAGS = (
    "Modality",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTSequence",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "SeriesInstanceUID",
    "NumberOfFrames",
    "BitsStored",
    "PixelRepresentation",
)


class MissingKeyError(RuntimeError):
    """No de-identification key is configured."""


class Pseudonymizer:
    """Maps identifiers and paths to keyed pseudonyms; ``kind`` keeps a patient id and a path with the same text
    from colliding."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise MissingKeyError(f"the de-identification key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def __call__(self, kind: str, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return f"{kind[0]}-{digest[:32]}"

    def source(self, relpath: str) -> str:
        """Pseudonym of an input's path relative to its root (``mermed trace`` recomputes it)."""
        return self("source", relpath.replace(os.sep, "/"))  # type: ignore[return-value]

    def patient(self, value: str | None) -> str | None:
        return self("patient", value)

    def study(self, value: str | None) -> str | None:
        return self("study", value)

    def __reduce__(self):  # the key travels to Ray workers inside the task, never into logs or repr
        return (Pseudonymizer, (self._key,))

    def __repr__(self) -> str:
        return "Pseudonymizer(<key hidden>)"


def load_key(key_file: str | Path | None = None) -> bytes:
    """The site key: an explicit key file, else ``MERMED_DEID_KEY``, else ``MERMED_DEID_KEY_FILE``."""
    if key_file is None and os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = key_file or os.environ.get(KEY_FILE_ENV)
    if not path:
        raise MissingKeyError(
            f"no de-identification key: set {KEY_ENV} (or {KEY_FILE_ENV} to a file holding the key). "
            "Ingest refuses to run without one, so that no identifier leaves the reader un-pseudonymised."
        )
    data = Path(path).read_bytes().strip()
    if not data:
        raise MissingKeyError(f"the de-identification key file {path} is empty")
    return data


def create_local_key(path: str | Path) -> Path:
    """Create (once) a random key file readable by its owner only; used by the demo, never by real ingest."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


_UNSAFE_CHARS = re.compile(r"[^\x20-\x7e]")


def scrub_message(message: str, secrets_to_hide: list[str], limit: int = 500) -> str:
    """Make an error message safe to store: remove the input's raw path and name, control characters and length."""
    for s in sorted((s for s in secrets_to_hide if s), key=len, reverse=True):
        message = message.replace(s, "<input>")
    message = _UNSAFE_CHARS.sub("?", message)
    return message[:limit]
