"""Hydra multirun sweeps: the sweep summary, one row per run with its final metrics.

    python -m research_rl.train -m experiment=debug_cpu algo.kl_coef=0,0.001 rollout.group_size=5,8
    python -m research_rl.sweep multirun/debug_cpu/2026-11-21_10-00-00      # print (and rewrite) the summary

Each run of a sweep is a directory ``SWEEP_DIR/<job number>/`` (Hydra's ``hydra.sweep.dir`` / ``hydra.job.num``)
that is also its ``trainer.output_dir``, with its own Ray namespace (``research_rl.train``); runs go one after
another (Hydra's basic launcher) on a local cluster, or on ``ray.address`` when set. ``SweepSummary`` (a Hydra
callback registered in ``conf/config.yaml``) rewrites ``SWEEP_DIR/sweep_summary.md`` and ``sweep_summary.csv``
after every run, so a sweep stopped half-way still has its rows, and a failed run is a row with its error.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

STATUS_FILE = "job_status.json"
SUMMARY_MD = "sweep_summary.md"
SUMMARY_CSV = "sweep_summary.csv"
METRICS = ("steps", "train_minutes", "reward_mean", "format_ok", "searches_per_traj", "val_em", "val_f1",
           "best_step", "best_value")


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    items = [str(o) for o in OmegaConf.load(path)]
    return dict(o.split("=", 1) for o in items if "=" in o)


def _final_metrics(summary: dict) -> dict:
    def last(key: str):
        h = summary.get(f"history/{key}") or []
        return h[-1] if h else None

    val = summary.get("val_last") or {}
    best = summary.get("best") or {}
    return {"steps": summary.get("steps"), "train_minutes": summary.get("train_minutes"),
            "reward_mean": last("reward_mean"), "format_ok": last("format_ok"),
            "searches_per_traj": last("searches_per_traj"), "val_em": val.get("val/em"), "val_f1": val.get("val/f1"),
            "best_step": best.get("step"), "best_value": best.get("value")}


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per run directory (``SWEEP_DIR/<n>/``), in job order: ``job``, ``status`` (ok, failed, running or
    incomplete), ``error``, ``run_dir``, ``overrides`` (``{key: value}``) and the ``METRICS`` of its summary.json."""
    rows = []
    runs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for run in runs:
        status = json.loads((run / STATUS_FILE).read_text()) if (run / STATUS_FILE).is_file() else {}
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        state = status.get("status") or ("ok" if summary else "running or incomplete")
        rows.append({"job": int(run.name), "status": state, "error": status.get("error", ""), "run_dir": str(run),
                     "overrides": _overrides(run), **_final_metrics(summary)})
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(sweep_dir: str | Path) -> Path:
    """Write ``sweep_summary.md`` and ``sweep_summary.csv`` in ``sweep_dir``; returns the Markdown path.

    Columns: job, the overrides that differ between runs, status, the final metrics (last step's rollout means,
    last validation EM/F1, best checkpoint), and the run directory; failed runs carry their error."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    keys = sorted({k for r in rows for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    header = ["job", *varying, "status", *METRICS, "run_dir", "error"]
    table = [[str(r["job"]), *[r["overrides"].get(k, "") for k in varying], r["status"],
              *[_fmt(r[m]) for m in METRICS], r["run_dir"], r["error"].replace("\n", " ").replace("|", "/")[:200]]
             for r in rows]
    with (sweep_dir / SUMMARY_CSV).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*header, "overrides"])
        for r, line in zip(rows, table):
            w.writerow([*line, " ".join(f"{k}={v}" for k, v in r["overrides"].items())])
    md = [f"# Sweep {sweep_dir}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in table]
    out = sweep_dir / SUMMARY_MD
    out.write_text("\n".join(md) + "\n")
    return out


class SweepSummary(Callback):
    """Hydra callback: after each multirun job, record its status in ``RUN_DIR/job_status.json`` and rewrite the
    sweep summary; at the end of the sweep, print where it is. Does nothing for single runs."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status == JobStatus.FAILED
        error = repr(job_return._return_value) if failed else ""  # the exception (``return_value`` re-raises it)
        (run_dir / STATUS_FILE).write_text(json.dumps({"status": "failed" if failed else "ok", "error": error}))
        write(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        out = write(config.hydra.sweep.dir)
        print(f"sweep summary: {out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m research_rl.sweep SWEEP_DIR   (a multirun directory holding run folders 0, 1, ...)",
              file=sys.stderr)
        return 2
    print(write(argv[0]).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
