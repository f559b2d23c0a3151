"""The last layer of each weight-sync transport: a buffer another process on the same device can open, and a process
group from the learner leader to the engine workers. Everything above it (``sender``, ``receiver``) is the same code
on GPU and CPU; only these stand-ins differ:

- ``SharedBuffer`` / ``open_buffer`` (transport ``ipc``): on CUDA a device buffer shared through torch's
  multiprocessing reductions (``reduce_tensor``: a CUDA IPC handle; the receiver rebuilds it on its own device index,
  as OpenRLHF's and verl's colocated syncs do, since Ray gives each actor its own ``CUDA_VISIBLE_DEVICES``); on CPU
  a file in ``/dev/shm`` that both processes map (``torch.from_file(shared=True)``), the shared-memory stand-in.
- ``stateless_group`` (transport ``collective``): a torch process group that is not the process's default group
  (the learner ranks and vLLM's workers each have theirs already): ``ProcessGroupNCCL`` on GPU, ``ProcessGroupGloo``
  on CPU, over a ``TCPStore`` hosted by the learner leader (vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``
  in its RLHF example do the same job).
- ``device_key``: where a tensor lives, for matching a learner rank with the engine workers on its device: the GPU's
  UUID, or ``host/cpu`` (every process on one host can map the same ``/dev/shm`` file).

Imports torch and the standard library only.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

SHM_DIR = "/dev/shm"


def device_key(device: torch.device | str) -> str:
    """``cuda-<GPU UUID>`` for a CUDA device (unique across hosts), ``<hostname>/cpu`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda-{torch.cuda.get_device_properties(index).uuid}"
    return f"{socket.gethostname()}/cpu"


@dataclass(frozen=True)
class BufferHandle:
    """What a receiver needs to open a ``SharedBuffer``: its size, the device key, and the CUDA IPC reduction
    (``(rebuild function, args)`` from ``reduce_tensor``) or the ``/dev/shm`` path."""

    nbytes: int
    key: str
    path: str | None = None
    cuda: tuple[Any, tuple] | None = None


class SharedBuffer:
    """A flat ``uint8`` buffer of ``nbytes`` on ``device`` that processes on the same device can open by
    ``handle`` (module docstring). ``close()`` releases it: the CPU file is unlinked (an opened mapping stays valid
    until its holder drops it), the CUDA memory is freed once no receiver holds it."""

    def __init__(self, nbytes: int, device: torch.device | str):
        self.device = torch.device(device)
        self.nbytes = int(nbytes)
        key = device_key(self.device)
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            self.handle = BufferHandle(self.nbytes, key, cuda=reduce_tensor(self.tensor))
            self._path = None
        else:
            base = SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
            self._path = os.path.join(base, f"research-rl-sync-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            with open(self._path, "wb") as f:
                f.truncate(self.nbytes)
            self.tensor = torch.from_file(self._path, shared=True, size=self.nbytes, dtype=torch.uint8)
            self.handle = BufferHandle(self.nbytes, key, path=self._path)

    def close(self) -> None:
        self.tensor = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def __del__(self):
        self.close()


def open_buffer(handle: BufferHandle, device: torch.device | str) -> torch.Tensor:
    """The flat ``uint8`` tensor behind ``handle``, mapped in this process on ``device`` (no copy).

    Raises:
        ValueError: ``handle`` is for another device than ``device``.
    """
    device = torch.device(device)
    if handle.key != device_key(device):
        raise ValueError(f"weight sync (ipc): the buffer lives on {handle.key}, this process is on "
                         f"{device_key(device)}; ipc needs learner and engine on one device (sync.transport)")
    if handle.cuda is not None:
        rebuild, args = handle.cuda
        args = list(args)
        args[6] = device.index if device.index is not None else torch.cuda.current_device()  # this process's index
        return rebuild(*args)
    return torch.from_file(handle.path, shared=True, size=handle.nbytes, dtype=torch.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def stateless_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0,
                    device: torch.device | None = None):
    """A torch process group of ``world_size`` ranks that is not the default group: rank 0 hosts a ``TCPStore`` at
    ``host:port``, the others connect. ``backend``: ``nccl`` (``ProcessGroupNCCL``, bound to ``device``) or ``gloo``.
    Every rank must call it at about the same time (it blocks until all have joined, at most ``timeout_s``).

    Raises:
        ValueError: an unknown backend.
    """
    from torch.distributed import PrefixStore, TCPStore

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=True)
    store = PrefixStore("research-rl-sync", store)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = ProcessGroupNCCL(store, rank, world_size, options)
        if device is not None:
            torch.cuda.set_device(device)
        return group
    raise ValueError(f"stateless_group: backend {backend!r}, expected nccl or gloo")


def group_backend(device: torch.device | str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def broadcast_async(group, tensor: torch.Tensor, src: int = 0):
    """Start broadcasting ``tensor`` from group rank ``src`` to every rank of ``group`` (in place); returns the work
    handle (``.wait()`` before the buffer is reused)."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)


def broadcast(group, tensor: torch.Tensor, src: int = 0) -> None:
    """``broadcast_async`` and wait for completion."""
    broadcast_async(group, tensor, src).wait()
