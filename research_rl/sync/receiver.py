"""The engine side of a weight sync, for any process that holds the rollout model: the HF engine's own process, or
each vLLM worker (every tensor-parallel rank; ``research_rl.rollout.vllm_engine.WeightSyncExtension``).

A ``WeightReceiver`` gets a sync's buckets by one of the three transports and hands each bucket's tensors, as
``(Hugging Face name, tensor)`` views in the wire dtype, to the engine's ``load`` callback (the HF engine copies
them into its parameters; vLLM's ``model.load_weights`` fuses q/k/v and gate/up and keeps its tensor-parallel shard):

- ``receive_ipc(msg)``: ``msg.handles`` holds one ``BufferHandle`` per device key (the learner rank on each
  device); the receiver maps the one of its own device (cached for the sync: two slots, double-buffered) and loads
  from it in place. On CUDA it synchronises before returning, so the sender may reuse the slot once it has the
  answer.
- ``receive_collective(buckets)``: joined earlier to the sync group (``join``); receives every bucket by broadcast
  from the learner leader (group rank 0) into one device buffer of the largest bucket's size, loading each as it
  arrives.
- ``receive_packed(bucket, flat)``: a bucket that arrived some other way (the object store), as a flat ``uint8``
  tensor or buffer.

``end()`` drops the mapped buffers and returns what the sync delivered. Imports torch and the standard library only.

What a rollout engine offers ``RolloutWorker`` for a sync (``HFEngine`` runs one receiver in its own process;
``VLLMEngine`` one per vLLM worker, reached through ``collective_rpc``): ``weight_dtype`` (the wire dtype),
``sync_device_keys()`` (one per replica), ``known_names()`` (every name a sync may carry) and ``parameter_names()``
(what a full sync must cover), ``join_sync_group(host, port, first_rank, world_size)`` (replica ``i`` joins as group
rank ``first_rank + i``), ``begin_sync()``, ``receive_ipc(msg)``, ``receive_collective(buckets)``,
``receive_packed(bucket, flat)`` and ``end_sync() -> SyncStats`` (one replica's; after it the engine serves the new
weights: e.g. vLLM resets its prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from research_rl.sync.buckets import Bucket, largest, unpack
from research_rl.sync.transport import BufferHandle, broadcast, device_key, group_backend, open_buffer, stateless_group

Load = Callable[[list[tuple[str, torch.Tensor]]], object]


@dataclass(frozen=True)
class IpcBucket:
    """One ipc bucket: its layout, the double-buffer slot it is in, and the handle of that slot per device key."""

    bucket: Bucket
    slot: int
    handles: dict[str, BufferHandle] = field(default_factory=dict)


@dataclass
class SyncStats:
    """What one sync delivered to one receiver: bytes and elements received, tensors loaded, buckets."""

    bytes: int = 0
    elements: int = 0
    tensors: int = 0
    buckets: int = 0

    def add(self, bucket: Bucket) -> None:
        self.bytes += bucket.nbytes
        self.elements += bucket.numel
        self.tensors += len(bucket.specs)
        self.buckets += 1


class WeightReceiver:
    """Receives weight-sync buckets for one model replica (one tensor-parallel rank) and loads them.

    Args:
        load: called with each bucket's ``(name, tensor)`` views; must copy what it keeps before returning.
        device: where this replica computes (``cuda:i`` or ``cpu``); ipc buffers are opened and collective
            buckets received there.
    """

    def __init__(self, load: Load, device: torch.device | str):
        self.load = load
        self.device = torch.device(device)
        self.key = device_key(self.device)
        self.group = None
        self._slots: dict[tuple[int, str], torch.Tensor] = {}
        self.stats = SyncStats()

    # ------------------------------------------------------------------ collective
    def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0) -> None:
        """Join the sync group as group rank ``rank`` (the learner leader is rank 0 and hosts the store)."""
        self.group = stateless_group(group_backend(self.device), host, port, rank, world_size, timeout_s,
                                     self.device)

    def receive_collective(self, buckets: Sequence[Bucket]) -> SyncStats:
        """Every bucket of the sync, in order, by broadcast from group rank 0 (``join`` first).

        Raises:
            RuntimeError: this receiver has not joined the sync group.
        """
        if self.group is None:
            raise RuntimeError("weight sync (collective): this engine has not joined the sync group")
        flat = torch.empty(largest(buckets), dtype=torch.uint8, device=self.device)
        for bucket in buckets:
            view = flat[:bucket.nbytes]
            broadcast(self.group, view, src=0)
            self._load(bucket, view)
        self._synchronize()
        return self.stats

    # ------------------------------------------------------------------ ipc
    def receive_ipc(self, msg: IpcBucket) -> SyncStats:
        """Load one bucket from the shared slot of this receiver's device.

        Raises:
            KeyError: no learner rank shares this receiver's device (ipc needs one; ``sync.transport``).
        """
        handle = msg.handles.get(self.key)
        if handle is None:
            raise KeyError(f"weight sync (ipc): no learner rank shares this engine's device {self.key} (learner "
                           f"ranks are on {sorted(msg.handles)}); use sync.transport=collective or object_store")
        slot = self._slots.get((msg.slot, handle.key))
        if slot is None:
            slot = self._slots[(msg.slot, handle.key)] = open_buffer(handle, self.device)
        self._load(msg.bucket, slot[:msg.bucket.nbytes])
        self._synchronize()  # the sender may overwrite the slot once this returns
        return self.stats

    # ------------------------------------------------------------------ object store
    def receive_packed(self, bucket: Bucket, flat) -> SyncStats:
        """Load one bucket from a flat buffer (a ``uint8`` tensor, or anything ``torch.frombuffer`` takes: bytes, a
        NumPy array); a host buffer is copied to this receiver's device by ``load``."""
        if not isinstance(flat, torch.Tensor):
            import warnings

            with warnings.catch_warnings():  # a read-only buffer (the object store's): only ever read here
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(flat, dtype=torch.uint8)
        self._load(bucket, flat)
        return self.stats

    # ------------------------------------------------------------------ both
    def _load(self, bucket: Bucket, flat: torch.Tensor) -> None:
        self.load(unpack(bucket, flat))
        self.stats.add(bucket)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def end(self) -> SyncStats:
        """Close the sync: drop the mapped ipc slots; returns (and resets) what it delivered."""
        self._slots.clear()
        stats, self.stats = self.stats, SyncStats()
        return stats
