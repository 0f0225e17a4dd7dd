"""Reliability under faults: killed Ray workers, an object store that goes away mid-write, exact resume, and no
credential in anything a run writes.

Faults are real: a worker process of this session's Ray is found by its process title and SIGKILLed, a second
S3-compatible server is stopped while shards are written. Only processes descended from this test process are
ever signalled (other Ray clusters may share the machine).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import yaml
from helpers import (
    BRIGHT_DARK_SIZE,
    bright_dark_patients,
    checkpoint_registered,
    killing,
    killing_readers_of,
    proc_stat,
    tiny_config,
    write_ingest_output,
)
from safetensors.torch import load_file

from ingest.config import IngestConfig
from ingest.pipeline import MANIFEST, QUARANTINE, IngestError, ShardWriter, run_ingest
from ingest.samples import make_sample_corpus
from mermed.config import PretrainConfig
from mermed.data import BalancedBatches, split_counts
from pipelines.pretrain import run_pretrain

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
KEY = b"faults-test-key-0123456789abcdef"
PACKAGES = ("mermed", "ingest", "pipelines", "bench")
LOCAL = fsspec.filesystem("file")


# ----------------------------------------------------------------------------------------------- helpers


def _session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a subprocess started with ``start_new_session`` and its children)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if proc.name.isdigit() and int(proc_stat(proc.name)[3]) == sid and proc_stat(proc.name)[0] != "Z":
                found.append(int(proc.name))
    return found


def _end_session(sid: int, grace_s: float = 60) -> None:
    """Wait until the processes of session ``sid`` have exited (a local Ray outlives its driver for a moment,
    still writing logs), then kill what is left."""
    deadline = time.monotonic() + grace_s
    while _session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_processes(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_hashes(fs, out: str, manifest: dict) -> list[str]:
    hashes = []
    for rel in manifest["shards"]:
        with fs.open(f"{out}/{rel}", "rb") as fh:
            hashes += pq.read_table(fh, columns=["pixel_sha256"]).column(0).to_pylist()
    return hashes


COUNTS = ("discovered", "ingested", "quarantined", "duplicates", "rows", "modalities", "splits")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_sample_corpus(tmp_path_factory.mktemp("corpus") / "raw", per_class=2, size=64, seed=3, slide_size=512)


# ----------------------------------------------------------------------------------------------- ingest


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """OCT volumes of noise as multi-page TIFFs: every page is one row with its own pixel hash, each file keeps
    a read task busy long enough to be killed in the middle, and 16 files make tasks of two files (2 CPUs), so a
    task can die after it has handed over a first part of its rows."""
    root = tmp_path_factory.mktemp("volumes") / "raw"
    (root / "oct").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(16):
        tifffile.imwrite(root / "oct" / f"vol_{i:02d}.tif", rng.integers(0, 256, (5, 192, 192), dtype=np.uint8))
    return root


def test_killed_read_worker_is_retried_without_loss_or_duplicate(ray_session, volumes, tmp_path):
    """Ray Data retries the task of a killed read worker; the output equals that of a fault-free run."""
    clean = run_ingest([str(volumes)], str(tmp_path / "clean"), IngestConfig(), key=KEY).manifest
    with killing("ray::MapBatches(_read_batch)") as killed:
        faulted = run_ingest([str(volumes)], str(tmp_path / "faulted"), IngestConfig(), key=KEY).manifest
    assert killed, "no read task was running to be killed"
    assert {k: faulted[k] for k in COUNTS} == {k: clean[k] for k in COUNTS}
    assert faulted["rows"] == 80 and faulted["duplicates"] == 0 and faulted["quarantined"] == 0
    hashes = _shard_hashes(LOCAL, str(tmp_path / "faulted"), faulted)
    assert len(hashes) == len(set(hashes)) == 80
    assert hashes == _shard_hashes(LOCAL, str(tmp_path / "clean"), clean)  # same rows, same order


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(clean root, the same files plus a poison file, the poison file): 15 small OCT volumes make tasks of two
    files (2 CPUs), so the poison takes a good file down with it; its 120 pages keep it open long enough for
    the killer to see it on every attempt."""
    base = tmp_path_factory.mktemp("poison")
    rng = np.random.default_rng(11)
    clean, dirty = base / "clean" / "oct", base / "poisoned" / "oct"
    for folder in (clean, dirty):
        folder.mkdir(parents=True)
    for i in range(15):
        pages = rng.integers(0, 256, (2, 48, 48), dtype=np.uint8)
        for folder in (clean, dirty):
            tifffile.imwrite(folder / f"vol_{i:02d}.tif", pages)
    poison = dirty / "vol_07p.tif"  # sorts into the middle of the inputs
    tifffile.imwrite(poison, rng.integers(0, 256, (120, 256, 256), dtype=np.uint8))
    return clean.parent, dirty.parent, poison


