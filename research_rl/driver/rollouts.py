"""One step's rollouts on the driver: the typed ``Experience`` batch built from the trajectories and their rewards,
the ``rollout/*``, ``retriever/*`` and validation metrics, and the rows of ``RUN_DIR/rollouts/step_NNNNNN.jsonl`` (``python -m research_rl.inspect``
reads them).

Rows are trajectories in group order (group ``i`` = rows ``i*G .. i*G+G-1``); ``questions[i]``,
``trajectories[i]`` and ``rewards[i]`` describe row ``i`` of the batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from research_rl.algo import evaluation
from research_rl.algo.experience import Experience
from research_rl.algo.reward import RewardResult
from research_rl.data import Question
from research_rl.rollout.agent_loop import Trajectory

FINISH_REASONS = ("eos", "length", "max_turns")


def build_experience(questions: Sequence[Question], trajectories: Sequence[Trajectory],
                     rewards: Sequence[RewardResult], pad_id: int, policy_version: int,
                     temperature: float = 1.0) -> Experience:
    """The step's batch: right-padded prompt + response ``[N, L]`` (``Experience.from_sequences``), ``rewards``
    ``[N]`` float32 scores, the engine's log-probs of the sampled tokens as ``rollout_log_probs`` ``[N, L-1]``
    float32 (None when the trajectories carry none: greedy rollouts), and per row the question id, reward reason,
    finish reason and number of searches; ``policy_version`` is the learner step whose weights generated the
    trajectories, sampled at ``temperature``.

    Raises:
        ValueError: some trajectories carry rollout log-probs and others do not (one engine and one sampling
            setting made them all, so that is a bug, not a batch to train on half-corrected).
    """
    have = [t.rollout_log_probs is not None for t in trajectories]
    if any(have) and not all(have):
        raise ValueError(f"{have.count(False)} of {len(have)} trajectories carry no rollout log-probs")
    return Experience.from_sequences(
        [t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
        [t.loss_mask for t in trajectories], pad_id,
        response_log_probs=[t.rollout_log_probs for t in trajectories] if all(have) else None,
        rewards=torch.tensor([r.score for r in rewards], dtype=torch.float32),  # [N]
        question_ids=[q.id for q in questions], reward_reasons=[r.reason for r in rewards],
        finish_reasons=[t.finish_reason for t in trajectories], num_searches=[t.num_searches for t in trajectories],
        policy_version=policy_version, temperature=temperature)


def rollout_metrics(exp: Experience, trajectories: Sequence[Trajectory],
                    rewards: Sequence[RewardResult]) -> dict[str, float]:
    """``rollout/*`` means over the ``N`` trajectories of the step (``trajectories``: ``N``): ``reward_mean`` and
    ``reward_std`` (the scores; population standard deviation), ``format_ok`` and ``f1_mean`` (the reward's parts),
    ``searches_per_traj``, ``response_len`` (generated tokens), ``total_len`` (generated + inserted result tokens),
    ``finish_<reason>`` (fractions); and ``retriever/errors``, the number of searches the retriever failed to serve."""
    n = len(exp)
    scores = [r.score for r in rewards]
    return {
        "rollout/trajectories": float(n),
        "rollout/reward_mean": sum(scores) / n,
        "rollout/reward_std": float(np.std(scores)),
        "rollout/format_ok": sum(r.format_ok for r in rewards) / n,
        "rollout/f1_mean": sum(r.f1 for r in rewards) / n,
        "rollout/searches_per_traj": sum(exp.num_searches) / n,
        "rollout/response_len": sum(t.num_generated for t in trajectories) / n,
        "rollout/total_len": sum(len(t.response_ids) for t in trajectories) / n,
        **{f"rollout/finish_{k}": exp.finish_reasons.count(k) / n for k in FINISH_REASONS},
        "retriever/errors": float(sum(t.failed_searches for t in trajectories)),
    }


def rollout_rows(step: int, exp: Experience, questions: Sequence[Question], trajectories: Sequence[Trajectory],
                 rewards: Sequence[RewardResult], limit: int = -1) -> list[dict]:
    """The rows of ``rollouts/step_NNNNNN.jsonl``, the first ``limit`` trajectories (all when ``limit < 0``), with
    the keys in this order: ``step``, ``question_id``, ``question``, ``golden_answers``, ``response``, ``reward``,
    ``reason``, ``answer`` (extracted, or None), ``searches``, ``queries``, ``finish_reason``, ``response_len``
    (generated tokens) and ``result_tokens`` (inserted result tokens)."""
    n = len(exp) if limit < 0 else min(limit, len(exp))
    return [{"step": step, "question_id": exp.question_ids[i], "question": questions[i].question,
             "golden_answers": list(questions[i].golden_answers), "response": trajectories[i].response_text,
             "reward": rewards[i].score, "reason": exp.reward_reasons[i], "answer": rewards[i].answer,
             "searches": exp.num_searches[i], "queries": trajectories[i].queries,
             "finish_reason": exp.finish_reasons[i], "response_len": trajectories[i].num_generated,
             "result_tokens": len(trajectories[i].response_ids) - trajectories[i].num_generated}
            for i in range(n)]


def validation_metrics(questions: Sequence[Question], trajectories: Sequence[Trajectory],
                       eos_token: str) -> dict[str, float]:
    """Greedy validation rollouts (one per question) scored by ``evaluation.score_example`` / ``aggregate``, the
    code of ``python -m research_rl.evaluate``: ``val/<dataset>/<metric>``, ``val/<dataset>/n``, overall
    ``val/<metric>`` and ``val/n``, plus ``val/searches_per_question`` (= ``val/searches``, the name earlier runs
    logged). Empty when there are no questions."""
    if not questions:
        return {}
    rows = [{"dataset": q.dataset, **evaluation.score_example(t.response_text, q.golden_answers, eos_token,
                                                               "research", t.num_searches, t.num_generated)}
            for q, t in zip(questions, trajectories)]
    out = {f"val/{k}": float(v) for k, v in evaluation.aggregate(rows).items()}
    out["val/searches_per_question"] = out["val/searches"]
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines (``rollouts/step_NNNNNN.jsonl``)."""
    with Path(path).open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def retriever_stats(retrievers, timeout_s: float) -> dict[str, float]:
    """``retriever/*`` latency, batch size and cache hit rate of the in-cluster replicas (a ``WorkerGroup``) since
    the last call (``batcher.merge_stats``); a replica that does not answer within ``timeout_s`` (restarting) is
    reported on stderr and counted at the next call. Empty without replicas (``retriever.url``)."""
    from research_rl.retrieval.batcher import merge_stats
    from research_rl.roles.group import WorkerError

    if not retrievers:
        return {}
    answers = retrievers.call_settled("stats", timeout=timeout_s)
    for a in answers:
        if isinstance(a, WorkerError):
            print(f"retriever stats: {a}; its numbers come with the next step", file=sys.stderr)
    stats = [a for a in answers if not isinstance(a, WorkerError)]
    return merge_stats(stats) if stats else {}
