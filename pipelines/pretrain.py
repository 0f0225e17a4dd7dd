"""MerMED-FM pretraining on Ray Train: Ray Data decodes shards on CPU, DDP workers crop on their device and step.

``mermed pretrain ...`` or ``ray job submit --working-dir . -- python pipelines/pretrain.py ...`` (same arguments).
Outputs live under ``STORAGE/RUN/``: Ray Train's checkpoints (``state.safetensors`` + ``meta.json``, no pickle), and
at the end ``encoder.safetensors`` + ``encoder.json`` (the teacher backbone), which the probe stage loads.
Re-running the same command resumes from the latest checkpoint; a worker that dies mid-run is replaced and the
group restarts from the latest checkpoint (``FailureConfig``), each data stream continuing where it stopped.
"""

from __future__ import annotations

if __name__ == "__main__":
    from entrypoint import run_command

    run_command("pretrain")

import logging
import os
import posixpath
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ingest import storage
from ingest.schema import modality_normalization, read_manifest
from mermed import tracking
from mermed.augment import MultiCrop
from mermed.checkpoints import (
    CHECKPOINT_DIR,
    export_teacher,
    load_served,
    restore_newest,
    save_served,
    teacher_backbone,
)
from mermed.config import PretrainConfig
from mermed.data import PASS, BalancedBatches, Prefetcher, decoded_dataset, pass_seed, rest_of_pass, split_counts
from mermed.embedding_map import embedding_report, sample_rows
from mermed.monitor import KnnMonitor, KnnSettings, check_tasks, initial_backbone, load_tasks
from mermed.probe.config import ProbeTasksFile
from mermed.train import TrainState, build_train_state, save_checkpoint

if TYPE_CHECKING:
    import ray.train
    from ray.train.torch import TorchTrainer

log = logging.getLogger("mermed.pretrain")

SPLIT_MIN_ROWS_PER_WORKER = 64


@dataclass
class PretrainResult:
    run_uri: str
    encoder_uri: str
    steps: int
    mlflow_run_id: str
    tracking_uri: str


class PretrainError(RuntimeError):
    """A pretraining run that stopped: its workers failed more often than ``max_failures`` allows, or Ray Train's
    controller failed (its storage gone, say)."""


def _dataset_name(modality: str) -> str:
    return f"modality_{modality}"


def _knn_monitor(
    monitor: dict, cfg: PretrainConfig, state: TrainState, restored: bool, normalization: dict
) -> KnnMonitor:
    """The kNN monitor of ``run_pretrain(monitor=...)``; drift is measured from the step-0 teacher, which a
    resumed run no longer holds and rebuilds."""
    return KnnMonitor(
        ProbeTasksFile.model_validate({"tasks": monitor["tasks"]}).tasks,
        initial_backbone(cfg) if restored else state.teacher.backbone,
        img_size=cfg.crops.global_size,
        device=state.device,
        amp_dtype=state.amp_dtype,
        settings=KnnSettings(**monitor["settings"]),
        normalization=normalization,
    )


