"""Ray shell of the learner role: one rank of the torch.distributed group, delegating to the ``Learner`` subclass
of ``learner.backend`` (``FSDP2Learner`` or ``DeepSpeedLearner``)."""

from __future__ import annotations

import socket

import ray
import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import AlgoConfig, LearnerConfig
from research_rl.learner.core import learner_class, set_torch_threads
from research_rl.roles.placement import where


def _tokenizer(path: str | None):
    """The tokenizer to save beside the weights (rank 0 writes files; other ranks need none)."""
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _learner_batch(exp: Experience) -> dict[str, torch.Tensor]:
    """The tensors ``Learner`` reads, as the dict it takes (the per-row driver fields stay behind)."""
    names = ("input_ids", "attention_mask", "loss_mask", "advantages", "ref_log_probs", "old_log_probs")
    return {k: getattr(exp, k) for k in names if getattr(exp, k) is not None}


@ray.remote
class LearnerWorker:
    def __init__(self, cfg: LearnerConfig, algo: AlgoConfig, rank: int, world_size: int, param_dtype: str,
                 gradient_checkpointing: bool):
        set_torch_threads(cfg.torch_threads)
        device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.learner = learner_class(cfg.backend)(cfg, algo, rank, world_size, device=device,
                                                  param_dtype=getattr(torch, param_dtype),
                                                  gradient_checkpointing=gradient_checkpointing)
        self._kept: Experience | None = None  # the shard compute_ref_log_probs(keep=True) holds for update()

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

    def load_reference(self, path: str, offload: bool = False) -> None:
        self.learner.load_reference(path, offload)

    def compute_ref_log_probs(self, exp: Experience, keep: bool = False) -> torch.Tensor | None:
        """Reference log-probs of this rank's shard, ``[n, L-1]`` float32 on CPU (``Learner.compute_log_probs``).

        With ``keep`` the shard, its ``ref_log_probs`` filled in, stays on this rank for the next ``update()`` and
        None is returned: in colocated mode the reference log-probs never leave the rank."""
        ref = self.learner.compute_log_probs(_learner_batch(exp), ("ref_log_probs",))["ref_log_probs"]
        if not keep:
            return ref
        self._kept = exp.replace(ref_log_probs=ref)
        return None

    def update(self, exp: Experience | None = None) -> dict:
        """One GRPO update on ``exp`` (this rank's shard), or on the shard kept by ``compute_ref_log_probs(...,
        keep=True)`` when None. Returns ``actor/*`` metrics reduced over ranks (``Learner.update``).

        Raises:
            RuntimeError: no shard given and none kept.
        """
        if exp is None:
            if self._kept is None:
                raise RuntimeError("update() without a batch needs compute_ref_log_probs(shard, keep=True) first")
            exp, self._kept = self._kept, None
        return self.learner.update(_learner_batch(exp))

    def sft_step(self, exp: Experience, lr: float) -> dict:
        return self.learner.sft_step(_learner_batch(exp), lr)

    def weight_buckets(self, bucket_mb: int) -> list:
        """Full weights as ObjectRefs of buckets, each put in the object store as soon as it is gathered (rank 0;
        other ranks take part in the gathers and return [])."""
        return [ray.put(b) for b in self.learner.weight_buckets(bucket_mb)]

    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        return self.learner.probe_log_probs(sequence)

    def save_hf(self, model_dir: str, tokenizer_path: str | None) -> None:
        """The policy as an HF model directory (rank 0 writes)."""
        self.learner.save_hf(model_dir, _tokenizer(tokenizer_path) if self.learner.rank == 0 else None)

    def save_checkpoint(self, path: str, tokenizer_path: str | None) -> None:
        """Sharded policy and optimizer state (every rank writes its shards)."""
        self.learner.save_checkpoint(path, _tokenizer(tokenizer_path) if self.learner.rank == 0 else None)

    def load_checkpoint(self, path: str) -> None:
        self.learner.load_checkpoint(path)

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this rank."""
        return where()

    def shutdown(self) -> None:
        self.learner.shutdown()
