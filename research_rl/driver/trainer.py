"""The GRPO driver (ReSearch §2.2; DESIGN.md: Architecture). It owns no model: the roles' Ray actors do the work,
each role a ``WorkerGroup`` (research_rl/roles/group.py) the driver calls as one.

Each step is a sequence of named, timed phases, each a call on a role::

    rollout → reward → advantages → logprobs → update → sync

``rollout``: the rollout workers run the search agent loop, ``group_size`` trajectories per prompt, and return
``Trajectory`` records; ``reward``: the rule reward on each response, and the step's one ``Experience`` batch;
``advantages``: group-normalised rewards (they need the rewards only, so they come before the reference pass);
``logprobs``: reference log-probs, on the learner ranks, which keep their shard for the update (colocated
reference: the batch crosses to the learners once per step), or on the separate reference ranks, whose log-probs
join the batch before it is sharded to the learners (the old policy's log-probs are the learner's own, detached:
one optimizer step per batch); ``update``: one optimizer step; ``sync``: learner weights → rollout engines in
buckets by ``sync.transport`` (``research_rl.driver.weight_sync``), then a log-prob probe that fails the run if an
engine is not running the learner's weights. A failure in any phase
(validation and checkpoint included) stops the run with ``TrainingError: step N, phase P: ...``.

``trainer.schedule`` decides when the rollout runs (``research_rl.driver.schedule``): ``sync`` as above;
``one_step_off`` and ``async`` take the step's batch from rollouts that ran while the learner trained the previous
step (phase ``rollout``: the wait for it), and wait for the engines to finish their current rollout or requests
before the weight sync (phase ``rollout_wait``). Every schedule logs ``rollout/staleness_mean`` (learner version −
the oldest segment's version, per trajectory), ``rollout/dropped_stale`` (trajectories ``async`` dropped),
``timing/rollout_busy`` (the workers' generation seconds since the previous step, summed) and
``rollout/generated_tokens`` (tokens the workers generated since the previous step, dropped ones included).

Validation (every ``validation.every`` steps, greedy, on a fixed sample of ``validation.num_questions``) is scored by
``research_rl.algo.evaluation``, the same code as ``python -m research_rl.evaluate``: ``val/<dataset>/<metric>`` and
``val/<metric>`` for em, f1, cover_em, searches, response_len and format_fail. The checkpoint with the highest
``validation.best_metric`` among the validations after GRPO steps is kept as ``checkpoints/best`` (the initial
policy is ``model.path`` itself); its step and value are in ``summary.json`` under ``best``. The run's progress is
a ``RunState`` (research_rl/driver/state.py), saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from research_rl.algo import evaluation, grpo
from research_rl.algo.experience import Experience
from research_rl.algo.reward import REWARD_FUNCTIONS, RewardResult
from research_rl.algo.templates import encode_prompt
from research_rl.config import preflight
from research_rl.config.pools import vllm_sleep_level
from research_rl.config.schema import Config, rollout_is_mode, to_dict
from research_rl.data import PromptStream, Question, load_questions
from research_rl.driver import checkpoint as ckpt
from research_rl.driver import schedule as schedules
from research_rl.driver.metrics import MetricsLogger, drop_rows_after, progress
from research_rl.driver.rollouts import (build_experience, retriever_stats, rollout_metrics, rollout_rows,
                                        validation_metrics, write_rows)
from research_rl.driver.state import RunState, capture_rng, restore_rng
from research_rl.driver.warmup import warm_up
from research_rl.driver.weight_sync import WeightSync
from research_rl.rollout.agent_loop import SamplingParams, Trajectory

PROBE_SUFFIX = " <think> probe </think> <answer> \\boxed{probe} </answer>"  # after the first training prompt


class TrainingError(RuntimeError):
    """A step failed in a way that must stop the run (the message names the step and phase)."""


def learning_rate(learner, step: int, total_steps: int) -> float:
    """The learning rate of GRPO step ``step`` (1-based) of ``total_steps``: ``learner.lr`` times a factor that
    rises linearly over the first ``learner.lr_warmup_steps`` steps (``step / lr_warmup_steps``), then is 1
    (``lr_schedule=constant``, the paper's constant rate) or follows a half cosine from 1 after the warm-up down to
    ``learner.min_lr_ratio`` at ``total_steps`` (``lr_schedule=cosine``).

    Source: transformers' ``get_constant_schedule_with_warmup`` and ``get_cosine_schedule_with_warmup`` as verl's
    ``actor.optim`` (``lr_warmup_steps``, ``lr_scheduler_type``, ``min_lr_ratio``) uses them, with one deviation:
    their first optimizer step has factor 0 (the scheduler steps after it), which spends a step on nothing; here step
    1 has ``1 / lr_warmup_steps``, and the cosine reaches its floor at the last step itself. The rate is a function
    of the step alone, so a resumed run continues the schedule with no state of its own."""
    warmup = learner.lr_warmup_steps
    if warmup > 0 and step < warmup:
        return learner.lr * step / warmup
    if learner.lr_schedule == "constant" or total_steps <= max(warmup, 1):
        return learner.lr
    progress = min(1.0, (step - max(warmup, 1)) / (total_steps - max(warmup, 1)))
    floor = learner.min_lr_ratio
    return learner.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def encode_questions(questions: list[Question], template: str, tokenizer,
                     max_prompt_len: int) -> tuple[list[tuple[Question, list[int]]], int]:
    """``(question, prompt ids)`` of the questions whose prompt fits ``max_prompt_len`` tokens, and how many were
    dropped (the paper drops longer prompts)."""
    keep = [(q, encode_prompt(q.question, template, tokenizer)) for q in questions]
    fits = [(q, ids) for q, ids in keep if len(ids) <= max_prompt_len]
    return fits, len(keep) - len(fits)


def start_ray(cfg: Config) -> bool:
    """Connect to ``ray.address``, or start a local one-node cluster (a custom ``placement.gpu_resource`` standing
    in for GPUs is declared on it). Returns False when Ray was already initialised (it is used as it is)."""
    import os

    import ray

    if ray.is_initialized():
        return False
    r, p = cfg.ray, cfg.placement
    if r.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        custom = {p.gpu_resource: p.gpus_per_node} if p.gpus_per_node and p.gpu_resource != "GPU" else None
        ray.init(num_cpus=r.num_cpus, namespace=r.namespace, include_dashboard=False, log_to_driver=True,
                 resources=custom)
    else:
        ray.init(address=r.address, namespace=r.namespace)
    return True


class GRPOTrainer:
    """``setup()``, then ``run()``, then (always, in a ``finally``) ``cleanup()``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg = preflight.absolute_paths(cfg)
        self.run_dir = Path(cfg.trainer.output_dir)
        self.state = RunState()
        self.reward_fn = REWARD_FUNCTIONS[cfg.reward.kind]
        # data, set by setup()
        self.tokenizer = None
        self.train_prompts: list[tuple[Question, list[int]]] = []
        self.warmup_questions: list[Question] | None = None  # warmup.question_share's set, else the GRPO prompts'
        self.val_questions: list[tuple[Question, list[int]]] = []
        self.prompt_ids: dict[Question, list[int]] = {}  # encoded once at setup
        self.dropped = 0  # training prompts over data.max_prompt_len
        self.stream: PromptStream | None = None
        self.total_steps = 0
        self.probe_sequence: list[int] = []
        self.resume_from: Path | None = None
        # the run's services and roles, set by setup() and released by cleanup()
        self.logger: MetricsLogger | None = None
        self.ray_started = False
        self.placement = None  # research_rl.roles.placement.Placement
        self.retrievers = None  # WorkerGroup of RetrieverActor (empty with retriever.url)
        self.retriever = None  # RetrieverClient
        self.rollout = None  # WorkerGroup of RolloutWorker
        self.learners = None  # WorkerGroup of LearnerWorker
        self.references = None  # WorkerGroup of ReferenceWorker (reference.placement=separate)
        self.weight_sync = None  # research_rl.driver.weight_sync.WeightSync between learners and rollout
        self.schedule = None  # trainer.schedule's object (research_rl.driver.schedule), None for sync
        self.consumed_cursor: dict | None = None  # the stream after the last batch trained on (what resume needs)
        self.rollout_busy = {"busy_s": 0.0, "generated_tokens": 0}  # the workers' totals at the last step

    # ================================================================= setup
    def setup(self) -> None:
        """Bad input has failed before (``preflight.check_train``, called by ``python -m research_rl.train``); each
        step after Ray starts is one named phase."""
        self.load_data()
        self.open_run_dir()
        self.ray_started = start_ray(self.cfg)
        with self._phase("start"):
            self.start_roles()
        with self._phase("warmup"):
            init_path = self.warmup()
        with self._phase("load"):
            self.load_policies(init_path)
        with self._phase("resume"):
            self.resume()
        with self._phase("sync"):  # the engines start from the learner's policy (warm-up, resume)
            self.sync(initial=True)
        with self._phase("validation"):
            self.validate_before()

    def load_data(self) -> None:
        """The tokenizer, the training prompts (less the share set apart for the warm-up, ``warmup.question_share``),
        the warm-up questions and the fixed validation sample, encoded once."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        questions = [q for f in cfg.data.train_files for q in load_questions(f)]
        if cfg.warmup.enabled and cfg.warmup.question_share > 0:  # the warm-up's questions are not GRPO's
            from research_rl.rollout.warmup import split_questions

            warm, questions = split_questions(questions, cfg.warmup.question_share, cfg.warmup.seed)
            if not warm or not questions:
                raise ValueError(f"warmup.question_share={cfg.warmup.question_share} leaves {len(warm)} warm-up and "
                                 f"{len(questions)} GRPO questions of {len(warm) + len(questions)}; both need some")
            self.warmup_questions = [q for q, _ in encode_questions(warm, cfg.model.template, self.tokenizer,
                                                                    cfg.data.max_prompt_len)[0]]
        self.train_prompts, self.dropped = encode_questions(questions, cfg.model.template, self.tokenizer,
                                                            cfg.data.max_prompt_len)
        if not self.train_prompts:
            raise ValueError(f"every training prompt is longer than data.max_prompt_len={cfg.data.max_prompt_len}")
        if self.warmup_questions is None:
            self.warmup_questions = [q for q, _ in self.train_prompts] if cfg.warmup.enabled else []
        v = cfg.validation
        per_file = max(1, v.num_questions // max(1, len(cfg.data.val_files)))
        sample = [q for f in cfg.data.val_files for q in evaluation.sample_questions(load_questions(f), per_file, v.seed)]
        self.val_questions = encode_questions(sample, cfg.model.template, self.tokenizer, cfg.data.max_prompt_len)[0]
        self.stream = PromptStream([q for q, _ in self.train_prompts], seed=cfg.trainer.seed, shuffle=cfg.data.shuffle,
                                   drop_last=cfg.data.drop_last)
        self.prompt_ids = dict([*self.train_prompts, *self.val_questions])
        steps_per_epoch = self.stream.steps_per_epoch(cfg.trainer.prompts_per_step)
        self.total_steps = cfg.trainer.total_steps or cfg.trainer.epochs * steps_per_epoch
        self.probe_sequence = self.train_prompts[0][1] + self.tokenizer.encode(PROBE_SUFFIX, add_special_tokens=False)

    def open_run_dir(self) -> None:
        """The checkpoint to resume from (``checkpoint.resume_point``; ``trainer.resume=force`` continues as
        ``auto`` does, past a changed config, which ``preflight.check_run_dir`` refuses otherwise), the run
        directory with this start's resolved ``config.yaml``, ``metrics.jsonl`` rows of steps after that checkpoint
        dropped (the resumed run trains them again), the logger, the seeds."""
        cfg = self.cfg
        resume = "auto" if cfg.trainer.resume == "force" else cfg.trainer.resume
        self.resume_from = ckpt.resume_point(self.run_dir, resume)
        saved = self.run_dir / preflight.CONFIG_FILE
        if self.resume_from is not None and saved.is_file():
            from omegaconf import OmegaConf

            diff = preflight.config_differences(OmegaConf.to_container(OmegaConf.load(saved)),
                                                preflight.resolved_config(cfg))
            if diff:  # only trainer.resume=force gets here with a changed config
                print(f"trainer.resume=force: continuing {self.run_dir} with {len(diff)} changed key(s):\n  "
                      + "\n  ".join(diff))
        preflight.write_run_config(cfg, self.run_dir)
        (self.run_dir / "rollouts").mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            drop_rows_after(self.run_dir / "metrics.jsonl", ckpt.load_state(self.resume_from)["step"])
        self.logger = MetricsLogger(self.run_dir, cfg.trainer.logger, cfg.trainer.wandb_project, cfg.experiment_name,
                                    to_dict(cfg))
        random.seed(cfg.trainer.seed)
        np.random.seed(cfg.trainer.seed)
        torch.manual_seed(cfg.trainer.seed)

    def start_roles(self) -> None:
        """The pools (``research_rl.roles.placement``), then the retriever replicas, rollout workers, learner ranks
        and (``reference.placement=separate``) reference ranks in them; ``RUN_DIR/placement.json``."""
        from research_rl.retrieval.client import RetrieverClient
        from research_rl.roles.group import WorkerGroup
        from research_rl.roles.learner_worker import LearnerWorker
        from research_rl.roles.placement import Placement, write_report
        from research_rl.roles.reference_worker import ReferenceWorker
        from research_rl.roles.retriever_actor import start_retrievers
        from research_rl.roles.rollout_worker import RolloutWorker

        cfg = self.cfg
        self.placement = Placement(cfg)
        self.placement.create()
        self.retrievers = WorkerGroup("retriever", [] if cfg.retriever.url else start_retrievers(
            cfg.retriever, cfg.data.corpus_path, self.placement.retriever_options(cfg.retriever.num_replicas)))
        self.retriever = RetrieverClient(self.retrievers.actors, cfg.retriever.url, cfg.retriever.timeout_s)
        max_len = cfg.rollout.vllm_max_model_len or cfg.data.max_prompt_len + cfg.rollout.max_response_len
        sleep_level = vllm_sleep_level(cfg)  # rollout.vllm_sleep_level, or the placement's choice when it is null
        self.rollout = WorkerGroup.start(
            "rollout", RolloutWorker, self.placement.role_options("rollout", cfg.rollout.num_workers),
            lambda rank: (cfg.rollout, cfg.model.path, self.retriever, cfg.retriever.top_k, cfg.model.dtype, max_len,
                          sleep_level))
        n = cfg.learner.num_workers
        algo = dataclasses.replace(cfg.algo, rollout_is=rollout_is_mode(cfg))  # auto resolved by trainer.schedule
        self.learners = WorkerGroup.start(
            "learner", LearnerWorker, self.placement.role_options("learner", n),
            lambda rank: (cfg.learner, algo, rank, n, cfg.model.dtype, cfg.model.gradient_checkpointing))
        self.learners.init_process_group()
        if cfg.reference.placement == "separate":
            m = cfg.reference.num_workers
            self.references = WorkerGroup.start(
                "reference", ReferenceWorker, self.placement.role_options("reference", m),
                lambda rank: (cfg.learner, cfg.reference, rank, m, cfg.model.dtype))
            self.references.init_process_group()
        self.retrievers.call("ready")
        self.rollout.call("ready")
        groups = (self.learners, self.rollout, self.references, self.retrievers)
        where = {g.role: g.call("where") for g in groups if g}
        self.weight_sync = WeightSync(self.learners, self.rollout, cfg.sync.transport, cfg.placement.mode,
                                      cfg.learner.weight_sync_bucket_mb)
        route = {"transport": self.weight_sync.route.transport, "dtype": self.weight_sync.route.dtype}
        print(write_report(self.run_dir / "placement.json", cfg, where, route))

    def load_policies(self, path: Path) -> None:
        """The initial policy (``path``: ``model.path`` or the warm-up's model) on the learner ranks, and as the
        frozen reference policy on the ranks that hold it."""
        offload = self.cfg.reference.offload
        self.learners.call("load_policy", str(path))
        if self.references:
            self.references.call("load", str(path), offload)
        else:
            self.learners.call("load_reference", str(path), offload)

    def resume(self) -> None:
        """From ``resume_from``: the exact sharded model and optimizer state (over the policy just loaded), the
        run state, the data cursor and the RNG states."""
        if self.resume_from is None:
            return
        self.learners.call("load_checkpoint", str(self.resume_from / ckpt.SHARDED))
        self.state = RunState.from_json(ckpt.load_state(self.resume_from))
        self.stream.load_state_dict(self.state.data_cursor)
        restore_rng(self.state.rng)
        print(f"resumed from {self.resume_from} at step {self.state.step}")

    def warmup(self) -> Path:
        """The initial policy's directory: ``model.path``, or in debug mode (``warmup.enabled``) ``RUN_DIR/
        warmup_model``, trained now unless a previous run of this directory left it (``driver.warmup``)."""
        if not self.cfg.warmup.enabled:
            return Path(self.cfg.model.path)
        out_dir = self.run_dir / "warmup_model"
        if not ckpt.is_valid_model_dir(out_dir):
            self.state.warmup_seconds, self.state.warmup_final_nll = warm_up(
                self.cfg, self.warmup_questions, self.tokenizer, self.retriever, self.learners, self.logger, out_dir)
        return out_dir

    def validate_before(self) -> None:
        """``validation.before_training``, logged at step 0 (not on resume)."""
        v = self.cfg.validation
        if v.before_training and v.every and self.resume_from is None:
            self.state.val_before = self.validate()
            self.state.val_step = self.state.step
            self.logger.log(self.state.step, self.state.val_before)

    # ================================================================= the loop
    @contextmanager
    def _phase(self, name: str, timings: dict[str, float] | None = None):
        """Time the block into ``timings["timing/<name>"]`` (seconds) and turn any error in it into a
        ``TrainingError`` naming the step and the phase."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:
            raise TrainingError(f"step {self.state.step}, phase {name}: {e}") from e
        finally:
            if timings is not None:
                timings[f"timing/{name}"] = timings.get(f"timing/{name}", 0.0) + time.perf_counter() - t0

    def run(self) -> dict:
        """GRPO steps until ``total_steps`` (or ``trainer.max_minutes`` of training), one phase a line; then a last
        validation and checkpoint unless the last step had them. Returns ``summary.json``'s object."""
        cfg, s = self.cfg, self.state
        bar = progress(self.total_steps, "GRPO", "steps", initial=s.step)
        self.schedule = schedules.make(self)
        if isinstance(self.schedule, schedules.AsyncRollouts):
            self.schedule.start()
        self.rollout_busy = self._rollout_busy()
        while self._steps_left():
            s.step += 1
            t_step, timings = time.perf_counter(), {}
            batch = self._next_batch(timings)
            questions, trajs = batch.questions, batch.trajectories
            self.consumed_cursor = batch.cursor
            with self._phase("reward", timings):
                rewards = self.rewards(questions, trajs)
            versions = batch.oldest_versions()
            exp = build_experience(questions, trajs, rewards, self.tokenizer.pad_token_id, min(versions),
                                   cfg.rollout.temperature)
            with self._phase("advantages", timings):  # from the rewards alone: before the reference pass
                exp = exp.replace(advantages=grpo.group_advantages(exp.rewards, cfg.rollout.group_size,
                                                                   cfg.algo.adv_eps))  # [N]
            with self._phase("logprobs", timings):
                exp = self.reference_log_probs(exp)
            with self._phase("update", timings):
                metrics = self.update(exp)
            if self.schedule is not None:  # the engines take new weights between rollouts / requests
                with self._phase("rollout_wait", timings):
                    self.schedule.before_sync()
            metrics.update(self._schedule_metrics(batch, versions))
            with self._phase("sync", timings):
                metrics.update(self.sync())
            if self.schedule is not None:
                self.schedule.after_sync()
            s.train_seconds += time.perf_counter() - t_step
            timings["timing/step"] = time.perf_counter() - t_step
            self._end_step({**metrics, **timings}, exp, questions, trajs, rewards)
            bar.update(1)
        bar.close()
        if self.schedule is not None:
            with self._phase("rollout_wait"):
                self.schedule.close()
        self._end_run()
        return self.finish()

    def _next_batch(self, timings: dict[str, float]) -> schedules.Batch:
        """This step's rollouts: generated now (``sync``, with ``learner.offload``'s handover around them), or
        taken from the schedule's (phase ``rollout``)."""
        cfg = self.cfg
        if self.schedule is not None:
            with self._phase("rollout", timings):
                return self.schedule.next_batch(self.state.step)
        questions = self.stream.next_batch(cfg.trainer.prompts_per_step)
        cursor = self.stream.state_dict()
        if cfg.learner.offload != "none":  # colocated: the engines get the GPU memory while they generate
            with self._phase("offload", timings):
                self.handover("offload")
        with self._phase("rollout", timings):
            questions, trajs = self._rollout(questions, greedy=False, group_size=cfg.rollout.group_size)
        if cfg.learner.offload != "none":
            with self._phase("reload", timings):
                self.handover("reload")
        return schedules.Batch(questions, trajs, cursor)

    def _rollout_busy(self) -> dict:
        """The rollout workers' ``busy()`` totals, summed (called while no request is in flight)."""
        totals = self.rollout.call("busy")
        return {k: sum(t[k] for t in totals) for k in ("busy_s", "generated_tokens")}

    def _schedule_metrics(self, batch: schedules.Batch, versions: list[int]) -> dict[str, float]:
        """``rollout/staleness_mean``, ``rollout/dropped_stale``, ``timing/rollout_busy`` and
        ``rollout/generated_tokens`` of this step (module docstring); the engines are idle when it is called."""
        learner_version = self.state.step - 1  # the weights this step's update started from
        busy, before = self._rollout_busy(), self.rollout_busy
        self.rollout_busy = busy
        return {"rollout/staleness_mean": sum(learner_version - v for v in versions) / len(versions),
                "rollout/dropped_stale": float(batch.dropped_stale),
                "timing/rollout_busy": busy["busy_s"] - before["busy_s"],
                "rollout/generated_tokens": float(busy["generated_tokens"] - before["generated_tokens"])}

    def _steps_left(self) -> bool:
        limit = self.cfg.trainer.max_minutes
        if limit is not None and self.state.train_seconds >= 60 * limit:
            from tqdm import tqdm

            tqdm.write(f"stopping: trainer.max_minutes={limit} reached")
            return False
        return self.state.step < self.total_steps

    def handover(self, method: str) -> None:
        """``learner.offload``: ``offload`` moves the learner ranks' (and separate reference ranks') state to CPU
        before the rollout, ``reload`` brings it back after it, each emptying the CUDA cache (docs/learner.md)."""
        self.learners.call(method)
        if self.references:
            self.references.call(method)

    def rewards(self, questions: list[Question], trajs: list[Trajectory]) -> list[RewardResult]:
        """``reward.kind``'s reward of each response against its question's golden answers; the reference reward
        (``research_reference``) scores the decoded prompt + response, as the authors' ``compute_score`` does."""
        eos = self.tokenizer.eos_token
        if self.cfg.reward.kind == "research_reference":
            return [self.reward_fn(self.tokenizer.decode(t.prompt_ids, skip_special_tokens=False) + t.response_text,
                                   eos, q.golden_answers) for q, t in zip(questions, trajs)]
        return [self.reward_fn(t.response_text, eos, q.golden_answers) for q, t in zip(questions, trajs)]

    def _end_step(self, metrics: dict[str, float], exp: Experience, questions: list[Question],
                  trajs: list[Trajectory], rewards: list[RewardResult]) -> None:
        """The step's metrics and rollout dump, its validation when due, then its checkpoints."""
        cfg, s = self.cfg, self.state
        with self._phase("log"):
            metrics.update(rollout_metrics(exp, trajs, rewards))
            metrics.update(retriever_stats(self.retrievers, self.cfg.retriever.timeout_s))
            cursor = self.consumed_cursor or self.stream.state_dict()  # the prompts trained on (schedules ahead)
            metrics.update({"train/epoch": cursor["epoch"] + cursor["position"] / cursor["size"],
                            "train/policy_version": s.policy_version})
            s.record_step(metrics)
            write_rows(self.run_dir / "rollouts" / f"step_{s.step:06d}.jsonl",
                       rollout_rows(s.step, exp, questions, trajs, rewards, cfg.trainer.rollouts_to_log))
        new_best = False
        if cfg.validation.every and (s.step % cfg.validation.every == 0 or s.step == self.total_steps):
            with self._phase("validation"):
                val = self.validate()
                metrics.update(val)
                s.record_validation(s.step, val)
                new_best = self._is_new_best(val)
                self.rollout_busy = self._rollout_busy()  # the next step's figures count training rollouts only
        self.logger.log(s.step, metrics)
        with self._phase("checkpoint"):
            if cfg.trainer.save_every and s.step % cfg.trainer.save_every == 0:
                self.save()
            if new_best:
                self.save_best()

    def _end_run(self) -> None:
        """A validation of the final policy unless the last step had one, and its checkpoint unless saved."""
        s = self.state
        if self.cfg.validation.every and s.val_step != s.step:
            with self._phase("validation"):
                val = self.validate()
                self.logger.log(s.step, val)
                s.record_validation(s.step, val)
                if s.step > 0 and self._is_new_best(val):
                    self.save_best()
        if not ckpt.checkpoint_dir(self.run_dir, s.step).is_dir():  # only committed checkpoints have the name
            with self._phase("checkpoint"):
                self.save()

    def _rollout(self, questions: list[Question], greedy: bool,
                 group_size: int) -> tuple[list[Question], list[Trajectory]]:
        """Each question repeated ``group_size`` times (group ``i`` = rows ``i*G .. i*G+G-1``) and its trajectories,
        the prompts split evenly over the rollout workers."""
        expanded = schedules.expand(questions, group_size)
        parts = self.rollout.call_each("generate", self.rollout_args(expanded, self.state.step, greedy))
        return expanded, [t for part in parts for t in part]

    def prompts_of(self, rows: list[Question]) -> list[list[int]]:
        """The encoded prompt of each row's question."""
        return [self.prompt_ids[q] for q in rows]

    def sampling(self, greedy: bool, seed_offset: int) -> SamplingParams:
        """``rollout``'s sampling settings, seeded ``trainer.seed × 100003 + seed_offset`` (the step, for
        ``sync`` and ``one_step_off``)."""
        cfg = self.cfg
        return SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, greedy=greedy,
                              seed=cfg.trainer.seed * 100_003 + seed_offset)

    def rollout_args(self, rows: list[Question], step: int, greedy: bool = False) -> list[tuple]:
        """``generate``'s arguments per rollout worker: the rows' prompts split evenly, in order, and the sampling
        settings of step ``step``."""
        prompts, sampling = self.prompts_of(rows), self.sampling(greedy, step)
        chunk = -(-len(prompts) // len(self.rollout))
        return [(prompts[i * chunk:(i + 1) * chunk], sampling) for i in range(len(self.rollout))]

    def reference_log_probs(self, exp: Experience) -> Experience:
        """Reference log-probs ``[N, L-1]``. Colocated: each learner rank computes them for its shard and keeps the
        shard for ``update`` (returns ``exp`` unchanged); separate: the reference ranks' log-probs, in ``exp``.
        ``old_log_probs`` are not computed: with one optimizer step per batch the learner uses its own, detached
        (``Learner._grpo_loss``), which saves a forward pass over the batch."""
        if not self.references:
            self.learners.scatter("compute_ref_log_probs", exp.shard(len(self.learners)), True)
            return exp
        parts = self.references.scatter("compute_ref_log_probs", exp.shard(len(self.references)))
        return exp.replace(ref_log_probs=Experience.concat_rows(parts))

    def update(self, exp: Experience) -> dict[str, float]:
        """One GRPO optimizer step on the learner ranks (each on its shard: the one it kept with a colocated
        reference, or ``exp``'s) at ``learning_rate(learner, state.step, total_steps)``; rank 0's ``actor/*``
        metrics, already reduced over the ranks."""
        lr = learning_rate(self.cfg.learner, self.state.step, self.total_steps)
        if not self.references:
            return self.learners.first("update", None, lr)
        return self.learners.scatter("update", exp.shard(len(self.learners)), lr)[0]

    def sync(self, initial: bool = False) -> dict[str, float]:
        """Learner → rollout weights (``research_rl.driver.weight_sync``, ``sync.transport``), then the log-prob
        probe; the engines then hold policy version ``state.step``. ``trainer.weight_sync=false`` (debug) skips every
        sync after the initial one, so rollouts stay on the initial policy.

        Raises:
            RuntimeError: an engine's probe log-probs differ from the learner's (``probe``).
        """
        if not self.cfg.trainer.weight_sync and not initial:
            return {}
        metrics = self.weight_sync.sync(self.state.step)
        metrics.update(self.probe())
        self.state.policy_version = self.state.step
        return metrics

    def probe(self) -> dict[str, float]:
        """Log-probs of a fixed probe sequence on the learner and on every engine at once, compared per engine by
        the mean |difference| over its tokens (nats per token): bf16 kernels differ token by token (vLLM's from HF's
        by ~0.01-0.03 on average), so a maximum would fail a correct sync, while a stale or wrong engine differs
        on average. Returns ``sync/probe_mean_diff`` and ``sync/probe_max_diff`` (the worst engine's).

        Raises:
            RuntimeError: an engine's mean difference exceeds ``trainer.probe_tolerance``, naming the engine and the
                policy version it should hold.
        """
        learner_refs = self.learners.submit("probe_log_probs", self.probe_sequence)
        engine_lps = self.rollout.call("probe_log_probs", self.probe_sequence)
        learner_lp = self.learners.wait("probe_log_probs", learner_refs)[0]
        diffs = [(lp - learner_lp).abs() for lp in engine_lps]
        means, maxes = [float(d.mean()) for d in diffs], [float(d.max()) for d in diffs]
        tolerance = self.cfg.trainer.probe_tolerance
        for rank, mean in enumerate(means):
            if not mean <= tolerance:  # NaN fails too
                raise RuntimeError(
                    f"after the weight sync to policy version {self.state.step}, rollout engine {rank}'s log-probs "
                    f"differ from the learner's by {mean:.3g} nats per token on average (max {maxes[rank]:.3g}; "
                    f"trainer.probe_tolerance={tolerance}): the engine is not running the weights being trained "
                    f"(sync.transport={self.weight_sync.route.transport})")
        return {"sync/probe_mean_diff": max(means, default=0.0), "sync/probe_max_diff": max(maxes, default=0.0)}

    def validate(self) -> dict[str, float]:
        """Greedy rollouts on the fixed validation sample, one per question, scored as the evaluator scores
        (``rollouts.validation_metrics``)."""
        if not self.val_questions:
            return {}
        questions, trajs = self._rollout([q for q, _ in self.val_questions], greedy=True, group_size=1)
        return validation_metrics(questions, trajs, self.tokenizer.eos_token)

    def _is_new_best(self, val: dict[str, float]) -> bool:
        """Whether ``val`` is the best validation so far, recorded as such (``RunState.update_best``)."""
        return self.state.update_best(self.cfg.validation.best_metric, val, self.state.step,
                                      str(ckpt.best_dir(self.run_dir)))

    # ================================================================= checkpoints
    def _write_checkpoint(self, tmp: Path) -> dict:
        """The learners' sharded state (and, with ``trainer.save_hf_model``, an HF ``model/``) into ``tmp``;
        returns the ``trainer_state.json`` to commit with them."""
        self.learners.call("save_checkpoint", str(tmp / ckpt.SHARDED), self.cfg.model.path)
        if self.cfg.trainer.save_hf_model:
            self.learners.call("save_hf", str(tmp / "model"), self.cfg.model.path)
        # the prompts trained on: one_step_off and async have drawn more, which a resumed run generates again
        self.state.data_cursor = self.consumed_cursor or self.stream.state_dict()
        self.state.rng = capture_rng()
        return self.state.to_json(to_dict(self.cfg))

    def save(self) -> Path:
        """This step's checkpoint, ``checkpoints/step_NNNNNN``."""
        tmp = ckpt.begin(self.run_dir, self.state.step)
        return ckpt.commit(tmp, self._write_checkpoint(tmp), self.cfg.trainer.keep_last)

    def save_best(self) -> Path:
        """The current policy as ``checkpoints/best``: hard links to this step's checkpoint when it was saved,
        otherwise written through the learners."""
        step_dir = ckpt.checkpoint_dir(self.run_dir, self.state.step)
        if step_dir.is_dir():  # committed this step
            return ckpt.commit_best(ckpt.begin_best(self.run_dir, step_dir))
        tmp = ckpt.begin_best(self.run_dir)
        return ckpt.commit_best(tmp, self._write_checkpoint(tmp))

    def finish(self) -> dict:
        """Write ``summary.json`` from the run state and return it."""
        import json

        latest = ckpt.list_checkpoints(self.run_dir)
        summary = self.state.summary(str(self.run_dir), self.cfg.trainer.logger,
                                     str(latest[-1]) if latest else None, self.dropped)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ================================================================= cleanup
    def cleanup(self) -> None:
        """Release what setup created, whatever failed before: the logger, the learner and reference ranks'
        process groups, the placement groups, and Ray when this trainer started it. A release that fails is
        reported on stderr and the others still run."""
        import ray

        def attempt(what: str, release) -> None:
            try:
                release()
            except Exception as e:  # reported, and the remaining releases still run
                print(f"cleanup: {what} failed: {type(e).__name__}: {e}", file=sys.stderr)

        if self.logger is not None:
            attempt("closing the metrics logger", self.logger.close)
            self.logger = None
        for group in (self.learners, self.references):
            if group:
                attempt(f"shutting down the {group.role} ranks", lambda g=group: g.call("shutdown", timeout=30))
        self.learners = self.references = None
        if self.placement is not None:
            attempt("removing the placement groups", self.placement.remove)
            self.placement = None
        if self.ray_started and ray.is_initialized():
            attempt("ray.shutdown()", ray.shutdown)
        self.ray_started = False
