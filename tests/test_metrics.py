"""The metrics logger: metrics.jsonl always, TensorBoard by default, Weights & Biases when chosen (an optional extra,
imported only then; a stand-in module replaces it here)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from research_rl.driver.metrics import MetricsLogger

pytestmark = pytest.mark.unit


def test_tensorboard_by_default(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"rollout/reward_mean": 0.5, "note": "x"}, console=False)
    logger.close()
    assert (tmp_path / "tensorboard").is_dir()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 1 and row["rollout/reward_mean"] == 0.5 and row["note"] == "x"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_wandb_names_the_extra(tmp_path):
    with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'"):
        MetricsLogger(tmp_path, "wandb")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing half-started


def test_wandb_logs_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    ids = iter(["run-a", "run-b"])
    fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: next(ids)))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    logger = MetricsLogger(tmp_path, "wandb", project="proj", name="exp", config={"a": 1})
    logger.log(-1, {"warmup/nll": 3.0}, console=False)  # warm-up rows stay local: W&B steps never decrease
    logger.log(1, {"rollout/reward_mean": 0.5, "tag": "x", "flag": True}, console=False)
    logger.close()
    assert calls["init"] == [{"project": "proj", "name": "exp", "id": "run-a", "resume": "allow", "config": {"a": 1},
                              "dir": str(tmp_path)}]
    assert calls["log"] == [(1, {"rollout/reward_mean": 0.5})] and calls["finish"] == [True]
    assert not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2

    MetricsLogger(tmp_path, "wandb", project="proj", name="exp").close()  # a resumed run: the same W&B run id
    assert calls["init"][1]["id"] == "run-a"


def test_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="unknown metrics backend"):
        MetricsLogger(tmp_path, "mlflow")
