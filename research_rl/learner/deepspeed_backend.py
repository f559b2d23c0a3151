"""The learner under DeepSpeed ZeRO-2 or ZeRO-3 (``learner.backend=deepspeed``): the only module that imports
deepspeed.

``DeepSpeedBackend`` wraps one model (the trainable policy, or the frozen reference policy) with the interface of
``research_rl.learner.fsdp2.FSDP2Backend`` (``research_rl.learner.backend.Backend``).
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
from pathlib import Path
from typing import Iterator

import torch

from research_rl.config.schema import LearnerConfig
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


class DeepSpeedBackend:
    """One model of one rank under DeepSpeed ZeRO (``learner.zero_stage`` 2 or 3), the
    ``research_rl.learner.backend.Backend`` interface. See the module docstring.

    Args:
        model: the HF model, float32 on CPU.
        cfg: ``learner.*`` (zero_stage, lr, betas, weight_decay, grad_clip, micro_batch_size, cpu_offload).
        rank, world_size: position in the process group (joined already).
        device: ``cpu`` or ``cuda``. param_dtype: compute dtype on GPU (DeepSpeed bf16/fp16).
        trainable: a DeepSpeed engine over a torch AdamW; offload follows ``cfg.cpu_offload``.
        offload: a frozen model's parameters stay on CPU between passes (ZeRO-3 parameter offload; under ZeRO-2,
            whose frozen model is a plain replicated module, a move to the device and back around each pass).
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, rank: int, world_size: int, device: torch.device,
                 param_dtype: torch.dtype, trainable: bool, offload: bool = False, from_rank0: bool = False):
        if from_rank0:
            raise ValueError("DeepSpeedBackend loads the full model on every rank (from_rank0 is FSDP2's)")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.offload = offload and not trainable
        self.optimizer = None
        if trainable:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                               weight_decay=cfg.weight_decay)
            config = deepspeed_config(cfg, world_size, device.type, param_dtype, trainable=True)
            self.module, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        elif cfg.zero_stage == 3:  # partitioned like the policy; ZeRO-3 offloads parameters itself
            config = deepspeed_config(cfg, world_size, device.type, param_dtype, trainable=False,
                                      offload_params=offload)
            self.module, *_ = deepspeed.initialize(model=model, config=config)
        else:  # ZeRO-2 replicates parameters: a plain module
            if device.type == "cuda":  # the policy computes in param_dtype under DeepSpeed bf16/fp16; so does this
                model.to(param_dtype)
            self.module = model.to("cpu" if offload else device)

    def offload(self, params: bool) -> None:
        """Optimizer state (and, with ``params``, the parameters and gradient buffers) to CPU between updates: the
        trainable ZeRO-3 engine's ``offload_states``; a frozen ZeRO-2 module moves to CPU whole.

        Raises:
            ValueError: a trainable engine under ZeRO-2, or a frozen one under ZeRO-3 (use ``reference.offload``,
                ZeRO-3 parameter offload, instead).
        """
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

        if self.optimizer is None:
            if self.cfg.zero_stage == 3:
                raise ValueError("a frozen ZeRO-3 model offloads through reference.offload=true (parameter offload)")
            self.module.to("cpu")
            return
        if self.cfg.zero_stage != 3:
            raise ValueError("learner.offload under DeepSpeed needs learner.zero_stage=3 (engine.offload_states)")
        include = [OffloadStateTypeEnum.optim_states]
        if params:
            include += [OffloadStateTypeEnum.hp_params, OffloadStateTypeEnum.lp_params,
                        OffloadStateTypeEnum.lp_grads, OffloadStateTypeEnum.contiguous_grad_buffer]
        self.module.offload_states(include=include, pin_memory=self.device.type == "cuda")

    def reload(self, params: bool) -> None:
        """Back to the device: what ``offload`` moved."""
        if self.optimizer is None:
            self.module.to(self.device)
            return
        self.module.reload_states()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # the learner marks the accumulation boundary: its number of micro-batches per step varies
        self.module.set_gradient_accumulation_boundary(last)
        self.module.backward(loss, scale_wrt_gas=False)

    def step(self) -> tuple[float, bool]:
        self.module.step()  # clips to gradient_clipping; skips the update on a non-finite norm (fp32/fp16)
        norm = self.module.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(self.module.was_step_applied()) and norm == norm

    @contextlib.contextmanager
    def in_use(self):
        move = self.offload and self.cfg.zero_stage == 2
        if move:
            self.module.to(self.device)
        try:
            yield
        finally:
            if move:
                self.module.to("cpu")

    def _named_tensors(self, skip: set[str]):
        """``(module, [(name, parameter)])`` per module (a tied parameter once, under its first name), then the
        persistent buffers, in the order ``full_tensors`` streams them."""
        module = getattr(self.module, "module", self.module)
        seen: set[int] = set()
        for prefix, m in module.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in m.named_parameters(recurse=False)
                   if id(p) not in seen and (f"{prefix}.{n}" if prefix else n) not in skip]
            if own:
                seen.update(id(p) for _, p in own)
                yield "params", own
        yield "buffers", [(n, b) for n, b in persistent_buffers(module) if n not in skip]

    def full_tensors(self, skip: set[str], every_rank: bool = False,
                     on_device: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:
        def out(t: torch.Tensor) -> torch.Tensor | None:
            if not (every_rank or self.rank == 0):
                return None
            return t.detach().clone() if on_device else t.detach().to("cpu", copy=True)

        for kind, named in self._named_tensors(skip):
            if kind == "buffers":
                for name, b in named:
                    yield name, out(b)
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                for name, p in named:
                    yield name, out(p)

    def tensor_shapes(self, skip: set[str]) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(getattr(t, "ds_shape", t.shape))) for _, named in self._named_tensors(skip)
                for name, t in named]

    def info(self) -> dict:
        return {"backend": self.name, "world_size": self.world_size, "zero_stage": self.cfg.zero_stage}

    def save(self, path: Path) -> None:
        self.module.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path, saved: dict) -> None:
        """Restore model and optimizer from ``save``'s state under ``path``.

        Raises:
            ValueError: ``saved`` (the checkpoint's ``learner.json``) has another world size or ZeRO stage.
            FileNotFoundError: no DeepSpeed state under ``path``.
        """
        mine = self.info()
        if (saved["world_size"], saved["zero_stage"]) != (mine["world_size"], mine["zero_stage"]):
            raise ValueError(
                f"{path} holds DeepSpeed ZeRO-{saved['zero_stage']} state of {saved['world_size']} ranks; this run has "
                f"learner.zero_stage={mine['zero_stage']} and learner.num_workers={mine['world_size']}, and ZeRO state "
                "reloads only at the same stage and world size (export it to HF with python -m research_rl.export "
                "and start from that model instead)")
        loaded, _ = self.module.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / TAG}")
