"""Shards to training batches: Ray Data reads and decodes on CPU; workers draw modality-balanced batches.

The Ray side (``open_shards``, ``decoded_dataset``) lives here and in ``pipelines/``; ``BalancedBatches`` works on any
iterator of numpy batches, so the same batching runs in a Ray Train worker and in a bare PyTorch loop, and
``Prefetcher`` assembles the next batch while a step runs.
"""

from __future__ import annotations

import io
import queue
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar, cast

import numpy as np
from PIL import Image, ImageOps

from ingest import storage
from ingest.schema import GRAYSCALE_MODALITIES, read_manifest

T = TypeVar("T")


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


def pass_seed(*keys: int | str) -> int:
    """A 32-bit seed from what names a stream and its pass (run seed, rank, modality, pass), the same in every
    process: strings enter by their CRC, and negative ints wrap (``SeedSequence`` takes only non-negative ones)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else k % 2**64 for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def open_shards(
    data: Sequence[str],
    *,
    splits: Sequence[str] | None = None,
    modality: str | None = None,
    columns: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
    reshuffle: bool = True,
):
    """A Ray Dataset over the shards of ``data`` (local or s3://), keeping rows whose split is in ``splits``.

    With ``shuffle_seed`` the shards are read in a seeded random order, a new one at every pass unless
    ``reshuffle`` is False. It is the streaming form of block-order randomisation (``randomize_block_order`` waits
    for every block of the pass); Ray numbers the passes from 0 in each process, so a resumed run continues the
    uninterrupted run's shard order only when it is fixed.
    """
    from ray.data import FileShuffleConfig
    from ray.data.expressions import col

    uris = shard_uris(data, modality)
    if not uris:
        raise ValueError(f"no shards{f' of modality {modality}' if modality else ''} in {', '.join(data)}")
    ds = read_shards(
        uris,
        columns=columns,
        shuffle=None if shuffle_seed is None else FileShuffleConfig(shuffle_seed, reseed_after_execution=reshuffle),
    )
    return ds.filter(expr=col("split").is_in(list(splits))) if splits else ds


def read_shards(
    uris: Sequence[str], *, columns: Sequence[str] | None = None, include_paths: bool = False, shuffle=None
):
    """A Ray Dataset over shard files of one filesystem (local, or one S3 endpoint); with ``include_paths`` each
    row's ``path`` is its file's path as ``storage.filesystem`` gives it."""
    import ray

    fs, _ = storage.filesystem(uris[0])
    return ray.data.read_parquet(
        [storage.filesystem(u)[1] for u in uris],
        filesystem=storage.arrow_filesystem(fs),
        columns=list(columns) if columns else None,
        include_paths=include_paths,
        shuffle=shuffle,
    )


def decode_square(data: bytes, size: int) -> np.ndarray:
    """Decode a stored image to uint8 RGB ``size`` x ``size`` (resize the short side, centre crop): the probe's
    evaluation view, as the usual resize + centre crop protocol."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR))


def decode_letterbox(data: bytes, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a stored image whole to uint8 RGB ``size`` x ``size``: the long side resized to ``size``, the image
    centred on zeros; and its box x0, y0, x1, y1 (int32). Training crops are drawn inside the box, so the sides of
    wide images (OCT B-scans, ultrasound sectors, photos) stay in reach, which a centre crop would cut off."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = (size - nw) // 2, (size - nh) // 2
        out = np.zeros((size, size, 3), np.uint8)
        out[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))
    return out, np.array([x0, y0, x0 + nw, y0 + nh], np.int32)


DECODE_COLUMNS = ["image", "modality", "channels", "split", "pixel_sha256"]


def row_keys(pixel_sha256: Sequence[str]) -> np.ndarray:
    """A row's identity in a training stream: the first 64 bits of its pixel hash (ingest keeps one row per hash)."""
    return np.array([int(h[:16], 16) for h in pixel_sha256], dtype=np.uint64).view(np.int64)


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` step: encoded rows to letterboxed uint8 pixels with their valid boxes, plus the
    modality, the grayscale flag and the row's key."""
    decoded = [decode_letterbox(b, size) for b in batch["image"]]
    modality = np.asarray(batch["modality"]).astype(str)
    return {
        "pixels": np.stack([p for p, _ in decoded]) if decoded else np.zeros((0, size, size, 3), np.uint8),
        "valid": np.stack([v for _, v in decoded]) if decoded else np.zeros((0, 4), np.int32),
        "modality": modality,
        "grayscale": np.isin(modality, list(GRAYSCALE_MODALITIES)) | (np.asarray(batch["channels"]) == 1),
        "row_key": row_keys(batch["pixel_sha256"]),
    }


def rest_of_pass(
    data: Sequence[str],
    modality: str,
    splits: Sequence[str],
    size: int,
    consumed: np.ndarray,
    share: tuple[int, int] | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """The rows of ``modality`` a pass had not yet served when it was cut off (all but the ``consumed`` keys),
    decoded and in a seeded order. ``share`` (rank, world) takes one worker's equal part of a modality split
    between workers (sorted keys dealt round-robin, the last ``len % world`` dropped, as Ray's equal split drops
    them); None keeps them all (a modality every worker reads whole).

    A run without ``run.deterministic_data`` resumes with these: its streams cannot replay the interrupted pass's
    order, but every worker can finish the pass on exactly the rows it had left."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def tables(columns: list[str]) -> Iterator[pa.Table]:
        """The modality's shards, one at a time, with their rows of ``splits``."""
        for uri in shard_uris(data, modality):
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=columns)
            yield table.filter(pc.is_in(table["split"], pa.array(list(splits))))

    keys = np.concatenate([row_keys(t["pixel_sha256"].to_pylist()) for t in tables(["pixel_sha256", "split"])])
    rest = np.setdiff1d(keys, consumed)  # sorted
    if share is not None:
        rank, world = share
        rest = rest[: len(rest) // world * world][rank::world]
    parts = []
    for table in tables(DECODE_COLUMNS):  # read again, images now: only this worker's rows are kept decoded
        mask = np.isin(row_keys(table["pixel_sha256"].to_pylist()), rest)
        if mask.any():
            parts.append(decode_batch(table.filter(pa.array(mask)).to_pydict(), size))
    if not parts:
        return {}
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _, first = np.unique(rows["row_key"], return_index=True)  # one row per key, as every worker counts them
    order = first[np.random.default_rng(seed).permutation(len(first))]
    return {k: v[order] for k, v in rows.items()}


def decoded_dataset(
    data: Sequence[str],
    size: int,
    splits: Sequence[str] | None = None,
    modality: str | None = None,
    *,
    shuffle_seed: int | None = None,
    reshuffle: bool = True,
):
    """Shards to decoded uint8 pixels on Ray's CPU workers (the only CPU work of training); the shard order as
    ``open_shards``."""
    ds = open_shards(
        data,
        splits=splits,
        modality=modality,
        columns=DECODE_COLUMNS,
        shuffle_seed=shuffle_seed,
        reshuffle=reshuffle,
    )
    return ds.map_batches(decode_batch, fn_kwargs={"size": size}, batch_format="numpy")


def modality_counts(batch_size: int, modalities: Sequence[str], offset: int) -> dict[str, int]:
    """Equal share of the batch per modality; the ``batch_size % n`` extra images go to the modalities from
    position ``offset`` on (cyclically), so counts differ by at most one."""
    n = len(modalities)
    base, extra = divmod(batch_size, n)
    return {m: base + (1 if (i - offset) % n < extra else 0) for i, m in enumerate(modalities)}


def _rows(batch: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(batch.values()), []))


PASS = "pass"  # each row's pass, in the batches a stream serves


class _Stream:
    """Rows of one modality, drawn ``n`` at a time; a new pass starts whenever the data runs out.

    The first use reads pass 0 as far as ``cache_bytes`` goes. A pass that fits is kept in memory and every pass,
    the first included, is a permutation of it seeded by ``(*seed, pass)``: a new streaming pass costs seconds of
    start-up, which a small modality cycling at every step would otherwise pay at every step. A bigger modality
    serves what was read, then streams on, pass ``e`` being ``make_iter(e)`` (shuffled by the source).

    The rows served are one fixed sequence, so ``fast_forward`` can continue it exactly where a previous process
    stopped (given a source that repeats its passes). Where the source does not repeat its passes, the stream
    records the keys of the rows it served from its newest pass (``served``), and a resumed stream serves what that
    pass had left (``resume_pass``) before its source's next pass.
    """

    def __init__(
        self, make_iter: Callable[[int], Iterator[dict[str, np.ndarray]]], cache_bytes: int, seed: tuple[int | str, ...]
    ):
        self.make_iter, self.cache_bytes, self.seed = make_iter, cache_bytes, seed
        self.epoch = 0  # the pass of the rows read last
        self.started = False
        self.it: Iterator[dict[str, np.ndarray]] | None = None  # None when cached
        self.cached: dict[str, np.ndarray] | None = None
        self.next_permutation = 0
        self.rows_this_pass = 0
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.served_pass = 0  # the newest pass rows were served from, and the keys of its rows served
        self.served_keys: list[np.ndarray] = []
        self.rest: dict[str, np.ndarray] | None = None  # the rest of an interrupted pass, served first

    def _start(self) -> None:
        """Read pass 0 (after a resumed pass, the next) as far as the cache goes: all of it is the cache, else it
        is the first rows to serve."""
        self.started = True
        self.it = iter(self.make_iter(self.epoch))
        head: list[dict[str, np.ndarray]] = []
        size = 0
        for batch in self.it:
            head.append(batch)
            self.rows_this_pass += _rows(batch)
            size += sum(v.nbytes for v in batch.values())
            if size > self.cache_bytes:
                self._queue(head)
                return
        if not self.rows_this_pass:
            raise RuntimeError("a modality stream yields no rows")
        self.cached = {k: np.concatenate([b[k] for b in head]) for k in head[0]}
        self.it = None

    def _queue(self, batches: list[dict[str, np.ndarray]], epoch: int | None = None) -> None:
        for batch in batches:
            if _rows(batch):
                tag = np.full(_rows(batch), self.epoch if epoch is None else epoch, np.int64)
                self.pending.append({**batch, PASS: tag})
                self.pending_rows += _rows(batch)

    def _pull(self) -> None:
        """Queue the next rows: a permuted pass of the cache, or the stream's next batch (none at a pass's end)."""
        if self.cached is not None:
            self.epoch, self.next_permutation = self.next_permutation, self.next_permutation + 1
            order = np.random.default_rng(pass_seed(*self.seed, self.epoch)).permutation(_rows(self.cached))
            self._queue([{k: v[order] for k, v in self.cached.items()}])
            return
        try:
            batch = next(self.it)
        except StopIteration:
            if self.rows_this_pass == 0:
                raise RuntimeError("a modality stream yields no rows") from None
            self.epoch += 1
            self.rows_this_pass = 0
            self.it = iter(self.make_iter(self.epoch))
            return
        self.rows_this_pass += _rows(batch)
        self._queue([batch])

    def fast_forward(self, rows: int, pass_rows: int) -> None:
        """Continue as if ``rows`` rows had been taken, passes being ``pass_rows`` long. Pass 0 is read again as
        far as the cache goes (it decides whether the passes come from the cache, and fills it); a pass too big to
        cache is then started directly and only its skipped rows are read."""
        epoch, within = divmod(rows, pass_rows)
        if not self.started:
            self._start()
        if epoch:
            if self.cached is None:
                self.pending, self.pending_rows, self.rows_this_pass = [], 0, 0
                self.it = iter(self.make_iter(epoch))
            self.epoch = self.next_permutation = epoch
        if within:
            self.take(within)

    def resume_pass(self, epoch: int, rest: dict[str, np.ndarray], served: np.ndarray) -> None:
        """Serve ``rest``, the rows pass ``epoch`` had left when it was cut off after serving ``served``, then go
        on with pass ``epoch + 1`` of the source."""
        self.rest, self.served_pass, self.served_keys = rest, epoch, [served]
        self.epoch = self.next_permutation = epoch + 1

    def take(self, n: int) -> dict[str, np.ndarray]:
        if self.rest is not None:
            self._queue([self.rest], epoch=self.served_pass)
            self.rest = None
        if not self.started and self.pending_rows < n:
            self._start()
        while self.pending_rows < n:
            self._pull()
        merged = {k: np.concatenate([b[k] for b in self.pending]) for k in self.pending[0]}
        self.pending_rows -= n
        self.pending = [{k: v[n:] for k, v in merged.items()}] if self.pending_rows else []
        out = {k: v[:n] for k, v in merged.items()}
        passes = out[PASS]
        if "row_key" in out and n:  # a bare loop's arrays have no keys: nothing to resume from
            newest = int(passes.max())
            if newest != self.served_pass:
                self.served_pass, self.served_keys = newest, []
            self.served_keys.append(out["row_key"][passes == newest])
        return out

    def served(self) -> tuple[int, np.ndarray]:
        """The newest pass rows were served from, and the keys served of it so far."""
        keys = np.concatenate(self.served_keys) if self.served_keys else np.zeros(0, np.int64)
        return self.served_pass, keys


class BalancedBatches:
    """Batches with equal counts per modality (within one), cycling the small modalities.

    ``streams`` maps a modality to a function ``epoch -> iterator of numpy batches`` (a Ray Data shard's
    ``iter_batches``, or any iterator for a bare loop). ``cache_bytes`` bounds the pass of one modality kept in
    memory (0: every pass is streamed).
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
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.modalities = sorted(streams)
        self.streams = {m: _Stream(streams[m], cache_bytes, (seed, rank, m)) for m in self.modalities}
        self.batch_size = batch_size

    def counts(self, step: int) -> dict[str, int]:
        """Rows per modality in the batch for ``step``, the same on every worker: all workers then end a pass of a
        modality at the same step, as its next pass waits for every worker (Ray Data's epoch barrier of a split
        dataset), whereas counts that differed by rank would leave one worker in the barrier and the others in
        the gradient all-reduce. The extras rotate over steps instead, so over ``len(modalities)`` steps every
        modality gets the same number of rows."""
        extra = self.batch_size % len(self.modalities)
        return modality_counts(self.batch_size, self.modalities, step * extra)

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
        """The pass of each modality's newest rows (0 during the first)."""
        return {m: s.epoch for m, s in self.streams.items()}

    def served(self) -> dict[str, tuple[int, np.ndarray]]:
        """Per modality: the newest pass served from and the keys of its rows served so far (for a checkpoint)."""
        return {m: s.served() for m, s in self.streams.items()}

    def resume_passes(self, passes: Mapping[str, tuple[int, dict[str, np.ndarray], np.ndarray]]) -> None:
        """Per modality (pass, its rows left, its keys served before): each stream finishes that pass first."""
        for m, (epoch, rest, served) in passes.items():
            self.streams[m].resume_pass(epoch, rest, served)


class Prefetcher(Generic[T]):
    """``fetch(step)`` for the steps ``start .. stop - 1``, each run in a background thread while the caller works
    on the step before (one step ahead), so that the next batch is read, merged and pinned during the current step.

    An exception raised by ``fetch`` is raised again by ``get`` of its step; ``close`` stops the thread (after the
    fetch in progress, if any).
    """

    def __init__(self, fetch: Callable[[int], T], start: int, stop: int) -> None:
        self._next, self._stop_step = start, stop
        self._ready: queue.SimpleQueue[tuple[T | None, BaseException | None]] = queue.SimpleQueue()
        self._room = threading.Semaphore(1)  # released when a result is taken: at most one waits
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fetch,), name="mermed-prefetch", daemon=True)
        self._thread.start()

    def _run(self, fetch: Callable[[int], T]) -> None:
        for step in range(self._next, self._stop_step):
            while not self._room.acquire(timeout=0.1):
                if self._stopping.is_set():
                    return
            if self._stopping.is_set():
                return
            try:
                self._ready.put((fetch(step), None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                self._ready.put((None, err))
                return

    def get(self, step: int) -> T:
        """The result for ``step``, waiting for it if need be; steps come in order."""
        if self._stopping.is_set():
            raise RuntimeError("the prefetcher is closed")
        if step != self._next or step >= self._stop_step:
            raise ValueError(f"step {step} asked of a prefetcher at step {self._next} (stop {self._stop_step})")
        value, err = self._ready.get()
        if err is not None:
            self._stop_step = step  # the thread has ended
            raise err
        self._next += 1
        self._room.release()
        return cast(T, value)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()
