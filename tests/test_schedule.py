"""Training schedules through the real entry point (``python -m research_rl.train`` as a subprocess, local Ray
cluster, BM25 retriever, tiny model): ``async`` disaggregated with a custom resource standing in for GPUs, dropping
what is too stale; ``one_step_off`` killed with SIGKILL after a checkpoint and resumed without losing or repeating
a prompt. (``sync`` is every other end-to-end test; tests/test_learning.py trains under all three.)

The train file holds 4 questions and a step takes 2, so an epoch is 2 steps: over 4 steps every question is trained
on exactly twice, and a checkpoint's data cursor must count the prompts trained on, not the ones generated ahead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.test_e2e import _train
from tests.test_resume import _overrides, _steps, _train_until_killed, train_file  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.ray]
DISAGGREGATED = ["placement.mode=disaggregated", "placement.gpus_per_node=2", "placement.gpu_resource=fake_gpu",
                 "learner.num_gpus_per_worker=1", "rollout.num_gpus_per_worker=1"]


def _trained_prompts(run_dir: Path, steps: int) -> list[list[str]]:
    """Per step, the question id of each group (rows come in groups of ``rollout.group_size``=2)."""
    out = []
    for step in range(1, steps + 1):
        rows = [json.loads(line) for line in (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        ids = [r["question_id"] for r in rows]
        assert ids[0::2] == ids[1::2], f"step {step}: a group was split: {ids}"
        out.append(ids[0::2])
    return out


def test_async_disaggregated_drops_what_is_too_stale(debug_model_dir, bm25_index, train_file, tmp_path):
    """``max_staleness=0``: the producer fills the buffer with the next batch while the learner trains on the
    current one, on weights one version old, so every step after the first drops those groups (counted in
    ``rollout/dropped_stale``) and trains on groups generated after the sync: staleness 0 throughout. The learner
    and the rollout worker each hold one ``fake_gpu`` (placement.json); the cursor counts the trained prompts,
    dropped ones included, and each trained group is whole."""
    run = tmp_path / "async"
    proc = _train(_overrides(debug_model_dir, bm25_index, run, train_file, "trainer.total_steps=3",
                             "trainer.schedule=async", "trainer.max_staleness=0", *DISAGGREGATED))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = _steps(run)
    assert sorted(steps) == [1, 2, 3]
    assert all(steps[s]["rollout/staleness_mean"] == 0 for s in steps)
    dropped = [steps[s]["rollout/dropped_stale"] for s in (1, 2, 3)]
    assert dropped[0] == 0 and sum(dropped) > 0, dropped
    assert all(dropped[i] % 2 == 0 for i in range(3)), "whole groups are dropped"
    assert all(steps[s]["rollout/generated_tokens"] > 0 and steps[s]["timing/rollout_busy"] > 0 for s in steps)
    assert "rollout/is_weight_mean" in steps[3]  # algo.rollout_is=auto: TIS under async
    report = json.loads((run / "placement.json").read_text())
    assert report["sync"]["transport"] == "collective"  # disaggregated: the broadcast group
    state = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    consumed = 3 * 2 + sum(dropped) // 2  # groups trained on + groups dropped, in draw order
    cursor = state["data_cursor"]
    assert cursor["epoch"] * 4 + cursor["position"] == consumed, cursor
    _trained_prompts(run, 3)


def test_one_step_off_kill_and_resume_loses_and_repeats_no_prompt(debug_model_dir, bm25_index, train_file,
                                                                    tmp_path):
    """Uninterrupted, 4 steps: staleness 0 at step 1 (nothing ran ahead of it) and 1 after; each question trained
    on twice. Killed after its step-2 checkpoint (with step 3's rollout generated or under way) and resumed: step
    3 is generated again from the checkpoint's weights (staleness 0: the resumed run has nothing ahead either), and
    the prompts of every step are the uninterrupted run's, none lost and none twice."""
    from research_rl.driver import checkpoint

    extra = ("trainer.total_steps=4", "trainer.schedule=one_step_off", "trainer.keep_last=4")
    full = tmp_path / "uninterrupted"
    proc = _train(_overrides(debug_model_dir, bm25_index, full, train_file, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _steps(full)
    assert [want[s]["rollout/staleness_mean"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    prompts = _trained_prompts(full, 4)
    assert set(Counter(q for step in prompts for q in step).values()) == {2}, prompts
    state = checkpoint.load_state(checkpoint.checkpoint_dir(full, 2))
    assert (state["data_cursor"]["epoch"], state["data_cursor"]["position"]) == (0, 4), state["data_cursor"]

    run = tmp_path / "interrupted"
    _train_until_killed(_overrides(debug_model_dir, bm25_index, run, train_file, *extra), run,
                        "checkpoints/step_000002")
    killed_at = checkpoint.load_state(checkpoint.latest_valid(run))["step"]
    assert 2 <= killed_at < 4, f"the kill came too late: the newest checkpoint is step {killed_at}"
    proc = _train(_overrides(debug_model_dir, bm25_index, run, train_file, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {killed_at}" in proc.stdout
    got = _steps(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert got[killed_at + 1]["rollout/staleness_mean"] == 0
    assert _trained_prompts(run, 4) == prompts
