"""Ray shell of the rollout role: holds one generation engine and runs the agent loop for a slice of prompts.

The plain cores are ``AgentLoop`` (agent_loop.py) and the engine (``HFEngine`` on CPU, ``VLLMEngine`` on GPU,
``rollout.engine``). Searches go through the ``RetrieverClient`` (actor replicas or a remote service): in
``rollout.mode=async`` each trajectory's query as soon as it is produced, in ``turn_sync`` one batched call per
turn; a query it fails to serve gets the ``search failed`` observation. Weights arrive from the learner as buckets
in the Ray object store and a probe compares the engine's log-probs with the learner's. A vLLM engine sleeps
after each rollout at ``sleep_level`` (``research_rl.config.pools.vllm_sleep_level``: 2 colocated, 0
disaggregated, unless ``rollout.vllm_sleep_level`` says otherwise); it wakes its weights for the sync and the rest
for the probe or the next rollout (research_rl/rollout/vllm_engine.py).
"""

from __future__ import annotations

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
            self.engine = HFEngine(model_path, self.tokenizer, cfg.max_batch_size, device=device, eos_ids=eos_ids)
        self.retriever, self.top_k = retriever, top_k
        self.loop = AgentLoop(self.engine, self._search, self.tokenizer, cfg.max_response_len, cfg.max_turns,
                              mode=cfg.mode, async_search_fn=_async_search(retriever, top_k),
                              max_batch_size=cfg.max_batch_size, batch_wait_s=cfg.batch_wait_ms / 1000,
                              eos_ids=eos_ids)
        self.policy_version = 0

    def _search(self, queries: list[str]) -> list[list[str] | None]:
        return [None if passages is None else [p.contents for p in passages]
                for passages in self.retriever.search(queries, self.top_k)]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Trajectory]:
        """Run the agent loop on each prompt (already repeated group_size times by the driver); one
        ``Trajectory`` per prompt, in order."""
        torch.manual_seed(sampling.seed)
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up()
        trajs: list[Trajectory] = self.loop.run(prompts, sampling)
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()  # the learner gets the GPU memory back (a no-op at sleep level 0)
        return trajs

    def load_weights(self, bucket_refs: list, policy_version: int) -> dict:
        """Load every bucket (a list of ObjectRefs to ``{name: tensor}``); the sync must cover all parameters.
        Returns ``{"bytes", "tensors"}`` received.

        Raises:
            RuntimeError: some parameters were not in any bucket.
        """
        names, nbytes = set(), 0

        def fetch():  # one bucket in memory at a time
            nonlocal nbytes
            for ref in bucket_refs:
                bucket = ray.get(ref)
                nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
                names.update(bucket)
                yield bucket

        self.engine.load_buckets(fetch())  # a sleeping vLLM engine wakes its weights first
        missing = self.engine.parameter_names() - names
        if missing:
            raise RuntimeError(f"weight sync left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}")
        self.policy_version = policy_version
        return {"bytes": nbytes, "tensors": len(names)}

    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        return self.engine.log_probs(sequence)

    def ready(self) -> bool:
        return True

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this worker."""
        return where()
