"""Pretraining speed, each number a ratio against a baseline measured in the same run on the same data.

(a) Multi-crop: ``mermed.augment.MultiCrop`` on a uint8 batch against the same recipe run per image the way
    its authors run it (MerMED-FM's ``DataAugmentationMerMED``, or DINO's ``DataAugmentationDINO`` with
    ``--dino-recipe``: torchvision transforms on PIL images plus their PIL blur and solarisation), both on one
    CPU thread, same images, same recipe and views (the ViT-B config's crops, 2 x 224 + 10 x 96 from 256 px;
    the tiny config's with ``--quick``). Target: >= 3x images/s per core.
(b) Step time: ``run_pretrain`` (Ray Train, 1 worker, CPU) against the same step in a bare loop in this process
    (``build_train_state`` + ``BalancedBatches`` over in-memory numpy + ``MultiCrop`` + ``train_step``), tiny
    config, same shards, same step window. Ray's per-step time is read from the worker's MLflow metrics (step
    timestamps, and ``images_per_s``), after a warm-up that fills the memory queue and ends every modality's
    first pass, so neither Ray's nor Ray Data's start-up is counted. Target: Ray / bare < 1.10.
(c) ``--gpu``: images/s and model FLOP utilisation of ViT-B/16 (2 x 224 + 10 x 96 views, bf16) on one GPU,
    eager and with ``run.compile`` (torch.compile), and what compiling costs.
(d) ``--cpu-step``: the same for the tiny and the ViT-B config on the CPU, in images/s per core.
(e) ``--data-wait``: the share of a Ray Train step spent waiting for its batch (the worker's ``data_wait_s``
    against the step's wall time), tiny and ViT-B config, 1 worker on the CPU. Target: <= 3%.

    python bench/train.py [--quick] [--reps 3]
    python bench/train.py --crops [--dino-recipe] [--reps 3]
    python bench/train.py --gpu [--batch 64] [--steps 20]
    python bench/train.py --cpu-step [--batch 4] [--steps 3]
    python bench/train.py --data-wait [--batch 4] [--steps 3]

Wall time on a shared machine also counts other people's work, so (b) also reports CPU seconds per step: of
this process for the bare loop, of the Ray Train worker process for Ray (sampled from /proc while it runs).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run by path: the packages first on sys.path (not this folder's ingest.py)
    from pipelines.entrypoint import repository_first

    repository_first(__file__)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Ray renices its workers to 15; on a shared machine that alone slows the Train worker against the bare loop
    # (niceness 0) by however busy the machine is. Both loops run at this process's niceness unless this is set.
    os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))

import argparse
import math
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import nn
from torchvision import transforms as T

from ingest import storage
from ingest.config import IngestConfig, load_config
from ingest.pipeline import run_ingest
from ingest.samples import make_sample_corpus
from ingest.schema import modality_normalization, read_manifest
from mermed.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCrop
from mermed.config import DINO_AUGMENTATION, CropsConfig, PretrainConfig
from mermed.data import DECODE_COLUMNS, BalancedBatches, decode_batch, shard_uris, split_counts
from mermed.train import batch_step, build_train_state
from pipelines.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain_tiny.yaml"
VITB = ROOT / "configs" / "pretrain_vitb.yaml"
KEY = b"bench-train-key-0123456789abcdef0123"
TRAIN_SPLITS = ("train", "val")  # what run_pretrain trains on by default
CROPS_TARGET = 3.0
STEP_TARGET = 1.10
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, most specific name first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return f"nproc {nproc}, CPU {model}, load average {loadavg()}"


# ------------------------------------------------------------------------------------------------ the data


def make_shards(work: Path, image_size: int) -> str:
    """The sample corpus (all seven modalities) through the real ingest pipeline, as training reads it."""
    info = make_sample_corpus(work / "raw", per_class=2, size=image_size, slide_size=512, seed=0)
    out = work / "shards"
    run_ingest([str(info.root)], str(out), IngestConfig(dataset="bench"), key=KEY, force=True)
    return str(out)


def decoded(shards: str, size: int, splits: tuple[str, ...] | None) -> dict[str, dict[str, np.ndarray]]:
    """Every row of ``splits`` (all when None) per modality, decoded as the training data path decodes it."""
    out = {}
    for modality in split_counts([shards]):
        tables = []
        for uri in shard_uris([shards], modality):
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh, columns=DECODE_COLUMNS))
        rows = {
            k: np.concatenate([t.column(k).to_numpy(zero_copy_only=False) for t in tables])
            for k in tables[0].column_names
        }
        keep = np.isin(rows["split"], splits) if splits else np.ones(len(rows["split"]), bool)
        if keep.any():
            out[modality] = decode_batch({k: v[keep] for k, v in rows.items()}, size)
    return out


# ------------------------------------------------------------------------------------------------ (a) crops


class PilGaussianBlur:
    """DINO's and MerMED-FM's ``utils.GaussianBlur`` in ``RandomApply``: PIL blur with a radius drawn from
    [radius_min, radius_max], with probability p."""

    def __init__(self, p: float, radius_min: float, radius_max: float):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class PilSolarization:
    """DINO's ``utils.Solarization``: PIL solarise (threshold 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def pil_augmentation(crops: CropsConfig) -> Callable[[Image.Image], list[torch.Tensor]]:
    """``crops``' recipe per image, as the authors' code runs it (DataAugmentationMerMED in MerMED-FM's
    main_mermed.py, DataAugmentationDINO in DINO's main_dino.py): RandomRotation (nearest, zero fill) before
    RandomResizedCrop (bicubic), flip, ColorJitter in RandomApply, RandomGrayscale, the PIL blur and
    solarisation; each step only where the recipe has it, as in those classes."""
    rotation = [T.RandomRotation(crops.rotation_degrees)] if crops.rotation_degrees else []
    jitter = T.ColorJitter(crops.brightness, crops.contrast, crops.saturation, crops.hue)
    flip_and_jitter = [T.RandomHorizontalFlip(p=0.5), T.RandomApply([jitter], p=crops.jitter_p)]
    if crops.grayscale_p:
        flip_and_jitter.append(T.RandomGrayscale(p=crops.grayscale_p))
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]

    def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0) -> T.Compose:
        crop = T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
        blur = PilGaussianBlur(blur_p, *crops.blur_sigma)
        solarize = [PilSolarization(solarize_p)] if solarize_p else []
        return T.Compose([*rotation, crop, *flip_and_jitter, blur, *solarize, *normalize])

    glob = (crops.global_size, crops.global_scale)
    transforms = (
        [view(*glob, crops.blur_p_global1)]
        + [view(*glob, crops.blur_p_global2, crops.solarize_p)] * (crops.n_global - 1)
        + [view(crops.local_size, crops.local_scale, crops.blur_p_local)] * crops.n_local
    )
    return lambda img: [t(img) for t in transforms]