# ----------------------------------------------------------------------------------------------- the worker


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the state, restore, then balanced batches -> crops -> ``train_step``."""
    import ray.train
    import ray.train.torch

    from mermed.train import batch_step, init_from_weights

    cfg = PretrainConfig.model_validate(config["pretrain"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.run.torch_threads)
    state = build_train_state(cfg, device=device, world_size=world, total_steps=cfg.run.steps)
    latest = ray.train.get_checkpoint()
    restored = restore_newest(state, config["run_uri"], latest.path if latest else None)
    if restored:
        log.info("worker %d resumed at step %d", rank, state.step)
    elif cfg.model.init:
        init_from_weights(state, cfg.model.init)
    if world > 1:
        if device.type == "cuda":  # the published SyncBatchNorm in both heads (it needs CUDA; gloo keeps BN local)
            state.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.student)
            state.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.teacher)
        state.student = ray.train.torch.prepare_model(state.student, move_to_device=False)

    modalities = config["modalities"]
    per_modality = max(1, cfg.optim.batch_size_per_worker // len(modalities))
    shards = {m: ray.train.get_dataset_shard(_dataset_name(m)) for m in modalities}
    streams = {
        m: (
            lambda epoch, m=m: shards[m].iter_batches(
                batch_size=per_modality,
                batch_format="numpy",
                prefetch_batches=2,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None,
                local_shuffle_seed=pass_seed(cfg.run.seed, rank, m, epoch),  # a new order every pass
            )
        )
        for m in modalities
    }
    row_log = None
    if cfg.run.row_log_dir:  # an audit of what trained each step; the process id tells attempts apart
        Path(cfg.run.row_log_dir).mkdir(parents=True, exist_ok=True)
        row_log = open(Path(cfg.run.row_log_dir) / f"rank{rank}-{os.getpid()}.tsv", "a")  # noqa: SIM115 - whole run
    batches = BalancedBatches(
        streams,
        cfg.optim.batch_size_per_worker,
        rank=rank,
        world_size=world,
        cache_bytes=cfg.data.stream_cache_mb * 2**20,
        seed=cfg.run.seed,
    )
    crops = MultiCrop.from_config(cfg.crops)
    # Rank 0 logs through a background sender: a tracking server that goes away does not stop training.
    tracker = tracking.RunLogger(config["tracking_uri"], config["mlflow_run_id"], cfg.tracking) if rank == 0 else None
    if restored and cfg.run.deterministic_data:  # the same rows, in the same order, as an uninterrupted run
        batches.fast_forward(state.step, config["pass_rows"])
    elif restored:  # the rows each interrupted pass had left, then the next passes
        batches.resume_passes(_rest_of_passes(restored, config, cfg, rank, world))
    if restored and tracker is not None:  # a restart (worker failure or re-run) shows in MLflow
        tracker.log({"resumed_at_step": state.step}, state.step)

    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    # The batch after a checkpoint is drawn once the checkpoint has recorded the rows served before it.
    saved = threading.Condition()
    saved_step = [state.step]

    def load(step: int) -> tuple[dict[str, torch.Tensor], np.ndarray, dict[str, int], dict[str, int], dict]:
        """The batch of ``step`` as tensors, its modalities, its rows per modality, each modality's pass and its
        rows' keys and passes. On a GPU the batch is page-locked and copied to the device on a side stream, while
        the current step runs."""
        if step % cfg.run.checkpoint_every == 0:
            with saved:
                saved.wait_for(lambda: saved_step[0] >= step)
        batch, counts = batches.next(step)
        tensors = {k: torch.from_numpy(batch[k]) for k in ("pixels", "grayscale", "valid")}
        if copy_stream is not None:
            with torch.cuda.stream(copy_stream):
                tensors = {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
            copy_stream.synchronize()  # in this thread: the training stream then finds the batch on the device
        return tensors, batch["modality"], counts, batches.epochs(), {k: batch[k] for k in ("row_key", PASS)}

    monitor = None
    if rank == 0 and config["monitor"]["tasks"]:
        monitor = _knn_monitor(config["monitor"], cfg, state, bool(restored), config["normalization"])
        tracker.log({"monitor_setup_s": monitor.setup_s}, state.step)
        if not restored:  # every curve starts at the initial weights (a resumed run has logged them)
            tracker.log(monitor(state.teacher.backbone), 0)

    # The next batch is assembled while a step runs; it fetches exactly the loop's steps, so its thread ends with it.
    # It starts after the step-0 monitor: on a few cores the data pipeline's start would run inside that call and
    # double its ``monitor_s``, though the run would wait for the pipeline in its first step just the same.
    prefetch = Prefetcher(load, state.step, cfg.run.steps)

    while state.step < cfg.run.steps:
        started = time.perf_counter()
        tensors, modality, counts, epochs, rows = prefetch.get(state.step)
        if copy_stream is not None:  # the caching allocator must not hand these to the side stream while in use
            for tensor in tensors.values():
                tensor.record_stream(torch.cuda.current_stream(device))
        data_wait = time.perf_counter() - started
        step = state.step + 1  # the step count once this step is taken
        logged = step % cfg.run.log_every == 0 or step == cfg.run.steps
        checkpointed = step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps
        metrics = batch_step(
            state,
            crops,
            tensors,
            modality,
            config["normalization"],
            rank=rank,
            world_size=world,
            monitors=logged or checkpointed,
        )
        metrics["images_per_s"] = world * len(modality) / (time.perf_counter() - started)
        metrics["data_wait_s"] = data_wait  # how long the step waited for its batch
        metrics.update({f"count_{m}": float(n) for m, n in counts.items()})
        metrics.update({f"epoch_{m}": float(e) for m, e in epochs.items()})
        if tracker is not None and logged:
            tracker.log(metrics, step)
        if row_log is not None:
            logged_rows = zip(modality, rows[PASS], rows["row_key"], strict=True)
            row_log.writelines(f"{step}\t{m}\t{e}\t{k}\n" for m, e, k in logged_rows)
            row_log.flush()
        if checkpointed:
            served = _gather(batches.served(), world)  # every worker's keys of its newest passes, on rank 0
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(state, Path(tmp) / CHECKPOINT_DIR)
                    save_served(served, Path(tmp) / CHECKPOINT_DIR)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                # Ray Train hears of checkpoints only (it prints every report); the metrics go to MLflow above.
                ray.train.report({"step": step, "loss": metrics["loss"]}, checkpoint=checkpoint)
            with saved:
                saved_step[0] = step
                saved.notify()
            if monitor is not None:  # after the checkpoint is safe; the other ranks wait in their next step
                tracker.log(monitor(state.teacher.backbone), step)
    if tracker is not None:
        tracker.close()
    if row_log is not None:
        row_log.close()


def _gather(served: dict, world: int) -> list[dict]:
    """Every worker's ``BalancedBatches.served()``, in rank order (a collective: all workers call it)."""
    if world == 1:
        return [served]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, served)
    return out


