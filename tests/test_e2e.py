"""End to end, through a local Ray cluster with the real BM25 index and the tiny model (subprocesses, as a user
runs it): 2 GRPO steps, rollouts with masked <result> blocks, a checkpoint that reloads, resume=auto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import start_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _train(overrides: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "research_rl.train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-8000:])
    return proc


def tiny_overrides(model_dir, index_dir, run_dir) -> list[str]:
    return ["experiment=debug_cpu", f"model.path={model_dir}", f"retriever.index_dir={index_dir}",
            f"trainer.output_dir={run_dir}", "trainer.prompts_per_step=2", "rollout.group_size=2",
            "rollout.max_response_len=384", "retriever.top_k=1", "warmup.steps=40", "warmup.batch_size=4",
            "warmup.max_seq_len=1024", "validation.num_questions=2", "ray.num_cpus=4", "trainer.max_minutes=null",
            "learner.micro_batch_size=2"]


def test_two_grpo_steps_checkpoint_and_resume(debug_model_dir, bm25_index, tmp_path, tokenizer):
    run = tmp_path / "run"
    # learner.offload: the optimizer state goes to CPU around each rollout (a round trip that changes nothing)
    proc = _train(tiny_overrides(debug_model_dir, bm25_index, run) + ["trainer.total_steps=2", "trainer.save_every=1",
                                                                      "validation.every=2", "learner.offload=optimizer"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "research-rl run finished" in proc.stdout

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1 and "rollout/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rollout/reward_mean", "rollout/searches_per_traj", "rollout/response_len", "actor/kl",
                "actor/entropy", "actor/grad_norm", "timing/rollout", "timing/update", "timing/sync", "timing/offload",
                "timing/reload",
                "sync/probe_max_diff", "retriever/p50_ms", "retriever/p99_ms", "retriever/batch_size",
                "retriever/cache_hit_rate", "retriever/errors"):
        assert key in steps[-1], key
    assert all(r["retriever/errors"] == 0 for r in steps)
    assert steps[-1]["sync/probe_max_diff"] < 1e-3
    # colocated on one host: the ipc transport (shared memory standing in for CUDA IPC), fp32 on CPU
    assert json.loads((run / "placement.json").read_text())["sync"] == {"transport": "ipc", "dtype": "float32"}
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(debug_model_dir).parameters())
    assert all(r["sync/bytes"] == 4 * params and r["sync/probe_mean_diff"] < 1e-4 for r in steps)
    assert any("val/em" in r for r in rows)

    dumped = [json.loads(line) for run_step in (1, 2)
              for line in (run / f"rollouts/step_{run_step:06d}.jsonl").read_text().splitlines()]
    assert len(dumped) == 8 and all({"question", "response", "reward", "reason", "searches"} <= set(d) for d in dumped)
    searched = [d for d in dumped if d["searches"] > 0]
    assert searched, "the warmed-up model should search at least once in 8 trajectories"
    for d in searched:  # result blocks are in the text and their tokens are outside the loss mask
        assert "<result>" in d["response"] and d["result_tokens"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2

    # validation is scored by the evaluator (per dataset and overall); the best validation keeps checkpoints/best
    val = next(r for r in rows if r["step"] == 2 and "val/em" in r)
    for key in ("val/musique/em", "val/hotpotqa/f1", "val/cover_em", "val/searches", "val/response_len",
                "val/format_fail"):
        assert key in val, key
    from research_rl.driver import checkpoint

    assert summary["best"]["metric"] == "val/em" and summary["best"]["step"] == 2
    assert summary["best"]["value"] == val["val/em"] and checkpoint.is_valid(run / "checkpoints/best")
    assert json.loads((run / "checkpoints/best" / checkpoint.STATE_FILE).read_text())["step"] == 2

    # training curves as PNG images, read back as real images
    import matplotlib.image

    plot = subprocess.run([sys.executable, "-m", "research_rl.plot", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert plot.returncode == 0, plot.stderr
    for name in ("reward", "response_length", "searches", "validation", "kl", "entropy", "overview"):
        image = matplotlib.image.imread(run / "plots" / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name
    assert any(r["step"] == 0 and "val/em" in r for r in rows)  # validation before training is on the curve

    # the checkpoint is a Hugging Face model directory
    from transformers import AutoModelForCausalLM

    ckpt = run / "checkpoints/step_000002"
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert model.config.vocab_size == len(tokenizer)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_cursor"]["position"] > 0

    # resume=auto continues from the newest checkpoint and trains the remaining steps only -- this time searching
    # through the HTTP service (retriever.url) instead of an in-cluster actor
    server, url = start_server(bm25_index)
    try:
        proc = _train(tiny_overrides(debug_model_dir, bm25_index, run) + [
            "trainer.total_steps=3", "trainer.save_every=1", "validation.every=0", f"retriever.url={url}",
            "learner.offload=optimizer"])
        stats = requests.get(f"{url}/stats", timeout=5).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert checkpoint.is_valid(run / "checkpoints/best")  # untouched by the resumed run (no validation there)
    assert json.loads((run / "summary.json").read_text())["best"]["step"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rollout/reward_mean" in r] == [1, 2, 3]
    assert rows[-1]["retriever/errors"] == 0
    searches = sum(json.loads(line)["searches"] for line in
                   (run / "rollouts/step_000003.jsonl").read_text().splitlines())
    # the rollouts' searches went to the service (empty queries are never sent)
    assert stats["errors"] == 0 and stats["queries"] <= searches
    assert (stats["queries"] > 0) == (searches > 0)


def test_missing_debug_model_names_the_build_command(bm25_index, tmp_path):
    proc = _train(tiny_overrides("artifacts/no_such_model", bm25_index, tmp_path / "run"))
    assert proc.returncode != 0
    assert "python -m research_rl.debug_model" in proc.stderr


def testmissing_index_names_the_build_command(debug_model_dir, tmp_path):
    proc = _train(tiny_overrides(debug_model_dir, tmp_path / "no_index", tmp_path / "run"))
    assert proc.returncode != 0
    assert "retriever_service.build_index" in proc.stderr


def test_unreachable_retriever_url_fails_before_training(debug_model_dir, bm25_index, tmp_path):
    from helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    proc = _train(tiny_overrides(debug_model_dir, bm25_index, tmp_path / "run") + [f"retriever.url={url}"])
    assert proc.returncode != 0
    assert f"retriever.url={url} does not answer GET /health" in proc.stderr
    assert "python -m retriever_service.serve" in proc.stderr
