"""Ray shell of the learner role: one rank of the learner's torch.distributed group, delegating to a plain
``research_rl.learner.core.Learner`` (its backend from ``learner.backend``). With ``reference.placement=colocated``
the rank also holds its shard of the reference policy (``load_reference``, ``compute_ref_log_probs``)."""

from __future__ import annotations

import socket

import ray
import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import AlgoConfig, LearnerConfig
from research_rl.learner.core import Learner, set_torch_threads
from research_rl.roles.placement import where


def rendezvous_address() -> tuple[str, int]:
    """This node's IP and a free port, for rank 0 to host a process group."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def tokenizer_for(path: str | None):
    """The tokenizer to save beside the weights (rank 0 writes files; other ranks need none)."""
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@ray.remote
class LearnerWorker:
    """One learner rank. ``param_dtype``: a torch dtype name (``model.dtype``), the compute dtype on GPU."""

    def __init__(self, cfg: LearnerConfig, algo: AlgoConfig, rank: int, world_size: int, param_dtype: str,
                 gradient_checkpointing: bool):
        set_torch_threads(cfg.torch_threads)
        device = "cuda" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        compute = getattr(torch, param_dtype) if device == "cuda" else torch.float32  # CPU debug runs train in fp32
        self.learner = Learner(cfg, algo, rank, world_size, device=device, param_dtype=compute,
                               gradient_checkpointing=gradient_checkpointing)

    def rendezvous_address(self) -> tuple[str, int]:
        return rendezvous_address()

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        self.learner.init_process_group(master_addr, master_port)

    def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this rank."""
        return where()

    def shutdown(self) -> None:
        self.learner.shutdown()

    def load_policy(self, path: str) -> None:
        self.learner.load_policy(path)

    def load_reference(self, path: str, offload: bool) -> None:
        self.learner.load_reference(path, offload)

    def compute_ref_log_probs(self, exp: Experience, keep: bool = False) -> torch.Tensor | None:
        """Reference log-probs of this rank's shard, ``[n, L-1]`` float32; with ``keep`` the shard stays here, with
        them filled in, for the next ``update()`` (returns None)."""
        return self.learner.compute_ref_log_probs(exp, keep)

    def update(self, exp: Experience | None = None, lr: float | None = None) -> dict[str, float]:
        """GRPO optimizer steps on ``exp`` (or the kept shard) at learning rate ``lr`` (None: unchanged);
        ``actor/*`` metrics reduced over ranks."""
        return self.learner.update(exp, lr)

    def offload(self) -> float:
        """Before rollout on a shared GPU: ``Learner.offload`` (``learner.offload``; empties the CUDA cache).
        Returns the seconds it took (``timing/offload``)."""
        return self.learner.offload()

    def reload(self) -> float:
        """After rollout, before the next policy pass: ``Learner.reload``. Returns seconds (``timing/reload``)."""
        return self.learner.reload()

    def sft_step(self, exp: Experience, lr: float) -> dict[str, float]:
        return self.learner.sft_step(exp, lr)

    # ------------------------------------------------------------------ weight sync (research_rl.driver.weight_sync)
    def sync_device_key(self) -> str:
        """Where this rank's tensors live (``research_rl.sync.transport.device_key``)."""
        from research_rl.sync.transport import device_key

        return device_key(self.learner.device)

    def sync_plan(self, dtype: str, bucket_mb: float) -> list:
        """The sync's bucket layouts in the engines' dtype (``Learner.sync_plan``; any rank, no collective)."""
        return self.learner.sync_plan(dtype, bucket_mb)

    def sync_join(self, host: str, port: int, world_size: int) -> None:
        """Leader only: host the collective sync group as its rank 0."""
        self.learner.sender.join(host, port, world_size)

    def sync_send_collective(self, buckets: list) -> int:
        """Every rank: gather each bucket; the leader broadcasts it to the engines. Returns bytes sent."""
        return self.learner.sender.send_collective(buckets)

    def sync_begin_ipc(self, buckets: list, pack_here: bool) -> dict:
        """Every rank: start an ipc sync; a packing rank returns its slots' handles by device key."""
        return self.learner.sender.begin_ipc(buckets, pack_here)

    def sync_pack(self, slot: int) -> int:
        """Every rank: gather the next bucket; a packing rank packs it into ``slot``. Returns the bucket index."""
        return self.learner.sender.pack_next(slot)

    def sync_object_store(self, buckets: list) -> list:
        """Every rank: gather each bucket; the leader puts each, packed, in the object store as a NumPy array (the
        engines read it in place) and returns the ObjectRefs, the other ranks []."""
        return [ray.put(flat.numpy()) for flat in self.learner.sender.host_buckets(buckets) if flat is not None]

    def sync_end(self) -> None:
        """Every rank: release the ipc slots."""
        self.learner.sender.end()

    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        return self.learner.probe_log_probs(sequence)

    def save_hf(self, model_dir: str, tokenizer_path: str | None) -> None:
        """The policy as an HF model directory (rank 0 writes)."""
        self.learner.save_hf(model_dir, tokenizer_for(tokenizer_path) if self.learner.rank == 0 else None)

    def save_checkpoint(self, path: str, tokenizer_path: str | None) -> None:
        """Sharded policy and optimizer state (every rank writes its shards)."""
        self.learner.save_checkpoint(path, tokenizer_for(tokenizer_path) if self.learner.rank == 0 else None)

    def load_checkpoint(self, path: str) -> None:
        self.learner.load_checkpoint(path)
