"""Full fine-tuning as the authors evaluate: the whole ViT and a new linear head per downstream task, label
fraction and seed, each a Ray Train run, all scheduled by Ray Tune; the published metric set over seeds.

Modules: ``config`` (the job's config), ``data`` (a task's rows as Ray Datasets), ``model`` (classifier, CLS
attention), ``worker`` (the Ray Train loop), ``report`` (summaries, comparisons, figures), ``job`` (Tune, MLflow).
The launcher is ``pipelines/finetune.py`` (``mermed finetune``); tasks use the probe's task file format.
"""

from mermed.finetune.config import FinetuneConfig, FinetuneSearchConfig, FinetuneTrainConfig
from mermed.finetune.job import FinetuneInputs, FinetuneResult, check_inputs, run_finetune_job

__all__ = [
    "FinetuneConfig",
    "FinetuneInputs",
    "FinetuneResult",
    "FinetuneSearchConfig",
    "FinetuneTrainConfig",
    "check_inputs",
    "run_finetune_job",
]
