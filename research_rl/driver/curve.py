"""Whether the training reward rose: the first quarter of a run's GRPO steps against its last quarter, with the
standard error of the difference, computed over trajectories.

Each step contributes its moments, ``(trajectories, reward sum, reward sum of squares, format-correct count)``
(``step_moments``, from the step's ``rollout/*`` metrics). A quarter's mean is its reward sum over its
trajectories; its standard error is the sample standard deviation of those trajectories' rewards over the square
root of their number; the difference's is the two errors added in quadrature (``quarter_change``).

The trajectories of one group share a prompt and a policy, so they are not independent: the standard error over
trajectories understates the uncertainty of a quarter's mean somewhat (prompts differ in difficulty). It is the
textbook figure, reported with that caveat in the README; the demo's margin is checked against it and
against the relative rise, not against it alone.
"""

from __future__ import annotations

import math
from typing import Sequence

Moments = tuple[float, float, float, float]  # trajectories, reward sum, reward sum of squares, format-correct count


def step_moments(metrics: dict[str, float]) -> Moments | None:
    """A step's moments from its ``rollout/trajectories``, ``rollout/reward_mean``, ``rollout/reward_std`` (the
    population standard deviation, ``np.std``) and ``rollout/format_ok``; None when the step lacks them (rows
    written before ``rollout/trajectories`` was logged)."""
    try:
        n, mean, std = metrics["rollout/trajectories"], metrics["rollout/reward_mean"], metrics["rollout/reward_std"]
    except KeyError:
        return None
    return n, mean * n, n * (std * std + mean * mean), metrics.get("rollout/format_ok", 0.0) * n


def pool(moments: Sequence[Moments]) -> dict[str, float]:
    """Pooled over the steps' trajectories: ``mean`` reward, its ``se`` (sample standard deviation over the square
    root of the count), ``trajectories`` and ``format_ok`` (the format-correct rate)."""
    n = sum(m[0] for m in moments)
    mean = sum(m[1] for m in moments) / n
    var = max(0.0, (sum(m[2] for m in moments) - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "se": math.sqrt(var / n), "trajectories": int(n),
            "format_ok": sum(m[3] for m in moments) / n}


def quarter_change(moments: Sequence[Moments | None]) -> dict | None:
    """The last quarter's mean reward against the first's, over ``q = max(1, steps // 4)`` steps each.

    Returns None with fewer than 2 steps or when any step's moments are missing; otherwise ``quarter_steps``
    (``q``), ``first`` and ``last`` (each ``mean``, ``se``, ``trajectories``, ``format_ok``: the quarter's
    format-correct rate), ``diff`` (last mean − first mean), ``diff_se`` (the two ``se`` in quadrature),
    ``z`` (``diff / diff_se``; None when ``diff_se`` is 0), ``ci95`` (``diff ± 1.96 diff_se``) and ``relative``
    (``diff`` over the first mean; None when that mean is 0).
    """
    if len(moments) < 2 or any(m is None or m[0] <= 0 for m in moments):
        return None
    q = max(1, len(moments) // 4)
    first, last = pool(moments[:q]), pool(moments[-q:])
    diff = last["mean"] - first["mean"]
    se = math.hypot(first["se"], last["se"])
    return {"quarter_steps": q, "first": first, "last": last, "diff": diff, "diff_se": se,
            "z": diff / se if se > 0 else None, "ci95": [diff - 1.96 * se, diff + 1.96 * se],
            "relative": diff / first["mean"] if first["mean"] else None}


def describe(change: dict) -> str:
    """One line for the run summary, e.g. ``+0.052 ± 0.011 SE (95% interval +0.030 to +0.074; 4.7 SE; +87%)``."""
    lo, hi = change["ci95"]
    parts = [f"{change['diff']:+.3f} ± {change['diff_se']:.3f} SE (95% interval {lo:+.3f} to {hi:+.3f}"]
    if change["z"] is not None:
        parts.append(f"{change['z']:.1f} SE")
    if change["relative"] is not None:
        parts.append(f"{100 * change['relative']:+.0f}%")
    return "; ".join(parts) + ")"
