"""Invariance of the learner across ranks, micro-batching and backends, on real gloo process groups (CPU).

Two groups of spawned processes run the same GRPO update on the same 8 trajectories of very different lengths:
one process with the whole batch, two processes with half of it each. Every variant must leave the same
parameters as the reference variant (1 rank, FSDP2, fixed micro-batches of 4):

- 2 ranks × half batch = 1 rank × full batch (FSDP2, DeepSpeed ZeRO-2, ZeRO-3);
- micro-batches of 1 (4 accumulations per 4 rows) = micro-batches of 4;
- token-budget micro-batches (here the two ranks get different numbers of micro-batches, so one of them runs a
  zero-weighted padding pass) = fixed micro-batches;
- FSDP2 = DeepSpeed ZeRO-2 = ZeRO-3; parameter/optimizer CPU offload and an offloaded reference change nothing;
- a ``ReferencePolicy`` of its own (what a separate reference group holds) gives the colocated reference's log-probs;
- packed micro-batches with a chunked LM head = fixed padded micro-batches; at 2 ranks, rank 1 building on the meta
  device and receiving rank 0's weights (``learner.rank0_load``, every FSDP2 variant) = every rank reading them.

The PPO variants (2 mini-batches × 2 epochs: four optimizer steps clipped against the log-probs recorded before
the first) are compared with their own 1-rank FSDP2 run the same way: 2 ranks × half batch = 1 rank, and ZeRO-3
with a token budget = FSDP2, since every mini-batch holds the same trajectories at any world size. So are the
``algo.loss_agg=reference`` variants (each micro-batch's masked mean weighted by its share of the rank's rows,
averaged over ranks): with micro-batches of 2 rows, 2 ranks × half batch = 1 rank and ZeRO-2 = FSDP2. That
aggregation is not invariant to the micro-batch size or a token budget, by construction (tests/test_learner.py).

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
PPO_BASE = "fsdp2_ppo"
PPO = dict(ppo_mini_batch_size=4, ppo_epochs=2)  # 8 trajectories: 2 mini-batches × 2 epochs = 4 optimizer steps
REF_BASE = "fsdp2_refagg"
REF_AGG = dict(loss_agg="reference")  # each rank's micro-batches of 2 rows: the same micro-batches at 1 and 2 ranks
CHECKPOINTED = ("fsdp2_mb4", "zero2_mb4", "zero3_tokens64")  # saved at 2 ranks; resumed; exported
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
    "fsdp2_ppo": dict(backend="fsdp2", micro_batch_size=2, algo=PPO),
    "zero3_ppo": dict(backend="deepspeed", zero_stage=3, micro_batch_size=4, max_tokens_per_micro_batch=64, algo=PPO),
    # the base's micro-batches packed without padding, the LM head over chunks of 16 scored tokens (a real-token
    # budget regroups the rows; its equality is tests/test_learner_memory.py's, on gradients)
    "fsdp2_packed": dict(backend="fsdp2", micro_batch_size=4, pack=True, logits_chunk_tokens=16),
    # every rank reads the weights itself (at 2 ranks the other variants receive rank 0's: learner.rank0_load)
    "fsdp2_everyrank_load": dict(backend="fsdp2", micro_batch_size=4, rank0_load=False),
    "fsdp2_refagg": dict(backend="fsdp2", micro_batch_size=2, algo=REF_AGG),
    "zero2_refagg": dict(backend="deepspeed", zero_stage=2, micro_batch_size=2, algo=REF_AGG),
}


def _batch():
    from research_rl.algo.experience import Experience

    g = torch.Generator().manual_seed(0)
    n, width = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(10, 2000, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        attn[i, :length] = 1
    mask = attn.clone()
    mask[:, :PROMPT] = 0
    return Experience(ids * attn, attn, mask, advantages=torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, 1.5, -0.7, -1.0]))


def _learner(name: str, rank: int, world: int, port: int, model_dir: str):
    from research_rl.config.schema import AlgoConfig, LearnerConfig
    from research_rl.learner.core import Learner

    settings = dict(VARIANTS[name])
    ref_offload = settings.pop("ref_offload", False)
    algo = AlgoConfig(kl_coef=0.05, entropy_coef=0.01, **settings.pop("algo", {}))
    cfg = LearnerConfig(lr=1e-3, weight_decay=0.01, grad_clip=1.0, **settings)
    learner = Learner(cfg, algo, rank, world)
    learner.init_process_group("127.0.0.1", port)  # joins once; later learners reuse the group
    learner.load_policy(model_dir)
    return learner, ref_offload


def _worker(rank: int, world: int, port: int, model_dir: str, root: str) -> None:
    """Every variant's update on this rank's shard of the batch; with 2 ranks, checkpoint round trips too."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from research_rl.learner.reference import ReferencePolicy

    torch.set_num_threads(1)
    out = Path(root) / f"world{world}"
    shard = _batch().shard(world)[rank]
    try:
        for name in VARIANTS:
            learner, ref_offload = _learner(name, rank, world, port, model_dir)
            learner.load_reference(model_dir, offload=ref_offload)
            logp = {"old_log_probs": learner.compute_log_probs(shard),
                    "ref_log_probs": learner.compute_ref_log_probs(shard)}
            if name == BASE:  # the reference policy on its own, as a separate reference group holds it
                separate = ReferencePolicy(learner.cfg, rank, world)
                separate.load(model_dir)
                logp["separate_ref_log_probs"] = separate.compute_log_probs(shard)
            batch = shard.replace(ref_log_probs=logp["ref_log_probs"])
            if "algo" not in VARIANTS[name]:  # one step: recorded old log-probs equal the detached current ones
                batch = batch.replace(old_log_probs=logp["old_log_probs"])
            metrics = learner.update(batch)
            params = learner.full_state_dict()
            if rank == 0:
                torch.save({"params": params, "metrics": metrics}, out / f"{name}.pt")
            torch.save(logp, out / f"{name}.logp{rank}.pt")
            ckpt = Path(root) / "ckpt" / name
            if world == 2 and name in CHECKPOINTED:
                # save after one update, take a second; a fresh learner restored from the checkpoint must take
                # the same second step (model and optimizer state restored exactly)
                learner.save_checkpoint(ckpt / "sharded", AutoTokenizer.from_pretrained(model_dir))
                learner.save_hf(ckpt / "model")
                learner.update(batch)
                second = learner.full_state_dict()
                restored, _ = _learner(name, rank, world, port, model_dir)
                restored.load_checkpoint(ckpt / "sharded")
                restored.update(batch)
                if rank == 0:
                    torch.save({"second": second, "restored": restored.full_state_dict()}, ckpt / "resume.pt")
                else:
                    restored.full_state_dict()
            if world == 1 and VARIANTS[name]["backend"] == "fsdp2" and name in CHECKPOINTED:
                restored, _ = _learner(name, rank, world, port, model_dir)  # the 2-rank DCP state on 1 rank
                restored.load_checkpoint(ckpt / "sharded")
                restored.update(batch)
                torch.save(restored.full_state_dict(), ckpt / "resharded.pt")
            del learner
    finally:
        dist.destroy_process_group()


