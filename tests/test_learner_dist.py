"""Invariance of the learner across ranks, micro-batching and backends, on real gloo process groups (CPU).

Two groups of spawned processes run the same GRPO update on the same 8 trajectories of very different lengths:
one process with the whole batch, two processes with half of it each. Every variant must leave the same
parameters as the reference variant (1 rank, FSDP2, fixed micro-batches of 4):

- 2 ranks × half batch = 1 rank × full batch (FSDP2, DeepSpeed ZeRO-2, ZeRO-3);
- micro-batches of 1 (4 accumulations per 4 rows) = micro-batches of 4;
- token-budget micro-batches (here the two ranks get different numbers of micro-batches, so one of them runs a
  zero-weighted padding pass) = fixed micro-batches;
- FSDP2 = DeepSpeed ZeRO-2 = ZeRO-3; parameter/optimizer CPU offload and an offloaded reference change nothing.

Tolerances (float32 on CPU; only the summation order differs between variants): log-probs on scored positions
within 1e-5; loss, KL, entropy and gradient norm within 1e-4 relative; parameters after one AdamW step (lr 1e-3)
within 1e-5 absolute, 1% of the step. (Almost every parameter agrees within 2e-6, but the first AdamW step is
lr·g/(|g|+1e-8), so an element whose gradient is near 1e-8 turns a 1e-12 difference in summation order into
~4e-6.) A variant that dropped, double-counted or mis-weighted a micro-batch or rank moves parameters by ~lr.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.unit, pytest.mark.timeout(900)]

LENGTHS = [40, 12, 33, 20, 40, 10, 12, 8]  # attended tokens per row; rows 0-3 go to rank 0, rows 4-7 to rank 1
PROMPT = 6
BASE = "fsdp2_mb4"
# name -> learner settings; every variant runs at world sizes 1 and 2
VARIANTS = {
    "fsdp2_mb4": dict(backend="fsdp2", micro_batch_size=4),
    "fsdp2_mb1": dict(backend="fsdp2", micro_batch_size=1),
    # budget 64: rank 0 packs [40] [33] [20, 12], rank 1 [40] [12, 10, 8]: 3 and 2 micro-batches
    "fsdp2_tokens64": dict(backend="fsdp2", micro_batch_size=4, max_tokens_per_micro_batch=64),
    "fsdp2_offload": dict(backend="fsdp2", micro_batch_size=2, cpu_offload=True, ref_offload=True),
    "zero2_mb4": dict(backend="deepspeed", zero_stage=2, micro_batch_size=4),
    "zero2_tokens64": dict(backend="deepspeed", zero_stage=2, micro_batch_size=4, max_tokens_per_micro_batch=64,
                           ref_offload=True),
    "zero3_mb1": dict(backend="deepspeed", zero_stage=3, micro_batch_size=1),
    "zero3_tokens64": dict(backend="deepspeed", zero_stage=3, micro_batch_size=4, max_tokens_per_micro_batch=64,
                           ref_offload=True),
}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, width = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(10, 2000, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        attn[i, :length] = 1
    mask = attn.clone()
    mask[:, :PROMPT] = 0
    return {"input_ids": ids * attn, "attention_mask": attn, "loss_mask": mask,
            "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, 1.5, -0.7, -1.0])}


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from research_rl.config import AlgoConfig, LearnerConfig
    from research_rl.learner import learner_class

    torch.set_num_threads(1)
    full = _batch()
    shard = {k: v.chunk(world)[rank] for k, v in full.items()}
    algo = AlgoConfig(kl_coef=0.05, entropy_coef=0.01)
    try:
        for name, settings in VARIANTS.items():
            settings = dict(settings)
            ref_offload = settings.pop("ref_offload", False)
            cfg = LearnerConfig(lr=1e-3, weight_decay=0.01, grad_clip=1.0, **settings)
            learner = learner_class(cfg.backend)(cfg, algo, rank, world)
            learner.init_process_group("127.0.0.1", port)  # joins once; later variants reuse the group
            learner.load_policy(model_dir)
            learner.load_reference(model_dir, offload=ref_offload)
            batch = dict(shard)
            batch.update(learner.compute_log_probs(batch))
            metrics = learner.update(batch)
            params = learner.full_state_dict()
            if rank == 0:
                torch.save({"params": params, "metrics": metrics}, Path(out_dir) / f"{name}.pt")
            torch.save({k: batch[k] for k in ("old_log_probs", "ref_log_probs")},
                       Path(out_dir) / f"{name}.logp{rank}.pt")
            del learner
    finally:
        dist.destroy_process_group()


def _spawn(world: int, model_dir: Path, out_dir: Path, timeout_s: float = 600) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir.mkdir(parents=True)
    ctx = mp.start_processes(_worker, args=(world, port, str(model_dir), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} learner processes did not finish in {timeout_s:.0f} s (a collective hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def results(debug_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("learner_dist")
    out = {}
    for world in (1, 2):
        _spawn(world, debug_model_dir, root / f"world{world}")
        for name in VARIANTS:
            r = torch.load(root / f"world{world}" / f"{name}.pt")
            parts = [torch.load(root / f"world{world}" / f"{name}.logp{rank}.pt") for rank in range(world)]
            r["log_probs"] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            out[(world, name)] = r
    return out


CASES = [(world, name) for world in (1, 2) for name in VARIANTS if (world, name) != (1, BASE)]


@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}rank-{n}" for w, n in CASES])
def test_update_matches_one_rank_fsdp2_fixed_micro_batches(results, world, name):
    """Same parameters (1e-5 abs = 1% of lr), log-probs on scored positions (1e-5 abs), loss terms and gradient norm
    (1e-4 rel) as the reference."""
    base, got = results[(1, BASE)], results[(world, name)]
    scored = _batch()["loss_mask"][:, 1:]  # positions past a row's end depend on its micro-batch's width
    for key in ("old_log_probs", "ref_log_probs"):
        torch.testing.assert_close(got["log_probs"][key] * scored, base["log_probs"][key] * scored, rtol=0, atol=1e-5,
                                   msg=key)
    for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm", "actor/num_tokens"):
        assert got["metrics"][key] == pytest.approx(base["metrics"][key], rel=1e-4, abs=1e-7), key
    assert got["metrics"]["actor/skipped_step"] == 0
    assert sorted(got["params"]) == sorted(base["params"])
    for key, value in base["params"].items():
        torch.testing.assert_close(got["params"][key], value, rtol=0, atol=1e-5,
                                   msg=lambda m, key=key: f"{key} after one update: {m}")


def test_the_update_moves_parameters_by_about_lr(results, debug_model_dir):
    """The 2e-6 tolerance above is meaningful: one AdamW step at lr 1e-3 moves parameters by ~1e-3."""
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(debug_model_dir).state_dict()
    after = results[(1, BASE)]["params"]
    assert max(float((after[k] - initial[k]).abs().max()) for k in after) > 5e-4


def test_token_budget_packs_unequal_micro_batch_counts_per_rank(results):
    """The budget-64 variants ran 3 micro-batches on rank 0 and 2 (+ 1 zero-weighted padding pass) on rank 1."""
    from research_rl.learner import plan_micro_batches

    assert plan_micro_batches(LENGTHS[:4], 4, 64) == [[0], [2], [3, 1]]
    assert plan_micro_batches(LENGTHS[4:], 4, 64) == [[0], [2, 1, 3]]
    assert results[(2, "fsdp2_tokens64")]["metrics"]["actor/micro_batches"] == 3
