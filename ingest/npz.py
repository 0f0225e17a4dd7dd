"""MedMNIST ``.npz`` archives: ``{train,val,test}_images`` with matching ``{split}_labels``.

Images are streamed from the archive a chunk of samples at a time rather than loaded whole: the 224-pixel MedMNIST+
releases hold tens of gigabytes in a single array.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO

import numpy as np

from ingest.config import IngestConfig
from ingest.schema import SPLITS, Image, InputError, per_file

CHUNK_BYTES = 64 * 1024**2


def _npy_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def _label_text(label: np.ndarray) -> str:
    """The integer class, or for multi-label rows the JSON list of the 0/1 label vector."""
    values = [int(v) for v in np.ravel(label)]
    return str(values[0]) if len(values) == 1 else json.dumps(values)


def _iter_images(npz: np.lib.npyio.NpzFile, key: str, n: int) -> Iterator[np.ndarray]:
    """Yield the ``n`` samples of ``key`` one at a time, reading a bounded chunk of the archive at once."""
    with npz.zip.open(f"{key}.npy") as member:
        shape, fortran, dtype = _npy_header(member)
        sample_shape = shape[1:]
        sample_bytes = int(np.prod(sample_shape)) * dtype.itemsize
        chunk = max(1, CHUNK_BYTES // max(sample_bytes, 1))
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            data = member.read(count * sample_bytes)
            if len(data) != count * sample_bytes:
                raise InputError(f"{key} is truncated")
            yield from np.frombuffer(data, dtype=dtype).reshape((count, *sample_shape))


def _check_images(npz: np.lib.npyio.NpzFile, key: str) -> int:
    """Validate an image array's header without loading it; return its sample count."""
    with npz.zip.open(f"{key}.npy") as member:
        shape, fortran, dtype = _npy_header(member)
    if dtype != np.uint8:
        raise InputError(f"{key} has dtype {dtype}, expected uint8")
    if fortran:
        raise InputError(f"{key} is stored in Fortran order")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise InputError(f"{key} has shape {shape}, expected (N, H, W) or (N, H, W, 3)")
    return shape[0]


def read_one(path: str, modality: str | None, cfg: IngestConfig) -> Iterator[Image]:
    """Yield one image per sample, with split, label and index within the split as ``frame``."""
    if modality is None:
        raise InputError("MedMNIST archives carry no modality; configure one")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy's messages may name the file
        raise InputError(f"not a NumPy .npz archive ({type(err).__name__})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError("a single NumPy array, not a .npz archive of MedMNIST splits")
    with npz:
        splits = [s for s in SPLITS if f"{s}_images" in npz.files]
        if not splits:
            raise InputError("no train_images, val_images or test_images array in the archive")
        counts = {}
        for split in splits:
            if f"{split}_labels" not in npz.files:
                raise InputError(f"{split}_images has no {split}_labels")
            counts[split] = _check_images(npz, f"{split}_images")
        labels = {split: npz[f"{split}_labels"] for split in splits}  # small: read whole, no pickles
        for split in splits:
            if len(labels[split]) != counts[split]:
                raise InputError(
                    f"{split}_images has {counts[split]} samples but {split}_labels has {len(labels[split])}"
                )
            if labels[split].ndim not in (1, 2) or not np.issubdtype(labels[split].dtype, np.integer):
                raise InputError(f"{split}_labels must be integers of shape (N,) or (N, K)")
        for split in splits:
            images = _iter_images(npz, f"{split}_images", counts[split])
            for index, (pixels, label) in enumerate(zip(images, labels[split], strict=True)):
                yield Image(pixels=pixels, modality=modality, frame=index, label=_label_text(label), split=split)


read = per_file(read_one)

__all__ = ["read", "read_one"]
