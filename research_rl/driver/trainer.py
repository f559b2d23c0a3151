"""The GRPO driver (ReSearch §2.2; DESIGN.md: Architecture). It owns no model: Ray actors do the work.

Each step is a sequence of named, timed phases::

    rollout → reward → logprobs → advantages → update → sync

``rollout``: RolloutWorkers run the search agent loop, ``group_size`` trajectories per prompt; ``reward``: the
rule reward on each response; ``logprobs``: reference log-probs (the old policy's are the learner's own, detached:
one optimizer step per batch); ``advantages``: group-normalised; ``update``: one optimizer step; ``sync``: learner
weights → rollout engines in buckets, then a log-prob probe that fails the run if the engines drifted from the
learner.

Validation (every ``validation.every`` steps, greedy, on a fixed sample of ``validation.num_questions``) is scored by
``research_rl.algo.evaluation``, the same code as ``python -m research_rl.evaluate``: ``val/<dataset>/<metric>`` and
``val/<metric>`` for em, f1, cover_em, searches, response_len and format_fail. The checkpoint with the highest
``validation.best_metric`` among the validations after GRPO steps is kept as ``checkpoints/best`` (the initial
policy is ``model.path`` itself); its step and value are in ``summary.json`` under ``best``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from research_rl.driver import checkpoint as ckpt
from research_rl.algo import evaluation
from research_rl.algo import grpo
from research_rl.rollout.agent_loop import SamplingParams
from research_rl.config import preflight
from research_rl.config.schema import Config, to_dict
from research_rl.data import PromptStream, Question, load_corpus, load_questions
from research_rl.driver.metrics import MetricsLogger, timed
from research_rl.algo.reward import REWARD_FUNCTIONS
from research_rl.algo.templates import encode_prompt


class TrainingError(RuntimeError):
    """A step failed in a way that must stop the run (the message names the step and phase)."""


class GRPOTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg = preflight.absolute_paths(cfg)
        self.run_dir = Path(cfg.trainer.output_dir)
        self.step = 0
        self.summary: dict = {}
        self.train_seconds = 0.0

    # ================================================================= setup
    def setup(self) -> None:
        """Everything that can fail on bad input is checked before Ray starts actors."""
        cfg = self.cfg
        preflight.check_inputs(cfg)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.train_prompts, self.dropped = self._encode(
            [q for f in cfg.data.train_files for q in load_questions(f)])
        if not self.train_prompts:
            raise ValueError(f"every training prompt is longer than data.max_prompt_len={cfg.data.max_prompt_len}")
        self.val_questions = self._validation_sample()
        preflight.check_best_metric(cfg, {q.dataset for q, _ in self.val_questions})
        self.stream = PromptStream([q for q, _ in self.train_prompts], seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        self.prompt_ids = dict([*self.train_prompts, *self.val_questions])  # Question -> prompt token ids
        steps_per_epoch = -(-len(self.train_prompts) // cfg.trainer.prompts_per_step)
        self.total_steps = cfg.trainer.total_steps or cfg.trainer.epochs * steps_per_epoch
        self.reward_fn = REWARD_FUNCTIONS[cfg.reward.kind]

        resume_from = self._resume_path()
        if resume_from is None and ckpt.list_checkpoints(self.run_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; pass resume=auto to continue that run "
                                  f"or trainer.output_dir=NEW_DIR to start a new one")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "rollouts").mkdir(exist_ok=True)
        if resume_from:
            self._drop_metrics_after(ckpt.load_state(resume_from)["step"])
        self.logger = MetricsLogger(self.run_dir, cfg.trainer.logger, cfg.trainer.wandb_project, cfg.experiment_name,
                                    to_dict(cfg))
        self._seed(cfg.trainer.seed)

        self._start_ray()
        self._start_actors()
        init_path = self.run_dir / "warmup_model" if cfg.warmup.enabled else Path(cfg.model.path)
        if cfg.warmup.enabled and not ckpt.is_valid_model_dir(init_path):
            self._warmup(init_path)
        self._call_learners("load_policy", str(init_path))
        self._call_learners("load_reference", str(init_path), self.cfg.reference.offload,
                            group=self.references or self.learners)
        if resume_from:  # the exact sharded model and optimizer state, over the policy just loaded
            self._call_learners("load_checkpoint", str(resume_from / ckpt.SHARDED))
            self._restore(ckpt.load_state(resume_from))
            print(f"resumed from {resume_from} at step {self.step}")
        self.probe_sequence = self.train_prompts[0][1] + self.tokenizer.encode(
            " <think> probe </think> <answer> \\boxed{probe} </answer>", add_special_tokens=False)
        self._sync(step=self.step, initial=True)  # engines start from the learner's policy (warm-up, resume)
        if cfg.validation.before_training and cfg.validation.every and not resume_from:
            self.summary["val_before"] = self._validate(self.step)
            self.logger.log(self.step, self.summary["val_before"])

    def _encode(self, questions: list[Question]) -> tuple[list[tuple[Question, list[int]]], int]:
        keep, dropped = [], 0
        for q in questions:
            ids = encode_prompt(q.question, self.cfg.model.template, self.tokenizer)
            if len(ids) > self.cfg.data.max_prompt_len:
                dropped += 1
            else:
                keep.append((q, ids))
        return keep, dropped

    def _validation_sample(self) -> list[tuple[Question, list[int]]]:
        v = self.cfg.validation
        files = self.cfg.data.val_files
        per_file = max(1, v.num_questions // max(1, len(files)))
        sample = []
        for f in files:
            sample += evaluation.sample_questions(load_questions(f), per_file, v.seed)
        return self._encode(sample)[0]

    def _resume_path(self) -> Path | None:
        mode = self.cfg.trainer.resume
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt.latest_valid(self.run_dir)
        path = Path(mode)
        reason = ckpt.check(path)
        if reason is not None:
            raise FileNotFoundError(f"trainer.resume={mode} is not a complete checkpoint directory: {reason}")
        return path

    def _drop_metrics_after(self, step: int) -> None:
        """Remove ``metrics.jsonl`` rows of steps after ``step`` (and a last line cut short by a kill): an interrupted
        run logged them after its last checkpoint, and the resumed run trains those steps again (so each step keeps
        one row)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return

        def row_step(line: str) -> int | None:
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                return None

        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if (s := row_step(line)) is not None and s <= step]
        if len(keep) < len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(path)
            print(f"metrics.jsonl: dropped {len(lines) - len(keep)} rows logged after step {step} by the interrupted "
                  "run (those steps are trained again)")

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        p = self.cfg.placement
        if self.cfg.ray.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # a local cluster is one node; a custom gpu_resource (standing in for GPUs) is declared on it
            custom = {p.gpu_resource: p.gpus_per_node} if p.gpus_per_node and p.gpu_resource != "GPU" else None
            ray.init(num_cpus=self.cfg.ray.num_cpus, namespace=self.cfg.ray.namespace, include_dashboard=False,
                     log_to_driver=True, resources=custom)
        else:
            ray.init(address=self.cfg.ray.address, namespace=self.cfg.ray.namespace)

    def _start_actors(self) -> None:
        """Create the pools (``research_rl.roles.placement``), then the retriever replicas, rollout workers, learner ranks
        and (``reference.placement=separate``) reference ranks in them; write ``RUN_DIR/placement.json``."""
        import ray

        from research_rl.roles.placement import Placement, check_placement, write_report
        from research_rl.roles.retriever_actor import start_retrievers
        from research_rl.retrieval.client import RetrieverClient
        from research_rl.roles.rollout_worker import RolloutWorker

        cfg = self.cfg
        for note in check_placement(cfg):
            print(note)
        self.placement = Placement(cfg)
        self.placement.create()
        self.retrievers = [] if cfg.retriever.url else start_retrievers(
            cfg.retriever, cfg.data.corpus_path, self.placement.retriever_options(cfg.retriever.num_replicas))
        self.retriever = RetrieverClient(self.retrievers, cfg.retriever.url, cfg.retriever.timeout_s)
        self.rollout_workers = [
            RolloutWorker.options(**self.placement.options("rollout", i))
            .remote(cfg.rollout, cfg.model.path, self.retriever, cfg.retriever.top_k, cfg.model.dtype,
                    cfg.rollout.vllm_max_model_len or cfg.data.max_prompt_len + cfg.rollout.max_response_len)
            for i in range(cfg.rollout.num_workers)]
        self.learners = self._worker_group("learner", cfg.learner.num_workers, cfg.learner.num_gpus_per_worker)
        self.references = (self._worker_group("reference", cfg.reference.num_workers,
                                              cfg.reference.num_gpus_per_worker)
                           if cfg.reference.placement == "separate" else [])
        ray.get([*[r.ready.remote() for r in self.retrievers], *[w.ready.remote() for w in self.rollout_workers]])
        roles = {"learner": self.learners, "rollout": self.rollout_workers, "reference": self.references,
                 "retriever": self.retrievers}
        where = {role: ray.get([a.where.remote() for a in actors]) for role, actors in roles.items() if actors}
        print(write_report(self.run_dir / "placement.json", cfg, where))

    def _worker_group(self, role: str, n: int, gpus_per_worker: float) -> list:
        """``n`` LearnerWorker ranks forming one torch.distributed group (rank 0 hosts the rendezvous)."""
        import ray

        from research_rl.roles.learner_worker import LearnerWorker

        cfg = self.cfg
        learner_cfg = dataclasses.replace(cfg.learner, num_gpus_per_worker=gpus_per_worker)
        group = [LearnerWorker.options(**self.placement.options(role, rank))
                 .remote(learner_cfg, cfg.algo, rank, n, cfg.model.dtype, cfg.model.gradient_checkpointing)
                 for rank in range(n)]
        addr, port = ray.get(group[0].rendezvous_address.remote())
        ray.get([w.init_process_group.remote(addr, port) for w in group])
        return group

    def _call_learners(self, method: str, *args, group: list | None = None):
        """Call a method on every rank of the learner group (or ``group``; collectives need all ranks); rank 0's
        result."""
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in (group or self.learners)])[0]

    @staticmethod
    def _shard(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
        """``n`` equal slices along the trajectory dimension (``validate`` checks it divides)."""
        return [{k: v.chunk(n)[r] for k, v in batch.items()} for r in range(n)]

    def _log_probs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ref_log_probs`` ``[N, L-1]`` from the reference policy: inside the learner ranks, or in the separate
        reference group. ``old_log_probs`` are not recomputed: with one optimizer step per batch the learner uses
        its own log-probs, detached (``Learner._grpo_loss``), which saves a forward pass over the batch."""
        import ray

        group = self.references or self.learners
        parts = ray.get([w.compute_log_probs.remote(b, ("ref_log_probs",))
                         for w, b in zip(group, self._shard(batch, len(group)))])
        return {"ref_log_probs": torch.cat([p["ref_log_probs"] for p in parts])}

    # ================================================================= warm-up (debug only)
    def _warmup(self, out_dir: Path) -> None:
        import ray
        from tqdm import tqdm

        from research_rl.rollout.warmup import collate, synthesize

        w = self.cfg.warmup
        corpus = load_corpus(self.cfg.data.corpus_path)
        titles = {pid: row.get("title") or row["contents"].split("\n", 1)[0].strip('"') for pid, row in corpus.items()}

        def search(queries):
            results = self.retriever.search(queries, self.cfg.retriever.top_k)
            if any(r is None for r in results):
                raise TrainingError("warm-up: the retriever failed to answer (see the warnings above)")
            return [[p.contents for p in ps] for ps in results]

        t0 = time.time()
        examples = synthesize([q for q, _ in self.train_prompts], titles, search, self.tokenizer,
                              self.cfg.model.template, w.search_fraction, w.max_seq_len, w.seed)
        self._call_learners("load_policy", self.cfg.model.path)
        rng = random.Random(w.seed)
        bar = tqdm(range(w.steps), desc="warm-up (supervised, debug only)", unit="step")
        for i in bar:
            batch = collate(rng.sample(examples, min(w.batch_size, len(examples))), self.tokenizer.pad_token_id)
            shards = self._shard(batch, len(self.learners))
            refs = [lw.sft_step.remote(b, w.lr) for lw, b in zip(self.learners, shards)]
            m = ray.get(refs)[0]
            bar.set_postfix(nll=f"{m['warmup/nll']:.3f}")
            if i % 10 == 0 or i == w.steps - 1:
                self.logger.log(-1, {**m, "warmup/step": i}, console=False)
        tmp = out_dir.parent / f".tmp-{out_dir.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        self._call_learners("save_hf", str(tmp), self.cfg.model.path)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        self.summary["warmup_seconds"] = round(time.time() - t0, 1)
        self.summary["warmup_final_nll"] = m["warmup/nll"]

    # ================================================================= the loop
    def run(self) -> dict:
        import ray
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="GRPO", unit="step")
        while self.step < self.total_steps:
            if cfg.trainer.max_minutes is not None and self.train_seconds >= 60 * cfg.trainer.max_minutes:
                tqdm.write(f"stopping: trainer.max_minutes={cfg.trainer.max_minutes} reached")
                break
            t_step = time.perf_counter()
            self.step += 1
            timings: dict[str, float] = {}
            questions = self.stream.next_batch(cfg.trainer.prompts_per_step)

            with timed("rollout", timings):
                trajs = self._rollout(questions, greedy=False)
            with timed("reward", timings):
                rewards = [self.reward_fn(t["response_text"], self.tokenizer.eos_token, q.golden_answers)
                           for q, t in trajs]
            batch = self._batch([t for _, t in trajs])
            with timed("logprobs", timings):
                batch.update(self._log_probs(batch))
            with timed("advantages", timings):
                scores = torch.tensor([r.score for r in rewards], dtype=torch.float32)  # [B*G]
                batch["advantages"] = grpo.group_advantages(scores, cfg.rollout.group_size, cfg.algo.adv_eps)
            with timed("update", timings):
                shards = self._shard(batch, len(self.learners))
                metrics = ray.get([w.update.remote(b) for w, b in zip(self.learners, shards)])[0]
            with timed("sync", timings):
                metrics.update(self._sync(self.step))
            self.train_seconds += time.perf_counter() - t_step
            timings["timing/step"] = time.perf_counter() - t_step

            metrics.update(timings)
            metrics.update(self._rollout_metrics(trajs, rewards))
            metrics.update({"train/epoch": self.stream.epoch_float, "train/policy_version": self.step})
            for key in ("reward_mean", "format_ok", "searches_per_traj"):
                self.summary.setdefault(f"history/{key}", []).append(metrics[f"rollout/{key}"])
            self._dump_rollouts(trajs, rewards)
            new_best = False
            if cfg.validation.every and (self.step % cfg.validation.every == 0 or self.step == self.total_steps):
                self.summary["val_last"] = self._validate(self.step)
                metrics.update(self.summary["val_last"])
                new_best = self._is_new_best(self.summary["val_last"])
            self.logger.log(self.step, metrics)
            bar.update(1)
            if cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0:
                self.save()
            if new_best:
                self.save_best()
        bar.close()
        if cfg.validation.every and self.summary.get("val_step") != self.step:
            self.summary["val_last"] = self._validate(self.step)
            self.logger.log(self.step, self.summary["val_last"])
            if self.step > 0 and self._is_new_best(self.summary["val_last"]):
                self.save_best()
        if not ckpt.checkpoint_dir(self.run_dir, self.step).is_dir():  # only committed checkpoints get this name
            self.save()
        return self.finish()

    def _rollout(self, questions: list[Question], greedy: bool, group_size: int | None = None):
        """Trajectories as ``(question, trajectory dict)`` in group order (group i = trajectories i*G..i*G+G-1)."""
        import ray

        cfg = self.cfg
        g = group_size or cfg.rollout.group_size
        expanded = [q for q in questions for _ in range(g)]
        prompts = [self.prompt_ids[q] for q in expanded]  # encoded once at setup
        n = len(self.rollout_workers)
        chunk = -(-len(prompts) // n)
        seed = cfg.trainer.seed * 100_003 + self.step
        sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, greedy=greedy, seed=seed)
        try:
            parts = ray.get([w.generate.remote(prompts[i * chunk:(i + 1) * chunk], sampling)
                             for i, w in enumerate(self.rollout_workers)])
        except ray.exceptions.RayTaskError as e:
            raise TrainingError(f"step {self.step}, phase rollout: {e}") from e
        return list(zip(expanded, [t for part in parts for t in part]))

    def _batch(self, trajs: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded ``[N, L]`` tensors of prompt + response with the loss mask over full positions."""
        width = max(len(t["prompt_ids"]) + len(t["response_ids"]) for t in trajs)
        n = len(trajs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((n, width), pad, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, t in enumerate(trajs):
            p, r = len(t["prompt_ids"]), len(t["response_ids"])
            ids[i, :p + r] = torch.tensor(t["prompt_ids"] + t["response_ids"])
            attn[i, :p + r] = 1
            mask[i, p:p + r] = torch.tensor(t["loss_mask"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}

    def _sync(self, step: int, initial: bool = False) -> dict[str, float]:
        """Learner → rollout weights through the object store, then the log-prob probe.

        ``trainer.weight_sync=false`` (debug) skips every sync after the initial one, so rollouts stay on the
        initial policy."""
        import ray

        if not self.cfg.trainer.weight_sync and not initial:
            return {}
        refs = self._call_learners("weight_buckets", self.cfg.learner.weight_sync_bucket_mb)
        stats = ray.get([w.load_weights.remote(refs, step) for w in self.rollout_workers])
        learner_lp = self._call_learners("probe_log_probs", self.probe_sequence)
        worst = 0.0
        for w in self.rollout_workers:
            engine_lp = ray.get(w.probe_log_probs.remote(self.probe_sequence))
            worst = max(worst, float((engine_lp - learner_lp).abs().max()))
        if worst > self.cfg.trainer.probe_tolerance:
            raise TrainingError(
                f"step {step}, phase sync: rollout engine log-probs differ from the learner's by {worst:.3g} "
                f"(> trainer.probe_tolerance={self.cfg.trainer.probe_tolerance}); the engine is not running the "
                "weights being trained")
        return {"sync/bytes": float(stats[0]["bytes"]), "sync/buckets": float(len(refs)), "sync/probe_max_diff": worst}

    def _rollout_metrics(self, trajs, rewards) -> dict[str, float]:
        n = len(trajs)
        finish = [t["finish_reason"] for _, t in trajs]
        return {
            "rollout/reward_mean": sum(r.score for r in rewards) / n,
            "rollout/reward_std": float(np.std([r.score for r in rewards])),
            "rollout/format_ok": sum(r.format_ok for r in rewards) / n,
            "rollout/f1_mean": sum(r.f1 for r in rewards) / n,
            "rollout/searches_per_traj": sum(t["num_searches"] for _, t in trajs) / n,
            "rollout/response_len": sum(t["num_generated"] for _, t in trajs) / n,
            "rollout/total_len": sum(len(t["response_ids"]) for _, t in trajs) / n,
            **{f"rollout/finish_{k}": finish.count(k) / n for k in ("eos", "length", "max_turns")},
            "retriever/errors": float(sum(t["failed_searches"] for _, t in trajs)),
            **self._retriever_stats(),
        }

    def _retriever_stats(self) -> dict[str, float]:
        """``retriever/*`` latency, batch size and cache hit rate of the in-cluster replicas since the last call."""
        import ray

        from research_rl.retrieval.batcher import merge_stats

        if not self.retrievers:
            return {}
        stats = []
        for ref in [r.stats.remote() for r in self.retrievers]:
            try:
                stats.append(ray.get(ref, timeout=self.cfg.retriever.timeout_s))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass  # a restarting replica reports next step
        return merge_stats(stats) if stats else {}

    def _dump_rollouts(self, trajs, rewards) -> None:
        limit = self.cfg.trainer.rollouts_to_log
        rows = list(zip(trajs, rewards))[: None if limit < 0 else limit]
        with (self.run_dir / "rollouts" / f"step_{self.step:06d}.jsonl").open("w") as f:
            for (q, t), r in rows:
                f.write(json.dumps({
                    "step": self.step, "question_id": q.id, "question": q.question, "golden_answers": list(q.golden_answers),
                    "response": t["response_text"], "reward": r.score, "reason": r.reason, "answer": r.answer,
                    "searches": t["num_searches"], "queries": t["queries"], "finish_reason": t["finish_reason"],
                    "response_len": t["num_generated"],
                    "result_tokens": len(t["response_ids"]) - t["num_generated"]}) + "\n")

    def _validate(self, step: int) -> dict[str, float]:
        """Greedy rollouts on the fixed validation sample, scored by ``evaluation.score_example`` / ``aggregate``.

        Returns ``val/<dataset>/<metric>``, ``val/<dataset>/n``, overall ``val/<metric>`` and ``val/n``, plus
        ``val/searches_per_question`` (= ``val/searches``, the name earlier runs logged)."""
        if not self.val_questions:
            return {}
        trajs = self._rollout([q for q, _ in self.val_questions], greedy=True, group_size=1)
        rows = [{"dataset": q.dataset,
                 **evaluation.score_example(t["response_text"], q.golden_answers, self.tokenizer.eos_token, "research",
                                            t["num_searches"], t["num_generated"])}
                for q, t in trajs]
        out = {f"val/{k}": float(v) for k, v in evaluation.aggregate(rows).items()}
        out["val/searches_per_question"] = out["val/searches"]
        self.summary["val_step"] = step
        return out

    def _is_new_best(self, val: dict[str, float]) -> bool:
        """Record ``val[validation.best_metric]`` at this step as the best so far if it beats the previous best
        (strictly; higher is better). The caller then writes the checkpoint (``save_best``).

        Raises:
            TrainingError: the metric is not among the validation metrics (e.g. a dataset name not validated on).
        """
        key = self.cfg.validation.best_metric
        if key not in val:
            raise TrainingError(f"step {self.step}, phase validation: validation.best_metric={key} is not a validation "
                                f"metric of this run; available: {sorted(k for k in val if not k.endswith('/n'))}")
        best = self.summary.get("best")
        if best is not None and val[key] <= best["value"]:
            return False
        self.summary["best"] = {"metric": key, "step": self.step, "value": val[key],
                                "path": str(ckpt.best_dir(self.run_dir))}
        return True

    # ================================================================= checkpoints
    def _write_checkpoint(self, tmp: Path) -> dict:
        """The learners' sharded state (and, with ``trainer.save_hf_model``, an HF ``model/``) into ``tmp``;
        returns the trainer state to commit with them."""
        self._call_learners("save_checkpoint", str(tmp / ckpt.SHARDED), self.cfg.model.path)
        if self.cfg.trainer.save_hf_model:
            self._call_learners("save_hf", str(tmp / "model"), self.cfg.model.path)
        return {
            "step": self.step, "policy_version": self.step, "data_cursor": self.stream.state_dict(),
            "rng": {"python": list(random.getstate()[1]), "numpy": np.random.get_state()[1].tolist(),
                    "torch": torch.get_rng_state().tolist()},
            "train_seconds": self.train_seconds, "summary": self.summary, "config": to_dict(self.cfg),
        }

    def save(self) -> Path:
        tmp = ckpt.begin(self.run_dir, self.step)
        return ckpt.commit(tmp, self._write_checkpoint(tmp), self.cfg.trainer.keep_last)

    def save_best(self) -> Path:
        """The current policy as ``checkpoints/best``: hard links to this step's checkpoint when it was saved,
        otherwise written through the learners."""
        step_dir = ckpt.checkpoint_dir(self.run_dir, self.step)
        if step_dir.is_dir():  # committed this step
            return ckpt.commit_best(ckpt.begin_best(self.run_dir, step_dir))
        tmp = ckpt.begin_best(self.run_dir)
        return ckpt.commit_best(tmp, self._write_checkpoint(tmp))

    def _restore(self, state: dict) -> None:
        self.step = state["step"]
        self.stream.load_state_dict(state["data_cursor"])
        self.train_seconds = state.get("train_seconds", 0.0)
        self.summary = state.get("summary", {})
        random.setstate((3, tuple(state["rng"]["python"]), None))
        np.random.set_state(("MT19937", np.array(state["rng"]["numpy"], dtype=np.uint32), 624, 0, 0.0))
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))

    def finish(self) -> dict:
        s = self.summary
        latest = ckpt.list_checkpoints(self.run_dir)
        s.update({"steps": self.step, "train_minutes": round(self.train_seconds / 60, 2), "run_dir": str(self.run_dir),
                  "logger": self.cfg.trainer.logger, "checkpoint": str(latest[-1]) if latest else None,
                  "dropped_prompts": self.dropped})
        (self.run_dir / "summary.json").write_text(json.dumps(s, indent=2))
        return s

    def cleanup(self) -> None:
        import ray

        if hasattr(self, "logger"):
            self.logger.close()
        if ray.is_initialized():
            try:
                ray.get([w.shutdown.remote() for w in [*getattr(self, "learners", []),
                                                        *getattr(self, "references", [])]], timeout=30)
            except Exception:
                pass
            if hasattr(self, "placement"):
                self.placement.remove()
            ray.shutdown()
