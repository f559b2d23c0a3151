"""The trainer with ``rollout.engine=vllm``, end to end on CPU (``make test-vllm``, the vLLM venv): ``python -m
research_rl.train`` as a user runs it, the vLLM engine inside a Ray rollout actor in its placement-group bundle, a
custom Ray resource ``fake_gpu`` standing in for the GPUs, 2 GRPO steps each, one run per weight-sync transport
(research_rl/sync; each vLLM worker receives through its own ``WeightReceiver``):

- colocated + ``ipc``: one ``fake_gpu`` shared by the learner rank and the rollout worker; the engine's worker maps
  the learner's shared-memory slots (CUDA IPC on GPUs). ``rollout.vllm_sleep_level`` null resolves to 2 and is
  printed; vLLM's CPU backend has no sleep mode, so the engine stays awake (tests/test_vllm_sleep.py checks the
  sleep/wake calls);
- disaggregated + ``collective`` and disaggregated + ``object_store``: the learner on one ``fake_gpu``, the rollout
  worker on two with tensor parallelism 2, which needs vLLM's ``mp`` executor inside the actor (vLLM's own choice
  there, its ``ray`` executor, fails on CPU: "current platform cpu does not support ray"; on GPUs it waits for GPUs
  the actor holds). Both tensor-parallel workers receive every bucket (by gloo broadcast as group ranks 1 and 2, or
  through vLLM's RPC from the object store) and load their shard of it.

Each run starts the engine from ``model.path`` and syncs the warmed-up policy into it before the first rollout, so
the probe after that first sync compares two different models unless the sync worked (tests/test_vllm_engine.py
measured ~8 nats between them). The model has head_dim 64 (vLLM's CPU attention rejects smaller heads).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("vllm")

from tests.test_e2e import _train, tiny_overrides  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.ray]

PLACEMENTS = {
    "colocated": ["placement.mode=colocated", "placement.gpus_per_node=1", "rollout.num_gpus_per_worker=1"],
    "disaggregated": ["placement.mode=disaggregated", "placement.gpus_per_node=3", "rollout.num_gpus_per_worker=2",
                      "rollout.vllm_tensor_parallel_size=2"],
}
RUNS = [("colocated", "ipc"), ("disaggregated", "collective"), ("disaggregated", "object_store")]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The debug model with head_dim 64 (hidden 128, 2 query heads, 1 KV head: each of 2 tensor-parallel ranks
    holds one query head and a copy of the KV head)."""
    from research_rl.config.schema import DebugModelConfig
    from research_rl.debug_model import build_debug_model
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("vllm_train") / "model"
    build_debug_model(str(out), str(ROOT / "data/corpus/corpus.jsonl"),
                      [str(ROOT / "data/musique/train.jsonl"), str(ROOT / "data/hotpotqa/train.jsonl")],
                      DebugModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=2,
                                       num_heads=2, num_kv_heads=1))
    return out


@pytest.mark.parametrize("placement, transport", RUNS, ids=[f"{p}-{t}" for p, t in RUNS])
def test_two_grpo_steps_on_vllm_in_ray_actors(placement, transport, vllm_model_dir, bm25_index, tmp_path,
                                               monkeypatch):
    # vLLM's CPU workers bind their OpenMP threads to cores; with two workers (TP 2) on one NUMA node it cannot
    # choose, so each gets one allowed core
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in (cores * 2)[:2]))
    run = tmp_path / "run"
    proc = _train(tiny_overrides(vllm_model_dir, bm25_index, run) + PLACEMENTS[placement] + [
        "rollout.engine=vllm", f"sync.transport={transport}", "placement.gpu_resource=fake_gpu",
        "learner.num_gpus_per_worker=1",
        "trainer.total_steps=2", "trainer.save_every=0", "validation.every=0", "rollout.max_response_len=256",
        "warmup.steps=10", "warmup.max_seq_len=512"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "research-rl run finished" in proc.stdout
    level = {"colocated": 2, "disaggregated": 0}[placement]
    assert f"rollout.vllm_sleep_level=null: {level} in placement.mode={placement}" in proc.stdout

    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(vllm_model_dir).parameters())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1 and "rollout/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("rollout/reward_mean", "rollout/response_len", "actor/kl", "timing/rollout", "timing/sync",
                    "sync/bytes", "sync/probe_mean_diff", "sync/probe_max_diff"):
            assert key in r, key
        # fp32 learner and engine: rounding only (the run stops above trainer.probe_tolerance, a mean of 0.05)
        assert r["sync/probe_mean_diff"] < 1e-4 and r["sync/probe_max_diff"] < 1e-3
        assert r["sync/bytes"] == 4 * params and r["rollout/response_len"] > 0  # every parameter, fp32, each step
    dumped = [json.loads(line) for s in (1, 2) for line in (run / f"rollouts/step_{s:06d}.jsonl").read_text()
              .splitlines()]
    assert len(dumped) == 8  # 2 steps × 2 prompts × group 2
    assert all(isinstance(d["reward"], float) and d["response"] for d in dumped)

    # the engine ran in the rollout worker's share of the placement group, and synced by the transport asked for
    report = json.loads((run / "placement.json").read_text())
    share = {"colocated": 0.5, "disaggregated": 2}[placement]
    assert [w["resources"].get("fake_gpu") for w in report["roles"]["rollout"]] == [share], report["roles"]
    assert report["sync"] == {"transport": transport, "dtype": "float32"}
