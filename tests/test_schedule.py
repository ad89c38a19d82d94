"""LR schedules at their boundary steps, checked against the formulas written out by hand."""

from __future__ import annotations

import math

import pytest

from nanocli.train.schedule import Schedule
from nanocli_model.errors import ConfigError


def test_wsd_boundaries_linear():
    s = Schedule(kind="wsd", lr=1.0, min_lr=0.01, warmup=10, decay=20, total=100)
    assert s.warmup_steps == 10 and s.decay_steps == 20 and s.decay_start == 80
    assert s.lr_at(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert s.lr_at(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert s.lr_at(10) == s.lr_at(50) == s.lr_at(79) == 1.0  # stable
    assert s.lr_at(80) == pytest.approx(0.01 + 0.99 * (1 - 1 / 20))  # first decay step
    assert s.lr_at(89) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.lr_at(99) == pytest.approx(0.01)  # the last step is at min_lr
    assert s.phases() == {"warmup": (0, 10), "stable": (10, 80), "decay": (80, 100)}


def test_wsd_fractions_and_shapes():
    s = Schedule(kind="wsd", lr=2.0, min_lr=0.0, warmup=0.1, decay=0.2, total=50)
    assert (s.warmup_steps, s.decay_steps) == (5, 10)
    mid = 40 + 4  # progress (44 - 40 + 1) / 10 = 0.5
    assert s.lr_at(mid) == pytest.approx(1.0)
    c = Schedule(kind="wsd", lr=2.0, min_lr=0.0, warmup=0.1, decay=0.2, total=50, decay_shape="cosine")
    assert c.lr_at(mid) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    q = Schedule(kind="wsd", lr=2.0, min_lr=0.0, warmup=0.1, decay=0.2, total=50, decay_shape="1-sqrt")
    assert q.lr_at(mid) == pytest.approx(2.0 * (1 - math.sqrt(0.5)))
    assert q.lr_at(49) == pytest.approx(0.0)


def test_cosine_and_constant():
    s = Schedule(kind="cosine", lr=1.0, min_lr=0.1, warmup=4, total=24)
    assert s.lr_at(3) == pytest.approx(1.0)
    assert s.lr_at(4) == pytest.approx(1.0)  # cosine starts at the peak
    assert s.lr_at(23) == pytest.approx(0.1)
    assert s.lr_at(4 + 19 // 2) < 1.0
    mid = 4 + 19 / 2
    assert Schedule(kind="cosine", lr=1.0, min_lr=0.1, warmup=4, total=24).lr_at(4) > s.lr_at(int(mid)) > 0.1
    k = Schedule(kind="constant", lr=0.5, min_lr=0.0, warmup=0, total=10)
    assert [k.lr_at(i) for i in (0, 9)] == [0.5, 0.5]


def test_monotone_pieces():
    s = Schedule(kind="wsd", lr=1e-3, min_lr=1e-5, warmup=0.05, decay=0.3, total=200)
    lrs = [s.lr_at(i) for i in range(200)]
    w, d = s.warmup_steps, s.decay_start
    assert all(a < b for a, b in zip(lrs[:w], lrs[1:w]))
    assert all(a > b for a, b in zip(lrs[d:], lrs[d + 1:]))
    assert max(lrs) == pytest.approx(1e-3) and min(lrs[d:]) == pytest.approx(1e-5)


@pytest.mark.parametrize("kw", [dict(kind="step"), dict(decay_shape="exp"), dict(lr=0.0), dict(min_lr=1.0),
                                dict(warmup=60, decay=50, total=100), dict(total=0), dict(warmup=-1)])
def test_bad_schedules(kw):
    base = dict(kind="wsd", lr=0.1, min_lr=0.0, warmup=1, decay=1, total=100)
    with pytest.raises(ConfigError):
        Schedule(**{**base, **kw})
