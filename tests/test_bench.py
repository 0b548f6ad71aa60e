"""The comparison benchmark's statistics (bench/convergence.py, bench/testbed.py) on constructed curves."""

import os
import sys

import numpy as np
import pytest

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))  # after the root: bench/rollout.py must not shadow rollout.py
import convergence  # noqa: E402
import testbed  # noqa: E402


def curve(accs, rollouts_per_eval=4096, start=0):
    """[(step, rollouts, acc)] evaluated every 8 steps."""
    return [(8 * k, start + rollouts_per_eval * k, a) for k, a in enumerate(accs)]


def test_primary_metric_is_the_second_half_mean():
    c = curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # steps 0..64
    assert convergence.primary_metric(c) == pytest.approx(np.mean([0.6, 0.7, 0.8, 0.9]))  # steps 40-64


def test_paired_differences_and_verdicts():
    rng = np.random.default_rng(0)
    base = [curve(0.4 + 0.05 * rng.standard_normal(9)) for _ in range(8)]
    shift = 0.03 + 0.005 * rng.standard_normal(8)  # a seed-dependent, always positive gain
    better = [[(s, r, a + d) for s, r, a in c] for c, d in zip(base, shift)]
    same = [list(c) for c in base]
    worse = [[(s, r, a - 0.1) for s, r, a in c] for c in base]
    # twice the rollouts per evaluation: at GRPO's last rollouts (32,768) it is at step 32, interpolated exactly
    costly = [curve([a for _, _, a in c], 8192) for c in base]
    rows = {r["variant"]: r for r in convergence.paired_differences(
        {"grpo": base, "better": better, "same": same, "worse": worse, "costly": costly})}
    assert rows["better"]["primary"][0] == pytest.approx(shift.mean())
    assert rows["better"]["primary"][1] > 0 and rows["better"]["verdict"] == "better"
    assert rows["better"]["equal steps"][0] == pytest.approx(shift.mean())
    assert rows["same"]["primary"][:3] == (0.0, 0.0, 0.0) and rows["same"]["verdict"] == "no difference detected"
    assert rows["worse"]["verdict"] == "worse" and rows["worse"]["verdict at equal rollouts"] == "worse"
    expected = np.mean([c[4][2] - c[-1][2] for c in base])  # costly at step 32 against base at step 64
    assert rows["costly"]["equal rollouts"][0] == pytest.approx(expected)
    assert rows["costly"]["equal steps"][0] == pytest.approx(0.0)
    # the other way round (the base generated more): both compared at the variant's final count, 32,768
    rows = {r["variant"]: r for r in convergence.paired_differences({"costly": costly, "grpo": base}, base="costly")}
    assert rows["grpo"]["equal rollouts"][0] == pytest.approx(-expected)
    assert convergence.verdict(None) == "not enough seeds"


def test_late_collapse():
    assert convergence.collapsed(curve([0.4, 0.4, 0.4, 0.4, 0.5, 0.5, 0.41, 0.45, 0.45]))  # 9 points below its best
    assert not convergence.collapsed(curve([0.4, 0.5, 0.3, 0.4, 0.45, 0.45, 0.44, 0.45, 0.45]))  # first half only
    assert not convergence.collapsed(curve([0.4, 0.4, 0.4, 0.4, 0.5, 0.5, 0.43, 0.45, 0.45]))  # 7 points
