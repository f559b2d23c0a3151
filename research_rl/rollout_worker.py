"""Ray shell of the rollout role: holds one generation engine and runs the agent loop for a slice of prompts.

The plain cores are ``AgentLoop`` (agent_loop.py) and the engine (``HFEngine`` on CPU). Searches go through the
``RetrieverClient`` (actor replicas or a remote service) in one batched call per turn; a query it fails to serve
gets the ``search failed`` observation. Weights arrive from the learner as buckets in the Ray object
store (CPU weight sync) and a probe compares the engine's log-probs with the learner's.
"""

from __future__ import annotations

from dataclasses import asdict

import ray
import torch

from research_rl.agent_loop import AgentLoop, SamplingParams, Trajectory
from research_rl.config import RolloutConfig
from research_rl.learner import set_torch_threads
from research_rl.placement import where
from research_rl.retriever_client import RetrieverClient


@ray.remote
class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, model_path: str, retriever: RetrieverClient, top_k: int):
        set_torch_threads(cfg.torch_threads)
        from transformers import AutoTokenizer

        if cfg.engine != "hf":
            raise NotImplementedError(
                f"rollout.engine={cfg.engine!r} is not available in this version; use rollout.engine=hf")
        from research_rl.hf_engine import HFEngine

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.engine = HFEngine(model_path, self.tokenizer, cfg.max_batch_size, device=device)
        self.retriever, self.top_k = retriever, top_k
        self.loop = AgentLoop(self.engine, self._search, self.tokenizer, cfg.max_response_len, cfg.max_turns)
        self.policy_version = 0

    def _search(self, queries: list[str]) -> list[list[str] | None]:
        return [None if passages is None else [p.contents for p in passages]
                for passages in self.retriever.search(queries, self.top_k)]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[dict]:
        """Run the agent loop on each prompt (already repeated group_size times by the driver).

        Returns one dict per trajectory (``Trajectory`` fields plus ``num_searches``, ``num_generated``)."""
        torch.manual_seed(sampling.seed)
        trajs: list[Trajectory] = self.loop.run(prompts, sampling)
        return [dict(asdict(t), num_searches=t.num_searches, num_generated=t.num_generated) for t in trajs]

    def load_weights(self, bucket_refs: list, policy_version: int) -> dict:
        """Load every bucket (a list of ObjectRefs to ``{name: tensor}``); the sync must cover all parameters.
        Returns ``{"bytes", "tensors"}`` received.

        Raises:
            RuntimeError: some parameters were not in any bucket.
        """
        names, nbytes = set(), 0
        for ref in bucket_refs:
            bucket = ray.get(ref)
            self.engine.load_weights(bucket)
            nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
            names.update(bucket)
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
