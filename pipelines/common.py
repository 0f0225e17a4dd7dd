"""What every pipeline entry point does first: logging, and joining the Ray cluster (or starting a local one)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set (a cluster, or ``ray job submit``); otherwise start a local Ray with its
    dashboard: Ray Train's placement-group cleaner asks the State API the dashboard serves (without it, it
    warns every few seconds and cannot clean up after a killed controller), and users watch jobs there."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
