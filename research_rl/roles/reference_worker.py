"""Ray shell of the reference role (``reference.placement=separate``): one rank of the reference policy's own
torch.distributed group, computing reference log-probs only (the KL term's ``π_ref``, ReSearch §2.2). It delegates
to a reference-only ``Learner`` of ``learner.backend`` (no policy, no optimizer)."""

from __future__ import annotations

import socket

import ray
import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import AlgoConfig, LearnerConfig, ReferenceConfig
from research_rl.learner.core import learner_class, set_torch_threads
from research_rl.roles.placement import where


@ray.remote
class ReferenceWorker:
    def __init__(self, cfg: LearnerConfig, reference: ReferenceConfig, rank: int, world_size: int, param_dtype: str):
        set_torch_threads(cfg.torch_threads)
        device = "cuda" if reference.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        # AlgoConfig() only fills the constructor: a reference-only learner computes no loss
        self.learner = learner_class(cfg.backend)(cfg, AlgoConfig(), rank, world_size, device=device,
                                                  param_dtype=getattr(torch, param_dtype), gradient_checkpointing=False)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        self.learner.init_process_group(master_addr, master_port)

    def load(self, path: str, offload: bool = False) -> None:
        """The frozen reference policy from an HF model directory, sharded over the group."""
        self.learner.load_reference(path, offload)

    def compute_ref_log_probs(self, exp: Experience) -> torch.Tensor:
        """Reference log-probs of this rank's shard, ``[n, L-1]`` float32 on CPU, 0 off ``loss_mask[:, 1:]``."""
        batch = {k: getattr(exp, k) for k in ("input_ids", "attention_mask", "loss_mask")}
        return self.learner.compute_log_probs(batch, ("ref_log_probs",))["ref_log_probs"]

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this rank."""
        return where()

    def shutdown(self) -> None:
        self.learner.shutdown()
