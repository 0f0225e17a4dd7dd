"""Probe entry point: ``ray job submit --working-dir . -- python pipelines/probe.py --encoder E --tasks T --output D``.

Takes the same arguments as ``mermed probe``. The library is ``mermed.probe``: input checks on the driver, features
on a Ray Data actor pool, Ray Tune sweeps of the heads, a refit scored once on test, MLflow parent and nested runs.
"""

from __future__ import annotations

if __name__ == "__main__":
    from entrypoint import run_command

    run_command("probe")

from collections.abc import Sequence
from pathlib import Path

from mermed.probe import ProbeConfig, ProbeResult, check_inputs, run_probe_job
from pipelines.common import init_ray


def run_probe(
    encoder: str | Path, tasks: str | Path, output: str | Path, cfg: ProbeConfig, baselines: Sequence[str] = ()
) -> ProbeResult:
    """Check every input, then join (or start) Ray and run the job."""
    inputs = check_inputs(encoder, tasks, cfg, baselines)
    init_ray()
    return run_probe_job(inputs, output, cfg)