def bench_crops(images: np.ndarray, crops: CropsConfig, reps: int) -> dict[str, dict[str, list[float]]]:
    """images/s of the batched tensor pipeline and of the same recipe per image on PIL, one CPU thread each,
    ``reps`` interleaved repetitions after one warm-up of each: per wall second, and per CPU second of the
    calling thread (where both do all their work), which other processes' load does not inflate as much."""
    torch.set_num_threads(1)
    tensor_fn = MultiCrop.from_config(crops)
    pil_fn = pil_augmentation(crops)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # (B, C, H, W) view, as the training worker passes it
    pil_images = [Image.fromarray(a) for a in images]
    random.seed(0)
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([IMAGENET_MEAN]).expand(len(images), 3)
    std = torch.tensor([IMAGENET_STD]).expand(len(images), 3)
    runs: dict[str, Callable[[], object]] = {
        # Per-row statistics, as the training loop passes each row's modality's.
        "MultiCrop": lambda: tensor_fn(batch, generator=gen, mean=mean, std=std),
        "PIL": lambda: [pil_fn(img) for img in pil_images],
    }
    got = [tuple(v.shape[1:]) for v in runs["MultiCrop"]()]
    want = [tuple(v.shape) for v in runs["PIL"]()[0]]
    if got != want:
        raise RuntimeError(f"the two pipelines make different views: {got} vs {want}")
    rates: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            fn()
            rates[name]["cpu"].append(len(images) / (time.thread_time() - cpu))
            rates[name]["wall"].append(len(images) / (time.perf_counter() - wall))
    return rates


# ------------------------------------------------------------------------------------------------ (b) steps


