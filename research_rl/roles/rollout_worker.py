"""Ray shell of the rollout role: holds one generation engine and runs the agent loop for a slice of prompts.

The plain cores are ``AgentLoop`` (agent_loop.py) and the engine (``HFEngine`` on CPU, ``VLLMEngine`` on GPU,
``rollout.engine``). Searches go through the ``RetrieverClient`` (actor replicas or a remote service): in
``rollout.mode=async`` each trajectory's query as soon as it is produced, in ``turn_sync`` one batched call per
turn; a query it fails to serve gets the ``search failed`` observation. Weights arrive from the learner in buckets
by one of the transports of ``research_rl.driver.weight_sync`` and a probe compares the engine's log-probs with the
learner's. A vLLM engine sleeps after each rollout at ``sleep_level`` (``research_rl.config.pools.vllm_sleep_level``:
2 colocated, 0 disaggregated, unless ``rollout.vllm_sleep_level`` says otherwise); it wakes its weights when a sync
begins and the rest for the probe or the next rollout (research_rl/rollout/vllm_engine.py).
"""

from __future__ import annotations

import time

import ray
import torch

from research_rl.rollout.eos import eos_token_ids
from research_rl.rollout.agent_loop import AgentLoop, SamplingParams, Trajectory
from research_rl.config.schema import RolloutConfig
from research_rl.learner.core import set_torch_threads
from research_rl.roles.placement import where
from research_rl.retrieval.client import RetrieverClient


def _async_search(retriever: RetrieverClient, top_k: int):
    """The async agent loop's search (passage contents per query). A closure, not an actor method: an ``async def``
    method would turn the actor into an async actor, whose blocking methods run on its event loop."""
    async def search(queries: list[str]) -> list[list[str] | None]:
        return [None if passages is None else [p.contents for p in passages]
                for passages in await retriever.search_async(queries, top_k)]

    return search


@ray.remote
class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, model_path: str, retriever: RetrieverClient, top_k: int,
                 dtype: str = "bfloat16", max_model_len: int | None = None, sleep_level: int = 0):
        set_torch_threads(cfg.torch_threads)
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        eos_ids = eos_token_ids(model_path, self.tokenizer, cfg.eos_ids_from)  # the engine and the loop share them
        if cfg.engine == "vllm":
            from research_rl.rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine.from_config(cfg, model_path, self.tokenizer, dtype, max_model_len, eos_ids,
                                                 sleep_level=sleep_level)
        else:
            from research_rl.rollout.hf_engine import HFEngine

            device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
            weights = cfg.hf_dtype or (dtype if device == "cuda" else "float32")
            self.engine = HFEngine(model_path, self.tokenizer, cfg.max_batch_size, dtype=getattr(torch, weights),
                                   device=device, eos_ids=eos_ids)
        self.retriever, self.top_k = retriever, top_k
        self.loop = AgentLoop(self.engine, self._search, self.tokenizer, cfg.max_response_len, cfg.max_turns,
                              mode=cfg.mode, async_search_fn=_async_search(retriever, top_k),
                              max_batch_size=cfg.max_batch_size, batch_wait_s=cfg.batch_wait_ms / 1000,
                              eos_ids=eos_ids)
        self.policy_version = 0
        self.busy_s = 0.0  # seconds inside generate, since start
        self.generated_tokens = 0  # model tokens generated, since start

    def _search(self, queries: list[str]) -> list[list[str] | None]:
        return [None if passages is None else [p.contents for p in passages]
                for passages in self.retriever.search(queries, self.top_k)]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Trajectory]:
        """Run the agent loop on each prompt (already repeated group_size times by the driver); one
        ``Trajectory`` per prompt, in order, each stamped with the policy version of the engine's weights for every
        segment (``Trajectory.segment_versions``: one per engine call, i.e. searches + 1)."""
        t0 = time.perf_counter()
        torch.manual_seed(sampling.seed)
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up()
        trajs: list[Trajectory] = self.loop.run(prompts, sampling)
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()  # the learner gets the GPU memory back (a no-op at sleep level 0)
        for t in trajs:
            t.segment_versions = [self.policy_version] * (t.num_searches + 1)
        self.busy_s += time.perf_counter() - t0
        self.generated_tokens += sum(t.num_generated for t in trajs)
        return trajs

    def busy(self) -> dict:
        """``{"busy_s": seconds spent in generate, "generated_tokens": model tokens generated}``, both since the
        worker started (the driver takes differences: idle fraction and generation throughput per step)."""
        return {"busy_s": self.busy_s, "generated_tokens": self.generated_tokens}

    # ------------------------------------------------------------------ weight sync (research_rl.driver.weight_sync)
    def sync_info(self) -> dict:
        """``{"dtype": the engine's weight dtype (the wire dtype), "device_keys": one per replica that receives}``."""
        return {"dtype": self.engine.weight_dtype, "device_keys": self.engine.sync_device_keys()}

    def sync_join(self, host: str, port: int, first_rank: int, world_size: int) -> None:
        """Join the collective sync group: this engine's replicas are group ranks ``first_rank``, ``first_rank+1``, ..."""
        self.engine.join_sync_group(host, port, first_rank, world_size)

    def sync_begin(self, buckets: list) -> None:
        """Check the sync plan against the engine's model before any byte moves, then prepare the engine (vLLM:
        wake the weights).

        Raises:
            KeyError: the plan names a tensor the rollout model does not have.
            RuntimeError: the plan leaves some of the model's tensors out (they would stay stale).
        """
        planned = {name for b in buckets for name in b.names}
        unknown = planned - self.engine.known_names()
        if unknown:
            raise KeyError(f"weight sync: the rollout model has no tensor {sorted(unknown)[0]!r} "
                           f"({len(unknown)} unknown names; the learner and the engine load different architectures)")
        missing = self.engine.parameter_names() - planned
        if missing:
            raise RuntimeError(f"weight sync would leave {len(missing)} tensors of the rollout model stale, e.g. "
                               f"{sorted(missing)[:3]}")
        self.engine.begin_sync()  # a sleeping vLLM engine wakes its weights here

    def sync_ipc(self, msg) -> None:
        """Load one bucket from the learner's shared slot (``research_rl.sync.receiver.IpcBucket``)."""
        self.engine.receive_ipc(msg)

    def sync_collective(self, buckets: list) -> None:
        """Receive every bucket by broadcast from the learner leader."""
        self.engine.receive_collective(buckets)

    def sync_object_store(self, buckets: list, refs: list) -> None:
        """Load each bucket from its object-store copy (read in place, one bucket at a time)."""
        for bucket, ref in zip(buckets, refs):
            self.engine.receive_packed(bucket, ray.get(ref))

    def sync_end(self, policy_version: int) -> dict:
        """Close the sync; the engine now holds ``policy_version``. Returns ``{"bytes", "tensors", "buckets"}``
        received (by each replica)."""
        stats = self.engine.end_sync()
        self.policy_version = policy_version
        return {"bytes": stats.bytes, "tensors": stats.tensors, "buckets": stats.buckets}

    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        return self.engine.log_probs(sequence)

    def ready(self) -> bool:
        return True

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this worker."""
        return where()
