"""MerMED-FM pretraining on Ray Train: Ray Data decodes shards on CPU, DDP workers crop on their device and step.

``mermed pretrain ...`` or ``ray job submit --working-dir . -- python pipelines/pretrain.py ...`` (same arguments).
Outputs live under ``STORAGE/RUN/``: Ray Train's checkpoints (``state.safetensors`` + ``meta.json``, no pickle), and
at the end ``encoder.safetensors`` + ``encoder.json`` (the teacher backbone), which the probe stage loads.
Re-running the same command resumes from the latest checkpoint; a worker that dies mid-run is replaced and the
group restarts from the latest checkpoint (``FailureConfig``), each data stream continuing where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mermed import storage, tracking
from mermed.augment import MultiCrop
from mermed.config import PretrainConfig
from mermed.data import BalancedBatches, decoded_dataset, split_counts
from mermed.models import build_backbone, export_encoder
from mermed.train import STATE_FILE, TrainState, build_train_state, load_checkpoint, save_checkpoint

log = logging.getLogger("mermed.pretrain")

ENCODER_FILE = "encoder.safetensors"
MLFLOW_RUN_FILE = "mlflow_run.json"
CHECKPOINT_DIR = "state"  # inside each Ray Train checkpoint
SPLIT_MIN_ROWS_PER_WORKER = 64


@dataclass
class PretrainResult:
    run_uri: str
    encoder_uri: str
    steps: int
    mlflow_run_id: str
    tracking_uri: str


def _dataset_name(modality: str) -> str:
    return f"modality_{modality}"


# ----------------------------------------------------------------------------------------------- the worker


def _checkpoint_candidates(run_uri: str) -> list:
    """Ray Train's latest checkpoint first, then the older ones kept in storage, newest first."""
    import ray.train

    candidates = []
    latest = ray.train.get_checkpoint()
    if latest is not None:
        candidates.append(latest)
    fs, root = storage.filesystem(run_uri)
    if fs.exists(root):
        for path in sorted(fs.glob(posixpath.join(root, "checkpoint_*")), reverse=True):
            if not fs.isdir(path):
                continue  # checkpoint_manager_snapshot.json
            if latest is None or posixpath.normpath(path) != posixpath.normpath(latest.path):
                candidates.append(ray.train.Checkpoint(path, filesystem=storage.arrow_filesystem(fs)))
    return candidates


def _restore(state: TrainState, run_uri: str) -> str | None:
    """Load the newest checkpoint that loads; a corrupt or truncated one is skipped with a warning."""
    for checkpoint in _checkpoint_candidates(run_uri):
        try:
            with checkpoint.as_directory() as directory:
                load_checkpoint(state, Path(directory) / CHECKPOINT_DIR)
            return checkpoint.path
        except Exception as err:  # noqa: BLE001 - fall back to the previous checkpoint
            log.warning(
                "checkpoint %s cannot be loaded (%s: %s); trying the previous one",
                posixpath.basename(checkpoint.path),
                type(err).__name__,
                err,
            )
    return None


