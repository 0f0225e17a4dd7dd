"""What several test modules share: the tiny pretraining config, a CPU process group, process killers, and a
tiny labelled ingest output (bright vs dark images) for probe jobs."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
import torch.multiprocessing as mp

from ingest.config import parse_config
from ingest.schema import ROW_SCHEMA, encode_image
from mermed.config import PretrainConfig

# ViT-Tiny at 32/16 px with a small head and a 32-row memory: a CPU step takes ~0.1 s.
TINY = {
    "model": {"name": "vit_tiny_patch16_224", "out_dim": 64, "bottleneck": 16, "hidden": 32, "drop_path": 0.1},
    "crops": {"n_global": 2, "n_local": 2, "global_size": 32, "local_size": 16, "decode_size": 40},
    "loss": {"warmup_teacher_temp_steps": 3},
    "memory": {"size": 32, "n_blocks": 4},
    "optim": {"batch_size_per_worker": 4, "base_lr": 5e-3, "warmup_steps": 2, "freeze_last_layer_steps": 1},
    "run": {"steps": 10, "seed": 0, "precision": "fp32", "cpus_per_worker": 0.5},
    "tracking": {"experiment": "mermed-pretrain-test"},
}


def tiny_config(**overrides: Any) -> PretrainConfig:
    """The tiny config with overrides: a section name maps to a dict merged into it (``optim={"lr": ...}``),
    a dotted name sets one field (``**{"run.steps": 4}``)."""
    data = {section: dict(values) for section, values in TINY.items()}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = {**data.get(section, {}), **value}
    return parse_config(PretrainConfig, data)


def _ddp_entry(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, results, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ddp(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined by gloo; their (picklable)
    results in rank order. ``fn`` must be a module-level function."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_entry, args=(fn, world_size, init_file, results, args), nprocs=world_size, join=True)
        return [results[rank] for rank in range(world_size)]


def proc_stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _parent(pid: int) -> int:
    return int(proc_stat(pid)[1])


def _own_processes(title: str) -> list[int]:
    """Pids of processes descended from this one whose title (Ray sets ``ray::<task or actor>``) starts with
    ``title``."""
    me, found = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").startswith(title):
                continue
            pid = int(proc.name)
            while pid > 1 and pid != me:
                pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        if pid == me:
            found.append(int(proc.name))
    return sorted(found)


@contextlib.contextmanager
def _hunting(hunt_once: Callable[[], bool], interval_s: float) -> Iterator[None]:
    """While the body runs, call ``hunt_once()`` every ``interval_s`` in a thread, until it returns True."""
    done = threading.Event()

    def hunt() -> None:
        while not done.is_set() and not hunt_once():
            done.wait(interval_s)

    thread = threading.Thread(target=hunt, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def killing(title: str, ready: Callable[[], bool] = lambda: True) -> Iterator[list[int]]:
    """While the body runs, SIGKILL the first of our processes titled ``title`` once ``ready()``; yields the
    killed pids (one, or none when the body ended first)."""
    killed: list[int] = []

    def hunt_once() -> bool:
        if ready():
            for pid in _own_processes(title)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return bool(killed)

    with _hunting(hunt_once, 0.02):
        yield killed


def checkpoint_registered(run_dirs: str) -> Callable[[], bool]:
    """True once Ray Train has registered a checkpoint of a run matching the glob ``run_dirs`` (it writes its
    snapshot then): the moment a killed worker must resume from, read from storage rather than from a metric log,
    which can trail the run by more than the run has left on a loaded machine."""
    return lambda: bool(glob.glob(os.path.join(run_dirs, "checkpoint_manager_snapshot.json")))


@contextlib.contextmanager
def killing_readers_of(path: str | Path) -> Iterator[list[int]]:
    """While the body runs, SIGKILL each of our Ray workers as soon as it has ``path`` open, every time one does:
    a file whose decoding kills its worker, with no hook in the product. Yields the killed pids."""
    target = os.path.realpath(path)
    killed: list[int] = []

    def holds(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return any(os.readlink(fd) == target for fd in Path(f"/proc/{pid}/fd").iterdir())
        return False

    def hunt_once() -> bool:
        for pid in _own_processes("ray::"):
            if holds(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return False  # every attempt, until the body ends

    with _hunting(hunt_once, 0.005):
        yield killed


# ----------------------------------------------------------------------------------------------- probe data

BRIGHT_DARK_SIZE = 32


def _bright_or_dark(rng: np.random.Generator, bright: bool) -> bytes:
    base = 170 if bright else 80
    noise = rng.normal(0, 25, (BRIGHT_DARK_SIZE, BRIGHT_DARK_SIZE))
    return encode_image(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_ingest_output(root: Path, patients: dict[str, tuple[str, list[str | None]]], seed: int = 0) -> Path:
    """An ingest output as the ingest stage commits it: one CXR shard and ``_manifest.json``.

    ``patients`` maps a patient pseudonym to (split, labels of its rows); label "1" is a bright image, "0" and
    None (unlabelled) dark ones. A patient named ``anon-*`` has no patient_id (grouped by its source).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for patient, (split, labels) in patients.items():
        for i, label in enumerate(labels):
            rows.append(
                {
                    "image": _bright_or_dark(rng, label == "1"),
                    "height": BRIGHT_DARK_SIZE,
                    "width": BRIGHT_DARK_SIZE,
                    "channels": 1,
                    "modality": "CXR",
                    "dataset": "synthetic",
                    "source": f"src-{patient}-{i}",
                    "patient_id": None if patient.startswith("anon") else patient,
                    "label": label,
                    "split": split,
                }
            )
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    shard = "modality=CXR/part-00000.parquet"
    (root / "modality=CXR").mkdir(parents=True)
    pq.write_table(table, root / shard)
    splits: dict[str, int] = {}
    for r in rows:
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    manifest = {
        "rows": len(rows),
        "modalities": {"CXR": len(rows)},
        "splits": {"CXR": splits},
        "shards": [shard],
        "config_hash": "c" * 64,
        "inputs_hash": f"{seed:064d}",
    }
    (root / "_manifest.json").write_text(json.dumps(manifest))
    return root


def bright_dark_patients(n_train: int = 16, n_val: int = 6, n_test: int = 8) -> dict[str, tuple[str, list[str | None]]]:
    """Patients with two bright and two dark images each, plus unlabelled rows of other patients."""
    cohort: dict[str, tuple[str, list[str | None]]] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            cohort[f"{split}-p{i}"] = (split, ["0", "1", "0", "1"])
    cohort["anon-test"] = ("test", ["1", "0"])  # no patient id: grouped by source
    cohort["pretrain-only"] = ("train", [None] * 6)
    return cohort


def e2e_directory_loop() -> bytes:
    """A Heidelberg .e2e whose main directory names itself as the previous one: a reader that walks the chain
    (oct-converter's E2E) would walk it for ever."""
    header = b"CMDb".ljust(12, b"\0") + struct.pack("<I", 100) + bytes(20)
    directory = b"MDbMDir".ljust(12, b"\0") + struct.pack("<I", 100) + bytes(20)
    return header + directory + struct.pack("<IIII", 0, len(header), len(header), 0)  # entries, current, prev
