"""The job the submitter builds (entrypoint, runtime environment, paths) and its refusals before submitting.
Real submissions to a two-node cluster are in tests/test_cluster.py."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from research_rl import submit

pytestmark = pytest.mark.unit


def test_job_runs_train_with_the_overrides_and_uploads_the_repo_without_heavy_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", "/shared/hf")
    for name in submit.ENV_PASSTHROUGH:
        if name != "HF_HOME":
            monkeypatch.delenv(name, raising=False)
    job = submit.build_job("debug_cpu", ["trainer.total_steps=3", "ray.address=10.0.0.1:6379"],
                           storage=str(tmp_path), env=["NCCL_DEBUG=INFO"])
    args = shlex.split(job.entrypoint)
    assert args[:5] == ["python", "-m", "research_rl.train", "experiment=debug_cpu", "ray.address=auto"]
    assert "trainer.total_steps=3" in args and "ray.address=10.0.0.1:6379" not in args
    # the output directory goes to the storage every node sees; excluded inputs are read where they are
    # (the default outputs/EXP/DATE/TIME, resolved here once: a resubmitted job continues the same directory)
    out = [a for a in args if a.startswith("trainer.output_dir=")]
    assert len(out) == 1 and re.fullmatch(rf"trainer\.output_dir={tmp_path}/outputs/debug_cpu/\d{{4}}-\d\d-\d\d/"
                                          r"\d\d-\d\d-\d\d", out[0]), out
    assert f"model.path={submit.ROOT}/artifacts/debug_model" in args
    assert not any(a.startswith("data.") for a in args)  # the shipped data travels with the job
    env = job.runtime_env
    assert env["working_dir"] == str(submit.ROOT)
    assert {".git", ".venv", "outputs", "artifacts", "data/full"} <= set(env["excludes"])
    # a job's output is a log: the Hugging Face progress bars are off there
    assert env["env_vars"] == {"HF_HOME": "/shared/hf", "NCCL_DEBUG": "INFO", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    assert "pip" not in env and job.submission_id.startswith("research-rl-debug_cpu-")
    assert any("trainer.output_dir" in n for n in job.notes)


def test_print_mode_gives_submit_sh_the_job(capsys):
    assert submit.main(["--print", "debug_cpu", "trainer.total_steps=2", "--pip", "wandb"]) == 0
    job_id, runtime_env, entrypoint = capsys.readouterr().out.splitlines()
    assert job_id.startswith("research-rl-debug_cpu-")
    assert json.loads(runtime_env)["pip"] == ["wandb"]
    assert "trainer.total_steps=2" in shlex.split(entrypoint)


@pytest.mark.parametrize("argv, message", [
    (["debug_cpu", "trainer.totl_steps=2", "--address", "http://127.0.0.1:9"], "trainer.totl_steps"),
    (["no_such_experiment", "--address", "http://127.0.0.1:9"], "no_such_experiment"),
    (["debug_cpu", "--env", "NOVALUE", "--address", "http://127.0.0.1:9"], "KEY=VALUE"),
    (["debug_cpu", "learner.lr=nan", "--address", "http://127.0.0.1:9"], "'learner.lr'"),
    # the preflight's placement arithmetic: GPU workers on a config of CPU-only nodes
    (["debug_cpu", "learner.num_gpus_per_worker=1", "--address", "http://127.0.0.1:9"], "learner.num_gpus_per_worker"),
])
def test_bad_input_fails_before_anything_is_submitted(argv, message, capsys):
    """Exit 2 with the reason; the address points nowhere, so reaching it would fail differently."""
    assert submit.main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_address_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.main(["debug_cpu"]) == 2
    assert "RAY_ADDRESS" in capsys.readouterr().err


def test_files_and_packages_are_the_clusters_to_check(monkeypatch, tmp_path):
    """check_submit checks the config alone: a model directory and data that exist only on the cluster, and a
    backend installed only there, pass; the placement notes (idle GPUs) come back with the job."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    overrides = ["model.path=/cluster/models/qwen", "learner.backend=deepspeed", "placement.mode=disaggregated",
                 "learner.num_workers=32", "rollout.num_workers=16"]
    job = submit.build_job("research_qwen2.5_7b_instruct", overrides, storage=str(tmp_path))
    assert "model.path=/cluster/models/qwen" in shlex.split(job.entrypoint)
    assert any(n.startswith("placement: 16 of 64 GPUs stay idle") for n in job.notes), job.notes
