"""Shards to training batches: Ray Data reads and decodes on CPU; workers draw modality-balanced batches.

The Ray side (``open_shards``, ``decoded_dataset``) lives here and in ``pipelines/``; ``BalancedBatches`` works on any
iterator of numpy batches, so the same batching runs in a Ray Train worker and in a bare PyTorch loop.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from mermed import storage

# Modalities stored as (pseudo-)grayscale: colour jitter on saturation/hue is meaningless for them.
GRAYSCALE_MODALITIES = frozenset({"CT", "CXR", "US", "OCT", "MR"})


def read_manifest(data: str) -> dict:
    fs, root = storage.filesystem(data)
    path = posixpath.join(root, "_manifest.json")
    if not fs.exists(path):
        raise FileNotFoundError(f"{data} has no _manifest.json: is it an ingest output (mermed ingest)?")
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def shard_uris(data: Sequence[str], modality: str | None = None) -> list[str]:
    """Every committed shard of the given ingest outputs (from their manifests, never a directory listing)."""
    uris = []
    for out in data:
        shards = read_manifest(out)["shards"]
        uris += [
            storage.join(out, rel) for rel in shards if modality is None or rel.startswith(f"modality={modality}/")
        ]
    return uris


def split_counts(data: Sequence[str]) -> dict[str, dict[str, int]]:
    """Rows per modality and split over the given ingest outputs, from their manifests."""
    counts: dict[str, dict[str, int]] = {}
    for out in data:
        for modality, per_split in read_manifest(out)["splits"].items():
            for split, n in per_split.items():
                counts.setdefault(modality, {}).setdefault(split, 0)
                counts[modality][split] += n
    return counts


def open_shards(
    data: Sequence[str],
    *,
    splits: Sequence[str] | None = None,
    modality: str | None = None,
    columns: Sequence[str] | None = None,
):
    """A Ray Dataset over the shards of ``data`` (local or s3://), keeping rows whose split is in ``splits``."""
    import ray
    from ray.data.expressions import col

    uris = shard_uris(data, modality)
    if not uris:
        raise ValueError(f"no shards{f' of modality {modality}' if modality else ''} in {', '.join(data)}")
    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    ds = ray.data.read_parquet(
        paths,
        filesystem=storage.arrow_filesystem(fs),
        columns=list(columns) if columns else None,
    )
    return ds.filter(expr=col("split").is_in(list(splits))) if splits else ds


def decode_square(data: bytes, size: int) -> np.ndarray:
    """Decode a stored image to uint8 RGB ``size`` x ``size`` (resize the short side, centre crop)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR))


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` step: encoded rows to fixed-size uint8 pixels plus the modality and grayscale flag."""
    pixels = (
        np.stack([decode_square(b, size) for b in batch["image"]])
        if len(batch["image"])
        else np.zeros((0, size, size, 3), np.uint8)
    )
    modality = np.asarray(batch["modality"]).astype(str)
    return {
        "pixels": pixels,
        "modality": modality,
        "grayscale": np.isin(modality, list(GRAYSCALE_MODALITIES)) | (np.asarray(batch["channels"]) == 1),
    }


def decoded_dataset(data: Sequence[str], size: int, splits: Sequence[str] | None = None, modality: str | None = None):
    """Shards to decoded uint8 pixels on Ray's CPU workers (the only CPU work of training)."""
    ds = open_shards(data, splits=splits, modality=modality, columns=["image", "modality", "channels", "split"])
    return ds.map_batches(decode_batch, fn_kwargs={"size": size}, batch_format="numpy")


def modality_counts(batch_size: int, modalities: Sequence[str], offset: int) -> dict[str, int]:
    """Equal share of the batch per modality; the ``batch_size % n`` extra images go to the modalities from
    position ``offset`` on (cyclically), so counts differ by at most one."""
    n = len(modalities)
    base, extra = divmod(batch_size, n)
    return {m: base + (1 if (i - offset) % n < extra else 0) for i, m in enumerate(modalities)}


class _Stream:
    """Rows of one modality, drawn ``n`` at a time; a new pass starts whenever the data runs out.

    A modality whose pass fits in ``cache_bytes`` is kept in memory after its first pass and re-served in a
    fresh seeded order: a new streaming pass costs seconds of start-up, which a small modality cycling at
    every step would otherwise pay at every step.

    The rows served are one fixed sequence (pass 0 as streamed, then pass ``e`` re-streamed or permuted by
    ``(seed, e)``), so ``fast_forward`` can continue it exactly where a previous process stopped.
    """

    def __init__(self, make_iter: Callable[[int], Iterator[dict[str, np.ndarray]]], cache_bytes: int, seed: int):
        self.make_iter, self.cache_bytes, self.seed = make_iter, cache_bytes, seed
        self.epoch = 0
        self.it = iter(make_iter(0))
        self.first_pass: list[dict[str, np.ndarray]] | None = []  # None once it no longer fits the cache
        self.first_pass_bytes = 0
        self.cached: dict[str, np.ndarray] | None = None
        self.rows_this_pass = 0
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0

    def _pull(self) -> dict[str, np.ndarray]:
        if self.cached is not None:
            rows = len(next(iter(self.cached.values())))
            order = np.random.default_rng((self.seed, self.epoch)).permutation(rows)
            self.epoch += 1
            return {k: v[order] for k, v in self.cached.items()}
        try:
            batch = next(self.it)
        except StopIteration:
            if self.rows_this_pass == 0:
                raise RuntimeError("a modality stream yields no rows") from None
            if self.first_pass is not None:
                self.cached = {k: np.concatenate([b[k] for b in self.first_pass]) for k in self.first_pass[0]}
                self.first_pass = None
            self.epoch += 1
            self.rows_this_pass = 0
            if self.cached is None:
                self.it = iter(self.make_iter(self.epoch))
            return {}
        self.rows_this_pass += len(next(iter(batch.values()), []))
        if self.first_pass is not None:
            self.first_pass.append(batch)
            self.first_pass_bytes += sum(v.nbytes for v in batch.values())
            if self.first_pass_bytes > self.cache_bytes:
                self.first_pass = None
        return batch

    def fast_forward(self, rows: int, pass_rows: int) -> None:
        """Continue as if ``rows`` rows had been taken, passes being ``pass_rows`` long. Pass 0 is read again
        as far as the cache goes (it decides whether later passes come from the cache, and fills it); a pass
        too big to cache is then started directly and only its skipped rows are read."""
        epoch, within = divmod(rows, pass_rows)
        if epoch:
            while self.epoch == 0 and self.first_pass is not None:
                self._pull()
            if self.cached is None:  # too big to cache: start the current pass directly
                self.first_pass, self.rows_this_pass = None, 0
                self.it = iter(self.make_iter(epoch))
            self.epoch = epoch
        if within:
            self.take(within)

    def take(self, n: int) -> dict[str, np.ndarray]:
        while self.pending_rows < n:
            batch = self._pull()
            rows = len(next(iter(batch.values()), []))
            if rows:
                self.pending.append(batch)
                self.pending_rows += rows
        merged = {k: np.concatenate([b[k] for b in self.pending]) for k in self.pending[0]}
        self.pending_rows -= n
        self.pending = [{k: v[n:] for k, v in merged.items()}] if self.pending_rows else []
        return {k: v[:n] for k, v in merged.items()}


class BalancedBatches:
    """Batches with equal counts per modality (within one), cycling the small modalities.

    ``streams`` maps a modality to a function ``epoch -> iterator of numpy batches`` (a Ray Data shard's
    ``iter_batches``, or any iterator for a bare loop).
    """

    def __init__(
        self,
        streams: dict[str, Callable[[int], Iterator[dict[str, np.ndarray]]]],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        cache_bytes: int = 256 * 1024**2,
        seed: int = 0,
    ) -> None:
        if not streams:
            raise ValueError("no modality to train on")
        if batch_size < len(streams):
            raise ValueError(f"batch size {batch_size} is smaller than the number of modalities ({len(streams)})")
        self.modalities = sorted(streams)
        self.streams = {m: _Stream(streams[m], cache_bytes, seed + rank) for m in self.modalities}
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def counts(self, step: int) -> dict[str, int]:
        """Rows per modality in this worker's batch for ``step``. The extras rotate over steps and workers, so
        the global batch (all workers) is balanced within one image as well."""
        extra = self.batch_size % len(self.modalities)
        return modality_counts(self.batch_size, self.modalities, (step * self.world_size + self.rank) * extra)

    def fast_forward(self, step: int, pass_rows: Mapping[str, int]) -> None:
        """Resume at ``step``: each stream skips the rows that steps ``0..step-1`` took from it.

        ``pass_rows`` is the number of rows one pass of each modality gives this worker. The counts repeat
        with a period of ``len(modalities)`` steps, so the total is cheap at any step.
        """
        period = len(self.modalities)
        whole, part = divmod(step, period)
        per_period: Counter[str] = Counter()
        for t in range(period):
            per_period.update(self.counts(t))
        rest: Counter[str] = Counter()
        for t in range(part):
            rest.update(self.counts(t))
        for m, stream in self.streams.items():
            stream.fast_forward(whole * per_period[m] + rest[m], pass_rows[m])

    def next(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """This worker's batch for ``step`` and its rows per modality."""
        counts = self.counts(step)
        parts = [self.streams[m].take(c) for m, c in counts.items() if c]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return batch, counts

    def epochs(self) -> dict[str, int]:
        return {m: s.epoch for m, s in self.streams.items()}
