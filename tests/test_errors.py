"""Errors a new user meets first: an unknown key or experiment gets the keys meant ("did you mean", difflib over the
schema) from every entry point and both launch scripts, which name the real bad key; a missing file is one line
naming the key and the path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from research_rl.config.compose import check_overrides, compose_config
from research_rl.config.schema import ConfigError, suggest_keys

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("typo, meant", [
    ("learner.lrr", "learner.lr"),              # a close key in its section
    ("rollout.groupsize", "rollout.group_size"),
    ("trainer.lr", "learner.lr"),               # the same field in another section
    ("kl_coef", "algo.kl_coef"),                # a field without its section
    ("eval.metod", "eval.method"),
])
def test_suggestions_are_the_key_meant(typo, meant):
    assert suggest_keys(typo)[0] == meant
    assert not any(typo.startswith(f"{k}.") for k in suggest_keys(typo))  # never the key's own section


def test_compose_names_the_real_key_and_the_one_meant():
    with pytest.raises(ConfigError) as e:
        compose_config(["experiment=debug_cpu", "rollout.group_sise=4"])
    assert e.value.key == "rollout.group_sise" and "did you mean 'rollout.group_size'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        compose_config(["experiment=debug_cp"])
    assert e.value.key == "experiment" and "did you mean 'debug_cpu' or 'demo_cpu'?" in str(e.value)
    with pytest.raises(ConfigError) as e:  # '+' adds a key for Hydra; the schema still refuses it
        compose_config(["experiment=debug_cpu", "+learner.lrate=1"])
    assert e.value.key == "learner.lrate"
    with pytest.raises(ConfigError) as e:  # a value of the wrong type names its key, not 'override'
        compose_config(["experiment=debug_cpu", "learner.lr=abc"])
    assert e.value.key == "learner.lr"
    check_overrides(["experiment=debug_cpu", "hydra.job.chdir=true", "hydra/job_logging=none",
                     "algo.kl_coef=0,0.001", "~eval.judge.model"])  # valid: groups, hydra.*, sweeps, deletions


def _run(args, env=None, timeout=120):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("module, override, meant", [
    ("research_rl.train", "learner.lrr=1e-4", "learner.lr"),
    ("research_rl.train", "-m learner.lrr=1e-4,1e-5", "learner.lr"),  # a sweep: checked before Hydra runs a job
    ("research_rl.evaluate", "eval.limt=2", "eval.limit"),
    ("research_rl.debug_model", "model.debug.hiden_size=8", "model.debug.hidden_size"),
])
def test_every_entry_point_suggests(module, override, meant):
    proc = _run([sys.executable, "-m", module, "experiment=debug_cpu", *override.split()])
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"did you mean '{meant}'" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_submit_sh_reports_the_real_bad_key():
    proc = _run(["bash", str(ROOT / "launch/submit.sh"), "debug_cpu", "rollout.group_sise=4"],
                env={"RAY_ADDRESS": "http://127.0.0.1:1", "PYTHON": sys.executable})
    assert proc.returncode != 0
    assert "config error at 'rollout.group_sise'" in proc.stderr and "did you mean 'rollout.group_size'" in proc.stderr
    assert "'override'" not in proc.stderr


def test_local_sh_reports_the_real_bad_key(tmp_path):
    """launch/local.sh as a user runs it, in a copy of the repository whose ``make`` is a no-op (the venv is
    this one) so that only the script's own steps run."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch/local.sh").write_text((ROOT / "launch/local.sh").read_text())
    for name in ("research_rl", "retriever_service", "conf", "data"):
        (repo / name).symlink_to(ROOT / name)
    (repo / ".venv/bin").mkdir(parents=True)
    (repo / ".venv/bin/python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (repo / ".venv/bin/python").chmod(0o755)
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "make").write_text("#!/bin/sh\nexit 0\n")
    (shims / "make").chmod(0o755)
    proc = _run(["bash", str(repo / "launch/local.sh"), "debug_cpu", "learner.lrr=1e-4"],
                env={"PATH": f"{shims}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "config error at 'learner.lrr': unknown key; did you mean 'learner.lr'?" in proc.stderr, proc.stderr
    assert "'override'" not in proc.stderr


def test_a_missing_data_file_is_one_line_naming_key_and_path(debug_model_dir, bm25_index, tmp_path):
    missing = tmp_path / "nq" / "train.parquet"
    proc = _run([sys.executable, "-m", "research_rl.train", "experiment=debug_cpu", f"model.path={debug_model_dir}",
                 f"retriever.index_dir={bm25_index}", f"trainer.output_dir={tmp_path / 'run'}",
                 f"data.train_files=[{missing}]"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"data.train_files: data file not found: {missing}"]
