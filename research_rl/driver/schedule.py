"""Training schedules (``trainer.schedule``; docs/rollout.md#training-schedules): when the rollout workers generate
relative to the learner's update and the weight sync.

- ``sync`` (the trainer's own loop, no object here): rollout → reward → advantages → log-probs → update → sync, one
  after the other; every batch comes from the weights the learner is about to update (staleness 0).
- ``one_step_off`` (``OneStepOff``): the rollout of step t+1 is launched on the engines right after step t's batch
  is collected, so it runs while the learner trains step t; before step t's weight sync the driver waits for it
  (weights go to the engines between rollouts). Step t+1 then trains on trajectories of policy version t-1 while
  the learner holds version t: staleness 1 after the first step. verl's one-step-off-policy trainer
  (``recipe/one_step_off_policy``) overlaps the same way.
- ``async`` (``AsyncRollouts``): a producer thread on the driver keeps one generate request of
  ``trainer.async_groups_per_request`` groups in flight on every rollout worker, into a buffer bounded at
  ``prompts_per_step × (1 + max_staleness)`` groups (buffered + in flight). The learner takes the next
  ``prompts_per_step`` groups whenever they are ready; a request whose oldest segment is more than
  ``trainer.max_staleness`` policy versions behind the learner is dropped and counted. Before each weight sync the
  producer stops issuing and the driver waits for the requests in flight (weights change between requests, never
  inside one), then the producer resumes. AReaL (Fu et al., arXiv 2505.24298, §4) bounds staleness the same way.

Groups are consumed in the order their prompts were drawn from the ``PromptStream`` (a later request that finishes
first waits for the earlier ones), so what the learner has consumed is always a prefix of the stream: each batch
carries the stream's cursor after its last prompt (``Batch.cursor``), and a checkpoint saves that, not the stream's
own position, which is ahead by what was generated and not yet trained on. A run resumed from the checkpoint
generates those prompts again (with the checkpoint's weights): no prompt is lost or trained on twice.

The stale-data correction is the learner's (``algo.rollout_is``, resolved by
``research_rl.config.schema.rollout_is_mode``): ``tis`` under both overlapping schedules.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from research_rl.data import Question
from research_rl.rollout.agent_loop import Trajectory


@dataclass
class Batch:
    """One step's rollouts, rows in group order (group ``i`` = rows ``i*G .. i*G+G-1``): ``questions[i]`` is row
    ``i``'s question, ``trajectories[i]`` its trajectory; ``cursor`` is ``PromptStream.state_dict()`` right after
    the batch's last prompt was drawn (what a checkpoint of this step saves); ``dropped_stale`` counts the
    trajectories ``async`` dropped as too stale while assembling it."""

    questions: list[Question]
    trajectories: list[Trajectory]
    cursor: dict
    dropped_stale: int = 0

    def oldest_versions(self) -> list[int]:
        """Per trajectory, the policy version of its oldest generated segment (``Trajectory.segment_versions``)."""
        return [min(t.segment_versions) if t.segment_versions else 0 for t in self.trajectories]


def expand(questions: list[Question], group_size: int) -> list[Question]:
    """Each question repeated ``group_size`` times: the rows of its group."""
    return [q for q in questions for _ in range(group_size)]


class OneStepOff:
    """``trainer.schedule=one_step_off`` (module docstring). ``trainer`` is the ``GRPOTrainer``: its stream,
    rollout workers and ``rollout_args``."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.pending: dict | None = None  # the launched rollout: step, questions, refs, cursor, then trajectories

    def _launch(self, step: int) -> None:
        t = self.trainer
        questions = t.stream.next_batch(t.cfg.trainer.prompts_per_step)
        cursor = t.stream.state_dict()
        rows = expand(questions, t.cfg.rollout.group_size)
        refs = t.rollout.submit_each("generate", t.rollout_args(rows, step))
        self.pending = {"step": step, "questions": rows, "refs": refs, "cursor": cursor, "trajectories": None}

    def _collect(self) -> None:
        p = self.pending
        if p["trajectories"] is None:
            parts = self.trainer.rollout.wait("generate", p["refs"])
            p["trajectories"] = [traj for part in parts for traj in part]

    def next_batch(self, step: int) -> Batch:
        """Step ``step``'s batch (launched during the previous step, or now at the first), then the launch of step
        ``step + 1``'s rollout on the engines' current weights, unless ``step`` is the last."""
        if self.pending is None or self.pending["step"] != step:
            self._launch(step)
        self._collect()
        p, self.pending = self.pending, None
        if step < self.trainer.total_steps:
            self._launch(step + 1)
        return Batch(p["questions"], p["trajectories"], p["cursor"])

    def before_sync(self) -> None:
        """Wait for the launched rollout: the engines take new weights only between rollouts."""
        if self.pending is not None:
            self._collect()

    def after_sync(self) -> None:
        pass

    def close(self) -> None:
        """Drop a launched rollout nothing will train on (the run stopped early, e.g. ``trainer.max_minutes``):
        wait for it so no generate call is left running, and forget it (its prompts were never consumed)."""
        if self.pending is not None:
            self._collect()
        self.pending = None


