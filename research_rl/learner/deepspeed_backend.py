"""The learner under DeepSpeed ZeRO-2 or ZeRO-3 (``learner.backend=deepspeed``): the only module that imports
deepspeed.

Same interface as ``FSDP2Learner``; what differs is only the backend hooks of ``research_rl.learner.core.Learner``.
The DeepSpeed config dict is generated from ``LearnerConfig`` (``deepspeed_config``): users never write one.
A torch ``AdamW`` is passed in, so nothing is JIT-compiled (DeepSpeed's own CPU Adam would be). The learner
marks the gradient-accumulation boundary itself (``set_gradient_accumulation_boundary``), because the number of
micro-batches per step varies with token-budget micro-batching; DeepSpeed's ``gradient_accumulation_steps`` is
therefore 1 and the loss is not rescaled by it (our loss is already the global token-mean share).

Full weights: ``deepspeed.zero.GatheredParameters`` over one module's own parameters at a time (a no-op under
ZeRO-2, whose parameters are replicated). Checkpoints: ``engine.save_checkpoint`` (tag ``state``), which reloads
only at the same world size and ZeRO stage; ``research_rl.export`` consolidates them with DeepSpeed's
``zero_to_fp32`` on CPU.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from research_rl.config.schema import LearnerConfig
from research_rl.learner.core import Learner
from research_rl.learner.weights import persistent_buffers

try:
    import deepspeed
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("learner.backend=deepspeed needs DeepSpeed; install it with: pip install -e '.[deepspeed]'") from e

TAG = "state"  # the sub-directory engine.save_checkpoint writes


def deepspeed_config(cfg: LearnerConfig, world_size: int, device_type: str, param_dtype: torch.dtype,
                     trainable: bool = True, offload_params: bool = False) -> dict:
    """The DeepSpeed config dict for ``cfg``.

    Args:
        cfg: ``learner.*`` (zero_stage, grad_clip, micro_batch_size, cpu_offload).
        world_size: ranks in the group.
        device_type: ``"cpu"`` or ``"cuda"``; mixed precision only on ``cuda``.
        param_dtype: ``torch.bfloat16`` / ``torch.float16`` turn on DeepSpeed's bf16 / fp16 with fp32 master weights.
        trainable: False for the frozen reference (no clipping, no optimizer offload).
        offload_params: ZeRO-3 parameter offload to CPU (the reference's ``offload``; ``cpu_offload`` for the policy).

    ``train_micro_batch_size_per_gpu`` is the nominal ``micro_batch_size`` (DeepSpeed requires a number; the
    learner forms its own micro-batches) and ``gradient_accumulation_steps`` is 1 (the learner sets the boundary).
    """
    zero: dict = {"stage": cfg.zero_stage}
    if trainable and cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if cfg.zero_stage == 3 and (offload_params or (trainable and cfg.cpu_offload)):
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    mixed = device_type == "cuda" and param_dtype != torch.float32
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed and param_dtype == torch.bfloat16},
        "fp16": {"enabled": mixed and param_dtype == torch.float16},
        "zero_allow_untested_optimizer": True,  # the torch AdamW passed in
        "zero_force_ds_cpu_optimizer": False,  # keep that AdamW under optimizer offload too (no JIT build)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if trainable:
        config["gradient_clipping"] = cfg.grad_clip
    return config


class DeepSpeedLearner(Learner):
    """One rank of the learner under DeepSpeed ZeRO (``learner.zero_stage`` 2 or 3). See the module docstring."""

    backend = "deepspeed"

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        # DeepSpeed reads the local device index from LOCAL_RANK; under Ray each actor sees its one GPU as device 0.
        os.environ.setdefault("LOCAL_RANK", "0" if self.device.type == "cuda" else str(self.rank))
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().init_process_group(master_addr, master_port)

    def _config(self, trainable: bool, offload_params: bool = False) -> dict:
        return deepspeed_config(self.cfg, self.world_size, self.device.type, self.param_dtype, trainable,
                                offload_params)

    def _wrap_policy(self, model: torch.nn.Module) -> None:
        self.optimizer = torch.optim.AdamW(model.parameters(), **self._optimizer_kwargs())
        self.policy, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self._config(True))

    def _wrap_reference(self, model: torch.nn.Module, offload: bool):
        if self.cfg.zero_stage == 3:  # partitioned like the policy; ZeRO-3 offloads parameters itself
            engine, *_ = deepspeed.initialize(model=model, config=self._config(False, offload_params=offload))
            return engine
        if self.device.type == "cuda":  # the policy computes in param_dtype under DeepSpeed bf16/fp16; so does this
            model.to(self.param_dtype)
        return model.to("cpu" if offload else self.device)  # ZeRO-2 replicates parameters: a plain module

    @contextlib.contextmanager
    def _reference_in_use(self):
        move = self.reference_offload and self.cfg.zero_stage == 2
        if move:
            self.reference.to(self.device)
        try:
            yield
        finally:
            if move:
                self.reference.to("cpu")

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.policy.set_gradient_accumulation_boundary(last)
        self.policy.backward(loss, scale_wrt_gas=False)

    def _step(self) -> tuple[float, bool]:
        self.policy.step()  # clips to gradient_clipping; skips the update on a non-finite norm (fp32/fp16)
        norm = self.policy.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(self.policy.was_step_applied()) and norm == norm

    def _full_tensors(self, model, skip: set[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        module = model.module if hasattr(model, "module") else model
        seen: set[int] = set()  # a tied parameter is gathered once, under its first name
        for prefix, m in module.named_modules():
            own = [(n, p) for n, p in m.named_parameters(recurse=False)
                   if id(p) not in seen and (f"{prefix}.{n}" if prefix else n) not in skip]
            if not own:
                continue
            seen.update(id(p) for _, p in own)
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                for n, p in own:
                    name = f"{prefix}.{n}" if prefix else n
                    yield name, (p.detach().to("cpu", copy=True) if self.rank == 0 else None)
        for name, b in persistent_buffers(module):
            if name not in skip:
                yield name, (b.detach().to("cpu", copy=True) if self.rank == 0 else None)

    def _backend_info(self) -> dict:
        return {**super()._backend_info(), "zero_stage": self.cfg.zero_stage}

    def _check_resumable(self, saved: dict, mine: dict, path: Path) -> None:
        if (saved["world_size"], saved["zero_stage"]) != (mine["world_size"], mine["zero_stage"]):
            raise ValueError(
                f"{path} holds DeepSpeed ZeRO-{saved['zero_stage']} state of {saved['world_size']} ranks; this run has "
                f"learner.zero_stage={mine['zero_stage']} and learner.num_workers={mine['world_size']}, and ZeRO state "
                "reloads only at the same stage and world size (export it to HF with python -m research_rl.export "
                "and start from that model instead)")

    def _save_sharded(self, path: Path) -> None:
        self.policy.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def _load_sharded(self, path: Path) -> None:
        loaded, _ = self.policy.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / TAG}")
