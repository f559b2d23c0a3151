"""The reward curve's first-vs-last-quarter change (research_rl.driver.curve) against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from research_rl.driver.curve import describe, quarter_change, step_moments

pytestmark = pytest.mark.unit


def _moments(rewards: list[float], format_ok: float = 1.0) -> tuple:
    return step_moments({"rollout/trajectories": float(len(rewards)), "rollout/reward_mean": float(np.mean(rewards)),
                         "rollout/reward_std": float(np.std(rewards)), "rollout/format_ok": format_ok})


def test_quarter_change_pools_trajectories_of_each_quarter():
    rng = np.random.default_rng(0)
    steps = [list(rng.uniform(0, 0.2 + s / 20, size=10)) for s in range(9)]  # 9 steps: quarters of 2 steps
    change = quarter_change([_moments(r, format_ok=0.5 + s / 20) for s, r in enumerate(steps)])
    first, last = steps[0] + steps[1], steps[7] + steps[8]
    assert change["quarter_steps"] == 2
    assert change["first"]["mean"] == pytest.approx(np.mean(first))
    assert change["first"]["se"] == pytest.approx(np.std(first, ddof=1) / math.sqrt(20))
    assert change["last"]["trajectories"] == 20 and change["last"]["format_ok"] == pytest.approx(0.875)
    diff_se = math.hypot(np.std(first, ddof=1) / math.sqrt(20), np.std(last, ddof=1) / math.sqrt(20))
    assert change["diff"] == pytest.approx(np.mean(last) - np.mean(first))
    assert change["diff_se"] == pytest.approx(diff_se) and change["z"] == pytest.approx(change["diff"] / diff_se)
    assert change["ci95"] == pytest.approx([change["diff"] - 1.96 * diff_se, change["diff"] + 1.96 * diff_se])
    assert change["relative"] == pytest.approx(change["diff"] / np.mean(first))
    assert describe(change).startswith(f"{change['diff']:+.3f} ± {diff_se:.3f} SE (95% interval")


def test_quarter_change_needs_every_step_and_two_of_them():
    assert quarter_change([_moments([0.1, 0.2])]) is None
    assert quarter_change([_moments([0.1, 0.2]), None]) is None
    assert step_moments({"rollout/reward_mean": 0.1, "rollout/reward_std": 0.0}) is None
    flat = quarter_change([_moments([0.1, 0.1]), _moments([0.1, 0.1])])
    assert flat["diff"] == pytest.approx(0.0) and flat["diff_se"] == pytest.approx(0.0, abs=1e-9)
