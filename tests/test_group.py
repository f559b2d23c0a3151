"""Worker groups (research_rl/roles/group.py) over real Ray actors, and the shards they scatter: each rank's
pickled shard is about 1/n of the batch, where a view of the batch would carry all of it."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from research_rl.algo.experience import Experience


def _batch(n: int, width: int) -> Experience:
    ids = torch.arange(n * width, dtype=torch.long).reshape(n, width)
    return Experience(ids, torch.ones_like(ids), torch.ones_like(ids), advantages=torch.randn(n),
                      rewards=torch.rand(n), question_ids=[f"q{i}" for i in range(n)],
                      reward_reasons=["r"] * n, finish_reasons=["eos"] * n, num_searches=[1] * n)


@pytest.mark.unit
def test_a_pickled_shard_is_about_a_rank_share_of_the_batch():
    exp = _batch(64, 512)
    whole = len(pickle.dumps(exp))
    shards = exp.shard(8)
    sizes = [len(pickle.dumps(s)) for s in shards]
    assert all(0.9 * whole / 8 < size < 1.2 * whole / 8 for size in sizes), (whole, sizes)
    view = exp.input_ids.chunk(8)[3]  # what slicing without a copy sends: the whole storage
    assert len(pickle.dumps(view)) > 0.9 * len(pickle.dumps(exp.input_ids))
    assert torch.equal(shards[3].input_ids, view) and shards[3].question_ids == [f"q{i}" for i in range(24, 32)]


@pytest.mark.unit
def test_shards_of_a_batch_as_large_as_the_papers_over_64_ranks():
    """A [1280, 8704] int64 batch (ReSearch's 256 prompts × 5 trajectories at 8704 tokens) over 64 ranks."""
    ids = torch.zeros(1280, 8704, dtype=torch.long)
    whole = len(pickle.dumps(ids))
    view = len(pickle.dumps(ids.chunk(64)[5]))
    copy = len(pickle.dumps(ids[100:120].clone()))
    print(f"\n[1280, 8704] int64: whole {whole / 2**20:.1f} MiB, view shard {view / 2**20:.1f} MiB, "
          f"copied shard {copy / 2**20:.2f} MiB")
    assert view > 0.99 * whole and copy < 1.01 * whole / 64


def _rank_class(ray):
    @ray.remote(num_cpus=0)
    class Rank:
        def __init__(self, rank: int, log_dir: str):
            self.rank, self.log = rank, os.path.join(log_dir, f"rank{rank}")

        def _note(self, what: str) -> None:
            with open(self.log, "a") as f:
                f.write(what + "\n")

        def who(self, tag: str) -> tuple[int, str]:
            self._note(f"who {tag}")
            return self.rank, tag

        def rows(self, exp: Experience, scale: int) -> tuple[int, list[str], int]:
            return self.rank, exp.question_ids, int(exp.input_ids.sum()) * scale

        def fail_on(self, rank: int) -> int:
            if self.rank == rank:
                raise ValueError(f"bad input on rank {rank}")
            return self.rank

        def die_on(self, rank: int) -> int:
            if self.rank == rank:
                os._exit(1)
            return self.rank

    return Rank


@pytest.mark.ray
def test_group_calls_every_rank_scatters_and_gathers_in_rank_order(ray_cluster, tmp_path):
    from research_rl.roles.group import WorkerGroup

    group = WorkerGroup.start("learner", _rank_class(ray_cluster), [{}] * 3, lambda r: (r, str(tmp_path)))
    assert len(group) == 3
    assert group.call("who", "a") == [(0, "a"), (1, "a"), (2, "a")]
    assert group.first("who", "b") == (0, "b")
    assert group.call_rank(2, "who", "c") == (2, "c")
    assert group.call_each("who", [("x",), ("y",), ("z",)]) == [(0, "x"), (1, "y"), (2, "z")]
    for r in range(3):  # every rank ran every call made on all of them, and only rank 2 the single call
        assert (tmp_path / f"rank{r}").read_text().split() == (
            ["who", "a", "who", "b"] + (["who", "c"] if r == 2 else []) + ["who", "xyz"[r]])
    exp = _batch(6, 4)
    out = group.scatter("rows", exp.shard(3), 10)
    assert [rank for rank, _, _ in out] == [0, 1, 2]
    assert [ids for _, ids, _ in out] == [["q0", "q1"], ["q2", "q3"], ["q4", "q5"]]
    assert [s for _, _, s in out] == [int(exp.input_ids[2 * r:2 * r + 2].sum()) * 10 for r in range(3)]
    with pytest.raises(ValueError, match="2 argument tuples for 3 learner ranks"):
        group.call_each("who", [("x",), ("y",)])
    for actor in group.actors:
        ray_cluster.kill(actor)


@pytest.mark.ray
def test_a_failing_or_dead_rank_is_named_with_role_rank_and_method(ray_cluster, tmp_path):
    from research_rl.roles.group import WorkerError, WorkerGroup

    group = WorkerGroup.start("reference", _rank_class(ray_cluster), [{}] * 2, lambda r: (r, str(tmp_path)))
    with pytest.raises(WorkerError, match=r"^reference rank 1 raised in fail_on: ValueError: bad input on rank 1$") as e:
        group.call("fail_on", 1)
    assert (e.value.role, e.value.rank, e.value.method) == ("reference", 1, "fail_on")
    assert group.call("fail_on", 5) == [0, 1]  # the rank that raised still serves
    with pytest.raises(WorkerError, match=r"^reference rank 1 died during die_on: ") as e:
        group.call("die_on", 1)
    assert not isinstance(e.value, ray_cluster.exceptions.RayError)
    assert isinstance(e.value.__cause__, ray_cluster.exceptions.RayError)  # kept for the traceback
    with pytest.raises(WorkerError, match=r"^reference rank 1 died during who: "):
        group.call_rank(1, "who", "again")
    settled = group.call_settled("who", "s", timeout=30)
    assert settled[0] == (0, "s") and isinstance(settled[1], WorkerError) and settled[1].rank == 1
    for actor in group.actors:
        ray_cluster.kill(actor)


def _driver_roles(ray):
    from research_rl.rollout.agent_loop import Trajectory

    @ray.remote(num_cpus=0)
    class Rollout:
        def generate(self, prompts, sampling):
            return [Trajectory(list(p), response_ids=[7, 8, 9], loss_mask=[1, 1, 1], finish_reason="eos",
                               response_text="<answer> \\boxed{x} </answer>") for p in prompts]

        def busy(self):
            return {"busy_s": 0.0, "generated_tokens": 0}

    @ray.remote(num_cpus=0)
    class Learner:
        def __init__(self, rank):
            self.rank, self.kept, self.updates = rank, None, 0

        def compute_ref_log_probs(self, exp, keep=False):
            self.kept = exp
            return None

        def update(self, exp=None, lr=None):
            assert exp is None and self.kept is not None  # colocated: the shard kept by the reference pass
            self.updates += 1
            if self.rank == 1 and self.updates == 2:
                os._exit(1)
            return {"actor/loss": float(self.rank), "actor/rows": float(len(self.kept))}

        def shutdown(self):
            return None

    return Rollout, Learner


@pytest.mark.ray
def test_the_driver_names_step_phase_role_and_rank_when_a_rank_dies(ray_cluster, tmp_path, capsys):
    """The GRPO loop over real actors standing in for the roles: step 1 trains (the colocated reference keeps
    each learner rank's shard, the update takes no batch), step 2's update kills learner rank 1, and the run stops
    with one error naming the step, the phase, the role, the rank and the method; cleanup reports the rank it
    cannot shut down instead of hiding it."""
    from types import SimpleNamespace

    from research_rl.config.compose import compose_config
    from research_rl.data import PromptStream, Question
    from research_rl.driver.metrics import MetricsLogger
    from research_rl.driver.trainer import GRPOTrainer, TrainingError
    from research_rl.roles.group import WorkerGroup

    cfg = compose_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}", "validation.every=0",
                          "trainer.save_every=0", "trainer.weight_sync=false", "trainer.prompts_per_step=2",
                          "rollout.group_size=2", "rollout.num_workers=1", "learner.num_workers=2",
                          "trainer.total_steps=3", "trainer.max_minutes=null"])
    trainer = GRPOTrainer(cfg)
    questions = [Question(str(i), f"q{i}", ("x",), "musique") for i in range(4)]
    trainer.tokenizer = SimpleNamespace(pad_token_id=0, eos_token="<|im_end|>")
    trainer.prompt_ids = {q: [1, 2, i + 3] for i, q in enumerate(questions)}
    trainer.stream = PromptStream(questions, seed=1, shuffle=False)
    trainer.total_steps = 3
    (tmp_path / "rollouts").mkdir()
    trainer.logger = MetricsLogger(tmp_path)
    Rollout, Learner = _driver_roles(ray_cluster)
    trainer.rollout = WorkerGroup("rollout", [Rollout.remote()])
    trainer.learners = WorkerGroup.start("learner", Learner, [{}] * 2, lambda rank: (rank,))
    trainer.retrievers = WorkerGroup("retriever", [])
    try:
        with pytest.raises(TrainingError, match=r"^step 2, phase update: learner rank 1 died during update: "):
            trainer.run()
    finally:
        trainer.cleanup()
    assert "cleanup: shutting down the learner ranks failed: WorkerError: learner rank 1 died" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["actor/loss"] == 0.0 and rows[0]["actor/rows"] == 2.0  # rank 0's metrics, its half of 4 rows
    assert {"timing/rollout", "timing/reward", "timing/advantages", "timing/logprobs", "timing/update",
            "timing/sync"} <= set(rows[0])
    dumped = [json.loads(line) for line in (tmp_path / "rollouts/step_000001.jsonl").read_text().splitlines()]
    assert [d["question_id"] for d in dumped] == ["0", "0", "1", "1"]  # group order