def _descendants() -> dict[int, str]:
    """pid -> process title of every process started (transitively) by this one."""
    parents, titles = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                titles[int(entry)] = (
                    Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                )
            except OSError:  # exited meanwhile
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    ours, grown = {os.getpid()}, True
    while grown:
        grown = {pid for pid, ppid in parents.items() if ppid in ours and pid not in ours}
        ours |= grown
    return {pid: titles[pid] for pid in ours if pid in titles}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerCPU:
    """Samples the CPU seconds of this run's Ray Train worker process (wall time, cpu) in a thread."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self.niceness: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pid = None
        while not self._stop.wait(self.period if pid else 0.5):
            if pid is None:
                pid = next((p for p, t in _descendants().items() if t.startswith("ray::RayTrainWorker")), None)
                if pid is not None:
                    self.niceness = os.getpriority(os.PRIO_PROCESS, pid)
                continue
            try:
                self.samples.append((time.time(), _cpu_seconds(pid)))
            except OSError:  # the worker exited (end of the run)
                return

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds the worker used between two wall-clock times (interpolated between samples)."""
        times, cpus = zip(*self.samples, strict=True)
        if not times[0] <= t0 < t1 <= times[-1]:
            raise RuntimeError("the worker's CPU samples do not cover the timed steps")
        return float(np.interp(t1, times, cpus) - np.interp(t0, times, cpus))


def warmup_steps(cfg: PretrainConfig, rows: dict[str, int]) -> int:
    """Steps until the memory queue is full and every modality has ended its first pass (after which both loops
    serve it from memory), plus a margin, rounded up to a logged step."""
    per_modality = cfg.optim.batch_size_per_worker // len(rows)
    first_pass = max(math.ceil(n / per_modality) for n in rows.values())
    fill = math.ceil(cfg.memory.size / (cfg.crops.n_global * cfg.optim.batch_size_per_worker))
    every = cfg.run.log_every
    return math.ceil((max(first_pass, fill) + 5) / every) * every


def bare_loop(
    cfg: PretrainConfig, data: dict[str, dict[str, np.ndarray]], normalization: dict
) -> tuple[list[float], list[float]]:
    """The Ray worker's loop without Ray, over in-memory numpy; wall and CPU time after each step (index 0 =
    before step 1)."""
    torch.set_num_threads(cfg.run.torch_threads)  # as the worker does
    device = torch.device("cpu")
    state = build_train_state(cfg, device=device, total_steps=cfg.run.steps)
    per_modality = max(1, cfg.optim.batch_size_per_worker // len(data))

    def chunks(arrays: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        rows = len(arrays["pixels"])
        return ({k: v[i : i + per_modality] for k, v in arrays.items()} for i in range(0, rows, per_modality))

    streams = {m: (lambda epoch, a=a: chunks(a)) for m, a in data.items()}
    batches = BalancedBatches(streams, cfg.optim.batch_size_per_worker, seed=cfg.run.seed)
    crops = MultiCrop.from_config(cfg.crops)
    walls, cpus = [time.perf_counter()], [time.process_time()]
    while state.step < cfg.run.steps:
        batch, _ = batches.next(state.step)
        host = {k: torch.from_numpy(batch[k]) for k in ("pixels", "grayscale", "valid")}
        done = state.step + 1
        batch_step(state, crops, host, batch["modality"], normalization, monitors=done % cfg.run.log_every == 0)
        walls.append(time.perf_counter())
        cpus.append(time.process_time())
    return walls, cpus


def ray_loop(cfg: PretrainConfig, shards: str, work: Path, name: str, first: int) -> dict[str, float]:
    """``run_pretrain`` with one worker; per-step wall, step-only and CPU seconds over the logged steps from
    ``first`` to the last."""
    import mlflow

    with WorkerCPU() as cpu:
        result = run_pretrain(cfg, [shards], str(work / "runs"), name, workers=1, max_failures=0, workdir=str(work))
    client = mlflow.MlflowClient(result.tracking_uri)
    stamps = {m.step: m.timestamp / 1000 for m in client.get_metric_history(result.mlflow_run_id, "loss")}
    rates = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "images_per_s")}
    waits = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "data_wait_s")}
    last = cfg.run.steps
    if first not in stamps or last not in stamps:
        raise RuntimeError(f"steps {first} and {last} were not logged (log_every={cfg.run.log_every})")
    steps = last - first
    return {
        "wall": (stamps[last] - stamps[first]) / steps,
        "step": statistics.median(cfg.optim.batch_size_per_worker / rates[s] for s in rates if first < s <= last),
        "cpu": cpu.between(stamps[first], stamps[last]) / steps,
        "wait": statistics.fmean(waits[s] for s in waits if first < s <= last),  # over the logged steps
        "niceness": float("nan") if cpu.niceness is None else cpu.niceness,
    }


