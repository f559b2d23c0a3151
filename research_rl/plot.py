"""Training curves as PNG, like the ReSearch paper's Figures 3-4 (training reward, response length, number of
searches, validation score over steps), plus what a run is judged by while it trains: the format-correct rate, the
validation format-fail rate, validation per dataset, KL and entropy.

    python -m research_rl.plot RUN_DIR [--out DIR] [--x step|minutes] [--smooth N]

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per step, as the trainer writes it) and writes
``RUN_DIR/plots/<name>.png`` and one ``overview.png`` with every panel. The reward is drawn per step (faint) and
as a trailing mean over ``--smooth`` steps, with a band: the 95% interval of that trailing mean (± 1.96 standard
errors over the window's trajectories, from ``rollout/trajectories`` and ``rollout/reward_std``), or, for rows
logged without ``rollout/trajectories``, ± the smoothed spread of the trajectories' rewards. The first and last
quarters' means are drawn over their steps with their 95% intervals, and the panel's title gives their difference
± its standard error (``research_rl.driver.curve.quarter_change``). ``--x minutes`` puts wall-clock minutes since the
first GRPO step (the rows' ``time``) on every x axis; ``reward_wallclock.png`` is always drawn that way. Response
length counts model tokens only (inserted ``<result>`` tokens excluded), as in the paper. Warm-up rows (step -1)
are not drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from research_rl.data import iter_jsonl
from research_rl.driver.curve import quarter_change

PANELS = [  # (file name, title, metric keys, y label); "val/*/em" expands to every dataset validated on
    ("reward", "Training reward", ["rollout/reward_mean"], "mean reward"),
    ("format_ok", "Format-correct rate (training)", ["rollout/format_ok"], "fraction of trajectories"),
    ("response_length", "Response length (model tokens)", ["rollout/response_len"], "tokens"),
    ("searches", "Searches per trajectory", ["rollout/searches_per_traj"], "searches"),
    ("validation", "Validation", ["val/em", "val/f1"], "score"),
    ("validation_datasets", "Validation EM per dataset", ["val/*/em"], "exact match"),
    ("validation_format_fail", "Validation format-fail rate", ["val/format_fail"], "fraction of questions"),
    ("kl", "KL to the reference policy", ["actor/kl"], "KL (k3)"),
    ("entropy", "Policy entropy", ["actor/entropy"], "nats"),
    ("reward_wallclock", "Training reward over wall-clock time", ["rollout/reward_mean"], "mean reward"),
]
RATES = {"format_ok", "validation", "validation_datasets", "validation_format_fail"}  # fractions: y in [0, 1]
SMOOTHED = "rollout/reward_mean"  # drawn smoothed, with its interval (or its spread, SPREAD) as a band
SPREAD = "rollout/reward_std"
COUNT = "rollout/trajectories"


def reward_moments(series: dict[str, list[tuple[int, float]]]) -> dict[int, tuple]:
    """``{step: curve.step_moments}`` of every step whose row has ``rollout/trajectories``."""
    from research_rl.driver.curve import step_moments

    keys = (SMOOTHED, SPREAD, COUNT, "rollout/format_ok")
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for step, value in series.get(key, []):
            rows.setdefault(step, {})[key] = value
    return {step: m for step, row in sorted(rows.items()) if (m := step_moments(row)) is not None}


def windowed_interval(moments: list[tuple], window: int) -> tuple[list[float], list[float]]:
    """The trailing ``window``-step pooled mean reward of each step and its standard error over the window's
    trajectories (``curve.pool``)."""
    from research_rl.driver.curve import pool

    pooled = [pool(moments[max(0, i - window + 1):i + 1]) for i in range(len(moments))]
    return [p["mean"] for p in pooled], [p["se"] for p in pooled]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for every numeric key of the training steps (step >= 0), ``time`` aside.

    Raises:
        FileNotFoundError: no metrics file.
        DataError (a ValueError): a line is not a JSON object (``FILE:LINE``).
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for _, row in iter_jsonl(path):
        step = row.get("step")
        if not isinstance(step, int) or step < 0:
            continue  # warm-up rows are logged at step -1
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                series.setdefault(key, []).append((step, float(value)))
    return series


def step_minutes(path: Path) -> dict[int, float]:
    """``{step: wall-clock minutes since the first GRPO row}``, from each step's first row's ``time``."""
    times: dict[int, float] = {}
    for _, row in iter_jsonl(path):
        step, t = row.get("step"), row.get("time")
        if isinstance(step, int) and step >= 0 and isinstance(t, (int, float)):
            times.setdefault(step, float(t))
    t0 = min(times.values(), default=0.0)
    return {s: (t - t0) / 60 for s, t in times.items()}


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def expand(keys: list[str], series: dict) -> list[str]:
    """``val/*/em`` -> ``val/<dataset>/em`` for every dataset in ``series``, sorted; other keys as they are."""
    out = []
    for key in keys:
        if "*" in key:
            head, tail = key.split("*")
            out += sorted(k for k in series if k.startswith(head) and k.endswith(tail) and k.count("/") == 2)
        else:
            out.append(key)
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, x: str = "step", smooth: int = 10) -> list[Path]:
    """Write one PNG per panel that has data, and ``overview.png``. Returns the files written.

    Args:
        x: ``step`` (GRPO step) or ``minutes`` (wall-clock since the first GRPO step).
        smooth: the reward's trailing-mean window, in steps (1: no smoothing).
    Raises:
        FileNotFoundError: no ``RUN_DIR/metrics.jsonl``.
        ValueError: it holds no GRPO step yet, or a bad ``x`` / ``smooth``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "minutes"):
        raise ValueError(f"--x must be step or minutes, got {x!r}")
    if smooth < 1:
        raise ValueError(f"--smooth must be >= 1, got {smooth}")
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: RUN_DIR must be a training run's output directory")
    series = read_metrics(metrics)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    panels = [(n, t, expand(k, series), y) for n, t, k, y in PANELS]
    panels = [p for p in panels if any(series.get(k) for k in p[2])]
    if not panels:
        raise ValueError(f"{metrics} holds no training steps yet")
    minutes = step_minutes(metrics)
    moments = reward_moments(series)

    def draw(ax, name, title, keys, ylabel):
        axis = "minutes" if name == "reward_wallclock" else x
        for key in keys:
            if not series.get(key):
                continue
            steps, values = map(list, zip(*series[key]))
            xs = [minutes.get(s, 0.0) for s in steps] if axis == "minutes" else steps
            label = key.split("/")[1] if name == "validation_datasets" else key
            if key == SMOOTHED:
                mean = trailing_mean(values, smooth)
                ax.plot(xs, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
                ax.plot(xs, mean, color="tab:blue", label=f"mean of {smooth} steps" if smooth > 1 else key)
                spread = dict(series.get(SPREAD, []))
                if set(steps) <= set(moments):  # every step has its trajectory count: the mean's interval
                    per_step = [moments[s] for s in steps]
                    mean, se = windowed_interval(per_step, smooth)
                    ax.fill_between(xs, [m - 1.96 * e for m, e in zip(mean, se)],
                                    [m + 1.96 * e for m, e in zip(mean, se)], color="tab:blue", alpha=0.15,
                                    label="95% interval of that mean")
                    change = quarter_change(per_step)
                    if change is not None:
                        q = change["quarter_steps"]
                        for part, sl, color in (("first", slice(0, q), "tab:gray"), ("last", slice(-q, None),
                                                                                    "tab:green")):
                            p = change[part]
                            ax.hlines(p["mean"], xs[sl][0], xs[sl][-1], color=color, linewidth=2,
                                      label=f"{part} quarter {p['mean']:.3f}")
                            ax.fill_between([xs[sl][0], xs[sl][-1]], p["mean"] - 1.96 * p["se"],
                                            p["mean"] + 1.96 * p["se"], color=color, alpha=0.2)
                        title = f"{title}\nlast - first quarter: {change['diff']:+.3f} ± {change['diff_se']:.3f} SE"
                elif spread:
                    sd = trailing_mean([spread.get(s, 0.0) for s in steps], smooth)
                    ax.fill_between(xs, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                                    color="tab:blue", alpha=0.15, label="± trajectory spread (std)")
            else:
                ax.plot(xs, values, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        if name in RATES:
            ax.set_ylim(-0.03, 1.03)  # a flat 0 or 1 reads as what it is, not as noise around it
        ax.set_title(title)
        ax.set_xlabel("wall-clock minutes" if axis == "minutes" else "step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or SMOOTHED in keys:
            ax.legend(fontsize=7)

    written = []
    for name, title, keys, ylabel in panels:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw(ax, name, title, keys, ylabel)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, (name, title, keys, ylabel) in zip(axes.flat, panels):
        draw(ax, name, title, keys, ylabel)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=100)
    plt.close(fig)
    written.append(out / "overview.png")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research_rl.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's output directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default RUN_DIR/plots)")
    parser.add_argument("--x", default="step", choices=("step", "minutes"),
                        help="x axis: GRPO step or wall-clock minutes (default step)")
    parser.add_argument("--smooth", type=int, default=10, help="the reward's trailing-mean window in steps (default 10)")
    args = parser.parse_args(argv)
    try:
        files = plot_run(args.run_dir, args.out, args.x, args.smooth)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for f in files:
        print(f)


if __name__ == "__main__":
    main()