@dataclass
class _Request:
    seq: int  # draw order
    questions: list[Question]  # rows (groups expanded)
    cursor: dict
    worker: int
    ref: object = None
    trajectories: list[Trajectory] | None = None


class AsyncRollouts:
    """``trainer.schedule=async`` (module docstring): a producer thread over the rollout workers and the bounded
    buffer the learner takes its batches from. ``start()`` once the stream is positioned (after resume);
    ``close()`` at the end.

    Raises (from ``next_batch`` / ``before_sync``): whatever a generate request raised, as the producer saw it.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.group_size = cfg.rollout.group_size
        self.per_request = cfg.trainer.async_groups_per_request
        self.per_batch = cfg.trainer.prompts_per_step
        self.max_staleness = cfg.trainer.max_staleness
        self.capacity = self.per_batch * (1 + self.max_staleness)  # groups buffered + in flight
        self.cond = threading.Condition()
        self.done: dict[int, _Request] = {}  # finished requests by seq
        self.in_flight: dict[int, _Request] = {}  # by worker
        self.next_seq = 0  # the next request to draw
        self.next_take = 0  # the next request the learner consumes
        self.paused = False
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._produce, name="async-rollouts", daemon=True)

    # ------------------------------------------------------------------ producer thread
    def start(self) -> None:
        self.thread.start()

    def _buffered_groups(self) -> int:
        return (len(self.done) + len(self.in_flight)) * self.per_request

    def _issue(self) -> None:
        """A request on every idle worker while the buffer has room (under the lock)."""
        t = self.trainer
        for worker in range(len(t.rollout)):
            if worker in self.in_flight or self.paused or self.stopping:
                continue
            if self._buffered_groups() + self.per_request > self.capacity:
                return
            questions = t.stream.next_batch(self.per_request)
            req = _Request(self.next_seq, expand(questions, self.group_size), t.stream.state_dict(), worker)
            self.next_seq += 1
            # seeds apart from the sync schedule's (seed × 100003 + step): request seq from 10**6
            req.ref = t.rollout.actors[worker].generate.remote(t.prompts_of(req.questions),
                                                               t.sampling(False, 1_000_000 + req.seq))
            self.in_flight[worker] = req

    def _produce(self) -> None:
        import ray

        try:
            while True:
                with self.cond:
                    if self.stopping:
                        return
                    self._issue()
                    refs = {req.ref: req for req in self.in_flight.values()}
                    if not refs:
                        self.cond.wait(0.5)
                        continue
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.2)
                for ref in ready:
                    trajs = ray.get(ref)
                    with self.cond:
                        req = refs[ref]
                        req.trajectories = trajs
                        del self.in_flight[req.worker]
                        self.done[req.seq] = req
                        self.cond.notify_all()
        except BaseException as e:  # handed to the driver's thread at its next call
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"an async rollout request failed: {type(self.error).__name__}: {self.error}") \
                from self.error

    # ------------------------------------------------------------------ driver side
    def next_batch(self, step: int) -> Batch:
        """The next ``prompts_per_step`` groups in draw order that are fresh enough for the learner at policy
        version ``step - 1`` (each request's oldest segment at least ``step - 1 - max_staleness``); older requests
        are dropped on the way and counted in ``Batch.dropped_stale`` (trajectories)."""
        learner_version = step - 1
        rows: list[Question] = []
        trajs: list[Trajectory] = []
        dropped, cursor = 0, None
        with self.cond:
            while len(trajs) < self.per_batch * self.group_size:
                while self.next_take not in self.done:
                    self._raise()
                    if not self.thread.is_alive():
                        raise RuntimeError("the async rollout producer stopped")
                    self.cond.wait(0.5)
                req = self.done.pop(self.next_take)
                self.next_take += 1
                cursor = req.cursor
                oldest = min((min(t.segment_versions) for t in req.trajectories if t.segment_versions), default=0)
                if learner_version - oldest > self.max_staleness:
                    dropped += len(req.trajectories)
                else:
                    rows.extend(req.questions)
                    trajs.extend(req.trajectories)
                self.cond.notify_all()  # room in the buffer
        return Batch(rows, trajs, cursor, dropped)

    def before_sync(self) -> None:
        """Stop issuing and wait for every request in flight (they land in the buffer, on the old weights)."""
        with self.cond:
            self.paused = True
            while self.in_flight:
                self._raise()
                self.cond.wait(0.5)
            self._raise()

    def after_sync(self) -> None:
        """Issue again, on the new weights."""
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def close(self) -> None:
        """Stop the producer and wait for the requests in flight (none is left running on a worker)."""
        self.before_sync()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=60)


def make(trainer) -> OneStepOff | AsyncRollouts | None:
    """The schedule object of ``trainer.cfg.trainer.schedule``: None for ``sync`` (the trainer's own loop)."""
    kind = trainer.cfg.trainer.schedule
    return None if kind == "sync" else {"one_step_off": OneStepOff, "async": AsyncRollouts}[kind](trainer)
