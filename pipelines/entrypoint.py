"""Lets the repository's scripts run by path: ``python pipelines/<stage>.py ARGS`` (what ``ray job submit`` runs)
behaves as ``mermed <stage> ARGS``, and ``python bench/<name>.py`` imports the packages, not its neighbours.

Run by path, Python puts the script's folder first on ``sys.path``, where ``pipelines/ingest.py`` or
``bench/ingest.py`` would shadow the ``ingest`` package, here and in Ray's workers (Ray hands the driver's path to
them). ``repository_first`` puts the repository there instead, once for every script.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def repository_first(script: str) -> None:
    """Replace the folder of ``script`` (a ``__file__``) by the repository at the front of ``sys.path``."""
    here = Path(script).resolve().parent
    sys.path[:] = [str(REPOSITORY), *(p for p in sys.path if Path(p or ".").resolve() != here)]


def run_command(stage: str) -> None:
    """Run ``mermed <stage>`` with this process's arguments; exits the process."""
    repository_first(__file__)
    from pipelines.cli import app

    app([stage, *sys.argv[1:]])
