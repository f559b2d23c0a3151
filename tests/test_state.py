"""The run state (research_rl/driver/state.py): best-metric tracking, summary.json, the trainer_state.json round
trip, and checkpoints written before RunState (tests/data/trainer_state_v1.json, from a real 2-step run) still
load with their values."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from research_rl.driver.state import HISTORY_KEYS, Best, RunState, capture_rng, restore_rng

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data"


def test_best_metric_is_strictly_higher_and_must_exist():
    s = RunState()
    assert s.update_best("val/em", {"val/em": 0.2}, 10, "/run/checkpoints/best")
    assert not s.update_best("val/em", {"val/em": 0.2}, 20, "/run/checkpoints/best")  # a tie keeps step 10
    assert not s.update_best("val/em", {"val/em": 0.1}, 25, "/run/checkpoints/best")
    assert s.update_best("val/em", {"val/em": 0.3}, 30, "/run/checkpoints/best")
    assert s.best == Best("val/em", 30, 0.3, "/run/checkpoints/best")
    with pytest.raises(ValueError, match=r"validation.best_metric=val/em is not a validation metric of this run; "
                                         r"available: \['val/f1'\]"):
        s.update_best("val/em", {"val/f1": 0.9, "val/n": 2.0}, 40, "/run/checkpoints/best")
    assert s.best.step == 30


def test_v1_checkpoint_loads_with_its_values():
    """The state file the driver wrote before RunState (validation, best and history in a ``summary`` dict)."""
    raw = json.loads((DATA / "trainer_state_v1.json").read_text())
    assert "version" not in raw and "summary" in raw  # the earlier layout
    s = RunState.from_json(raw)
    assert (s.step, s.policy_version) == (2, 2)
    assert s.data_cursor == {"epoch": 0, "position": 4, "seed": 42, "size": 261}
    assert s.train_seconds == raw["train_seconds"] > 0
    assert s.best == Best("val/em", 2, 0.0, raw["summary"]["best"]["path"])
    assert s.val_step == 2 and s.val_before["val/n"] == 2.0 and s.val_last["val/response_len"] == 384.0
    assert s.val_last == raw["summary"]["val_last"] and s.val_before == raw["summary"]["val_before"]
    assert s.history == {"reward_mean": [0.0, 0.0], "format_ok": [0.0, 0.0], "searches_per_traj": [0.0, 1.0]}
    assert s.warmup_seconds == 82.6 and s.warmup_final_nll == pytest.approx(3.37026, abs=1e-5)
    assert s.rng == raw["rng"] and len(s.rng["torch"]) == 5056


def test_v1_summary_is_reproduced_from_the_loaded_state():
    """summary.json keeps its keys and values: the v1 run's own summary.json, rebuilt from its state file."""
    s = RunState.from_json(json.loads((DATA / "trainer_state_v1.json").read_text()))
    want = json.loads((DATA / "summary_v1.json").read_text())
    got = s.summary(want["run_dir"], want["logger"], want["checkpoint"], want["dropped_prompts"])
    got["train_minutes"] = want["train_minutes"]  # the run ended after this checkpoint's training time
    assert sorted(got) == sorted(want)
    assert got == want


def test_round_trip_through_json_and_the_summary_formatter():
    from research_rl.train import format_summary

    s = RunState(step=3, policy_version=3, train_seconds=90.0, data_cursor={"epoch": 1, "position": 2},
                 warmup_seconds=12.5, warmup_final_nll=2.5)
    val = {"val/em": 0.5, "val/f1": 0.6, "val/searches_per_question": 1.5}
    s.val_before = {"val/em": 0.0, "val/f1": 0.1, "val/searches_per_question": 0.0}
    for step, reward in ((1, 0.1), (2, 0.2), (3, 0.4)):
        s.record_step({"rollout/reward_mean": reward, "rollout/format_ok": 1.0, "rollout/searches_per_traj": 1.0})
    s.record_validation(3, val)
    s.update_best("val/em", val, 3, "/r/checkpoints/best")
    s.rng = capture_rng()
    text = json.dumps(s.to_json({"seed": 1}))
    back = RunState.from_json(json.loads(text))
    assert back == s
    summary = back.summary("/r", "tensorboard", "/r/checkpoints/step_000003", 4)
    assert summary["history/reward_mean"] == [0.1, 0.2, 0.4] and summary["val_step"] == 3
    assert summary["best"] == {"metric": "val/em", "step": 3, "value": 0.5, "path": "/r/checkpoints/best"}
    assert summary["steps"] == 3 and summary["train_minutes"] == 1.5 and summary["dropped_prompts"] == 4
    out = format_summary(summary)
    assert "mean reward:           0.233 -> 0.233" in out and "EM 0.500  F1 0.600" in out
    assert "(val/em 0.500 at step 3)" in out
    fresh = RunState().summary("/r", "tensorboard", None, 0)  # nothing ran: no history, validation or best keys
    assert not [k for k in fresh if k.startswith("history/") or k in ("best", "val_last", "val_before")]
    assert set(HISTORY_KEYS) == {"reward_mean", "format_ok", "searches_per_traj"}


def test_rng_states_restore_exactly():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.random(), np.random.rand(), torch.rand(1)
    saved = json.loads(json.dumps(capture_rng()))
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
