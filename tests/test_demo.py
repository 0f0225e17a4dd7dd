"""`mermed demo` end to end on a smaller corpus and a few steps: the table, the outputs, and a second run that
reuses every stage."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from pipelines.demo import MODALITY_ORDER, run_demo

# Two whole demo runs: about 8 minutes on 2 quiet cores, more on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
# The bootstrap has no interval where a tiny test set leaves too few two-class resamples.
AUROC_CELL = re.compile(r"(\d\.\d{3}) \[(?:(\d\.\d\d), (\d\.\d\d)|no CI: few patients)\]")


def test_demo_prints_an_auroc_table_for_every_modality_and_a_second_run_reuses_every_stage(fresh_ray, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mermed.demo")
    workdir = tmp_path / "demo"
    first = run_demo(workdir, steps=4, per_class=8)

    rows = first.table.splitlines()[2:]
    assert [row.split()[0] for row in rows] == list(MODALITY_ORDER)
    for row in rows:
        cells = AUROC_CELL.findall(row)
        assert len(cells) == 2, f"want a pretrained and a random-weights cell: {row}"
        for auroc, lo, hi in cells:
            assert 0 <= float(auroc) <= 1
            if lo:
                assert 0 <= float(lo) <= float(auroc) <= float(hi) <= 1
    curves = first.knn_curves.splitlines()
    assert len(curves) == len(MODALITY_ORDER) and all("(step 0)" in line for line in curves)
    assert first.summary_csv.exists() and Path(first.encoder).exists()
    assert first.tracking_uri == f"sqlite:///{workdir}/mlflow.db"

    caplog.clear()
    second = run_demo(workdir, steps=4, per_class=8)
    assert second.table == first.table
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "3/4 pretrain: " in messages and "reusing" in messages
    assert "4/4 probes: done for this encoder, data and probe config; reusing" in messages
    assert "4/4 probes (Ray Data" not in messages
