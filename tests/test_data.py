"""The data path: seeded per-pass shuffles, rank-independent balanced counts, whole-image decoding, prefetching."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import tiny_config
from PIL import Image

from ingest.config import ConfigError, IngestConfig
from ingest.pipeline import run_ingest
from ingest.samples import make_sample_corpus
from ingest.schema import MANIFEST
from mermed.data import (
    BalancedBatches,
    Prefetcher,
    decode_batch,
    decode_letterbox,
    decode_square,
    decoded_dataset,
    pass_seed,
    shard_uris,
)

KEY = b"data-test-key-0123456789abcdef0123"

Source = Callable[[int], Iterator[dict[str, np.ndarray]]]


def _source(ids: np.ndarray, chunk: int = 3, calls: list[int] | None = None) -> Source:
    """Rows ``ids`` in storage order, ``chunk`` at a time, every pass; the passes asked for go to ``calls``."""

    def passes(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        if calls is not None:
            calls.append(epoch)
        for i in range(0, len(ids), chunk):
            yield {"id": ids[i : i + chunk]}

    return passes


def _passes(batches: BalancedBatches, rows: int, n: int) -> list[list[int]]:
    """The ids of the first ``n`` passes of a one-modality stream, ``rows`` rows each, as drawn step after step."""
    drawn: list[int] = []
    step = 0
    while len(drawn) < rows * n:
        drawn += batches.next(step)[0]["id"].tolist()
        step += 1
    return [drawn[i * rows : (i + 1) * rows] for i in range(n)]


# ----------------------------------------------------------------------------------------------- shuffles


def test_cached_passes_are_seeded_permutations_from_the_first():
    """A modality that fits the cache: every pass, the first included, permutes all rows, by (seed, pass)."""
    ids = np.arange(10)

    def passes(seed: int, rank: int = 0) -> list[list[int]]:
        batches = BalancedBatches({"A": _source(ids)}, 4, rank=rank, world_size=2, cache_bytes=1 << 20, seed=seed)
        return _passes(batches, len(ids), 3)

    first = passes(seed=5)
    assert all(sorted(p) == ids.tolist() for p in first)  # every row exactly once per pass
    assert first[0] != ids.tolist()  # the first pass is shuffled too, not served in storage order
    assert first[0] != first[1] != first[2]
    assert passes(seed=5) == first  # same seed and pass: same order
    assert passes(seed=6) != first and passes(seed=5, rank=1) != first


def test_streamed_passes_come_from_the_source_pass_by_pass():
    """Too big for the cache: each pass is the source's pass of that number (it shuffles by the pass itself)."""
    ids, calls = np.arange(10), []
    batches = BalancedBatches({"A": _source(ids, calls=calls)}, 4, cache_bytes=0)
    assert _passes(batches, len(ids), 3) == [ids.tolist()] * 3
    assert calls == [0, 1, 2, 3]  # the fourth pass starts as the third runs out


@pytest.fixture(scope="module")
def derm_shards(ray_session, tmp_path_factory) -> str:
    """Twelve dermoscopy images through the real ingest, its one shard then cut into four (so that the shard
    order matters; enough images for several shards would take long to make)."""
    raw = tmp_path_factory.mktemp("raw")
    info = make_sample_corpus(raw, per_class=6, size=32, seed=2, slide_size=256, ct_slices=2)
    out = tmp_path_factory.mktemp("shards")
    run_ingest([str(info.root / "derm")], str(out), IngestConfig(), key=KEY)
    (shard,) = shard_uris([str(out)])
    table = pq.read_table(shard)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"] = []
    for i in range(4):
        rel = f"modality=DERM/part-{i + 1:05d}.parquet"
        pq.write_table(table.slice(3 * i, 3), out / rel)
        manifest["shards"].append(rel)
    Path(shard).unlink()
    (out / MANIFEST).write_text(json.dumps(manifest))
    return str(out)


