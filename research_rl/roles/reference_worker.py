"""Ray shell of the reference role (``reference.placement=separate``): one rank of the reference policy's own
torch.distributed group, delegating to a plain ``research_rl.learner.reference.ReferencePolicy``.

The group is sharded and micro-batched like the learner (``learner.backend``, ``learner.micro_batch_size`` /
``max_tokens_per_micro_batch``) and placed by ``reference.*`` (``num_workers``, ``num_gpus_per_worker``).
"""

from __future__ import annotations

import ray
import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import LearnerConfig, ReferenceConfig
from research_rl.learner.core import set_torch_threads
from research_rl.learner.reference import ReferencePolicy
from research_rl.roles.learner_worker import rendezvous_address
from research_rl.roles.placement import where


@ray.remote
class ReferenceWorker:
    """One reference rank. ``param_dtype``: a torch dtype name (``model.dtype``), the compute dtype on GPU."""

    def __init__(self, cfg: LearnerConfig, reference: ReferenceConfig, rank: int, world_size: int, param_dtype: str):
        set_torch_threads(cfg.torch_threads)
        device = "cuda" if reference.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        compute = getattr(torch, param_dtype) if device == "cuda" else torch.float32  # CPU debug runs in fp32
        self.reference = ReferencePolicy(cfg, rank, world_size, device=device, param_dtype=compute)

    def rendezvous_address(self) -> tuple[str, int]:
        return rendezvous_address()

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        self.reference.init_process_group(master_addr, master_port)

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this rank."""
        return where()

    def shutdown(self) -> None:
        self.reference.shutdown()

    def load(self, path: str, offload: bool) -> None:
        self.reference.load(path, offload)

    def compute_ref_log_probs(self, exp: Experience) -> torch.Tensor:
        """log π_ref of this rank's shard, ``[n, L-1]`` float32 on CPU (``ReferencePolicy.compute_log_probs``)."""
        return self.reference.compute_log_probs(exp)

    def offload(self) -> float:
        """Before rollout on a shared GPU: ``ReferencePolicy.offload`` (parameters to CPU, CUDA cache emptied).
        Returns the seconds it took (``timing/offload``)."""
        return self.reference.offload()

    def reload(self) -> float:
        """Before the reference log-prob pass: ``ReferencePolicy.reload``. Returns seconds (``timing/reload``)."""
        return self.reference.reload()