def test_poison_input_that_kills_its_worker_is_quarantined_and_the_rest_ingested(ray_session, poisoned, tmp_path):
    """Every process that opens the poison file is SIGKILLed, on every attempt: after read_attempts its block is
    dropped, its inputs are read one per task, the poison is quarantined and everything else is ingested."""
    clean_root, dirty_root, poison = poisoned
    cfg = IngestConfig(read_attempts=2)
    clean = run_ingest([str(clean_root)], str(tmp_path / "clean"), cfg, key=KEY).manifest
    with killing_readers_of(poison) as killed:
        dirty = run_ingest([str(dirty_root)], str(tmp_path / "dirty"), cfg, key=KEY).manifest
    assert len(killed) == 4  # 2 attempts of the block, then 2 of the poison's own task
    assert (dirty["discovered"], dirty["ingested"], dirty["quarantined"]) == (16, 15, 1)
    assert dirty["rows"] == clean["rows"] == 30
    hashes = _shard_hashes(LOCAL, str(tmp_path / "dirty"), dirty)
    assert sorted(hashes) == sorted(_shard_hashes(LOCAL, str(tmp_path / "clean"), clean))
    (row,) = pq.read_table(tmp_path / "dirty" / QUARANTINE).to_pylist()
    assert (row["stage"], row["error_class"]) == ("read", "WorkerDied")
    assert row["message"] == "worker died while decoding (2 attempts in a task of its own)"
    assert "vol_07p" not in json.dumps(row)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_while_writing_shards_fails_clearly_and_keeps_the_previous_output(ray_session, volumes, tmp_path):
    """The output lives on a 1 MB tmpfs: a first small ingest fits, the next one (about 3 MB of shards) fills
    the disk. The error names the output, the previous output is byte-identical and readable, nothing half
    written is left, and the same run on a larger disk completes."""
    out = tmp_path / "out"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root: " + mounted.stderr.decode(errors="replace").strip())
    try:
        small = tmp_path / "small" / "oct"
        small.mkdir(parents=True)
        for name in ("vol_00.tif", "vol_01.tif"):
            shutil.copy(volumes / "oct" / name, small / name)
        first = run_ingest([str(small.parent)], str(out), IngestConfig(), key=KEY).manifest
        before = _files(out)
        with pytest.raises(IngestError, match=f"no space left on the device of {out}.*previous output"):
            run_ingest([str(volumes)], str(out), IngestConfig(), key=KEY)
        assert _files(out) == before
        assert json.loads((out / MANIFEST).read_text()) == first
        assert sum(pq.read_table(out / rel).num_rows for rel in first["shards"]) == first["rows"] == 10
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        again = run_ingest([str(volumes)], str(out), IngestConfig(), key=KEY).manifest
        assert again["rows"] == 80 and sorted(_files(out)) == sorted([MANIFEST, QUARANTINE, *again["shards"]])
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_object_store_stopped_mid_write_fails_clearly_and_rerun_completes(ray_session, corpus, tmp_path, monkeypatch):
    """Inputs stay local (read tasks need no endpoint); the output goes to a second S3 server, which stops right
    after the first shards are written."""
    import s3fs
    from botocore.exceptions import BotoCoreError
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        monkeypatch.setenv("MERMED_S3_ENDPOINT", endpoint)  # the driver writes the output
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # give up soon on a server that is gone
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        inputs = [str(corpus.root / m) for m in ("derm", "cfp")]
        cfg = IngestConfig(shard_bytes=1024)  # a shard per write: some are complete when the server stops
        out = f"s3://{bucket}/out"
        write = ShardWriter.write

        def write_then_stop(self, table):
            write(self, table)
            server.stop()

        monkeypatch.setattr(ShardWriter, "write", write_then_stop)
        with pytest.raises((OSError, BotoCoreError)) as err:
            run_ingest(inputs, out, cfg, key=KEY)
        assert "could not connect" in str(err.value).lower()
        assert "_staging-" in str(err.value) and "part-" in str(err.value)  # a shard write, not the clean-up
        monkeypatch.setattr(ShardWriter, "write", write)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto's store lives in this process: the bucket is as the stop left it
        fs.invalidate_cache()
        left = fs.find(f"{bucket}/out")
        assert left and all("/_staging-" in p for p in left)  # shards were written, but only where none reads

        local = run_ingest(inputs, str(tmp_path / "local"), cfg, key=KEY).manifest
        again = run_ingest(inputs, out, cfg, key=KEY).manifest
        assert {k: again[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
        fs.invalidate_cache()
        assert _shard_hashes(fs, f"{bucket}/out", again) == _shard_hashes(LOCAL, str(tmp_path / "local"), local)
        assert not [p for p in fs.find(f"{bucket}/out") if "/_staging-" in p]  # the failed run's leftovers too
    finally:
        server.stop()


def test_paths_escaping_the_root_are_refused(ray_session, corpus, tmp_path):
    """A symlinked directory that leads outside the root is quarantined, not walked; ``..`` in an --input is
    resolved to the directory it names (whose name gives the modality)."""
    root = tmp_path / "raw"
    shutil.copytree(corpus.root / "cfp", root / "cfp")
    (root / "cfp" / "empty").mkdir()
    shutil.copytree(corpus.root / "derm", tmp_path / "elsewhere" / "derm")
    (root / "cfp" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    m = run_ingest([str(root)], str(tmp_path / "out"), IngestConfig(), key=KEY).manifest
    assert m["modalities"] == {"CFP": len([p for p in (root / "cfp").iterdir() if p.suffix in (".png", ".dcm")])}
    q = pq.read_table(tmp_path / "out" / QUARANTINE).to_pylist()
    assert [r["error_class"] for r in q] == ["PathOutsideRoot"] and m["quarantined"] == 1

    plain = run_ingest([str(root / "cfp")], str(tmp_path / "plain"), IngestConfig(), key=KEY).manifest
    dotted = run_ingest([f"{root}/cfp/empty/.."], str(tmp_path / "dotted"), IngestConfig(), key=KEY).manifest
    assert {k: dotted[k] for k in COUNTS} == {k: plain[k] for k in COUNTS}
    assert _shard_hashes(LOCAL, str(tmp_path / "dotted"), dotted) == _shard_hashes(
        LOCAL, str(tmp_path / "plain"), plain
    )


# ----------------------------------------------------------------------------------------------- training


PIPELINE = {
    "run.steps": 6,
    "run.checkpoint_every": 2,
    "run.log_every": 1,
    "run.deterministic_data": True,
    "optim.batch_size_per_worker": 5,
    "optim.warmup_steps": 1,
}


def pipeline_config(**overrides) -> PretrainConfig:
    return tiny_config(**(PIPELINE | overrides))


@pytest.fixture(scope="module")
def shards(fresh_ray, corpus, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    inputs = [str(corpus.root / m) for m in ("derm", "oct")]
    run_ingest(inputs, str(out), IngestConfig(), labels_csv=str(corpus.labels_csv), key=KEY)
    return str(out)


def _final_state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1] / "state"
    return json.loads((latest / "meta.json").read_text())["step"], load_file(str(latest / "state.safetensors"))


def _logged_steps(run_dir: Path, key: str) -> list[int]:
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    history = mlflow.MlflowClient(saved["tracking_uri"]).get_metric_history(saved["run_id"], key)
    return sorted(m.step for m in history)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "cached"])
@pytest.mark.parametrize("stop", [4, 9, 17])
def test_a_resumed_pass_of_a_source_that_does_not_repeat_serves_each_row_once(cache_bytes, stop):
    """Without deterministic data a new process's source gives its passes in another order; a stream resumed from
    what it had ``served()`` serves the rest of the interrupted pass (``resume_pass``), then whole passes: every
    row of every pass once, none twice, and the pass ends where the uninterrupted one would have."""
    n = 11
    keys = np.arange(n, dtype=np.int64) * 7 + 1

    def source(salt: int) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
        def passes(epoch: int) -> Iterator[dict[str, np.ndarray]]:
            order = np.random.default_rng([salt, epoch]).permutation(n)  # another order in every process
            for i in range(0, n, 4):
                yield {"row_key": keys[order[i : i + 4]]}

        return passes

    def batches(salt: int) -> BalancedBatches:
        return BalancedBatches({"A": source(salt)}, 3, cache_bytes=cache_bytes, seed=salt)

    first = batches(0)
    trained = [first.next(t)[0] for t in range(stop)]
    epoch, served = first.served()["A"]
    rest = {"row_key": np.setdiff1d(keys, served)}
    resumed = batches(1)
    resumed.resume_passes({"A": (epoch, rest, served)})
    trained += [resumed.next(t)[0] for t in range(stop, 40)]
    rows = np.concatenate([b["row_key"] for b in trained])
    passes = np.concatenate([b["pass"] for b in trained])
    assert np.array_equal(passes, np.repeat(np.arange(len(rows) // n + 1), n)[: len(rows)]), "passes end on time"
    for p in range(passes.max()):  # every complete pass: each row once
        assert sorted(rows[passes == p]) == sorted(keys), p
    assert len(set(rows[passes == passes.max()])) == (passes == passes.max()).sum()


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "cached"])
def test_balanced_batches_fast_forward_continues_the_same_sequence(cache_bytes):
    """A resumed worker draws exactly the rows an uninterrupted one would, whether passes are re-streamed or
    served from the cache, across pass boundaries and with the extras rotating over two workers."""
    sizes = {"A": 5, "B": 13, "C": 2}

    def stream(modality: str, n: int) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
        def passes(epoch: int) -> Iterator[dict[str, np.ndarray]]:
            ids = np.arange(n) + 100 * ord(modality)
            for i in range(0, n, 3):
                yield {"id": ids[i : i + 3], "epoch": np.full(len(ids[i : i + 3]), epoch)}

        return passes

    def batches() -> BalancedBatches:
        streams = {m: stream(m, n) for m, n in sizes.items()}
        return BalancedBatches(streams, 7, rank=1, world_size=2, cache_bytes=cache_bytes, seed=3)

    reference = batches()
    expected = [reference.next(t)[0] for t in range(30)]
    for start in (1, 3, 11, 22):
        resumed = batches()
        resumed.fast_forward(start, sizes)
        for t in range(start, 30):
            got = resumed.next(t)[0]
            assert all(np.array_equal(got[k], expected[t][k]) for k in got), (start, t)


def _four_outputs(tmp_path: Path) -> list[str]:
    """Four ingest outputs of 6 random DERM and 6 OCT images each: several blocks for Ray's split to deal out."""
    rng = np.random.default_rng(5)
    data = []
    for k in range(4):
        for m in ("derm", "oct"):
            (tmp_path / f"raw{k}" / m).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
                tifffile.imwrite(tmp_path / f"raw{k}" / m / f"{i}.tif", pixels)
        data.append(str(tmp_path / f"shards{k}"))
        run_ingest([str(tmp_path / f"raw{k}" / m) for m in ("derm", "oct")], data[-1], IngestConfig(), key=KEY)
    return data


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_train_worker_resumes_exactly(shards, tmp_path, workers, monkeypatch):
    """Seeded data order: a run whose worker (one of two) is SIGKILLed after its first checkpoint restores it and
    ends with the same weights, memory queue, centre, optimiser and RNG state as an uninterrupted run. With two
    workers every modality is split between them and streamed (no cache), so each worker's rows come through
    Ray Data's streaming split on every pass, before and after the restart."""
    import pipelines.pretrain

    data = [shards]
    if workers > 1:
        monkeypatch.setattr(pipelines.pretrain, "SPLIT_MIN_ROWS_PER_WORKER", 2)
        data = _four_outputs(tmp_path)
    cfg = pipeline_config(**({"data.stream_cache_mb": 0} if workers > 1 else {}))
    storage = tmp_path / "runs"
    run_pretrain(cfg, data, str(storage), "clean", workers=workers, max_failures=0)

    with killing("ray::RayTrainWorker", checkpoint_registered(str(storage / "killed"))) as killed:
        result = run_pretrain(cfg, data, str(storage), "killed", workers=workers, max_failures=1)
    assert killed, "the run ended before its worker could be killed"
    assert result.steps == cfg.run.steps

    resumed_at = _logged_steps(storage / "killed", "resumed_at_step")
    assert len(resumed_at) == 1 and resumed_at[0] >= cfg.run.checkpoint_every
    steps = _logged_steps(storage / "killed", "loss")
    assert set(steps) == set(range(1, cfg.run.steps + 1))
    assert all(steps.count(s) == 1 for s in range(1, resumed_at[0] + 1))  # not redone from scratch
    if workers > 1:
        saved = json.loads((storage / "killed" / "mlflow_run.json").read_text())
        client = mlflow.MlflowClient(saved["tracking_uri"])
        for m in ("DERM", "OCT"):  # a pass boundary crossed in every modality
            assert max(x.value for x in client.get_metric_history(saved["run_id"], f"epoch_{m}")) >= 1, m

    clean_step, clean = _final_state(storage / "clean")
    killed_step, resumed = _final_state(storage / "killed")
    assert clean_step == killed_step == cfg.run.steps
    assert clean.keys() == resumed.keys()
    for prefix in ("student/", "teacher/", "memory/", "optimizer/", "rng/"):
        assert any(k.startswith(prefix) for k in clean), prefix
    for key, value in clean.items():
        if key in ("rng/numpy", "rng/python"):
            continue  # never seeded, never drawn from in a step: each process starts them at random
        # bit-identical on CPU; without the exact resume the memory and centre differ by >1e-3, weights by ~1e-5
        assert torch.allclose(value.double(), resumed[key].double(), rtol=0, atol=1e-6), key


def test_killed_worker_of_a_nondeterministic_run_neither_repeats_nor_skips_rows(fresh_ray, tmp_path, monkeypatch):
    """Without run.deterministic_data a 2-worker run whose worker is SIGKILLed after a checkpoint resumes each
    interrupted pass on the rows it had left: by the rows' keys that every worker logged (``run.row_log_dir``), each
    pass of each modality trains every row once (but the split's remainder, which Ray's equal split drops) and
    none twice, before and after the restart. Passes are streamed, through Ray's split on every pass (the cached
    form's resume is checked without Ray, above)."""
    import pipelines.pretrain

    monkeypatch.setattr(pipelines.pretrain, "SPLIT_MIN_ROWS_PER_WORKER", 2)
    data = _four_outputs(tmp_path)
    rows_log = tmp_path / "rows"
    cfg = pipeline_config(
        **{"run.deterministic_data": False, "run.steps": 8, "data.stream_cache_mb": 0},
        **{"run.row_log_dir": str(rows_log), "run.embedding_sample": 0},
    )
    storage = tmp_path / "runs"
    with killing("ray::RayTrainWorker", checkpoint_registered(str(storage / "nd"))) as killed:
        result = run_pretrain(cfg, data, str(storage), "nd", workers=2, max_failures=1)
    assert killed and result.steps == cfg.run.steps
    (resumed_at,) = _logged_steps(storage / "nd", "resumed_at_step")
    trained: dict[tuple[str, int], list[int]] = {}
    for path in rows_log.glob("*.tsv"):
        lines = [line.split("\t") for line in path.read_text().splitlines()]
        before = int(lines[0][0]) == 1  # the killed attempt's files start at step 1, the resumed one's after
        for step, modality, epoch, key in lines:
            if (int(step) <= resumed_at) == before:  # steps the killed attempt did after its checkpoint: redone
                trained.setdefault((modality, int(epoch)), []).append(int(key))
    counts = split_counts(data)
    for (modality, epoch), keys in trained.items():
        assert len(keys) == len(set(keys)), f"{modality} pass {epoch}: a row trained twice"
        n = sum(counts[modality].get(s, 0) for s in ("train", "val"))
        if (modality, epoch + 1) in trained:  # a complete pass
            assert n - len(keys) <= n % 2, f"{modality} pass {epoch}: {n - len(keys)} rows skipped"
    assert {m for m, e in trained if e >= 1} == {"DERM", "OCT"}, "a pass boundary crossed in every modality"


def test_checkpoint_store_stopped_mid_run_stops_clearly_and_rerun_resumes(shards, tmp_path, restart_ray):
    """The run's storage is a second S3 server that stops once the first checkpoint is complete: the next upload
    fails, the restarted worker cannot read its checkpoints and stops the run (no silent restart from step 0)
    with a message naming the kept checkpoint; on the server back, the first checkpoint is intact and the same
    command resumes from it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from mermed.checkpoints import restore_newest
    from mermed.train import build_train_state
    from pipelines.pretrain import PretrainError

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("MERMED_S3_ENDPOINT", "AWS_MAX_ATTEMPTS")}
    os.environ.update({"MERMED_S3_ENDPOINT": endpoint, "AWS_MAX_ATTEMPTS": "2"})
    restart_ray()  # the workers read the endpoint from their environment
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        cfg = pipeline_config(**{"run.steps": 40, "run.checkpoint_every": 10, "run.embedding_sample": 0})
        storage, stopped = f"s3://{bucket}/runs", []

        def complete() -> list[str]:
            """Checkpoints whose two files are both in the store (Ray uploads them one after the other)."""
            fs.invalidate_cache()
            with contextlib.suppress(Exception):
                files = fs.glob(f"{bucket}/runs/s3run/checkpoint_*/state/*")
                dirs = {f.rsplit("/", 1)[0] for f in files}
                return sorted(d for d in dirs if {f"{d}/meta.json", f"{d}/state.safetensors"} <= set(files))
            return []

        def stop_after_first_checkpoint() -> None:
            while not complete():
                time.sleep(0.05)
            stopped.extend(complete())
            server.stop()

        thread = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
        thread.start()
        with pytest.raises(PretrainError, match=f"newest complete checkpoint under {storage}/s3run is kept") as err:
            run_pretrain(cfg, [shards], storage, "s3run", workers=1, max_failures=1, workdir=str(tmp_path))
        thread.join()
        # the cause is the store: the upload or the controller's checkpoint index, or the restarted worker's restore
        assert re.search("Could not connect|CheckpointStorageError|cannot read checkpoint", str(err.value)), err.value
        assert len(stopped) == 1

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto's store lives in this process: the bucket is as the stop left it
        state = build_train_state(cfg, device=torch.device("cpu"), world_size=1, total_steps=cfg.run.steps)
        first = stopped[0].rsplit("/state", 1)[0]
        assert restore_newest(state, f"{storage}/s3run", f"s3://{first}") == f"s3://{first}" and state.step == 10
        result = run_pretrain(cfg, [shards], storage, "s3run", workers=1, max_failures=0, workdir=str(tmp_path))
        assert result.steps == cfg.run.steps
        resumed_at = [
            m.step
            for m in mlflow.MlflowClient(result.tracking_uri).get_metric_history(
                result.mlflow_run_id, "resumed_at_step"
            )
        ]
        assert resumed_at and min(resumed_at) >= 10
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        restart_ray()


class _TrackingServer:
    """A real ``mlflow server`` on 127.0.0.1 over a sqlite store, which the test can stop and start again."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._args = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)),
            *("--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"),
            *("--artifacts-destination", str(root / "artifacts")),
        ]
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        import requests

        self._proc = subprocess.Popen(
            self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            time.sleep(0.2)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            _end_session(self._proc.pid, grace_s=10)
            self._proc = None


def _outage(
    server: _TrackingServer,
    ready: Callable[[], bool],
    times: list[float],
    seconds: float = 10,
    back: Callable[[], bool] | None = None,
) -> None:
    """Once ``ready()``: kill the server, start it again ``seconds`` later (or once ``back()``, within 180 s);
    ``times`` gets when it went and came."""
    while not ready():
        time.sleep(0.1)
    server.stop()
    times.append(time.time())
    if back is None:
        time.sleep(seconds)
    else:
        deadline = time.monotonic() + 180
        while not back() and time.monotonic() < deadline:
            time.sleep(0.2)
    server.start()
    times.append(time.time())


def _worker_log_lines(text: str) -> int:
    """Lines of this session's Ray worker logs that contain ``text``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(p.read_text(errors="replace").count(text) for p in logs.glob("worker-*"))


def test_tracking_server_that_goes_away_mid_run_loses_no_metric(shards, tmp_path):
    """A real tracking server is SIGKILLed once the run's first metrics are in, and started again once the run has
    written two checkpoints meanwhile (not after a fixed time: on a loaded machine seconds can pass without a
    step). Training goes on meanwhile, the metrics of those steps arrive once it is back (each step once), the
    worker warns once that it is away and once that it is back, and the run's encoder and status are recorded."""
    server = _TrackingServer(tmp_path)
    server.start()
    cfg = pipeline_config(
        **{"run.steps": 40, "run.checkpoint_every": 10, "tracking.mlflow_uri": server.uri, "tracking.retry_s": 0.5}
    )
    storage = tmp_path / "runs"
    outage: list[float] = []

    def logged() -> int:
        with contextlib.suppress(Exception):  # the run has not started logging yet
            return max(_logged_steps(storage / "outage", "loss"), default=0)
        return 0

    def two_checkpoints_since() -> bool:  # so at least checkpoint_every steps were taken while it was away
        written = []
        for meta in (storage / "outage").glob("checkpoint_*/state/meta.json"):
            with contextlib.suppress(OSError):  # one rotated out meanwhile
                written.append(meta.stat().st_mtime > outage[0])
        return sum(written) >= 2

    back = {"back": two_checkpoints_since}
    thread = threading.Thread(target=_outage, args=(server, lambda: logged() >= 2, outage), kwargs=back, daemon=True)
    warned_before = _worker_log_lines("tracking server unreachable")
    try:
        thread.start()
        result = run_pretrain(cfg, [shards], str(storage), "outage", workers=1, max_failures=0)
        thread.join()
        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(result.mlflow_run_id)
        history = client.get_metric_history(result.mlflow_run_id, "loss")
    finally:
        server.stop()
    assert len(outage) == 2, "the run ended before the server could be stopped"
    assert run.info.status == "FINISHED" and run.data.tags["mermed.encoder"] == result.encoder_uri
    assert sorted(m.step for m in history) == list(range(1, cfg.run.steps + 1))
    during = [m.step for m in history if outage[0] * 1000 < m.timestamp < outage[1] * 1000]
    assert len(during) >= 3, "no step was taken while the server was away"
    assert _worker_log_lines("tracking server unreachable") - warned_before == 1
    assert _worker_log_lines("tracking server back after") >= 1


def test_tracking_server_that_goes_away_mid_sweep_loses_no_trial(fresh_ray, tmp_path, caplog):
    """The same outage during a probe job's Tune sweep: once the first trial's run is in, the server is killed,
    and started again once the sweep's trials are all done, so that their results and ends all wait for it. The
    sweep goes on, the trials' runs, metrics and ends arrive once it is back (and no stray run), and the job's
    results and status are recorded."""
    from ingest.config import parse_config
    from mermed.models import build_backbone, export_encoder
    from mermed.probe.config import ProbeConfig
    from pipelines.probe import run_probe

    server = _TrackingServer(tmp_path)
    server.start()
    data = write_ingest_output(tmp_path / "data", bright_dark_patients())
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [{"name": "bright", "data": str(data), "type": "binary"}]}))
    encoder = tmp_path / "run" / "encoder.safetensors"
    encoder.parent.mkdir()
    export_encoder(
        build_backbone("vit_tiny_patch16_224", BRIGHT_DARK_SIZE),
        encoder,
        model_name="vit_tiny_patch16_224",
        img_size=BRIGHT_DARK_SIZE,
    )
    cfg = parse_config(
        ProbeConfig,
        {
            "trials": 4,
            "fractions": [1.0],
            "heads_per_trial": 1,
            "search": {"epochs": [30], "grace_period": 30, "hidden": [32], "batch_size": 64},
            "tracking": {"mlflow_uri": server.uri, "retry_s": 0.5},
        },
    )
    outage: list[float] = []

    def trial_runs() -> list:
        with contextlib.suppress(Exception):  # the experiment does not exist yet
            client = mlflow.MlflowClient(server.uri)
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            return client.search_runs([experiment.experiment_id], "tags.trial_name != ''")
        return []

    def sweep_done() -> bool:  # the sweep's closing progress line, logged before its tracking calls are sent
        return any(r.getMessage().startswith("sweep: 4/4 trials") for r in list(caplog.records))

    back = {"back": sweep_done}
    thread = threading.Thread(
        target=_outage, args=(server, lambda: bool(trial_runs()), outage), kwargs=back, daemon=True
    )
    try:
        thread.start()
        with caplog.at_level("INFO", logger="mermed"):
            result = run_probe(encoder, tasks, tmp_path / "out", cfg, baselines=[])
        thread.join()
        client = mlflow.MlflowClient(server.uri)
        parent = client.get_run(result.parent_run_id)
        trials = trial_runs()
        every_run = client.search_runs([parent.info.experiment_id])
    finally:
        server.stop()
    assert len(outage) == 2, "the job ended before the server could be stopped"
    assert parent.info.status == "FINISHED"
    assert any(k.endswith(".test_auroc") for k in parent.data.metrics)
    assert len(trials) == 4 and all(t.info.status == "FINISHED" and "val_auroc" in t.data.metrics for t in trials)
    assert all(t.data.tags["mlflow.parentRunId"] == result.parent_run_id for t in trials)
    assert all(t.data.params["cell"] == "bright-pretrained-f1-s0" for t in trials)
    assert len(every_run) == 1 + len(trials), [r.info.run_name for r in every_run]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("tracking server unreachable" in w for w in warnings) == 1, warnings
    assert sum("tracking server back" in w for w in warnings) == 1, warnings