def _crop_generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """Crops depend only on (seed, rank, step), so a resumed run draws the same views as an uninterrupted one."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return gen


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the state, restore, then balanced batches -> crops -> ``train_step``."""
    import mlflow
    import ray.train
    import ray.train.torch

    from mermed.train import train_step

    cfg = PretrainConfig.model_validate(config["pretrain"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    state = build_train_state(cfg, device=device, world_size=world, total_steps=cfg.run.steps)
    restored = _restore(state, config["run_uri"])
    if restored:
        log.info("worker %d resumed at step %d", rank, state.step)
    if world > 1:
        state.student = ray.train.torch.prepare_model(state.student, move_to_device=False)

    modalities = config["modalities"]
    per_modality = max(1, cfg.optim.batch_size_per_worker // len(modalities))
    streams = {
        m: (
            lambda epoch, m=m: ray.train.get_dataset_shard(_dataset_name(m)).iter_batches(
                batch_size=per_modality, batch_format="numpy", prefetch_batches=2
            )
        )
        for m in modalities
    }
    batches = BalancedBatches(streams, cfg.optim.batch_size_per_worker, rank=rank, world_size=world, seed=cfg.run.seed)
    crops = MultiCrop.from_config(cfg.crops)
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 else None
    run_id = config["mlflow_run_id"]
    if restored:
        # Same rows as an uninterrupted run would draw next (the same rows exactly under run.deterministic_data).
        batches.fast_forward(state.step, config["pass_rows"])
        if client is not None:  # a restart (worker failure or re-run) shows in MLflow
            client.log_metric(run_id, "resumed_at_step", state.step, step=state.step)

    while state.step < cfg.run.steps:
        started = time.perf_counter()
        batch, counts = batches.next(state.step)
        images = torch.from_numpy(batch["pixels"]).to(device, non_blocking=True).permute(0, 3, 1, 2)
        grayscale = torch.from_numpy(batch["grayscale"]).to(device)
        views = crops(images, grayscale, generator=_crop_generator(device, cfg.run.seed, rank, state.step))
        metrics = train_step(state, views)
        metrics["images_per_s"] = world * len(images) / (time.perf_counter() - started)
        metrics.update({f"count_{m}": float(n) for m, n in counts.items()})
        step = state.step
        if client is not None and (step % cfg.run.log_every == 0 or step == cfg.run.steps):
            client.log_batch(
                run_id,
                metrics=[
                    mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step) for k, v in metrics.items()
                ],
            )
        if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(state, Path(tmp) / CHECKPOINT_DIR)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)
        elif step % cfg.run.log_every == 0:
            ray.train.report({"step": step, **metrics})


# ----------------------------------------------------------------------------------------------- the driver


def _mlflow_run(run_uri: str, cfg: PretrainConfig, name: str, workdir: str, params: dict) -> tuple[str, str]:
    """The run's MLflow run, created once and reused when the run resumes (its id is kept beside the checkpoints)."""
    import mlflow

    uri = tracking.tracking_uri(cfg.tracking.mlflow_uri, workdir)
    experiment_id = tracking.use_experiment(cfg.tracking.experiment, uri, workdir)
    fs, root = storage.filesystem(run_uri)
    marker = posixpath.join(root, MLFLOW_RUN_FILE)
    if fs.exists(marker):
        with fs.open(marker, "rb") as fh:
            saved = json.loads(fh.read())
        if saved.get("tracking_uri") == uri:
            return saved["run_id"], uri
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name, tags={"mermed.stage": "pretrain"})
    for key, value in {**tracking.flatten_params(cfg.model_dump()), **params}.items():
        client.log_param(run.info.run_id, key, value)
    fs.makedirs(root, exist_ok=True)
    with fs.open(marker, "wb") as fh:
        fh.write(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}).encode())
    return run.info.run_id, uri


def _export(checkpoint, cfg: PretrainConfig, run_uri: str) -> str:
    """The final teacher backbone as ``encoder.safetensors`` + ``encoder.json`` in the run's folder."""
    from safetensors.torch import load_file

    with checkpoint.as_directory() as directory:
        tensors = load_file(str(Path(directory) / CHECKPOINT_DIR / STATE_FILE))
    prefix = "teacher/backbone."
    backbone = build_backbone(cfg.model.name, cfg.crops.global_size)
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    fs, root = storage.filesystem(run_uri)
    with tempfile.TemporaryDirectory() as tmp:
        export_encoder(backbone, Path(tmp) / ENCODER_FILE, model_name=cfg.model.name, img_size=cfg.crops.global_size)
        for name in os.listdir(tmp):
            fs.put(os.path.join(tmp, name), posixpath.join(root, name))
    return storage.join(run_uri, ENCODER_FILE)


def _ingest_options(cfg: PretrainConfig):
    """Ray Train's default data options, keeping the rows in shard order under ``run.deterministic_data``
    (what makes a resumed run draw exactly the batches of an uninterrupted one)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or cfg.run.deterministic_data
    return options


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
) -> PretrainResult:
    """Pretrain on the ingest outputs ``data``; resumes from ``STORAGE/NAME`` when a checkpoint is there."""
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    splits = ["train", "val"] + (["test"] if include_test else [])
    counts = split_counts(data)
    modalities = sorted(m for m, per_split in counts.items() if sum(per_split.get(s, 0) for s in splits))
    if not modalities:
        raise ValueError(f"no {'/'.join(splits)} rows in {', '.join(data)}")
    if cfg.optim.batch_size_per_worker < len(modalities):
        raise ValueError(
            f"optim.batch_size_per_worker ({cfg.optim.batch_size_per_worker}) is below the number of "
            f"modalities ({len(modalities)}): a balanced batch needs one image of each"
        )
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
    }
    run_id, uri = _mlflow_run(run_uri, cfg, name, workdir, params)
    log.info(
        "pretrain %s: %d modalities %s, %d workers; MLflow run %s", name, len(modalities), modalities, workers, run_id
    )

    datasets = {_dataset_name(m): decoded_dataset(data, cfg.crops.decode_size, splits, modality=m) for m in modalities}
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
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    encoder_uri = _export(result.checkpoint, cfg, run_uri)
    client = mlflow.MlflowClient(uri)
    if not storage.is_remote(encoder_uri):
        for artifact in (encoder_uri, os.path.join(os.path.dirname(encoder_uri), "encoder.json")):
            client.log_artifact(run_id, artifact, artifact_path="encoder")
    client.set_tag(run_id, "mermed.encoder", encoder_uri)
    client.set_terminated(run_id)
    return PretrainResult(run_uri, encoder_uri, int(result.metrics.get("step", cfg.run.steps)), run_id, uri)


if __name__ == "__main__":
    from mermed.cli import app

    app(["pretrain", *sys.argv[1:]])
