"""Learner core: log-probs and GRPO updates on one rank of a ``torch.distributed`` group (DESIGN: Learner).

Each rank is one ``Learner`` in one process group (gloo on CPU, NCCL on GPU); more ranks only need more
``LearnerWorker`` actors. ``Learner`` holds everything the backends share (micro-batching, the loss, metrics,
weight streaming, the HF export); a backend subclass only wraps the model and owns backward, optimizer step and
sharded state:

- ``FSDP2Learner`` (this module): ``fully_shard`` per decoder layer and the root; bf16 parameters with fp32
  gradient reduction on GPU (``MixedPrecisionPolicy``); optional ``CPUOffloadPolicy``.
- ``DeepSpeedLearner`` (``research_rl.learner.deepspeed_backend``, the only module that imports deepspeed): ZeRO-2 or
  ZeRO-3 with a torch AdamW passed in, its config generated from ``LearnerConfig``.

``learner_class(cfg.backend)`` picks the class.

Batches are dicts of tensors with right-padded sequences (prompt + response):
    input_ids      [N, L] int64
    attention_mask [N, L] int64
    loss_mask      [N, L] int64   1 on generated response tokens, 0 on prompt, inserted results, padding
    advantages     [N]    float   (update only)
    ref_log_probs  [N, L-1] float (update only; position t scores token t+1; zero off the loss mask)
    old_log_probs  [N, L-1] float (update, optional: without it the policy's own log-probs, detached, see
                   ``_grpo_loss``; the trainer leaves it out, since one optimizer step per batch makes the
                   recomputed values equal the current ones and the extra forward pass would buy nothing)

Micro-batches: fixed ``micro_batch_size`` rows in batch order, or, with ``max_tokens_per_micro_batch``, rows
sorted by length and packed first-fit so that rows × longest row ≤ the budget (``plan_micro_batches``). Every
rank runs the same number of micro-batches (collectives in FSDP2/ZeRO-3 forward and in backward need it): a rank
with fewer pads with zero-weighted ones.

Loss aggregation is the masked token-mean over the whole mini-batch: every micro-batch divides by the global
number of loss tokens (summed over ranks, divided by the world size because both backends average gradients
over ranks), so grouping, gradient accumulation and data parallelism leave the update unchanged. One optimizer
step per batch (DESIGN).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from research_rl.algo import grpo
from research_rl.learner.weights import cut_buckets, tied_aliases, write_hf_model
from research_rl.config.schema import AlgoConfig, LearnerConfig

BACKEND_FILE = "learner.json"  # in a sharded checkpoint: which backend wrote it, at what world size
HF_CONFIG_DIR = "hf"  # in a sharded checkpoint: the model's HF config and tokenizer (what export needs)


def plan_micro_batches(lengths: list[int], micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Group row indices into micro-batches.

    Args:
        lengths: attended length of each row (tokens).
        micro_batch_size: rows per micro-batch when ``max_tokens`` is None (batch order kept).
        max_tokens: token budget per micro-batch, counted as padded tokens = rows × longest row. Rows are sorted
            longest first and each goes into the first micro-batch it fits (first-fit decreasing); a row longer
            than the budget gets a micro-batch of its own.

    Returns:
        Lists of row indices; every row appears exactly once.
    """
    n = len(lengths)
    if max_tokens is None:
        return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    groups: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        for g in groups:  # the first row of a group is its longest
            if (len(g) + 1) * lengths[g[0]] <= max_tokens:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _take(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of the batch, trimmed to their longest attended sequence (no compute on shared padding)."""
    idx = torch.tensor(rows, dtype=torch.long)
    mb = {k: v.index_select(0, idx) for k, v in batch.items()}
    width = int(mb["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :width] if k in ("input_ids", "attention_mask", "loss_mask")
                else v[:, :width - 1] if v.dim() == 2 else v) for k, v in mb.items()}


class Learner:
    """One rank of the learner: what both backends share. Use ``FSDP2Learner`` or ``DeepSpeedLearner``.

    Args:
        cfg: learner settings (lr, grad clip, micro-batching, backend options).
        algo: GRPO coefficients.
        rank, world_size: position in the process group.
        device: ``"cpu"`` or ``"cuda"``.
        param_dtype: compute dtype on GPU (CPU always runs float32).
        gradient_checkpointing: recompute activations in backward (HF ``gradient_checkpointing_enable``).
    """

    backend = ""

    def __init__(self, cfg: LearnerConfig, algo: AlgoConfig, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", param_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False):
        self.cfg, self.algo = cfg, algo
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.param_dtype = param_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.policy = None  # the wrapped trainable model (callable like the HF model)
        self.optimizer: torch.optim.Optimizer | None = None  # the torch optimizer (the backend may wrap it)
        self.reference = None
        self.reference_offload = False
        self.hf_config = None  # the policy's transformers config and generation config (for HF export)
        self.generation_config = None
        self._aliases: set[str] = set()  # tied parameter names streamed once (lm_head.weight when tied)

    # ================================================================ backend hooks
    def _wrap_policy(self, model: torch.nn.Module) -> None:
        """Shard ``model`` and build the optimizer: set ``self.policy`` and ``self.optimizer``."""
        raise NotImplementedError

    def _wrap_reference(self, model: torch.nn.Module, offload: bool):
        """Shard the frozen reference; with ``offload`` its parameters stay on CPU between passes."""
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients of one micro-batch; ``last`` marks the accumulation boundary."""
        raise NotImplementedError

    def _step(self) -> tuple[float, bool]:
        """Clip to ``grad_clip`` and step. Returns (total grad norm before clipping, whether the step was applied:
        a non-finite norm skips it)."""
        raise NotImplementedError

    def _full_tensors(self, model, skip: set[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every parameter and persistent buffer but those named in ``skip``, unsharded, one gather at a time:
        ``(name, CPU tensor)`` on rank 0, ``(name, None)`` on other ranks. Every rank must consume it (collectives)."""
        raise NotImplementedError

    def _save_sharded(self, path: Path) -> None:
        raise NotImplementedError

    def _load_sharded(self, path: Path) -> None:
        raise NotImplementedError

    def _backend_info(self) -> dict:
        return {"backend": self.backend, "world_size": self.world_size}

    @contextlib.contextmanager
    def _reference_in_use(self):
        """Around a reference pass: bring offloaded parameters in where the backend does not do it itself."""
        yield

    # ================================================================ setup
    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the process group (rank 0 hosts the TCP rendezvous at ``master_addr:master_port``)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda" and self.cfg.cpu_offload:
            backend = "cuda:nccl,cpu:gloo"  # offloaded shards are reduced on CPU (gradient norm)
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=self.rank, world_size=self.world_size)

    def _load_hf(self, path: str, trainable: bool) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # on CPU: the backend places it
        if trainable and self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train(trainable)
        if not trainable:
            model.requires_grad_(False)
        return model

    def load_policy(self, path: str) -> None:
        """Load (or reload) the trainable policy from an HF directory or model id; a fresh AdamW optimizer."""
        model = self._load_hf(path, trainable=True)
        self.hf_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self._aliases = tied_aliases(model)
        self._wrap_policy(model)

    def load_reference(self, path: str, offload: bool = False) -> None:
        """Load the frozen reference policy (the initial policy of RL) from an HF directory or model id.

        With ``offload`` its parameters live on CPU between log-prob passes (and are brought to the device per
        layer or per pass); on a CPU learner that changes nothing but runs the same code."""
        self.reference = self._wrap_reference(self._load_hf(path, trainable=False), offload)
        self.reference_offload = offload

    def _optimizer_kwargs(self) -> dict:
        return {"lr": self.cfg.lr, "betas": tuple(self.cfg.betas), "weight_decay": self.cfg.weight_decay}

    # ================================================================ forward
    def _forward(self, model, mb: dict[str, torch.Tensor], with_entropy: bool, entropy_grad: bool = False):
        """Log-probs (and entropy) of the next token at every position ``t`` with ``loss_mask[t + 1] = 1``, each
        ``[n, l-1]`` float32; zero at every other position.

        Logits are only computed where the loss reads them: a forward pre-hook on the output embeddings (the LM
        head) hands it the final hidden states of the scored positions alone, ``[1, K, d]`` for ``K`` loss tokens,
        instead of ``[n, l, d]``. In a ReSearch trajectory most positions are prompt and inserted ``<result>``
        passages, so this skips most of the vocabulary projection, the log-softmax and their backward (a
        generalisation of transformers' ``logits_to_keep``). The values at the scored positions are those of the
        full forward. ``entropy_grad``: keep the entropy in the graph (an entropy bonus); otherwise it is a
        detached metric.
        """
        ids = mb["input_ids"].to(self.device)
        n, width = ids.shape
        scored = mb["loss_mask"][:, 1:].to(self.device).bool()  # [n, l-1]: position t scores token t+1
        at = torch.cat([scored, scored.new_zeros((n, 1))], dim=1)  # [n, l]: the hidden states the head needs

        def select(_module, args):
            return (args[0][at].unsqueeze(0), *args[1:])  # [n, l, d] -> [1, K, d]

        attention = mb["attention_mask"].to(self.device)
        if bool((attention[:, 1:] <= attention[:, :-1]).all()):
            # right padding: under the causal mask no real token attends to a pad, so the padding mask changes
            # nothing at real positions, and without it SDPA runs its causal kernel (skips the upper triangle)
            attention = None
        hf_model = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
        handle = hf_model.get_output_embeddings().register_forward_pre_hook(select)
        try:
            logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=0).logits[0]  # [K, V]
        finally:
            handle.remove()
        log_probs = torch.zeros((n, width - 1), dtype=torch.float32, device=self.device)
        log_probs = log_probs.masked_scatter(scored, grpo.log_probs_from_logits(logits, ids[:, 1:][scored]).float())
        entropy = None
        if with_entropy:
            with contextlib.nullcontext() if entropy_grad else torch.no_grad():
                per_token = grpo.entropy_from_logits(logits).float()  # [K]
            entropy = torch.zeros_like(log_probs).masked_scatter(scored, per_token)
        return log_probs, entropy

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _global_tokens(self, mask: torch.Tensor) -> float:
        return self._all_reduce([float(mask.sum())])[0]

    def _plan(self, batch: dict[str, torch.Tensor]) -> list[list[int] | None]:
        """This rank's micro-batches, padded with ``None`` (a zero-weighted pass) to the most any rank has."""
        if batch["input_ids"].shape[0] == 0:
            raise ValueError("the learner got an empty batch")
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        plan: list[list[int] | None] = plan_micro_batches(lengths, self.cfg.micro_batch_size,
                                                          self.cfg.max_tokens_per_micro_batch)
        most = int(self._all_reduce([float(len(plan))], op=dist.ReduceOp.MAX)[0])
        return plan + [None] * (most - len(plan))

    @torch.no_grad()
    def compute_log_probs(self, batch: dict[str, torch.Tensor],
                          keys: tuple[str, ...] = ("old_log_probs", "ref_log_probs")) -> dict[str, torch.Tensor]:
        """Log-probs of the scored tokens under the loaded models, rows in the batch's order.

        Returns, of ``keys``, ``old_log_probs`` (the policy, when loaded) and ``ref_log_probs`` (the reference, when
        loaded), each ``[N, L-1]`` float32 on CPU, zero where ``loss_mask[:, 1:]`` is 0 (``_forward``).

        Raises:
            RuntimeError: none of ``keys`` has its model loaded.
        """
        models = {k: m for k, m in (("old_log_probs", self.policy), ("ref_log_probs", self.reference))
                  if m is not None and k in keys}
        if not models:
            raise RuntimeError(f"compute_log_probs({list(keys)}) needs load_policy or load_reference first")
        n, width = batch["input_ids"].shape
        plan = self._plan(batch)
        out = {}
        for key, model in models.items():
            out[key] = torch.zeros(n, width - 1)
            was_training = model.training
            model.eval()
            with self._reference_in_use() if key == "ref_log_probs" else contextlib.nullcontext():
                for rows in plan:
                    lp, _ = self._forward(model, _take(batch, rows or [0]), with_entropy=False)
                    if rows is not None:
                        out[key][rows, :lp.shape[1]] = lp.float().cpu()
            model.train(was_training)
        return out

    def _accumulate(self, batch: dict[str, torch.Tensor], loss_fn) -> tuple[dict[str, float], float]:
        """Forward and backward every micro-batch of ``batch``; ``loss_fn(mb, num_tokens)`` returns the micro-batch's
        loss and its detached metric terms (each a share of the global token-mean). Returns the metric sums and
        the global number of loss tokens."""
        global_tokens = self._global_tokens(batch["loss_mask"][:, 1:])
        num_tokens = max(global_tokens / self.world_size, 1e-8)  # the backends average gradients over ranks
        plan = self._plan(batch)
        sums: dict[str, float] = {}
        for i, rows in enumerate(plan):
            loss, terms = loss_fn(_take(batch, rows or [0]), num_tokens)
            weight = 0.0 if rows is None else 1.0  # a padding pass keeps the ranks' collectives in step
            self._backward(loss * weight, last=i == len(plan) - 1)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
        sums["micro_batches"] = float(len(plan))
        return sums, global_tokens

    def _grpo_loss(self, mb: dict[str, torch.Tensor], num_tokens: float):
        mask = mb["loss_mask"][:, 1:].to(self.device).float()
        log_probs, entropy = self._forward(self.policy, mb, with_entropy=True, entropy_grad=self.algo.entropy_coef != 0)
        adv = grpo.broadcast_advantages(mb["advantages"].to(self.device).float(), mask)
        ref = mb["ref_log_probs"].to(self.device) if self.algo.kl_coef > 0 else None
        # without old_log_probs the policy's own, detached: one optimizer step per batch means the policy at loss
        # time is the one that produced (and, after the sync, scored) the batch, so the ratio is 1 with gradient
        # ∇log π_θ, as a recomputed old_log_probs would give (TRL's GRPOTrainer with num_iterations=1 does the same)
        old = mb["old_log_probs"].to(self.device) if "old_log_probs" in mb else log_probs.detach()
        out = grpo.grpo_loss(log_probs, old, ref, adv, mask, entropy,
                             clip_eps=self.algo.clip_eps, kl_coef=self.algo.kl_coef,
                             entropy_coef=self.algo.entropy_coef, num_tokens=num_tokens)
        terms = {k: getattr(out, k).detach() for k in ("pg_loss", "kl", "entropy", "clip_frac", "approx_kl")}
        return out.loss, {**terms, "loss": out.loss.detach()}

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One GRPO optimizer step over the whole batch (micro-batched). Returns ``actor/*`` metrics, averaged over
        ranks: ``pg_loss``, ``kl``, ``entropy``, ``clip_frac``, ``approx_kl``, ``loss`` (token-means over the global
        batch), ``grad_norm`` (before clipping), ``lr``, ``num_tokens`` (global loss tokens), ``micro_batches``
        (per rank), ``skipped_step`` (1 when a non-finite gradient norm skipped the step)."""
        self._zero_grad()
        sums, num_tokens = self._accumulate(batch, self._grpo_loss)
        grad_norm, applied = self._step()
        metrics = {f"actor/{k}": v for k, v in sums.items()}
        metrics.update({"actor/grad_norm": grad_norm, "actor/lr": self.optimizer.param_groups[0]["lr"],
                        "actor/num_tokens": num_tokens, "actor/skipped_step": float(not applied)})
        return self._reduce_metrics(metrics)

    def sft_step(self, batch: dict[str, torch.Tensor], lr: float) -> dict[str, float]:
        """One supervised step: masked token-mean NLL over loss-mask tokens (the debug warm-up) at learning rate
        ``lr``. Returns ``warmup/nll`` and ``warmup/grad_norm``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def nll(mb, num_tokens):
            mask = mb["loss_mask"][:, 1:].to(self.device).float()
            log_probs, _ = self._forward(self.policy, mb, with_entropy=False)
            loss = grpo.token_mean(-log_probs, mask, num_tokens=num_tokens)
            return loss, {"nll": loss.detach()}

        self._zero_grad()
        sums, _ = self._accumulate(batch, nll)
        grad_norm, _ = self._step()
        return self._reduce_metrics({"warmup/nll": sums["nll"], "warmup/grad_norm": grad_norm})

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        values = self._all_reduce([metrics[k] for k in keys])
        return {k: v / self.world_size for k, v in zip(keys, values)}

    # ================================================================ weights
    def weight_buckets(self, bucket_mb: int) -> Iterator[dict[str, torch.Tensor]]:
        """Full (unsharded) policy weights on CPU, cut into buckets of at most ``bucket_mb`` MiB as they are
        gathered (a tensor larger than that gets a bucket of its own), so the full model never exists twice on
        one rank. Tied aliases (``lm_head.weight`` tied to the embeddings) appear once, under the first name.

        A generator: rank 0 yields the buckets; other ranks yield nothing but must still exhaust it, since every
        tensor is gathered collectively."""
        yield from cut_buckets(self._full_tensors(self.policy, skip=self._aliases), bucket_mb)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full policy weights on CPU in one dict (rank 0; empty on other ranks). Every rank must call it."""
        return {k: v for bucket in self.weight_buckets(bucket_mb=2**30) for k, v in bucket.items()}

    @torch.no_grad()
    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        """Policy log-probs of tokens 1..L-1 of one sequence, ``[L-1]`` float32 on CPU (every rank must call)."""
        ids = torch.tensor([sequence], dtype=torch.long)
        was_training = self.policy.training
        self.policy.eval()
        lp, _ = self._forward(self.policy, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                            "loss_mask": torch.ones_like(ids)}, False)
        self.policy.train(was_training)
        return lp[0].float().cpu()

    # ================================================================ checkpoints
    def save_hf(self, path: str | Path, tokenizer=None, shard_mb: int = 4096) -> None:
        """Write the policy as a Hugging Face model directory, streaming ``shard_mb``-MiB safetensors shards (rank 0
        writes; every rank must call)."""
        buckets = self.weight_buckets(shard_mb)
        if self.rank == 0:
            write_hf_model(path, buckets, self.hf_config, self.generation_config, tokenizer)
        else:
            for _ in buckets:
                pass

    def save_checkpoint(self, path: str | Path, tokenizer=None) -> None:
        """The sharded policy and optimizer state in the backend's own format under ``path``, plus
        ``learner.json`` (backend, world size) and ``hf/`` (HF config and tokenizer, for export). Every rank must
        call; each writes its own shards."""
        path = Path(path)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / BACKEND_FILE).write_text(json.dumps(self._backend_info(), indent=2))
            self.hf_config.save_pretrained(str(path / HF_CONFIG_DIR))
            if self.generation_config is not None:
                self.generation_config.save_pretrained(str(path / HF_CONFIG_DIR))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path / HF_CONFIG_DIR))
        if self.world_size > 1:
            dist.barrier()
        self._save_sharded(path)
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the policy and optimizer from ``save_checkpoint``'s directory (after ``load_policy``).

        Raises:
            ValueError: the checkpoint was written by another backend, or (DeepSpeed) at another world size.
        """
        path = Path(path)
        info = json.loads((path / BACKEND_FILE).read_text())
        mine = self._backend_info()
        if info["backend"] != self.backend:
            raise ValueError(f"{path} was written by learner.backend={info['backend']}; this run has "
                             f"learner.backend={self.backend} (export it to HF with python -m research_rl.export and "
                             "start from that model instead)")
        self._check_resumable(info, mine, path)
        self._load_sharded(path)

    def _check_resumable(self, saved: dict, mine: dict, path: Path) -> None:
        """Backends that cannot reshard raise here."""

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class FSDP2Learner(Learner):
    """The learner under FSDP2: ``fully_shard`` per decoder layer and the root, over a 1-D device mesh.

    Full weights come from the sharded ``get_model_state_dict`` one ``DTensor.full_tensor()`` at a time; the
    checkpoint is ``torch.distributed.checkpoint`` (DCP) of the sharded model and optimizer state dicts, which
    reloads at any world size.
    """

    backend = "fsdp2"

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        super().init_process_group(master_addr, master_port)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    def _shard(self, model: torch.nn.Module, offload: bool) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {"mesh": self.mesh}
        if self.device.type == "cuda" and self.param_dtype != torch.float32:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # moves what it shards to the mesh's device (or keeps it on CPU to offload)
        return model

    def _wrap_policy(self, model: torch.nn.Module) -> None:
        self.policy = self._shard(model, self.cfg.cpu_offload)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), **self._optimizer_kwargs())

    def _wrap_reference(self, model: torch.nn.Module, offload: bool):
        return self._shard(model, offload)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _step(self) -> tuple[float, bool]:
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        if math.isfinite(norm):
            self.optimizer.step()
        return norm, math.isfinite(norm)

    def _full_tensors(self, model, skip: set[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.tensor import DTensor

        for name, t in get_model_state_dict(model).items():  # sharded: one DTensor per parameter, canonical names
            if name in skip:
                continue
            if isinstance(t, DTensor):
                if t.device.type != self.mesh.device_type:  # an offloaded shard: gather on the mesh's device
                    t = t.to(self.mesh.device_type)
                t = t.full_tensor()
            yield name, (t.detach().cpu() if self.rank == 0 else None)

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def _save_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))

    def _load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def learner_class(backend: str) -> type[Learner]:
    """The ``Learner`` subclass for ``learner.backend``.

    Raises:
        ValueError: an unknown backend.
        ImportError: ``deepspeed`` without DeepSpeed installed (the message names the install command).
    """
    if backend == "fsdp2":
        return FSDP2Learner
    if backend == "deepspeed":
        from research_rl.learner.deepspeed_backend import DeepSpeedLearner

        return DeepSpeedLearner
    raise ValueError(f"learner.backend={backend!r}: expected fsdp2 or deepspeed")


def set_torch_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0 keeps what Ray set from the actor's num_cpus)."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
