"""Ingest entry point for ``ray job submit --working-dir . -- python pipelines/ingest.py --input ... --output ...``.

Takes the same arguments as ``mermed ingest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mermed.cli import app

    app(["ingest", *sys.argv[1:]])