def _rest_of_passes(checkpoint: str, config: dict, cfg: PretrainConfig, rank: int, world: int) -> dict:
    """Per modality, the pass a resumed run was in, the rows that pass had left for this worker, and the keys it
    had served (``BalancedBatches.resume_passes``), from the checkpoint's record of every worker's served rows."""
    served = load_served(storage.filesystem(config["run_uri"])[0], checkpoint)
    if not served:
        log.warning("checkpoint %s records no served rows: its passes start again", posixpath.basename(checkpoint))
    passes = {}
    for m, (epoch, by_rank) in served.items():
        split = m in config["split_modalities"]  # then the pass is the workers' rows together
        consumed = np.concatenate(by_rank) if split else by_rank[rank]
        seed = pass_seed(cfg.run.seed, rank, m, epoch, "rest")
        share = (rank, world) if split else None
        rest = rest_of_pass(config["data"], m, config["splits"], cfg.crops.decode_size, consumed, share, seed)
        passes[m] = (epoch, rest, by_rank[rank])  # the next checkpoint's record: all ranks' together, again
    return passes


# ----------------------------------------------------------------------------------------------- the driver


def _ingest_options(cfg: PretrainConfig):
    """Ray Train's default data options, keeping the rows in their (seeded) shard order under
    ``run.deterministic_data`` (what makes a resumed run draw exactly the batches of an uninterrupted one)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or cfg.run.deterministic_data
    return options


def _fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, then the SIGINT handler put back as it was.

    On the main thread Ray Train installs a SIGINT handler that holds the run's controller actor, so a process
    that goes on after the run (the demo, a notebook, the tests) would keep that controller and its dataset
    actors alive for as long as it lives; putting the handler back lets them go when the run ends.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _record_encoder(uri: str, run_id: str, encoder_uri: str, embedding: dict[str, float], pictures: Path) -> None:
    """The run's encoder (as artifacts when local), its location as a tag, the embedding metrics and pictures in
    ``pictures``, and the run marked finished."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if not storage.is_remote(encoder_uri):
        for artifact in (encoder_uri, os.path.join(os.path.dirname(encoder_uri), "encoder.json")):
            client.log_artifact(run_id, artifact, artifact_path="encoder")
    if embedding:
        client.log_batch(run_id, metrics=tracking.metric_batch(embedding, 0))
    for picture in sorted(pictures.glob("*.png")):
        client.log_artifact(run_id, str(picture))
    client.set_tag(run_id, "mermed.encoder", encoder_uri)
    client.set_terminated(run_id)


