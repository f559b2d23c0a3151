"""Learner core: the policy under FSDP2 (``fully_shard``), its frozen reference copy, log-probs, GRPO updates.

Written against ``torch.distributed``: each rank is one ``Learner`` in one process group (gloo on CPU, NCCL on
GPU); more ranks only need more ``LearnerWorker`` actors. Each decoder layer and the root are sharded with
``fully_shard``; full (unsharded) weights for sync and export come from
``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True, cpu_offload=True)``.

Batches are dicts of tensors with right-padded sequences (prompt + response):
    input_ids      [N, L] int64
    attention_mask [N, L] int64
    loss_mask      [N, L] int64   1 on generated response tokens, 0 on prompt, inserted results, padding
    advantages     [N]    float   (update only)
    old_log_probs  [N, L-1], ref_log_probs [N, L-1]  (update only; position t scores token t+1)

Loss aggregation is the masked token-mean over the whole mini-batch: every micro-batch divides by the global
number of loss tokens (summed over ranks, divided by the world size because FSDP averages gradients), so
gradient accumulation and data parallelism leave the update unchanged. One optimizer step per batch (DESIGN).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from research_rl import grpo
from research_rl.config import AlgoConfig, LearnerConfig


def _micro_batches(batch: dict[str, torch.Tensor], size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Split along N; trim each micro-batch to its longest attended sequence (no compute on shared padding)."""
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        mb = {k: v[start:start + size] for k, v in batch.items()}
        width = int(mb["attention_mask"].sum(dim=1).max())
        yield {k: (v[:, :width] if k in ("input_ids", "attention_mask", "loss_mask")
                   else v[:, :width - 1] if v.dim() == 2 else v) for k, v in mb.items()}


