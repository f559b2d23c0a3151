"""Learner core: GRPO updates of the policy on one rank of a ``torch.distributed`` group (DESIGN: Learner).

Each rank is one ``Learner`` in one process group (gloo on CPU, NCCL on GPU); more ranks only need more
``LearnerWorker`` actors. ``Learner`` is one concrete class that holds its models through a backend object
(``research_rl.learner.backend``): the trainable policy (backend with its optimizer) and, when the reference policy
is colocated, a ``ReferencePolicy`` (``research_rl.learner.reference``, a frozen backend) on the same ranks.
``learner.backend`` picks ``FSDP2Backend`` (``research_rl.learner.fsdp2``) or ``DeepSpeedBackend``
(``research_rl.learner.deepspeed_backend``); everything else here (micro-batching, the loss, mini-batches,
metrics, weight streaming, the HF export) is the same for both.

Batches are ``Experience`` records (``research_rl.algo.experience``: right-padded ``[N, L]`` sequences, the loss
mask, ``advantages [N]``, ``ref_log_probs [N, L-1]``, optionally ``old_log_probs [N, L-1]`` and the engine's
``rollout_log_probs [N, L-1]``).

With rollout log-probs in the batch, the update logs the engine/learner mismatch (``rollout/is_weight_mean``,
``rollout/engine_learner_kl``), and with ``algo.rollout_is=tis`` weights each token's policy-gradient term by
``min(π_learner/π_engine, algo.rollout_is_cap)`` (``grpo.tis_weights``; verl's ``rollout_is``), π_learner being the
log-probs the PPO ratio is taken against (``old_log_probs``, or the policy's own, detached).

Loss aggregation is the masked token-mean over the whole mini-batch: every micro-batch divides by the global
number of loss tokens (summed over ranks, divided by the world size because both backends average gradients
over ranks), so grouping, gradient accumulation and data parallelism leave the update unchanged.

Optimizer steps per batch: ``algo.ppo_epochs`` × (trajectories / ``algo.ppo_mini_batch_size``). With the defaults
that is one step per batch, as in the paper (ReSearch §2.2, one GRPO update per rollout batch), and π_θold is
the policy's own log-probs, detached: the policy at loss time is the one that produced the batch, so the ratio
is 1 with gradient ∇log π_θ, what a recomputed ``old_log_probs`` would give, without that forward pass (TRL's
``GRPOTrainer`` with ``num_iterations=1`` does the same). With more steps, ``old_log_probs`` are computed once
before the first step and every mini-batch's ratio is clipped against them (PPO, arXiv 1707.06347 §3; verl's
``ppo_epochs`` / ``ppo_mini_batch_size``). Mini-batch ``j`` of ``S`` is every ``S``-th trajectory of the batch
from ``j`` (``Learner._mini_batches``), the same in every epoch: no random shuffling, so updates are reproducible
and equal at any world size, and each mini-batch still spans the batch's prompts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from research_rl.algo import grpo
from research_rl.algo.experience import Experience
from research_rl.config.schema import AlgoConfig, LearnerConfig
from research_rl.learner import group
from research_rl.learner.backend import Backend, backend_class
from research_rl.learner.group import empty_cache
from research_rl.learner.passes import batch_log_probs, load_hf_model, micro_batch, rank_plan, token_log_probs
from research_rl.learner.reference import ReferencePolicy
from research_rl.learner.weights import cut_buckets, tied_aliases, write_hf_model

BACKEND_FILE = "learner.json"  # in a sharded checkpoint: which backend wrote it, at what world size
HF_CONFIG_DIR = "hf"  # in a sharded checkpoint: the model's HF config and tokenizer (what export needs)


class Learner:
    """One rank of the learner.

    Args:
        cfg: learner settings (backend, lr, grad clip, micro-batching, offload).
        algo: GRPO coefficients and the optimizer steps per batch (``ppo_epochs``, ``ppo_mini_batch_size``).
        rank, world_size: position in the process group.
        device: ``"cpu"`` or ``"cuda"``.
        param_dtype: compute dtype (FSDP2 mixed precision when not float32; the roles pass float32 on CPU).
        gradient_checkpointing: recompute activations in backward (HF ``gradient_checkpointing_enable``).

    Raises:
        ValueError, ImportError: as ``backend_class(cfg.backend)`` (an unknown backend; DeepSpeed not installed).
    """

    def __init__(self, cfg: LearnerConfig, algo: AlgoConfig, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", param_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False):
        self.cfg, self.algo = cfg, algo
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.param_dtype = param_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self._backend_cls = backend_class(cfg.backend)
        self.policy: Backend | None = None  # the trainable policy and its optimizer
        self.reference: ReferencePolicy | None = None  # colocated reference policy (reference.placement=colocated)
        self.hf_config = None  # the policy's transformers config and generation config (for HF export)
        self.generation_config = None
        self._aliases: set[str] = set()  # tied parameter names streamed once (lm_head.weight when tied)
        self._kept: Experience | None = None  # the shard compute_ref_log_probs(keep=True) holds for update()
        self._sender = None  # research_rl.sync.sender.WeightSender, created by the first sync

    # ================================================================ setup
    def init_process_group(self, master_addr: str, master_port: int) -> None:
        """Join the process group (rank 0 hosts the TCP rendezvous at ``master_addr:master_port``)."""
        group.init_process_group(self.cfg.backend, self.rank, self.world_size, self.device, master_addr,
                                 master_port, cpu_offload=self.cfg.cpu_offload)

    def load_policy(self, path: str) -> None:
        """Load (or reload) the trainable policy from an HF directory or model id; a fresh AdamW optimizer.

        With ``learner.rank0_load`` under FSDP2 at world size > 1, only rank 0 reads the weights; the other ranks
        build the model on the meta device and receive rank 0's (``FSDP2Backend(from_rank0=True)``): one full copy
        of the weights per node at start instead of one per rank. Every rank of the group must call it."""
        from_rank0 = self.cfg.rank0_load and self.world_size > 1 and self.cfg.backend == "fsdp2"
        model = load_hf_model(path, trainable=True, gradient_checkpointing=self.gradient_checkpointing,
                              meta=from_rank0 and self.rank > 0)
        self.hf_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self._aliases = tied_aliases(model)
        self.policy = self._backend_cls(model, self.cfg, self.rank, self.world_size, self.device, self.param_dtype,
                                        trainable=True, **({"from_rank0": True} if from_rank0 else {}))

    def load_reference(self, path: str, offload: bool = False) -> None:
        """Load the frozen reference policy (the initial policy of RL) on this rank, in the learner's group
        (``ReferencePolicy.load``; ``offload`` keeps its parameters on CPU between passes)."""
        self.reference = ReferencePolicy(self.cfg, self.rank, self.world_size, str(self.device), self.param_dtype)
        self.reference.load(path, offload)

    # ================================================================ memory between phases
    def offload(self) -> float:
        """Give the device back for rollout: ``learner.offload=optimizer`` moves the optimizer state to CPU,
        ``all`` also the parameters (and this rank's colocated reference policy); gradients are dropped (the next
        update zeroes them first); then the allocator's cache is emptied. ``none`` only empties the cache. Returns
        the seconds it took (log as ``timing/offload``). Call ``reload`` before the next pass of the policy."""
        start = time.perf_counter()
        if self.cfg.offload != "none" and self.policy is not None:
            self.policy.offload(params=self.cfg.offload == "all")
        if self.cfg.offload == "all" and self.reference is not None:
            self.reference.offload()
        empty_cache(self.device)
        return time.perf_counter() - start

    def reload(self) -> float:
        """Undo ``offload``: what it moved back on the device, bit for bit (the next update equals the one without
        the round trip). Returns the seconds it took (``timing/reload``)."""
        start = time.perf_counter()
        if self.cfg.offload != "none" and self.policy is not None:
            self.policy.reload(params=self.cfg.offload == "all")
        if self.cfg.offload == "all" and self.reference is not None:
            self.reference.reload()
        return time.perf_counter() - start

    # ================================================================ log-probs
    def compute_ref_log_probs(self, exp: Experience, keep: bool = False) -> torch.Tensor | None:
        """Reference log-probs of this rank's shard, ``[n, L-1]`` float32 on CPU (``ReferencePolicy``).

        With ``keep`` the learner keeps ``exp`` with ``ref_log_probs`` filled in for the next ``update()`` and
        returns None: colocated, the reference log-probs never leave the rank and the batch is sent once per step
        (send it with its ``advantages``).

        Raises:
            RuntimeError: no reference loaded (``load_reference``).
        """
        if self.reference is None:
            raise RuntimeError("compute_ref_log_probs needs load_reference first (reference.placement=colocated)")
        ref = self.reference.compute_log_probs(exp)
        if keep:
            self._kept = exp.replace(ref_log_probs=ref)
            return None
        return ref

    def compute_log_probs(self, exp: Experience) -> torch.Tensor:
        """Log-probs of ``exp``'s scored tokens under the current policy, no gradient, eval mode: ``[n, L-1]``
        float32 on CPU, rows in ``exp``'s order, zero where ``loss_mask[:, 1:]`` is 0. ``update`` uses this for
        ``old_log_probs`` when it takes more than one optimizer step. Every rank must call it.

        Raises:
            RuntimeError: no policy loaded.
        """
        if self.policy is None:
            raise RuntimeError("compute_log_probs needs load_policy first")
        return batch_log_probs(self.policy.module, exp, self._plan(exp), self.device, self.cfg.logits_chunk_tokens,
                               self.cfg.pack)

    def _plan(self, exp: Experience) -> list[list[int] | None]:
        return rank_plan(exp, self.cfg, self.world_size, self.device)

    def _all_reduce(self, values: list[float]) -> list[float]:
        return group.all_reduce(values, self.world_size, self.device)

    # ================================================================ updates
    def _accumulate(self, exp: Experience, loss_fn, loss_agg: str = "token_mean") -> tuple[dict[str, float], float]:
        """Forward and backward every micro-batch of ``exp``; ``loss_fn(mb, num_tokens)`` returns the micro-batch's
        loss and its detached metric terms, each ``sum over the micro-batch's loss tokens / num_tokens``. Returns
        the metric sums and the global number of loss tokens.

        ``loss_agg`` picks ``num_tokens`` per micro-batch:

        - ``token_mean``: the step's global token count over the world size (the backends average gradients over
          ranks), so the sum over micro-batches and ranks is the token-mean of the whole step, whatever the
          micro-batching or the number of ranks.
        - ``reference`` (the authors' fork): the micro-batch's own token count × (rank's rows / micro-batch's
          rows), i.e. its masked mean weighted by its share of the rank's trajectories, then averaged over ranks.
          Invariant to the number of ranks when every rank's micro-batches have the same rows; not to micro-batch
          size or the token budget (a mean of means weighs the tokens of short micro-batches more).
        """
        global_tokens = self._all_reduce([float(exp.loss_mask[:, 1:].sum())])[0]
        num_tokens = max(global_tokens / self.world_size, 1e-8)  # the backends average gradients over ranks
        plan = self._plan(exp)
        sums: dict[str, float] = {}
        for i, rows in enumerate(plan):
            mb = micro_batch(exp, rows or [0])
            if loss_agg == "reference":
                num_tokens = max(float(mb.loss_mask[:, 1:].sum()), 1.0) * len(exp) / len(rows or [0])
            loss, terms = loss_fn(mb, num_tokens)
            weight = 0.0 if rows is None else 1.0  # a padding pass keeps the ranks' collectives in step
            self.policy.backward(loss * weight, last=i == len(plan) - 1)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
        sums["micro_batches"] = float(len(plan))
        return sums, global_tokens

    def _grpo_loss(self, mb: Experience, num_tokens: float):
        mask = mb.loss_mask[:, 1:].to(self.device).float()
        log_probs, entropy = token_log_probs(self.policy.module, mb, self.device, with_entropy=True,
                                             entropy_grad=self.algo.entropy_coef != 0,
                                             chunk=self.cfg.logits_chunk_tokens, pack=self.cfg.pack)
        adv = grpo.broadcast_advantages(mb.advantages.to(self.device).float(), mask)
        ref = None
        if self.algo.kl_coef > 0:
            if mb.ref_log_probs is None:
                raise ValueError(f"algo.kl_coef={self.algo.kl_coef} needs the batch's ref_log_probs "
                                 "(compute_ref_log_probs first)")
            ref = mb.ref_log_probs.to(self.device)
        # without old_log_probs the policy's own, detached: exact for one optimizer step per batch (module docstring)
        old = mb.old_log_probs.to(self.device) if mb.old_log_probs is not None else log_probs.detach()
        weights, mismatch = None, {}
        if mb.rollout_log_probs is not None:  # the engine/learner mismatch: logged always, weighted with tis
            engine = mb.rollout_log_probs.to(self.device)
            with torch.no_grad():
                w = grpo.tis_weights(old, engine, self.algo.rollout_is_cap)  # [n, l-1]
                # k3 estimate of KL(π_engine || π_learner) on the engine's samples (verl's mismatch_k3_kl), in
                # float64: at float32 a per-token log-ratio of 1e-6 (CPU numerics) cancels to 0 or below it
                kl = grpo.low_var_kl(engine.double(), old.double(), clamp=float("inf"))
                mismatch = {"rollout/is_weight_mean": grpo.token_mean(w.double(), mask, num_tokens),
                            "rollout/engine_learner_kl": grpo.token_mean(kl, mask, num_tokens)}
            if self.algo.rollout_is == "tis":
                weights = w
        out = grpo.grpo_loss(log_probs, old, ref, adv, mask, entropy,
                             clip_eps=self.algo.clip_eps, kl_coef=self.algo.kl_coef,
                             entropy_coef=self.algo.entropy_coef, num_tokens=num_tokens, kl_clamp=self.algo.kl_clamp,
                             is_weights=weights)
        terms = {k: getattr(out, k).detach() for k in ("pg_loss", "kl", "entropy", "clip_frac", "approx_kl")}
        return out.loss, {**terms, "loss": out.loss.detach(), **mismatch}

    def _optimizer_step(self, exp: Experience) -> dict[str, float]:
        """One GRPO optimizer step over ``exp`` (micro-batched); this rank's unreduced ``actor/*`` metrics."""
        self.policy.zero_grad()
        sums, num_tokens = self._accumulate(exp, self._grpo_loss, self.algo.loss_agg)
        grad_norm, applied = self.policy.step()
        metrics = {k if "/" in k else f"actor/{k}": v for k, v in sums.items()}  # rollout/* keep their area
        metrics.update({"actor/grad_norm": grad_norm, "actor/lr": self.policy.optimizer.param_groups[0]["lr"],
                        "actor/num_tokens": num_tokens, "actor/skipped_step": float(not applied)})
        return metrics

    def _mini_batches(self, n: int) -> list[range]:
        """Row sets of this rank's ``n``-row shard, one per optimizer step, over all epochs.

        With ``S`` mini-batches per epoch, mini-batch ``j`` is every ``S``-th row from row ``j``. Since each rank's
        shard is ``S`` × (``ppo_mini_batch_size`` / world size) contiguous rows of the batch, this is every
        ``S``-th trajectory of the whole batch on every rank together: the same trajectories at any world size
        (so 2 ranks × half batch still equal 1 rank × full batch), and each mini-batch spans the batch's prompts.
        """
        if self.algo.ppo_mini_batch_size == 0:
            return [range(n)] * self.algo.ppo_epochs
        per_rank, rest = divmod(self.algo.ppo_mini_batch_size, self.world_size)
        if rest or per_rank == 0 or n % per_rank:
            raise ValueError(
                f"algo.ppo_mini_batch_size={self.algo.ppo_mini_batch_size} trajectories over {self.world_size} "
                f"learner ranks is not a whole number of mini-batches of this rank's {n} trajectories")
        count = n // per_rank
        return [range(j, n, count) for j in range(count)] * self.algo.ppo_epochs

    def update(self, exp: Experience | None = None, lr: float | None = None) -> dict[str, float]:
        """GRPO optimizer steps over this rank's shard ``exp``, or over the one ``compute_ref_log_probs(keep=True)``
        kept when None: ``algo.ppo_epochs`` × (trajectories / ``algo.ppo_mini_batch_size``) steps, one with the
        defaults (module docstring). Every rank calls it with its own shard. ``lr``: the learning rate of these
        steps (the driver's schedule, ``research_rl.driver.trainer.learning_rate``); None keeps the optimizer's current one.

        Returns ``actor/*`` metrics, averaged over ranks and over the optimizer steps: ``pg_loss``, ``kl``,
        ``entropy``, ``clip_frac``, ``approx_kl``, ``loss`` (token-means over each step's global mini-batch),
        ``grad_norm`` (before clipping), ``lr``, ``num_tokens`` (global loss tokens per step), ``micro_batches``
        (per rank and step), ``skipped_step`` (the fraction of steps a non-finite gradient norm skipped) and
        ``optimizer_steps``. When the batch has ``rollout_log_probs`` (whatever ``algo.rollout_is``), also
        ``rollout/is_weight_mean`` (token-mean of the truncated weight ``min(π_learner/π_engine, C)``) and
        ``rollout/engine_learner_kl`` (token-mean k3 estimate of KL(π_engine || π_learner) on the sampled tokens),
        π_learner being the behaviour-side log-probs the ratio is taken against.

        Raises:
            RuntimeError: ``exp`` is None and no shard was kept.
            ValueError: ``exp`` has no ``advantages``, lacks ``ref_log_probs`` while ``algo.kl_coef > 0``, lacks
                ``rollout_log_probs`` while ``algo.rollout_is=tis``, or does not split into
                ``algo.ppo_mini_batch_size`` mini-batches.
        """
        if exp is None:
            if self._kept is None:
                raise RuntimeError("update() without a batch needs compute_ref_log_probs(exp, keep=True) first")
            exp, self._kept = self._kept, None
        if exp.advantages is None:
            raise ValueError("update() needs the batch's advantages")
        if lr is not None:
            for g in self.policy.optimizer.param_groups:
                g["lr"] = lr
        if self.algo.rollout_is == "tis" and exp.rollout_log_probs is None:
            raise ValueError("algo.rollout_is=tis needs the batch's rollout_log_probs (the engine's log-probs of the "
                             "sampled tokens; greedy rollouts have none): set algo.rollout_is=none or sample")
        steps = self._mini_batches(len(exp))
        if len(steps) == 1:  # the paper's one step per batch: π_θold is the policy itself, no extra pass
            metrics = self._optimizer_step(exp)
            metrics["actor/optimizer_steps"] = 1.0
            return self._reduce_metrics(metrics)
        if exp.old_log_probs is None:  # π_θold: the policy before the first step, for every mini-batch's ratio
            exp = exp.replace(old_log_probs=self.compute_log_probs(exp))
        per_step = [self._optimizer_step(exp.select(rows)) for rows in steps]
        metrics = {k: sum(m[k] for m in per_step) / len(per_step) for k in per_step[0]}
        metrics["actor/optimizer_steps"] = float(len(per_step))
        return self._reduce_metrics(metrics)

    def sft_step(self, exp: Experience, lr: float) -> dict[str, float]:
        """One supervised step: masked token-mean NLL over loss-mask tokens (the debug warm-up) at learning rate
        ``lr``. Returns ``warmup/nll`` and ``warmup/grad_norm``, averaged over ranks."""
        for g in self.policy.optimizer.param_groups:
            g["lr"] = lr

        def nll(mb, num_tokens):
            mask = mb.loss_mask[:, 1:].to(self.device).float()
            log_probs, _ = token_log_probs(self.policy.module, mb, self.device, with_entropy=False,
                                           chunk=self.cfg.logits_chunk_tokens, pack=self.cfg.pack)
            loss = grpo.token_mean(-log_probs, mask, num_tokens=num_tokens)
            return loss, {"nll": loss.detach()}

        self.policy.zero_grad()
        sums, _ = self._accumulate(exp, nll)
        grad_norm, _ = self.policy.step()
        return self._reduce_metrics({"warmup/nll": sums["nll"], "warmup/grad_norm": grad_norm})

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
        yield from cut_buckets(self.policy.full_tensors(skip=self._aliases), bucket_mb)

    def weight_stream(self, every_rank: bool = False, on_device: bool = False):
        """The policy's full tensors one gather at a time (``Backend.full_tensors``; tied aliases once), for the
        weight-sync transports (``research_rl.sync.sender``). Every rank must exhaust it."""
        return self.policy.full_tensors(self._aliases, every_rank=every_rank, on_device=on_device)

    def sync_plan(self, dtype: str, bucket_mb: float) -> list:
        """The layout of a weight sync (``research_rl.sync.buckets.plan_buckets``): every tensor ``weight_stream``
        yields, in its order, as ``dtype`` (the engine's), cut into ``bucket_mb``-MiB buckets. No gather."""
        from research_rl.sync.buckets import plan_buckets

        return plan_buckets(self.policy.tensor_shapes(self._aliases), dtype, bucket_mb)

    @property
    def sender(self):
        """This rank's ``research_rl.sync.sender.WeightSender`` (created on first use)."""
        if self._sender is None:
            from research_rl.sync.sender import WeightSender

            self._sender = WeightSender(self.weight_stream, self.device, self.rank)
        return self._sender

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full policy weights on CPU in one dict (rank 0; empty on other ranks). Every rank must call it."""
        return {k: v for bucket in self.weight_buckets(bucket_mb=2**30) for k, v in bucket.items()}

    @torch.no_grad()
    def probe_log_probs(self, sequence: list[int]) -> torch.Tensor:
        """Policy log-probs of tokens 1..L-1 of one sequence, ``[L-1]`` float32 on CPU (every rank must call)."""
        ids = torch.tensor([sequence], dtype=torch.long)
        model = self.policy.module
        was_training = model.training
        model.eval()
        lp, _ = token_log_probs(model, Experience(ids, torch.ones_like(ids), torch.ones_like(ids)), self.device,
                                with_entropy=False)
        model.train(was_training)
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
        import torch.distributed as dist

        path = Path(path)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / BACKEND_FILE).write_text(json.dumps(self.policy.info(), indent=2))
            self.hf_config.save_pretrained(str(path / HF_CONFIG_DIR))
            if self.generation_config is not None:
                self.generation_config.save_pretrained(str(path / HF_CONFIG_DIR))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path / HF_CONFIG_DIR))
        if self.world_size > 1:
            dist.barrier()
        self.policy.save(path)
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the policy and optimizer from ``save_checkpoint``'s directory (after ``load_policy``).

        Raises:
            ValueError: the checkpoint was written by another backend, or (DeepSpeed) at another world size.
        """
        path = Path(path)
        info = json.loads((path / BACKEND_FILE).read_text())
        if info["backend"] != self.policy.name:
            raise ValueError(f"{path} was written by learner.backend={info['backend']}; this run has "
                             f"learner.backend={self.policy.name} (export it to HF with python -m research_rl.export "
                             "and start from that model instead)")
        self.policy.load(path, info)

    def shutdown(self) -> None:
        if self._sender is not None:
            self._sender.close()
        group.leave()


def set_torch_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0 keeps what Ray set from the actor's num_cpus)."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
