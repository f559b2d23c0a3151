"""The backend interface: what ``Learner`` and ``ReferencePolicy`` need from the library that shards one model.

Two implementations, picked by ``learner.backend`` (``backend_class``):

- ``FSDP2Backend`` (``research_rl.learner.fsdp2``): ``fully_shard`` per decoder layer and the root;
- ``DeepSpeedBackend`` (``research_rl.learner.deepspeed_backend``, the only module that imports deepspeed):
  ZeRO-2 or ZeRO-3 with a torch AdamW passed in.

A backend object wraps one model: trainable (with its optimizer) or frozen (with optional CPU offload). Backends
import neither the learner nor each other; this module imports them only inside ``backend_class``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Iterator, Protocol

import torch

from research_rl.config.schema import LearnerConfig


class Backend(Protocol):
    """One model of one rank, sharded over the process group (joined before construction).

    Constructed as ``cls(model, cfg, rank, world_size, device, param_dtype, trainable, offload=False,
    from_rank0=False)``: ``model`` is the HF model in float32 on CPU; ``trainable`` builds the optimizer (a torch
    AdamW from ``cfg``) and follows ``cfg.cpu_offload``; a frozen model's parameters stay on CPU between passes when
    ``offload``; with ``from_rank0`` ranks > 0 pass a meta-device model and receive rank 0's weights (FSDP2 only).
    """

    name: str  # the learner.backend value, written to a checkpoint's learner.json
    module: torch.nn.Module  # the wrapped model, called like the HF model
    optimizer: torch.optim.Optimizer | None  # the torch optimizer (trainable only; the backend may wrap it)

    def offload(self, params: bool) -> None:
        """Between phases: optimizer state (and, with ``params``, the parameters) to CPU, gradients dropped."""

    def reload(self, params: bool) -> None:
        """Back to the device: what ``offload`` moved, bit for bit."""

    def zero_grad(self) -> None:
        """Drop the accumulated gradients."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradients of one micro-batch's loss; ``last`` marks the accumulation boundary."""

    def step(self) -> tuple[float, bool]:
        """Clip to ``learner.grad_clip`` and step. Returns (total gradient norm before clipping, whether the step
        was applied: a non-finite norm skips it)."""

    def in_use(self) -> ContextManager[None]:
        """Around a frozen model's pass: bring offloaded parameters in where the library does not do it itself."""

    def full_tensors(self, skip: set[str], every_rank: bool = False,
                     on_device: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every parameter and persistent buffer but those named in ``skip``, unsharded, one gather at a time:
        ``(name, tensor)`` on rank 0 (on every rank with ``every_rank``), ``(name, None)`` on the others. The tensor
        is a CPU copy, or with ``on_device`` the gathered tensor on the rank's device (no host copy; valid until the
        next item). Every rank must exhaust it (collectives)."""

    def tensor_shapes(self, skip: set[str]) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, global shape)`` of what ``full_tensors`` streams, in its order, without gathering anything."""

    def info(self) -> dict:
        """``{"backend": name, "world_size": ..., ...}``: what a checkpoint records to check a resume."""

    def save(self, path: Path) -> None:
        """Write this rank's shards of the model and optimizer state under ``path`` (every rank calls)."""

    def load(self, path: Path, saved: dict) -> None:
        """Restore ``save``'s state; ``saved`` is the writer's ``info()``.

        Raises:
            ValueError: this backend cannot reshard that state (DeepSpeed at another world size or ZeRO stage).
        """


def backend_class(name: str) -> type[Backend]:
    """The backend class for ``learner.backend``.

    Raises:
        ValueError: an unknown backend.
        ImportError: ``deepspeed`` without DeepSpeed installed (the message names the install command).
    """
    if name == "fsdp2":
        from research_rl.learner.fsdp2 import FSDP2Backend

        return FSDP2Backend
    if name == "deepspeed":
        from research_rl.learner.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend
    raise ValueError(f"learner.backend={name!r}: expected fsdp2 or deepspeed")
