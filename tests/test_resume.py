"""Exact resume through the real entry point (``python -m research_rl.train`` as a subprocess, local Ray cluster,
BM25 retriever, tiny model with a short warm-up, 2 DeepSpeed ZeRO-3 learner ranks; deterministic CPU settings):
a run killed with SIGKILL in the middle and resumed with ``resume=auto`` logs the same per-step metrics as the
uninterrupted run; a truncated newest checkpoint is skipped with a message naming the file and the run resumes
from the previous one; a resume exactly at an epoch boundary trains the remaining steps. (FSDP2 goes through the same
driver code: tests/test_e2e.py resumes it; tests/test_learner_dist.py restores both backends' state bit for bit.)

The train file holds 4 questions and a step takes 2, so an epoch is 2 steps and every run crosses epochs. Metrics
compared: every ``actor/*``, ``rollout/*``, ``sync/*`` and ``train/*`` key (within 1e-6 relative; they are equal
in practice) but ``sync/seconds``; ``timing/*``, ``retriever/*`` (latencies, a cache that starts cold) and
``sync/seconds`` (the sync's duration) are wall-clock facts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_e2e import ROOT, _train

pytestmark = [pytest.mark.slow, pytest.mark.ray]
COMPARED = ("actor/", "rollout/", "sync/", "train/")
WALL_CLOCK = {"sync/seconds"}  # under a compared prefix, but a duration


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    lines = (ROOT / "data/musique/train.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("data") / "musique" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _overrides(model_dir, index_dir, run_dir, train_file, *extra: str) -> list[str]:
    return ["experiment=debug_cpu", f"model.path={model_dir}", f"retriever.index_dir={index_dir}",
            f"trainer.output_dir={run_dir}", f"data.train_files=[{train_file}]", "warmup.steps=4",
            "warmup.batch_size=2", "trainer.prompts_per_step=2", "rollout.group_size=2",
            "rollout.max_response_len=48", "retriever.top_k=1", "validation.every=0", "trainer.save_every=1",
            "trainer.max_minutes=null", "ray.num_cpus=4", "learner.micro_batch_size=2",
            "rollout.mode=turn_sync",  # batches fixed by the turn: bitwise repeatable (async batches follow timing)
            *extra]


def _steps(run_dir: Path) -> dict[int, dict]:
    """Step -> its GRPO metrics row; fails if a step was logged twice."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/reward_mean" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in rows}


def _same_metrics(got: dict, want: dict, step: int) -> None:
    keys = sorted(k for k in want if k.startswith(COMPARED) and k not in WALL_CLOCK)
    assert sorted(k for k in got if k.startswith(COMPARED) and k not in WALL_CLOCK) == keys, step
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), f"step {step} {k}: {got[k]} != {want[k]}"


def _train_until_killed(overrides: list[str], run_dir: Path, after: str, timeout: float = 600) -> None:
    """Start a run and SIGKILL its whole process group (driver and Ray) once ``after`` exists."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "research_rl.train", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (run_dir / after).exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {after} was written"
            assert time.monotonic() < deadline, f"no {after} after {timeout} s"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_kill_resume_damaged_checkpoint_and_epoch_boundary(debug_model_dir, bm25_index, train_file, tmp_path):
    """2 DeepSpeed ZeRO-3 learner ranks, 6 steps = 3 epochs, a 4-step lr warm-up, against an uninterrupted run of
    the same config.

    (a) + (b) Killed after its step-2 checkpoint; its newest checkpoint then truncated: resume=auto says which file
        is wrong, resumes from the checkpoint before it, and the steps after that equal the uninterrupted run's.
    (c) That run was resumed for 4 steps, so it ended exactly at the end of epoch 2; resumed for 6 it trains steps
        5 and 6 (not zero steps), again equal to the uninterrupted run's."""
    from research_rl.driver import checkpoint

    # with an lr warm-up over the first 4 steps: its rate is a function of the step, so a resumed run continues it
    config = ("learner.num_workers=2", "learner.backend=deepspeed", "learner.zero_stage=3", "learner.lr_warmup_steps=4")

    def train(run_dir, steps):
        proc = _train(_overrides(debug_model_dir, bm25_index, run_dir, train_file, f"trainer.total_steps={steps}",
                                 *config))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    full = tmp_path / "uninterrupted"
    train(full, 6)
    want = _steps(full)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert [want[s]["actor/lr"] for s in want] == pytest.approx([5e-4 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])

    # (a) SIGKILL in the middle of the run
    run = tmp_path / "interrupted"
    _train_until_killed(_overrides(debug_model_dir, bm25_index, run, train_file, "trainer.total_steps=6", *config),
                        run, "checkpoints/step_000002")
    newest = checkpoint.latest_valid(run)
    killed_at = checkpoint.load_state(newest)["step"]
    assert 2 <= killed_at < 4, f"the kill came too late: the newest checkpoint is step {killed_at}"

    # (b) truncate a ZeRO optimizer shard of the newest checkpoint; the previous one (keep_last=2) is intact
    shard = sorted((newest / "sharded" / "state").glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    resumed_at = killed_at - 1
    proc = train(run, 4)
    assert f"checkpoint {newest} is invalid: {shard.relative_to(newest)} has" in proc.stderr, proc.stderr[-3000:]
    assert "(truncated); trying the previous one" in proc.stderr
    assert f"resumed from {checkpoint.checkpoint_dir(run, resumed_at)} at step {resumed_at}" in proc.stdout
    got = _steps(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(resumed_at + 1, 5):
        _same_metrics(got[step], want[step], step)

    # (c) step 4 is the end of epoch 2 (cursor at the end of the epoch's order): the resume must train 5 and 6
    state = checkpoint.load_state(checkpoint.checkpoint_dir(run, 4))
    assert (state["data_cursor"]["epoch"], state["data_cursor"]["position"]) == (1, 4), state["data_cursor"]
    proc = train(run, 6)
    assert f"resumed from {checkpoint.checkpoint_dir(run, 4)} at step 4" in proc.stdout
    got = _steps(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6], "(c) the resumed run did not train the remaining steps"
    for step in (5, 6):
        _same_metrics(got[step], want[step], step)
    assert [got[s]["train/epoch"] for s in (4, 5, 6)] == [2.0, 2.5, 3.0]