def bench_steps(shards: str, work: Path, quick: bool, reps: int) -> tuple[PretrainConfig, dict[str, list[float]]]:
    counts = split_counts([shards])
    rows = {m: sum(s.get(k, 0) for k in TRAIN_SPLITS) for m, s in counts.items()}
    base = load_config(PretrainConfig, TINY)
    first = warmup_steps(base, {m: n for m, n in rows.items() if n})
    measured = math.ceil((15 if quick else 40) / base.run.log_every) * base.run.log_every
    total = first + measured
    # One checkpoint, at the end: the bare loop writes none, and the timed window must not contain one.
    cfg = load_config(PretrainConfig, TINY, {"run.steps": total, "run.checkpoint_every": total})
    data = decoded(shards, cfg.crops.decode_size, TRAIN_SPLITS)
    print(
        f"(b) tiny config, batch {cfg.optim.batch_size_per_worker}, {len(data)} modalities, steps 1-{first} warm-up, "
        f"{first + 1}-{total} timed; {cfg.run.torch_threads} torch thread(s) in both loops",
        flush=True,
    )
    keys = ("bare wall", "bare step", "bare cpu", "ray wall", "ray step", "ray cpu")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(reps):
        walls, cpus = bare_loop(cfg, data, modality_normalization([read_manifest(shards)]))
        out["bare wall"].append((walls[total] - walls[first]) / measured)
        logged = range(first + cfg.run.log_every, total + 1, cfg.run.log_every)  # the steps Ray logs
        out["bare step"].append(statistics.median(walls[s] - walls[s - 1] for s in logged))
        out["bare cpu"].append((cpus[total] - cpus[first]) / measured)
        ray = ray_loop(cfg, shards, work, f"bench-{rep}", first)
        for key in ("wall", "step", "cpu"):
            out[f"ray {key}"].append(ray[key])
        bare = {k: out[f"bare {k}"][-1] for k in ("wall", "step", "cpu")}
        print(
            f"  rep {rep + 1}: "
            + "; ".join(
                f"{who} {r['wall'] * 1e3:.0f} ms/step (step alone {r['step'] * 1e3:.0f} ms, "
                f"{r['cpu'] * 1e3:.0f} ms CPU)"
                for who, r in (("bare", bare), ("Ray", ray))
            )
            + f"; niceness bare {os.getpriority(os.PRIO_PROCESS, 0)}, Ray worker {ray['niceness']:.0f}"
            + f"; load {loadavg()}",
            flush=True,
        )
    return cfg, out