def run_pretrain(
    cfg: PretrainConfig,
    data: Sequence[str],
    storage_uri: str,
    name: str,
    *,
    workers: int = 1,
    use_gpu: bool = False,
    include_test: bool = False,
    max_failures: int = 3,
    workdir: str | None = None,
    monitor: str | Path | None = None,
    monitor_settings: KnnSettings = KnnSettings(),
) -> PretrainResult:
    """Pretrain on the ingest outputs ``data``; resumes from ``STORAGE/NAME`` when a checkpoint is there.

    ``monitor``: a probe task file (``mermed.probe.config.ProbeTasksFile``) whose tasks the kNN monitor
    (``mermed.monitor``) scores with the teacher at step 0 and at every checkpoint, on rank 0.
    """
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    splits = ["train", "val"] + (["test"] if include_test else [])
    counts = split_counts(data)
    normalization = modality_normalization([read_manifest(d) for d in data])
    modalities = sorted(m for m, per_split in counts.items() if sum(per_split.get(s, 0) for s in splits))
    if not modalities:
        raise ValueError(f"no {'/'.join(splits)} rows in {', '.join(data)}")
    if cfg.optim.batch_size_per_worker < len(modalities):
        raise ValueError(
            f"optim.batch_size_per_worker ({cfg.optim.batch_size_per_worker}) is below the number of "
            f"modalities ({len(modalities)}): a balanced batch needs one image of each"
        )
    monitor_tasks = load_tasks(monitor) if monitor is not None else []
    monitor_splits = check_tasks(monitor_tasks, monitor_settings)  # a bad task fails here, before any compute
    run_uri = storage.join(storage_uri, name)
    if (
        workdir is None
        and storage.is_remote(storage_uri)
        and not (cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    ):
        log.warning(
            "storage is remote and no MLflow tracking URI is set: the run history goes to ./mlflow.db, "
            "which a `ray job submit` working directory does not keep; set MLFLOW_TRACKING_URI"
        )
    workdir = workdir or (storage_uri if not storage.is_remote(storage_uri) else ".")
    params = {
        "data": ",".join(data),
        "workers": str(workers),
        "use_gpu": str(use_gpu),
        "splits": ",".join(splits),
        "modalities": ",".join(modalities),
        "monitor": str(monitor or ""),
    }
    run_id, uri = tracking.resumable_run(
        run_uri, cfg.tracking, name, workdir, {**tracking.flatten_params(cfg.model_dump()), **params}, stage="pretrain"
    )
    log.info(
        "pretrain %s: %d modalities %s, %d workers; MLflow run %s", name, len(modalities), modalities, workers, run_id
    )
    for task, split in monitor_splits.items():
        mlflow.MlflowClient(uri).set_tag(run_id, f"monitor.{task}.split", split)  # val, or test where val is empty

    # Shards in a seeded order, a new one every pass; fixed under run.deterministic_data, which a resumed run then
    # continues exactly (the workers' shuffle buffers, seeded by the pass, still vary the passes).
    datasets = {
        _dataset_name(m): decoded_dataset(
            data,
            cfg.crops.decode_size,
            splits,
            modality=m,
            shuffle_seed=pass_seed(cfg.run.seed, m),
            reshuffle=not cfg.run.deterministic_data,
        )
        for m in modalities
    }
    # A modality too small to share out (each worker needs rows of it at every step) goes whole to every worker.
    rows = {m: sum(counts[m].get(s, 0) for s in splits) for m in modalities}
    split = [_dataset_name(m) for m in modalities if rows[m] >= SPLIT_MIN_ROWS_PER_WORKER * workers]
    # Rows one pass gives each worker (Ray's equal split drops the remainder): where a resumed run continues.
    pass_rows = {m: rows[m] // workers if _dataset_name(m) in split else rows[m] for m in modalities}
    if len(split) < len(modalities):
        log.info(
            "modalities given whole to every worker (too few rows to split): %s",
            [m for m in modalities if _dataset_name(m) not in split],
        )
    fs, root = storage.filesystem(storage_uri)
    resources = {"CPU": cfg.run.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pretrain": cfg.model_dump(mode="json"),
            "modalities": modalities,
            "run_uri": run_uri,
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "pass_rows": pass_rows,
            "data": list(data),
            "splits": splits,
            "split_modalities": [m for m in modalities if _dataset_name(m) in split],
            "normalization": normalization,
            "monitor": {
                "tasks": [t.model_dump(mode="json") for t in monitor_tasks],
                "settings": asdict(monitor_settings),
            },
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=storage.arrow_filesystem(fs),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split, execution_options=_ingest_options(cfg)),
    )
    try:
        result = _fit(trainer)
    except ray.train.TrainingFailedError as err:
        if isinstance(err, ray.train.WorkerGroupError):
            cause = "; ".join(f"worker {r}: {type(e).__name__}: {e}" for r, e in sorted(err.worker_failures.items()))
        else:  # the controller, e.g. writing its checkpoint index to storage that has gone away
            cause = f"{type(err).__name__}: {err}"
        raise PretrainError(
            f"pretraining {name} stopped ({cause[:2000]}); the newest complete checkpoint under {run_uri} is kept, "
            "and the same command resumes from it"
        ) from err
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        teacher = teacher_backbone(Path(directory) / CHECKPOINT_DIR, cfg)
    encoder_uri = export_teacher(teacher, cfg, run_uri, normalization, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        pictures: dict[str, float] = {}
        if cfg.run.embedding_sample:
            picture = Path(tmp) / "embedding_map.png"
            sample = sample_rows(
                data, modalities, cfg.run.embedding_sample, splits, cfg.crops.decode_size, cfg.run.seed
            )
            pictures = embedding_report(teacher, sample, MultiCrop.from_config(cfg.crops), normalization, picture)
            fs.put(str(picture), posixpath.join(storage.filesystem(run_uri)[1], picture.name))  # beside the encoder
        tracking.when_reachable(
            lambda: _record_encoder(uri, run_id, encoder_uri, pictures, Path(tmp)),
            "the encoder and status",
            cfg.tracking,
        )
    return PretrainResult(run_uri, encoder_uri, int(result.metrics.get("step", cfg.run.steps)), run_id, uri)