def _spawn(world: int, model_dir: Path, root: Path, timeout_s: float = 600) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / f"world{world}").mkdir(parents=True)
    ctx = mp.start_processes(_worker, args=(world, port, str(model_dir), str(root)), nprocs=world, join=False,
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
    out = {"root": root}
    for world in (2, 1):  # 2 first: the 1-rank group reloads its FSDP2 checkpoint
        _spawn(world, debug_model_dir, root)
        for name in VARIANTS:
            r = torch.load(root / f"world{world}" / f"{name}.pt")
            parts = [torch.load(root / f"world{world}" / f"{name}.logp{rank}.pt") for rank in range(world)]
            r["log_probs"] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            out[(world, name)] = r
    return out


def _baseline(name: str) -> str:
    algo = VARIANTS[name].get("algo", {})
    return PPO_BASE if "ppo_epochs" in algo else REF_BASE if algo.get("loss_agg") == "reference" else BASE


CASES = [(world, name) for world in (1, 2) for name in VARIANTS if (world, name) != (1, _baseline(name))]


@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}rank-{n}" for w, n in CASES])
def test_update_matches_one_rank_fsdp2_fixed_micro_batches(results, world, name):
    """Same parameters (1e-5 abs = 1% of lr), log-probs on scored positions (1e-5 abs), loss terms and gradient norm
    (1e-4 rel) as the reference (``BASE``, or ``PPO_BASE`` for the PPO variants)."""
    base, got = results[(1, _baseline(name))], results[(world, name)]
    scored = _batch().loss_mask[:, 1:]  # positions past a row's end depend on its micro-batch's width
    for key in ("old_log_probs", "ref_log_probs"):
        torch.testing.assert_close(got["log_probs"][key] * scored, base["log_probs"][key] * scored, rtol=0, atol=1e-5,
                                   msg=key)
    for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm", "actor/num_tokens",
                "actor/optimizer_steps"):
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