def test_ray_stream_is_shuffled_per_pass_by_seed_and_pass(derm_shards):
    """What a worker streams of a modality too big for the cache: shards in a seeded order, a new one at every
    pass, through a local shuffle buffer seeded by the pass. Same seed and pass give the same order (the order
    is kept, as under run.deterministic_data); another pass another order; each pass has every row once."""

    def dataset(shuffle_seed: int | None):
        ds = decoded_dataset([derm_shards], 16, shuffle_seed=shuffle_seed)
        ds.context.execution_options.preserve_order = True
        return ds

    def one_pass(ds, epoch: int | None) -> list[str]:
        shuffle = {} if epoch is None else {"local_shuffle_buffer_size": 4, "local_shuffle_seed": pass_seed(0, epoch)}
        batches = ds.iter_batches(batch_size=2, batch_format="numpy", **shuffle)
        return [hashlib.sha256(p.tobytes()).hexdigest() for b in batches for p in b["pixels"]]

    stored = one_pass(dataset(None), None)
    assert len(set(stored)) == len(stored) == 12
    shuffled = dataset(shuffle_seed=3)
    first, second = one_pass(shuffled, 0), one_pass(shuffled, 1)  # Ray's passes 0 and 1 of one dataset
    assert sorted(first) == sorted(second) == sorted(stored)
    assert first != stored and second != first
    shards_only = one_pass(dataset(shuffle_seed=3), None)  # the shards reordered, each one's rows kept together
    assert shards_only != stored and {tuple(shards_only[i : i + 3]) for i in range(0, 12, 3)} == {
        tuple(stored[i : i + 3]) for i in range(0, 12, 3)
    }
    assert one_pass(dataset(shuffle_seed=3), 0) == first


# ----------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(("batch_size", "n"), [(4, 3), (5, 3), (7, 2), (6, 3), (17, 7), (9, 4)])
def test_counts_are_the_same_on_every_rank_and_balanced_over_a_period(batch_size, n):
    modalities = [f"M{i}" for i in range(n)]
    streams = {m: _source(np.arange(3)) for m in modalities}
    ranks = [BalancedBatches(streams, batch_size, rank=r, world_size=3) for r in range(3)]
    for step in range(50):
        counts = ranks[0].counts(step)
        assert all(b.counts(step) == counts for b in ranks[1:]), step
        assert sum(counts.values()) == batch_size and max(counts.values()) - min(counts.values()) <= 1
    for start in range(10):  # every window of one period, on all ranks together
        total: Counter[str] = Counter()
        for step in range(start, start + n):
            for b in ranks:
                total.update(b.counts(step))
        assert max(total.values()) - min(total.values()) <= 1, start


def test_every_rank_starts_a_new_pass_at_the_same_step():
    """Equal per-worker passes (Ray's equal split) and rank-independent counts: each worker asks its streams for
    a new pass at the same step, so none waits in Ray Data's epoch barrier while another is in the all-reduce."""
    rows = {"A": 7, "B": 11, "C": 3}

    def boundaries(rank: int) -> dict[str, list[int]]:
        calls: dict[str, list[int]] = {m: [] for m in rows}
        steps: dict[str, list[int]] = {m: [] for m in rows}
        streams = {m: _source(np.arange(n) + 100 * rank, chunk=2, calls=calls[m]) for m, n in rows.items()}
        batches = BalancedBatches(streams, 8, rank=rank, world_size=2, cache_bytes=0)
        for step in range(40):
            before = {m: len(c) for m, c in calls.items()}
            batches.next(step)
            for m in rows:
                steps[m] += [step] * (len(calls[m]) - before[m])
        return steps

    zero, one = boundaries(0), boundaries(1)
    assert zero == one
    assert all(len(s) >= 5 for s in zero.values())  # several pass boundaries of every modality


# ----------------------------------------------------------------------------------------------- decoding


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_letterbox_keeps_the_whole_wide_image_with_its_valid_box():
    """A 200 x 50 image with red left and blue right ends: both ends survive (a centre crop drops them), centred
    on zeros, with the box x0, y0, x1, y1 where the image is."""
    wide = np.full((50, 200, 3), 128, np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, -20:] = (0, 0, 255)
    pixels, valid = decode_letterbox(_png(wide), 40)
    assert pixels.shape == (40, 40, 3) and pixels.dtype == np.uint8
    assert valid.dtype == np.int32 and valid.tolist() == [0, 15, 40, 25]
    x0, y0, x1, y1 = valid
    for y in (y0, y1 - 1):  # the four corners of the image
        assert pixels[y, x0].tolist() == [255, 0, 0] and pixels[y, x1 - 1].tolist() == [0, 0, 255]
    inside = np.zeros((40, 40), bool)
    inside[y0:y1, x0:x1] = True
    assert not pixels[~inside].any()  # zero padding, which MultiCrop's rotation reads as the fill
    cropped = decode_square(_png(wide), 40)
    assert not (cropped[..., 2] > 200).any()  # what the centre crop loses

    tall = np.full((90, 30), 200, np.uint8)
    _, valid = decode_letterbox(_png(tall), 30)
    assert valid.tolist() == [10, 0, 20, 30]


