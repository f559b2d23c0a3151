"""The learner side of a weight sync: one ``WeightSender`` per learner rank, fed by the backend's stream of full
tensors (every rank takes part in each gather: FSDP2's ``full_tensor()``, DeepSpeed's ``GatheredParameters``).

Per transport (the driver's orchestration: ``research_rl.driver.weight_sync``):

- ``ipc``: each rank that shares a device with an engine worker (``begin(..., pack=True)``) keeps two slots of the
  largest bucket's size (``SharedBuffer``) and packs bucket ``k`` into slot ``k % 2`` on its device, cast to the
  wire dtype: no host copy. While the engines load bucket ``k`` the ranks gather and pack bucket ``k + 1`` into the
  other slot (double buffering; the driver waits for the engines' answer on a slot before it is packed again).
  After OpenRLHF's and verl's colocated CUDA-IPC syncs, which hand a handle per tensor (verl: per bucket).
- ``collective``: the leader (rank 0) packs each bucket on its device and broadcasts it over the sync group (NCCL;
  gloo on CPU), two buffers in flight so the next gather overlaps the current broadcast; after OpenRLHF's
  ``broadcast_to_vllm`` (per tensor) and vLLM's RLHF example, in buckets.
- ``object_store``: the leader packs each bucket into a host buffer; the driver ``ray.put``s it (a NumPy array:
  the engines read it without a copy).

Imports torch and the standard library only.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

from research_rl.sync.buckets import Bucket, largest, pack
from research_rl.sync.transport import BufferHandle, SharedBuffer, broadcast_async, group_backend, stateless_group

Stream = Callable[[bool, bool], Iterable[tuple[str, "torch.Tensor | None"]]]


def bucket_tensors(stream: Iterable[tuple[str, torch.Tensor | None]],
                   buckets: Sequence[Bucket]) -> Iterator[dict[str, torch.Tensor | None]]:
    """Group a stream of ``(name, tensor)`` (in the plan's order) into one dict per bucket.

    Raises:
        RuntimeError: the stream holds a tensor the plan does not, or ends before the plan does.
    """
    it = iter(stream)
    for bucket in buckets:
        out: dict[str, torch.Tensor | None] = {}
        for spec in bucket.specs:
            name, tensor = next(it, (None, None))
            if name != spec.name:
                raise RuntimeError(f"weight sync: the learner streamed {name!r} where the plan has {spec.name!r} "
                                   f"(bucket {bucket.index})")
            out[name] = tensor
        yield out
    extra = next(it, None)
    if extra is not None:
        raise RuntimeError(f"weight sync: the learner streamed {extra[0]!r}, which is in no bucket of the plan")


class WeightSender:
    """One learner rank's side of the syncs.

    Args:
        stream: ``stream(every_rank, on_device)`` → the backend's ``(name, tensor)`` stream (``Learner.weight_stream``).
        device: this rank's device. rank: its learner rank (0 leads).
    """

    def __init__(self, stream: Stream, device: torch.device | str, rank: int):
        self.stream = stream
        self.device = torch.device(device)
        self.rank = rank
        self.group = None
        self._slots: list[SharedBuffer] = []
        self._pending: Iterator[dict] | None = None
        self._buckets: Sequence[Bucket] = ()
        self._next = 0  # the next bucket pack_next gathers

    # ------------------------------------------------------------------ collective
    def join(self, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> None:
        """Host the sync group as its rank 0 (leader only), the engine workers being ranks 1..world_size-1."""
        self.group = stateless_group(group_backend(self.device), host, port, 0, world_size, timeout_s, self.device)

    def send_collective(self, buckets: Sequence[Bucket]) -> int:
        """Gather every bucket (every rank) and broadcast it from the leader over the sync group. Returns bytes
        sent (0 on other ranks).

        Raises:
            RuntimeError: the leader has not joined the sync group.
        """
        if self.rank != 0:
            for _ in bucket_tensors(self.stream(False, True), buckets):
                pass
            return 0
        if self.group is None:
            raise RuntimeError("weight sync (collective): the learner leader has not joined the sync group")
        size = largest(buckets)
        flats = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(min(2, len(buckets)))]
        work: list = [None] * len(flats)
        sent = 0
        for bucket, tensors in zip(buckets, bucket_tensors(self.stream(False, True), buckets)):
            i = bucket.index % len(flats)
            if work[i] is not None:
                work[i].wait()
            view = pack(bucket, tensors, flats[i])
            del tensors
            work[i] = broadcast_async(self.group, view, src=0)
            sent += bucket.nbytes
        for w in work:
            if w is not None:
                w.wait()
        return sent

    # ------------------------------------------------------------------ ipc
    def begin_ipc(self, buckets: Sequence[Bucket], pack_here: bool) -> dict[str, list[BufferHandle]]:
        """Start an ipc sync: with ``pack_here`` two slots of the largest bucket on this rank's device, and their
        handles ``{device key: [slot 0, slot 1]}``; ``{}`` for a rank that only takes part in the gathers."""
        self.end()
        self._buckets = buckets
        self._pending = iter(bucket_tensors(self.stream(True, True), buckets))
        if not pack_here:
            return {}
        size = max(1, largest(buckets))
        self._slots = [SharedBuffer(size, self.device) for _ in range(2)]
        return {self._slots[0].handle.key: [s.handle for s in self._slots]}

    def pack_next(self, slot: int) -> int:
        """Gather the next bucket (every rank must call) and, on a packing rank, pack it into ``slot``; returns the
        bucket's index. On CUDA the packing is complete when this returns."""
        tensors = next(self._pending)
        index, self._next = self._next, self._next + 1
        if self._slots:
            pack(self._buckets[index], tensors, self._slots[slot].tensor)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return index

    # ------------------------------------------------------------------ object store
    def host_buckets(self, buckets: Sequence[Bucket]) -> Iterator[torch.Tensor | None]:
        """Each bucket packed into a new host ``uint8`` buffer on the leader (``None`` on other ranks, which take part
        in the gathers)."""
        for bucket, tensors in zip(buckets, bucket_tensors(self.stream(False, False), buckets)):
            if self.rank != 0:
                yield None
                continue
            yield pack(bucket, tensors, torch.empty(bucket.nbytes, dtype=torch.uint8))

    # ------------------------------------------------------------------ all
    def end(self) -> None:
        """Release the ipc slots (after every engine has answered for its last bucket)."""
        for s in self._slots:
            s.close()
        self._slots, self._pending, self._next = [], None, 0

    def close(self) -> None:
        self.end()
        self.group = None