# ----------------------------------------------------------------------------------------------- security


def _readable_bytes(path: Path) -> list[bytes]:
    """A file's bytes, plus for Parquet its decoded non-image columns (zstd hides text from a byte scan)."""
    data = [path.read_bytes()]
    if path.suffix == ".parquet":
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=[c for c in schema.names if c != "image"])
        data.append(json.dumps(table.to_pylist(), default=str).encode())
    return data


def test_no_credential_in_anything_a_run_writes(s3_server, corpus, tmp_path):
    """``mermed ingest`` (inputs on S3) and ``mermed pretrain`` run with unique credentials in their environment,
    on their own Ray (so that every worker has them too); no byte they write or log holds one: outputs, the
    MLflow store, checkpoints, their console output and every file under their Ray temp dir."""
    import s3fs

    secrets = {
        "AWS_SECRET_ACCESS_KEY": f"s3secret{uuid.uuid4().hex}",
        "MLFLOW_TRACKING_TOKEN": f"mlflowtoken{uuid.uuid4().hex}",
        "MERMED_DEID_KEY": f"deidkey{uuid.uuid4().hex}",
    }
    # Names that must be found where the secrets are looked for: proof that the scan reads what was written.
    dataset, run = f"dataset{uuid.uuid4().hex[:12]}", f"run{uuid.uuid4().hex[:12]}"
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(bucket)
    for m in ("derm", "oct"):
        fs.put(str(corpus.root / m), f"{bucket}/raw/{m}", recursive=True)
    config = tmp_path / "tiny.yaml"
    tiny = pipeline_config(**{"run.steps": 1, "run.checkpoint_every": 1})
    config.write_text(yaml.safe_dump(tiny.model_dump(mode="json")))
    ray_tmp = Path(tempfile.mkdtemp(prefix="mf-", dir="/tmp"))  # short: Ray's socket paths must stay short
    env = {**os.environ, **secrets, "RAY_TMPDIR": str(ray_tmp), "AWS_ENDPOINT_URL": s3_server}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MERMED_DEID_KEY_FILE", "MERMED_S3_ENDPOINT"):
        env.pop(name, None)
    inputs = ["-i", f"s3://{bucket}/raw/derm", "-i", f"s3://{bucket}/raw/oct"]
    commands = [
        ["ingest", *inputs, "-o", "shards", "--dataset", dataset, "-v"],
        ["pretrain", "--config", str(config), "-d", "shards", "--storage", "runs", "--name", run, "-v"],
    ]
    # Both commands in one process, as `mermed` runs them, so that one local Ray is started instead of two.
    script = (
        "import json, sys\n"
        "from pipelines.cli import app\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    if code := app(argv, standalone_mode=False):\n"
        "        sys.exit(code)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(commands)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = proc.communicate(timeout=500)
        finally:
            proc.kill()
            _end_session(proc.pid)  # its Ray's last log lines are part of what is scanned
        assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
        assert (tmp_path / "runs" / run / "encoder.safetensors").is_file()
        assert (tmp_path / "runs" / "mlflow.db").is_file()
        written = [p for top in (tmp_path, ray_tmp) for p in top.rglob("*") if p.is_file() and not p.is_symlink()]
        blobs = {str(p): _readable_bytes(p) for p in written} | {"console": [stdout, stderr]}
        found = {
            name: {where for where, data in blobs.items() if any(name.encode() in b for b in data)}
            for name in (dataset, run)
        }
        assert any(w.endswith(".parquet") for w in found[dataset]) and any(str(ray_tmp) in w for w in found[run])
        for name, secret in secrets.items():
            leaks = [where for where, data in blobs.items() if any(secret.encode() in b for b in data)]
            assert not leaks, f"{name} written to {leaks}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


_PICKLERS = ("pickle", "_pickle", "cloudpickle", "dill")
_UNPICKLING = ("load", "loads", "Unpickler")


def _unsafe_loads(source: str) -> list[str]:
    """Calls that may unpickle: ``torch.load`` without ``weights_only=True``, ``np.load(allow_pickle=True)``,
    ``pickle.load/loads/Unpickler`` (also cloudpickle, dill) used or imported by name. Importing ``pickle`` for its
    exception classes is harmless and allowed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in (*_UNPICKLING, "*")]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in _UNPICKLING
            and ast.unparse(node.value).split(".")[0] in _PICKLERS
        ):
            found.append(ast.unparse(node))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if owner == "torch" and kwargs.get("weights_only") != "True":
                found.append(ast.unparse(node))
            if owner in ("np", "numpy") and kwargs.get("allow_pickle", "False") != "False":
                found.append(ast.unparse(node))
    return found


def test_checkpoints_and_inputs_are_never_unpickled():
    assert _unsafe_loads("import torch\ntorch.load(path)") == ["torch.load(path)"]  # the check can fail
    assert sorted(_unsafe_loads("np.load(p, allow_pickle=True)\npickle.loads(b)\nfrom dill import load")) == [
        "from dill import load",
        "np.load(p, allow_pickle=True)",
        "pickle.loads",
    ]
    assert not _unsafe_loads("import pickle\nerror = pickle.UnpicklingError")
    assert not _unsafe_loads("torch.load(path, weights_only=True)\nnp.load(p)")
    sources = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(sources) > 10
    unsafe = {str(p.relative_to(ROOT)): found for p in sources if (found := _unsafe_loads(p.read_text()))}
    assert not unsafe


def test_trial_end_while_tracking_server_is_away_is_sent_once_it_is_back(tmp_path, caplog):
    """The sweep's logger against a real server that is killed between a trial's last result and its end: the end
    waits and is sent once the server is back, so the trial's run is FINISHED, not left RUNNING. (Ray's own
    ``end_run`` takes an unreachable server for a missing run and silently ends none.)"""
    from ray.tune.experiment import Trial

    from mermed.config import TrackingConfig
    from mermed.probe.sweep import mlflow_logger

    server = _TrackingServer(tmp_path)
    server.start()
    tracking = TrackingConfig(mlflow_uri=server.uri, retry_s=0.5)
    logger = mlflow_logger(
        {"cell-a": {"task": "a"}}, tracking, tracking_uri=server.uri, experiment_name="away", save_artifact=False
    )
    trial = Trial("probe_trial", config={"cell": "cell-a", "heads": [{"lr": 0.01}]}, stub=True)
    try:
        logger.setup()
        logger.log_trial_start(trial)
        logger.log_trial_result(1, trial, {"training_iteration": 1, "val_auroc": 0.75})
        server.stop()
        with caplog.at_level("WARNING", logger="mermed"):
            logger.log_trial_end(trial)
            server.start()
            logger.on_experiment_end([trial])
        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("away")
        runs = client.search_runs([experiment.experiment_id])
    finally:
        server.stop()
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_auroc"] == 0.75 and run.data.tags["task"] == "a"
    assert run.data.params["cell"] == "cell-a"
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("tracking server unreachable" in w for w in warnings) == 1, warnings