def test_decode_batch_returns_a_valid_column():
    images = [_png(np.zeros((10, 40, 3), np.uint8)), _png(np.zeros((40, 40), np.uint8))]
    hashes = np.array(["00000000000000ff" + "0" * 48, "ffffffffffffffff" + "a" * 48])
    batch = {"image": images, "modality": np.array(["DERM", "OCT"]), "channels": np.array([3, 1])}
    batch["pixel_sha256"] = hashes
    out = decode_batch(batch, 20)
    assert out["pixels"].shape == (2, 20, 20, 3) and out["valid"].dtype == np.int32
    assert out["valid"].tolist() == [[0, 7, 20, 12], [0, 0, 20, 20]]
    assert out["grayscale"].tolist() == [False, True]
    assert out["row_key"].tolist() == [255, -1]  # the hash's first 64 bits, as int64
    empty = decode_batch({"image": [], "modality": np.array([]), "channels": np.array([]), "pixel_sha256": []}, 20)
    assert empty["pixels"].shape == (0, 20, 20, 3) and empty["valid"].shape == (0, 4)


# ----------------------------------------------------------------------------------------------- prefetch


def _batches() -> BalancedBatches:
    streams = {m: _source(np.arange(n) + 100 * i) for i, (m, n) in enumerate({"A": 5, "B": 13, "C": 2}.items())}
    return BalancedBatches(streams, 7, cache_bytes=0, seed=1)


def test_prefetch_yields_the_batches_of_a_plain_loop():
    plain = _batches()
    expected = [plain.next(step) for step in range(20)][3:]
    ahead = _batches()
    ahead.fast_forward(3, {"A": 5, "B": 13, "C": 2})
    prefetch = Prefetcher(ahead.next, 3, 20)
    for step, (batch, counts) in zip(range(3, 20), expected, strict=True):
        got, got_counts = prefetch.get(step)
        assert got_counts == counts and all(np.array_equal(got[k], batch[k]) for k in batch), step
    with pytest.raises(ValueError, match="step 20"):
        prefetch.get(20)  # past the last step: an error, never a hang
    prefetch.close()


def test_prefetch_runs_one_step_ahead_and_stops_cleanly():
    fetched: list[int] = []

    def fetch(step: int) -> int:
        fetched.append(step)
        return step * step

    prefetch = Prefetcher(fetch, 0, 100)
    assert prefetch.get(0) == 0
    deadline = time.monotonic() + 10
    while 1 not in fetched and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert fetched == [0, 1]  # step 1 is assembled while step 0 runs, and no further
    prefetch.close()
    assert not any(t.name == "mermed-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        prefetch.get(1)


def test_prefetch_raises_the_error_of_its_step():
    def fetch(step: int) -> int:
        if step == 2:
            raise OSError("shard unreadable")
        return step

    prefetch = Prefetcher(fetch, 0, 10)
    assert [prefetch.get(0), prefetch.get(1)] == [0, 1]
    with pytest.raises(OSError, match="shard unreadable"):
        prefetch.get(2)
    with pytest.raises(ValueError):
        prefetch.get(3)
    prefetch.close()


# ----------------------------------------------------------------------------------------------- config


def test_data_config_is_strict():
    assert tiny_config().data.stream_cache_mb == 256
    assert tiny_config(**{"data.stream_cache_mb": 0}).data.stream_cache_mb == 0
    with pytest.raises(ConfigError, match="data.stream_cache_mb"):
        tiny_config(**{"data.stream_cache_mb": -1})
    with pytest.raises(ConfigError, match="data.cache_mb"):
        tiny_config(**{"data.cache_mb": 1})
