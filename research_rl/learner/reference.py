"""The reference policy π_ref of the KL term (ReSearch §2.2, DeepSeekMath eq. 4): the initial policy of RL, frozen.

``ReferencePolicy`` scores a batch's loss-mask tokens. It runs on the learner's own ranks
(``reference.placement=colocated``: ``Learner.load_reference`` builds one over the learner's process group) or in
its own group of ``ReferenceWorker`` actors (``reference.placement=separate``,
``research_rl.roles.reference_worker``). Either way it is sharded by the backend of ``learner.backend`` and
micro-batched like the learner (``learner.micro_batch_size`` / ``max_tokens_per_micro_batch``).
"""

from __future__ import annotations

import time

import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import LearnerConfig
from research_rl.learner import group
from research_rl.learner.backend import Backend, backend_class
from research_rl.learner.group import empty_cache
from research_rl.learner.passes import batch_log_probs, load_hf_model, rank_plan


class ReferencePolicy:
    """The frozen reference policy on one rank of a process group (joined before ``load``).

    Args:
        cfg: ``learner.*`` (backend, zero_stage, micro-batching).
        rank, world_size: position in the group.
        device: ``"cpu"`` or ``"cuda"``.
        param_dtype: compute dtype (FSDP2 mixed precision when not float32; the roles pass float32 on CPU).

    Raises:
        ValueError, ImportError: as ``backend_class(cfg.backend)``.
    """

    def __init__(self, cfg: LearnerConfig, rank: int = 0, world_size: int = 1, device: str = "cpu",
                 param_dtype: torch.dtype = torch.float32):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.param_dtype = param_dtype
        self._backend_cls = backend_class(cfg.backend)
        self.model: Backend | None = None
        self.streams = False  # load(offload=True): parameters live on CPU, brought in per pass
        self._moved = False  # offload() moved the parameters to CPU

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join this role's own process group (a separate reference group; colocated, the learner has joined)."""
        group.init_process_group(self.cfg.backend, self.rank, self.world_size, self.device, master_addr,
                                 master_port, cpu_offload=self.cfg.cpu_offload)

    def shutdown(self) -> None:
        group.leave()

    def load(self, path: str, offload: bool = False) -> None:
        """Load the frozen model from an HF directory or model id (every rank of the group calls).

        With ``offload`` its parameters live on CPU between log-prob passes and are brought to the device per
        layer (FSDP2 ``CPUOffloadPolicy``, ZeRO-3 parameter offload) or per pass (ZeRO-2); on a CPU rank that
        changes nothing but runs the same code. With ``learner.rank0_load`` under FSDP2 only rank 0 reads the
        weights (``Learner.load_policy``)."""
        from_rank0 = self.cfg.rank0_load and self.world_size > 1 and self.cfg.backend == "fsdp2"
        model = load_hf_model(path, trainable=False, meta=from_rank0 and self.rank > 0)
        self.model = self._backend_cls(model, self.cfg, self.rank, self.world_size, self.device, self.param_dtype,
                                       trainable=False, offload=offload, **({"from_rank0": True} if from_rank0 else {}))
        self.streams = offload

    def offload(self) -> float:
        """Parameters to CPU between phases (colocated with rollout), unless ``load(offload=True)`` keeps them there
        already; then the allocator's cache is emptied. Returns the seconds it took (``timing/offload``).

        Raises:
            ValueError: under DeepSpeed ZeRO-3 (use ``load(offload=True)``, its parameter offload).
        """
        start = time.perf_counter()
        if self.model is not None and not self.streams:
            self.model.offload(params=True)
            self._moved = True
        empty_cache(self.device)
        return time.perf_counter() - start

    def reload(self) -> float:
        """Undo ``offload`` (bit for bit). Returns the seconds it took (``timing/reload``)."""
        start = time.perf_counter()
        if self._moved:
            self.model.reload(params=True)
            self._moved = False
        return time.perf_counter() - start

    def compute_log_probs(self, exp: Experience) -> torch.Tensor:
        """log π_ref of ``exp``'s scored tokens: ``[n, L-1]`` float32 on CPU, rows in ``exp``'s order; position
        ``t`` scores token ``t+1`` and is 0 where ``loss_mask[:, 1:]`` is 0. Every rank of the group calls it with
        its own shard (micro-batch counts are agreed by an all-reduce).

        Raises:
            RuntimeError: ``load`` has not been called.
            ValueError: ``exp`` has no rows.
        """
        if self.model is None:
            raise RuntimeError("ReferencePolicy.compute_log_probs needs load(path) first")
        if self._moved:
            raise RuntimeError("ReferencePolicy.compute_log_probs after offload() needs reload() first")
        plan = rank_plan(exp, self.cfg, self.world_size, self.device)
        with self.model.in_use():
            return batch_log_probs(self.model.module, exp, plan, self.device, self.cfg.logits_chunk_tokens,
                                   self.cfg.pack)