class Learner:
    """One rank of the learner.

    Args:
        cfg: learner settings (lr, grad clip, micro-batch size).
        algo: GRPO coefficients.
        rank, world_size: position in the process group.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, cfg: LearnerConfig, algo: AlgoConfig, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", param_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False):
        self.cfg, self.algo = cfg, algo
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.param_dtype = param_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.policy = None
        self.reference = None
        self.optimizer = None
        self.mesh = None

    # ---------------------------------------------------------------- setup
    def init_process_group(self, master_addr: str, master_port: int) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=self.rank, world_size=self.world_size)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    def _load_sharded(self, path: str, trainable: bool):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)
        if trainable and self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        kwargs = {"mesh": self.mesh}
        if self.device.type == "cuda" and self.param_dtype != torch.float32:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        model.train(trainable)
        if not trainable:
            model.requires_grad_(False)
        return model

    def load_policy(self, path: str) -> None:
        """Load (or reload) the trainable policy from an HF directory; a fresh AdamW optimizer."""
        self.policy = self._load_sharded(path, trainable=True)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                           weight_decay=self.cfg.weight_decay)

    def load_reference(self, path: str) -> None:
        """Load the frozen reference policy (the initial policy of RL) from an HF directory."""
        self.reference = self._load_sharded(path, trainable=False)

    # ---------------------------------------------------------------- forward
    def _forward(self, model, mb: dict[str, torch.Tensor], with_entropy: bool):
        """Log-probs (and entropy) of every next token, ``[n, l-1]``; zero before the first loss position.

        Logits are only computed from the first position any row scores (``logits_to_keep``): the prompt's
        logits never enter the loss, and the vocabulary projection is the largest activation on long prompts.
        """
        ids = mb["input_ids"].to(self.device)
        n, width = ids.shape
        scored = mb["loss_mask"][:, 1:].any(dim=0).nonzero()
        first = int(scored[0]) if len(scored) else width - 2  # first position t whose next token is scored
        keep = torch.arange(first, width - 1, device=self.device)
        logits = model(input_ids=ids, attention_mask=mb["attention_mask"].to(self.device),
                       logits_to_keep=keep).logits  # [n, l-1-first, V]
        log_probs = ids.new_zeros((n, width - 1), dtype=torch.float32)
        log_probs = torch.cat([log_probs[:, :first], grpo.log_probs_from_logits(logits, ids[:, first + 1:]).float()], 1)
        entropy = None
        if with_entropy:
            entropy = torch.cat([log_probs.new_zeros((n, first)), grpo.entropy_from_logits(logits).float()], 1)
        return log_probs, entropy

    def _global_tokens(self, mask: torch.Tensor) -> float:
        n = mask.sum().to(torch.float64)
        if self.world_size > 1:
            n = n.to(self.device)
            dist.all_reduce(n)
        return float(n)

    @torch.no_grad()
    def compute_log_probs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Log-probs of every next token under the current policy (``old_log_probs``) and the reference
        (``ref_log_probs``), each ``[N, L-1]`` float32 on CPU (zero past each sequence's trimmed width). Only the
        models loaded on this rank are scored (a separate reference group holds only the reference)."""
        n, width = batch["input_ids"].shape
        models = {key: m for key, m in (("old_log_probs", self.policy), ("ref_log_probs", self.reference))
                  if m is not None}
        out = {key: torch.zeros(n, width - 1) for key in models}
        for key, model in models.items():
            was_training = model.training
            model.eval()
            row = 0
            for mb in _micro_batches(batch, self.cfg.micro_batch_size):
                lp, _ = self._forward(model, mb, with_entropy=False)
                out[key][row:row + lp.shape[0], :lp.shape[1]] = lp.float().cpu()
                row += lp.shape[0]
            model.train(was_training)
        return out

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One GRPO optimizer step over the whole batch (micro-batched). Returns ``actor/*`` metrics."""
        mask_all = batch["loss_mask"][:, 1:]
        num_tokens = self._global_tokens(mask_all) / self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "loss": 0.0}
        for mb in _micro_batches(batch, self.cfg.micro_batch_size):
            mask = mb["loss_mask"][:, 1:].to(self.device).float()
            log_probs, entropy = self._forward(self.policy, mb, with_entropy=True)
            adv = grpo.broadcast_advantages(mb["advantages"].to(self.device).float(), mask)
            ref = mb["ref_log_probs"].to(self.device) if self.algo.kl_coef > 0 else None
            out = grpo.grpo_loss(log_probs, mb["old_log_probs"].to(self.device), ref, adv, mask, entropy,
                                 clip_eps=self.algo.clip_eps, kl_coef=self.algo.kl_coef,
                                 entropy_coef=self.algo.entropy_coef, num_tokens=max(num_tokens, 1e-8))
            out.loss.backward()
            for k in sums:
                sums[k] += float(getattr(out, k).detach())
        grad_norm = self._clip_grad_norm()
        if math.isfinite(grad_norm):
            self.optimizer.step()
        metrics = {f"actor/{k}": v for k, v in sums.items()}
        metrics.update({"actor/grad_norm": grad_norm, "actor/lr": self.optimizer.param_groups[0]["lr"],
                        "actor/num_tokens": num_tokens * self.world_size,
                        "actor/skipped_step": float(not math.isfinite(grad_norm))})
        return self._reduce_metrics(metrics)

    def sft_step(self, batch: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
        """One supervised step: masked token-mean NLL over loss-mask tokens (the debug warm-up)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mask_all = batch["loss_mask"][:, 1:]
        num_tokens = self._global_tokens(mask_all) / self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for mb in _micro_batches(batch, self.cfg.micro_batch_size):
            mask = mb["loss_mask"][:, 1:].to(self.device).float()
            log_probs, _ = self._forward(self.policy, mb, with_entropy=False)
            loss = grpo.token_mean(-log_probs, mask, num_tokens=max(num_tokens, 1e-8))
            loss.backward()
            total += float(loss.detach())
        grad_norm = self._clip_grad_norm()
        self.optimizer.step()
        return self._reduce_metrics({"warmup/nll": total, "warmup/grad_norm": grad_norm})

    def _clip_grad_norm(self) -> float:
        """Clip to ``grad_clip``; the total norm before clipping (a DTensor under FSDP2, made a float)."""
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) for k, v in zip(keys, t / self.world_size)}

    # ---------------------------------------------------------------- weights
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) policy weights on CPU; the complete dict on rank 0, empty on other ranks.

        Every rank must call this (it all-gathers shards)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def weight_buckets(self, bucket_mb: int) -> list[dict[str, torch.Tensor]]:
        """The full state dict cut into buckets of at most ``bucket_mb`` MiB (a tensor larger than that gets a
        bucket of its own). Empty list on ranks other than 0."""
        limit = bucket_mb * 2**20
        buckets, current, size = [], {}, 0
        for name, tensor in self.full_state_dict().items():
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > limit:
                buckets.append(current)
                current, size = {}, 0
            current[name] = tensor
            size += nbytes
        if current:
            buckets.append(current)
        return buckets

    @torch.no_grad()
    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        """Policy log-probs of tokens 1..L-1 of one sequence, ``[L-1]`` float32 on CPU."""
        ids = torch.tensor([sequence], dtype=torch.long)
        was_training = self.policy.training
        self.policy.eval()
        lp, _ = self._forward(self.policy, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                            "loss_mask": torch.ones_like(ids)}, False)
        self.policy.train(was_training)
        return lp[0].float().cpu()

    # ---------------------------------------------------------------- checkpoints
    def save_hf(self, path: str | Path, tokenizer=None) -> None:
        """Write the policy as a Hugging Face model directory (rank 0 writes; every rank must call)."""
        state = self.full_state_dict()
        if self.rank == 0:
            self.policy.save_pretrained(str(path), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path))

    def save_optimizer(self, path: str | Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.policy, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            torch.save(state, str(path))

    def load_optimizer(self, path: str | Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(str(path), map_location="cpu", weights_only=False) if self.rank == 0 else {}
        set_optimizer_state_dict(self.policy, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world_size > 1))

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def set_torch_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0 keeps what Ray set from the actor's num_cpus)."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