def bench_data_wait(shards: str, work: Path, batch: int | None, steps: int) -> None:
    """(e): each config's Ray Train loop, every step logged; the tiny one after (b)'s warm-up, ViT-B after 2."""
    rows = {m: n for m, s in split_counts([shards]).items() if (n := sum(s.get(k, 0) for k in TRAIN_SPLITS))}
    for config in (TINY, VITB):
        sized = {"optim.batch_size_per_worker": batch} if batch and config == VITB else {}  # tiny: its own 16
        first = warmup_steps(load_config(PretrainConfig, config, sized), rows) if config == TINY else 2
        total = first + (40 if config == TINY else steps)
        overrides = {"run.steps": total, "run.checkpoint_every": total, "run.log_every": 1}
        cfg = load_config(PretrainConfig, config, overrides | sized)
        r = ray_loop(cfg, shards, work, f"wait-{config.stem}", first)
        print(
            f"(e) {config.stem}: {cfg.model.name}, batch {cfg.optim.batch_size_per_worker}, steps {first + 1}-{total}: "
            f"waited {r['wait'] * 1e3:.1f} ms for data per {r['wall'] * 1e3:.0f} ms step, {r['wait'] / r['wall']:.2%} "
            f"(target <= 3%); load {loadavg()}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------ (c) GPU


def forward_flops(backbone: nn.Module, head: nn.Module, size: int) -> float:
    """Forward FLOPs of one view of ``size`` px: 2 x weights x tokens for the transformer's linear layers (the
    patch embedding over patches only), 4 x N^2 x D per block for attention (QK^T and AV), and the head once on
    the class token. Norms, biases, softmax and GELU are left out (well under 1%)."""
    patch = backbone.patch_embed.patch_size[0]
    patches = (size // patch) ** 2
    tokens = patches + backbone.num_prefix_tokens
    block_weights = sum(m.weight.numel() for m in backbone.blocks.modules() if isinstance(m, nn.Linear))
    attention = len(backbone.blocks) * 4 * tokens**2 * backbone.embed_dim
    head_weights = sum(m.weight.numel() for m in head.modules() if isinstance(m, nn.Linear))
    return (
        2 * block_weights * tokens
        + 2 * backbone.patch_embed.proj.weight.numel() * patches
        + attention
        + (2 * head_weights)
    )


def step_flops(cfg: PretrainConfig, student: nn.Module) -> float:
    """Model FLOPs per image of one training step: student forward + backward (3 x forward) on every view,
    teacher forward on the global views. The memory and DINO losses are not counted."""
    crops = cfg.crops
    f_global = forward_flops(student.backbone, student.head, crops.global_size)
    f_local = forward_flops(student.backbone, student.head, crops.local_size)
    student_fwd = crops.n_global * f_global + crops.n_local * f_local
    return 3 * student_fwd + crops.n_global * f_global


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def step_timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of ``fn`` over ``n`` calls: CUDA events on a GPU, the wall clock on the CPU."""

    def cuda(fn: Callable[[], object], n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    def cpu(fn: Callable[[], object], n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - started) / n

    return cuda if device.type == "cuda" else cpu


def bench_step(config: Path, device: torch.device, batch: int | None, steps: int, warmup: int, peak: float | None):
    """(c) and (d): one training step's images/s, eager and with ``run.compile``, and the compilation's cost (the
    first compiled steps over eager ones); on CUDA in bf16 with the MFU, on the CPU per core."""
    from torch.utils.flop_counter import FlopCounterMode

    timed = step_timer(device)
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    peak = (peak or peak_tflops(name)) if gpu else None
    for compiled in (False, True):
        overrides = {"run.compile": compiled, "run.precision": "bf16" if gpu else "fp32"}
        cfg = load_config(PretrainConfig, config, overrides | ({"optim.batch_size_per_worker": batch} if batch else {}))
        b = cfg.optim.batch_size_per_worker
        state = build_train_state(cfg, device=device, total_steps=cfg.run.steps)
        crops = MultiCrop.from_config(cfg.crops)
        size = cfg.crops.decode_size
        inputs = {
            "pixels": torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, device=device),
            "grayscale": torch.zeros(b, dtype=torch.bool, device=device),
        }
        modalities = ["CT"] * b  # ImageNet's statistics (none measured): the speed does not depend on them

        def step(state=state, crops=crops, inputs=inputs, modalities=modalities) -> None:
            batch_step(state, crops, inputs, modalities, {}, monitors=False)

        first_s = timed(step, 1)  # a compiled run compiles both resolutions' graphs here
        if warmup > 1:  # also fills part of the memory queue, as in a running job
            timed(step, warmup - 1)
        step_s = timed(step, steps)
        views = f"{cfg.crops.n_global}x{cfg.crops.global_size} + {cfg.crops.n_local}x{cfg.crops.local_size}"
        mode = "compiled" if compiled else "eager"
        print(f"{config.stem} {mode} on {name}: {cfg.model.name}, {views} views, batch {b}, {steps} steps after "
              f"{warmup} warm-up")  # fmt: skip
        rate = b / step_s
        per_core = "" if gpu else f", {rate / torch.get_num_threads():.2f} per core"
        print(f"  step {step_s * 1e3:.1f} ms, {rate:.1f} images/s{per_core}; first step {first_s:.1f} s")
        if not compiled:
            flops = step_flops(cfg, state.student)
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            print(f"  model FLOPs per image (analytic) {flops / 1e9:.1f} G; torch's count of the whole step "
                  f"{counter.get_total_flops() / b / 1e9:.1f} G")  # fmt: skip
            eager_first = first_s
        else:
            print(f"  compilation: first step {first_s - eager_first:.1f} s longer than eager's")
        if gpu:
            achieved = flops * rate / 1e12
            mfu = f": MFU {achieved / peak:.1%}" if peak else "; no bf16 peak known: pass --peak-tflops for the MFU"
            print(
                f"  {achieved:.0f} TFLOP/s{mfu}; peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            )


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny views in (a), fewer timed steps in (b)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement (the median is reported)")
    parser.add_argument("--crops", action="store_true", help="only (a): the multi-crop comparison")
    parser.add_argument("--dino-recipe", action="store_true", help="(a) with DINO's augmentation over the views")
    parser.add_argument("--gpu", action="store_true", help="only (c): ViT-B/16 images/s and MFU on one CUDA GPU")
    parser.add_argument("--cpu-step", action="store_true", help="only (d): tiny and ViT-B steps per CPU core")
    parser.add_argument("--data-wait", action="store_true", help="only (e): share of a Ray step waiting for data")
    parser.add_argument("--batch", type=int, help="(c, d; e for ViT-B) images per step (default: the config's)")
    parser.add_argument("--steps", type=int, default=20, help="(c, d) timed steps; (e) ViT-B's")
    parser.add_argument("--peak-tflops", type=float, help="(c) the GPU's dense bf16 peak, if not in the table")
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA GPU, and torch.cuda.is_available() is False on this machine")
        bench_step(VITB, torch.device("cuda"), args.batch, args.steps, warmup=3, peak=args.peak_tflops)
        return
    if args.cpu_step:
        for config in (TINY, VITB):
            bench_step(config, torch.device("cpu"), args.batch, args.steps, warmup=2, peak=None)
        return

    import ray

    print(f"machine: {machine()}", flush=True)
    crops = load_config(PretrainConfig, TINY if args.quick else VITB).crops
    if args.dino_recipe:
        crops = CropsConfig(**(crops.model_dump() | DINO_AUGMENTATION))
    work = Path(tempfile.mkdtemp(prefix="mermed-bench-train-"))
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        shards = make_shards(work, image_size=crops.decode_size)
        if args.data_wait:
            bench_data_wait(shards, work, args.batch, args.steps)
            return

        pixels = np.concatenate([d["pixels"] for d in decoded(shards, crops.decode_size, None).values()])
        images = pixels[np.arange(32 if not args.quick else 16) % len(pixels)]
        rates = bench_crops(images, crops, args.reps)
        crop_med = {(n, k): statistics.median(v) for n, r in rates.items() for k, v in r.items()}
        crop_summary = "; ".join(
            f"per {k} second: MultiCrop {crop_med['MultiCrop', k]:.1f}, PIL {crop_med['PIL', k]:.1f} img/s, "
            f"{crop_med['MultiCrop', k] / crop_med['PIL', k]:.2f}x"
            for k in ("wall", "cpu")
        )
        print(
            f"(a) {len(images)} images of {crops.decode_size} px -> {crops.n_global}x{crops.global_size} + "
            f"{crops.n_local}x{crops.local_size} views, 1 thread each (target >= {CROPS_TARGET}x); load {loadavg()}",
        )
        views = {"n_global", "n_local", "global_size", "local_size", "decode_size"}
        print("  recipe: " + ", ".join(f"{k} {v}" for k, v in crops.model_dump(exclude=views).items()))
        for name, r in rates.items():
            print(
                f"  {name} img/s per rep: " + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in r.items())
            )
        print(f"  {crop_summary}", flush=True)
        if args.crops:
            return

        cfg, steps = bench_steps(shards, work, args.quick, args.reps)
        med = {k: statistics.median(v) for k, v in steps.items()}
        print(f"\nmachine: {machine()}; medians of {args.reps} repetitions")
        print(f"(a) multi-crop, one thread: {crop_summary}")
        print(
            f"(b) step, tiny config: bare {med['bare wall'] * 1e3:.0f} ms, Ray Train {med['ray wall'] * 1e3:.0f} ms: "
            f"{med['ray wall'] / med['bare wall']:.3f}x wall (target < {STEP_TARGET}); step alone (logged steps, "
            f"images_per_s for Ray) bare {med['bare step'] * 1e3:.0f} ms, Ray {med['ray step'] * 1e3:.0f} ms: "
            f"{med['ray step'] / med['bare step']:.3f}x; CPU per step bare {med['bare cpu'] * 1e3:.0f} ms, "
            f"Ray worker {med['ray cpu'] * 1e3:.0f} ms: {med['ray cpu'] / med['bare cpu']:.3f}x"
        )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
