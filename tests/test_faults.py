"""Fault injection in a real training run (``python -m research_rl.train`` as a subprocess, local Ray cluster, 2
FSDP2 learner ranks): a learner rank killed with SIGKILL mid-run stops the run with one error naming the step, the
phase, the role and the rank, in seconds (the surviving rank may be stuck in a collective with the dead one: the
driver does not wait for it), and every committed checkpoint stays valid, so ``resume=auto`` can continue.

The other faults of docs/reliability.md are tested where their code is: the whole run killed and resumed
(tests/test_resume.py), a crash mid-checkpoint (tests/test_checkpoint.py), retriever replicas killed
(tests/test_retriever_actor.py), a rank dying in a stand-in loop (tests/test_group.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_e2e import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.reliability]


def test_a_killed_learner_rank_names_step_phase_role_and_rank_and_keeps_checkpoints(debug_model_dir, bm25_index,
                                                                                     tmp_path):
    from research_rl.driver import checkpoint as ckpt

    run = tmp_path / "run"
    overrides = ["experiment=debug_cpu", f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
                 f"trainer.output_dir={run}", "warmup.steps=4", "warmup.batch_size=2", "trainer.prompts_per_step=2",
                 "rollout.group_size=2", "rollout.max_response_len=48", "retriever.top_k=1", "validation.every=0",
                 "trainer.save_every=1", "trainer.total_steps=200", "trainer.max_minutes=null", "ray.num_cpus=4",
                 "learner.num_workers=2", "learner.num_cpus_per_worker=1", "learner.micro_batch_size=1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "research_rl.train", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ckpt.checkpoint_dir(run, 1).is_dir():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.05)
        pid = json.loads((run / "placement.json").read_text())["roles"]["learner"][1]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=300)
        stopped_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode != 0
    line = next((ln for ln in err.splitlines() if "TrainingError: " in ln), "")
    assert "learner rank 1 died during" in line and "step " in line and ", phase " in line, err[-3000:]
    print(f"\nstopped {stopped_after:.1f} s after the kill: {line[:200]}")
    assert stopped_after < 120
    committed = ckpt.list_checkpoints(run)
    assert committed, "the first checkpoint was committed before the kill"
    for path in committed:  # nothing half-written got a step name
        assert ckpt.check(path) is None, path
    assert ckpt.latest_valid(run) == committed[-1]
