"""Hydra multirun sweeps of the debug experiment: a run directory and Ray namespace per run, runs one after another
on a local cluster, and the sweep summary with one row per run (a failed run included, with its error)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_multirun_sweep_gives_each_run_its_dir_namespace_and_a_summary_row(debug_model_dir, bm25_index, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "research_rl.train", "-m", "experiment=debug_cpu",
           "algo.kl_coef=0,0.001", "learner.num_workers=1,3",  # 3 ranks cannot split 4 trajectories: those runs fail
           "trainer.total_steps=1", "warmup.steps=2", "validation.every=0", "trainer.prompts_per_step=2",
           "rollout.group_size=2", "rollout.max_response_len=96", "ray.num_cpus=4", f"model.path={debug_model_dir}",
           f"retriever.index_dir={bm25_index}", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0  # Hydra reports the failed runs at the end of the sweep, after running them all

    with (sweep_dir / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"], out.stderr[-3000:]
    assert {(r["algo.kl_coef"], r["learner.num_workers"]) for r in rows} == {
        ("0", "1"), ("0", "3"), ("0.001", "1"), ("0.001", "3")}
    ok = [r for r in rows if r["learner.num_workers"] == "1"]
    failed = [r for r in rows if r["learner.num_workers"] == "3"]
    assert all(r["status"] == "ok" and r["steps"] == "1" and r["reward_mean"] != "" for r in ok), ok
    assert all(r["status"] == "failed" and "learner.num_workers" in r["error"] for r in failed), failed

    namespaces = set()
    for r in ok:
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == sweep_dir
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints").is_dir()
        namespaces.add(json.loads((run_dir / "placement.json").read_text())["namespace"])
    assert len(namespaces) == 2 and all(ns.startswith("research_rl-sweep-") for ns in namespaces), namespaces
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert md.count("| ok |") == 2 and md.count("| failed |") == 2

    # the CLI rebuilds the same table from the run directories
    cli = subprocess.run([sys.executable, "-m", "research_rl.sweep", str(sweep_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout == md
