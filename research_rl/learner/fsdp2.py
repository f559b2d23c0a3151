"""The FSDP2 backend (``learner.backend=fsdp2``): one model under ``fully_shard`` per decoder layer and the root, over
a 1-D device mesh of the process group.

With a half-precision ``param_dtype`` (``model.dtype`` on GPU; the roles pass float32 on CPU), parameters stay fp32
and shards compute in that dtype with fp32 gradient reduction (``MixedPrecisionPolicy``; the same on CPU, where a
test asks for it); ``CPUOffloadPolicy`` keeps parameters (and, when trainable,
gradients and optimizer state) on CPU. Full weights come from the sharded ``get_model_state_dict``, one
``DTensor.full_tensor()`` at a time; the sharded checkpoint is ``torch.distributed.checkpoint`` (DCP) of the model
and optimizer state dicts, which reloads at any world size.

One copy at start (``from_rank0``): ranks > 0 pass a model built on the meta device; after ``fully_shard`` they
allocate their shards only (``to_empty``) and receive rank 0's full state dict, broadcast one tensor at a time and
kept as shards (``set_model_state_dict(..., broadcast_from_rank0=True)``), then rank 0's buffers (RoPE's
``inv_freq`` is not in the state dict). After verl's ``fsdp2_load_full_state_dict``.

Between phases (``offload`` / ``reload``): optimizer state and, with ``params``, the parameter shards are copied to
CPU and the device copies dropped, then copied back before the update; gradients are dropped (the next step
zeroes them first). The copies are exact, so the next update equals the one without the round trip.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator

import torch

from research_rl.config.schema import LearnerConfig


class FSDP2Backend:
    """One model of one rank under FSDP2 (the ``research_rl.learner.backend.Backend`` interface).

    Args:
        model: the HF model, float32 on CPU; sharded in place and moved to ``device`` (unless offloaded).
        cfg: ``learner.*`` (lr, betas, weight_decay, grad_clip, cpu_offload).
        rank, world_size: position in the process group (joined already).
        device: ``cpu`` or ``cuda``. param_dtype: compute dtype (mixed precision when not float32).
        trainable: build a torch AdamW over the shards; offload follows ``cfg.cpu_offload``.
        offload: a frozen model's parameters stay on CPU between passes (ignored when ``trainable``).
        from_rank0: ``model`` is on the meta device on ranks > 0 and real on rank 0, whose weights every rank
            receives (module docstring); every rank of the group must pass it.
    """

    name = "fsdp2"

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, rank: int, world_size: int, device: torch.device,
                 param_dtype: torch.dtype, trainable: bool, offload: bool = False, from_rank0: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.mesh = init_device_mesh(device.type, (world_size,))
        offload = cfg.cpu_offload if trainable else offload
        kwargs = {"mesh": self.mesh}
        if param_dtype != torch.float32:  # the roles pass float32 on CPU (CPU debug runs train in float32)
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        full = dict(model.state_dict()) if from_rank0 and rank == 0 else {}  # rank 0's full tensors, on CPU
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # moves what it shards to the mesh's device (or keeps it on CPU to offload)
        self.device = torch.device("cpu") if offload else device
        if from_rank0:
            self._receive_from_rank0(model, full)
        self.module = model
        self.optimizer = (torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                            weight_decay=cfg.weight_decay) if trainable else None)

    def _receive_from_rank0(self, model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.rank != 0:
            model.to_empty(device=self.device)  # this rank's shards and buffers, uninitialised
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for _, buf in model.named_buffers():  # non-persistent buffers (RoPE inv_freq) are not in the state dict
            if self.world_size > 1:
                dist.broadcast(buf, src=0)

    def offload(self, params: bool) -> None:
        """Optimizer state (and, with ``params``, the parameter shards) to CPU; gradients dropped."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            _move_optimizer_state(self.optimizer, torch.device("cpu"))
        if params:
            self.module._apply(lambda t: t.to("cpu", copy=True))  # FSDP2 re-registers the moved shards

    def reload(self, params: bool) -> None:
        """Back to the device: what ``offload`` moved."""
        if params:
            self.module._apply(lambda t: t.to(self.device, copy=True))
        if self.optimizer is not None:
            _move_optimizer_state(self.optimizer, self.device)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()  # FSDP2 reduce-scatters each layer's gradients as its backward ends

    def step(self) -> tuple[float, bool]:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        if math.isfinite(norm):
            self.optimizer.step()
        return norm, math.isfinite(norm)

    @contextlib.contextmanager
    def in_use(self):
        yield  # CPUOffloadPolicy brings offloaded shards to the device per layer itself

    def full_tensors(self, skip: set[str], every_rank: bool = False,
                     on_device: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.tensor import DTensor

        for name, t in get_model_state_dict(self.module).items():  # sharded: one DTensor each, canonical names
            if name in skip:
                continue
            if isinstance(t, DTensor):
                if t.device.type != self.mesh.device_type:  # an offloaded shard: gather on the mesh's device
                    t = t.to(self.mesh.device_type)
                t = t.full_tensor()
            if not (every_rank or self.rank == 0):
                yield name, None
            else:
                yield name, t.detach() if on_device else t.detach().cpu()

    def tensor_shapes(self, skip: set[str]) -> list[tuple[str, tuple[int, ...]]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return [(name, tuple(t.shape)) for name, t in get_model_state_dict(self.module).items() if name not in skip]

    def info(self) -> dict:
        return {"backend": self.name, "world_size": self.world_size}

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))

    def load(self, path: Path, saved: dict) -> None:
        """Restore model and optimizer from ``save``'s DCP under ``path``, at any world size (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every tensor of the optimizer state (AdamW's moments; ``step`` too) as a new copy on ``device``: a copy even
    when it is there already, so the same code runs on CPU and frees the old storage on GPU."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and (v.dim() > 0 or v.device.type != "cpu"):
                state[k] = v.to(device, copy=True)
