"""Schedules: DINO's cosine scheduler and the per-iteration values built from a config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ingest.config import parse_config
from mermed.config import PretrainConfig
from mermed.schedules import Schedules, cosine_schedule


def reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """utils.cosine_scheduler of facebookresearch/dino."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize(("epochs", "per_epoch", "warmup"), [(10, 7, 2), (3, 5, 0), (4, 4, 4 - 1)])
def test_cosine_schedule_matches_dino(epochs, per_epoch, warmup):
    ref = reference_cosine_scheduler(0.5, 1e-3, epochs, per_epoch, warmup_epochs=warmup, start_warmup_value=0.01)
    ours = cosine_schedule(0.5, 1e-3, epochs * per_epoch, warmup_steps=warmup * per_epoch, warmup_start=0.01)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)


def test_cosine_schedule_shape_and_bad_warmup():
    s = cosine_schedule(1.0, 0.0, 5)
    assert len(s) == 5 and s[0] == 1.0 and s[-1] > 0.0 and np.all(np.diff(s) < 0)
    assert np.array_equal(cosine_schedule(2.0, 0.0, 3, warmup_steps=3), np.linspace(0, 2, 3))
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)


def test_schedules_from_config():
    cfg = parse_config(
        PretrainConfig,
        {
            "optim": {"batch_size_per_worker": 32, "base_lr": 4e-4, "min_lr": 1e-6, "warmup_steps": 10},
            "loss": {"teacher_temp": 0.04, "final_teacher_temp": 0.07, "warmup_teacher_temp_steps": 30},
            "run": {"steps": 100},
        },
    )
    s = Schedules.from_config(cfg, world_size=4)
    assert s.total_steps == 100
    peak = 4e-4 * 32 * 4 / 256
    assert s.lr[0] == 0.0 and s.lr[9] == pytest.approx(peak) and s.lr[10] == pytest.approx(peak)
    last = 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 89 / 90))  # 90 cosine steps, the last is i=89
    assert s.lr[-1] == pytest.approx(last) and np.all(np.diff(s.lr[10:]) < 0)
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(0.4, rel=1e-3)
    assert s.momentum[0] == pytest.approx(0.9995) and 0.99999 < s.momentum[-1] <= 1.0  # the published default
    np.testing.assert_allclose(s.teacher_temp[:30], np.linspace(0.04, 0.07, 30))
    assert np.all(s.teacher_temp[30:] == 0.07)
    at = s.at(29)
    assert set(at) == {"lr", "wd", "momentum", "teacher_temp"} and at["teacher_temp"] == pytest.approx(0.07)
    assert all(isinstance(v, float) for v in at.values())
    assert math.isclose(s.at(50)["lr"], float(s.lr[50]))
    with pytest.raises(IndexError, match="outside the schedule"):
        s.at(100)
    assert Schedules.from_config(cfg, total_steps=40).total_steps == 40
