"""Fine-tuning entry point: ``ray job submit --working-dir . -- python pipelines/finetune.py --encoder E --tasks T
--output D``.

Takes the same arguments as ``mermed finetune``. The library is ``mermed.finetune``: input checks on the driver,
one Ray Train run per (task, encoder, label fraction, seed), all scheduled by Ray Tune, scored on the driver with
the published metric set, MLflow parent and nested runs.
"""

from __future__ import annotations

if __name__ == "__main__":
    from entrypoint import run_command

    run_command("finetune")

from collections.abc import Sequence
from pathlib import Path

from mermed.finetune import FinetuneConfig, FinetuneResult, check_inputs, run_finetune_job
from pipelines.common import init_ray


def run_finetune(
    encoder: str | Path, tasks: str | Path, output: str | Path, cfg: FinetuneConfig, baselines: Sequence[str] = ()
) -> FinetuneResult:
    """Check every input, then join (or start) Ray and run the job."""
    inputs = check_inputs(encoder, tasks, cfg, baselines)
    init_ray()
    return run_finetune_job(inputs, output, cfg)