def test_ppo_variants_take_four_clipped_steps(results):
    """2 mini-batches × 2 epochs: four optimizer steps whose ratios leave the clip range (the clip binds), against
    one step with ratio 1 (clip fraction 0) in the one-step variants."""
    for world in (1, 2):
        for name in ("fsdp2_ppo", "zero3_ppo"):
            metrics = results[(world, name)]["metrics"]
            assert metrics["actor/optimizer_steps"] == 4 and metrics["actor/clip_frac"] > 0, (world, name, metrics)
        assert results[(world, "fsdp2_mb4")]["metrics"]["actor/clip_frac"] == 0


def test_a_reference_policy_of_its_own_gives_the_colocated_log_probs(results):
    for world in (1, 2):
        logp = results[(world, BASE)]["log_probs"]
        assert torch.equal(logp["separate_ref_log_probs"], logp["ref_log_probs"]), world


def test_token_budget_packs_unequal_micro_batch_counts_per_rank(results):
    """The budget-64 variants ran 3 micro-batches on rank 0 and 2 (+ 1 zero-weighted padding pass) on rank 1."""
    from research_rl.learner.passes import plan_micro_batches

    assert plan_micro_batches(LENGTHS[:4], 4, 64) == [[0], [2], [3, 1]]
    assert plan_micro_batches(LENGTHS[4:], 4, 64) == [[0], [2, 1, 3]]
    assert results[(2, "fsdp2_tokens64")]["metrics"]["actor/micro_batches"] == 3


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpoint_restores_model_and_optimizer_exactly(results, name):
    """A learner restored from a 2-rank checkpoint takes the same second AdamW step, bit for bit (a lost optimizer
    state would make it a first step again: ~lr away)."""
    saved = torch.load(results["root"] / "ckpt" / name / "resume.pt")
    for key, value in saved["second"].items():
        assert torch.equal(saved["restored"][key], value), key


def test_fsdp2_checkpoint_reshards_from_two_ranks_to_one(results):
    """DCP state saved by 2 ranks loads on 1; its second step matches the 2-rank one within 1e-5 (1% of lr)."""
    second = torch.load(results["root"] / "ckpt" / BASE / "resume.pt")["second"]
    resharded = torch.load(results["root"] / "ckpt" / BASE / "resharded.pt")
    for key, value in second.items():
        torch.testing.assert_close(resharded[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_export_writes_an_hf_model_with_identical_logits(results, name, tmp_path):
    """``python -m research_rl.export`` (DCP or ZeRO state, on CPU) gives the weights after the first update exactly
    and the same logits as the model the learner itself wrote at that point."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    ckpt = results["root"] / "ckpt" / name
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "research_rl.export", str(ckpt), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out)
    direct = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    after_first = results[(2, name)]["params"]
    state = exported.state_dict()
    for key, value in after_first.items():
        assert torch.equal(state[key], value), key
    ids = _batch().input_ids[:2]
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, direct(input_ids=ids).logits)
    assert (out / "tokenizer_config.json").is_file()
