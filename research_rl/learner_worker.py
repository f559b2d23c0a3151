"""Ray shell of the learner role: one rank of the torch.distributed group, delegating to ``Learner``."""

from __future__ import annotations

import socket

import ray
import torch

from research_rl.config import AlgoConfig, LearnerConfig
from research_rl.learner import Learner, set_torch_threads
from research_rl.placement import where


@ray.remote
class LearnerWorker:
    def __init__(self, cfg: LearnerConfig, algo: AlgoConfig, rank: int, world_size: int, param_dtype: str,
                 gradient_checkpointing: bool):
        set_torch_threads(cfg.torch_threads)
        device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.learner = Learner(cfg, algo, rank, world_size, device=device,
                               param_dtype=getattr(torch, param_dtype), gradient_checkpointing=gradient_checkpointing)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        self.learner.init_process_group(master_addr, master_port)

    def load_policy(self, path: str) -> None:
        self.learner.load_policy(path)

    def load_reference(self, path: str) -> None:
        self.learner.load_reference(path)

    def compute_log_probs(self, batch: dict) -> dict:
        return self.learner.compute_log_probs(batch)

    def update(self, batch: dict) -> dict:
        return self.learner.update(batch)

    def sft_step(self, batch: dict, lr: float) -> dict:
        return self.learner.sft_step(batch, lr)

    def weight_buckets(self, bucket_mb: int) -> list:
        """Full weights as ObjectRefs of buckets (rank 0; other ranks take part in the gather and return [])."""
        return [ray.put(b) for b in self.learner.weight_buckets(bucket_mb)]

    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        return self.learner.probe_log_probs(sequence)

    def save(self, model_dir: str, optimizer_path: str | None, tokenizer_path: str | None) -> None:
        tokenizer = None
        if tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.learner.save_hf(model_dir, tokenizer)
        if optimizer_path:
            self.learner.save_optimizer(optimizer_path)

    def load_optimizer(self, path: str) -> None:
        self.learner.load_optimizer(path)

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this rank."""
        return where()

    def shutdown(self) -> None:
        self.learner.shutdown()
