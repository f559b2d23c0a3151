"""Learner → rollout engines weight sync, driven from the driver over the two worker groups (DESIGN: Architecture;
docs/rollout.md, "Weight sync").

One sync: learner rank 0 plans it (``research_rl.sync.buckets``: every tensor in the engines' dtype, in
``learner.weight_sync_bucket_mb`` buckets), every engine checks the plan against its model (an unknown name or a
tensor left out fails the sync before any byte moves), then the buckets travel by ``sync.transport``:

========================  ==================================================================================
``ipc``                   learner and engine share a device (colocated): each learner rank on an engine's device
                          packs bucket ``k`` into one of two shared slots on its device, the engines there load it
                          in place (CUDA IPC on GPU, a shared-memory file on CPU); the ranks gather bucket ``k+1``
                          meanwhile. No host copy, nothing through Ray but the handles.
``collective``            disaggregated: learner rank 0 broadcasts each packed bucket over a process group of
                          itself and every engine worker (NCCL on GPU, gloo on CPU), formed once at setup.
``object_store``          anywhere (the fallback): learner rank 0 packs each bucket on the host and puts it in the
                          Ray object store; each engine reads it there without a copy.
========================  ==================================================================================

``auto`` takes ``collective`` in disaggregated placement, else ``ipc`` when every engine replica has a learner rank
on its device, else ``object_store`` (e.g. engines on nodes without a learner rank). The engines then hold policy version ``version``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from research_rl.roles.group import WorkerGroup
from research_rl.sync.receiver import IpcBucket

TRANSPORTS = ("auto", "ipc", "collective", "object_store")


@dataclass
class Route:
    """How syncs travel: the transport, the wire dtype, the learner ranks that pack (ipc), the engines' replicas
    per engine (collective group ranks)."""

    transport: str
    dtype: str
    packers: list[int]
    replicas: list[int]


def choose(requested: str, placement_mode: str, learner_keys: list[str], engine_keys: list[list[str]]) -> str:
    """The transport for ``sync.transport=requested`` given where the learner ranks and the engines' replicas are
    (device keys, ``research_rl.sync.transport.device_key``).

    Raises:
        ValueError: ``ipc`` requested but some replica shares no device with a learner rank.
    """
    shared = all(k in learner_keys for keys in engine_keys for k in keys)
    if requested == "ipc" and not shared:
        alone = sorted({k for keys in engine_keys for k in keys} - set(learner_keys))
        raise ValueError(f"sync.transport=ipc needs a learner rank on every engine's device; no learner rank is on "
                         f"{alone} (learner ranks: {sorted(set(learner_keys))}); use collective or object_store")
    if requested != "auto":
        return requested
    if placement_mode == "disaggregated":  # each role on its own devices (on CPU they may still share a host)
        return "collective"
    return "ipc" if shared else "object_store"


class WeightSync:
    """The syncs of one run, between the learner group and the rollout group.

    Args:
        learners, engines: the ``WorkerGroup`` s (``LearnerWorker``, ``RolloutWorker``).
        transport: ``sync.transport``. placement_mode: ``placement.mode``. bucket_mb: MiB per bucket.
    """

    def __init__(self, learners: WorkerGroup, engines: WorkerGroup, transport: str, placement_mode: str,
                 bucket_mb: float):
        self.learners, self.engines, self.bucket_mb = learners, engines, bucket_mb
        infos = engines.call("sync_info")
        dtypes = {i["dtype"] for i in infos}
        if len(dtypes) != 1:
            raise ValueError(f"the rollout engines hold their weights in different dtypes {sorted(dtypes)}")
        learner_keys = learners.call("sync_device_key")
        engine_keys = [i["device_keys"] for i in infos]
        chosen = choose(transport, placement_mode, learner_keys, engine_keys)
        packers = sorted({learner_keys.index(k) for keys in engine_keys for k in keys}) if chosen == "ipc" else []
        self.route = Route(chosen, dtypes.pop(), packers, [len(k) for k in engine_keys])
        if chosen == "collective":
            self._form_group()

    def _form_group(self) -> None:
        """Learner rank 0 and every engine replica join one process group (rank 0 hosts its store)."""
        host, port = self.learners.call_rank(0, "rendezvous_address")
        world = 1 + sum(self.route.replicas)
        first = [1 + sum(self.route.replicas[:i]) for i in range(len(self.engines))]
        leader = self.learners.submit_rank(0, "sync_join", host, port, world)  # it waits for the engines to join
        self.engines.wait("sync_join", self.engines.submit_each("sync_join", [(host, port, r, world) for r in first]))
        self.learners.wait("sync_join", leader)

    def sync(self, version: int) -> dict[str, float]:
        """One sync of every engine to the learner's current weights. Returns ``sync/*`` metrics: ``bytes`` (on the
        wire to each engine), ``buckets``, ``tensors``, ``seconds``.

        Raises:
            WorkerError: a learner rank or an engine failed (an unknown name, a tensor left out, a lost peer).
            RuntimeError: an engine received fewer bytes than the plan holds.
        """
        t0 = time.perf_counter()
        buckets = self.learners.call_rank(0, "sync_plan", self.route.dtype, self.bucket_mb)
        self.engines.call("sync_begin", buckets)
        try:
            getattr(self, f"_{self.route.transport}")(buckets)
            stats = self.engines.call("sync_end", version)  # the engines drop their mappings of the ipc slots
        finally:
            if self.route.transport == "ipc":
                self.learners.call("sync_end")  # then the learner ranks free them
        expected = sum(b.nbytes for b in buckets)
        for rank, got in enumerate(stats):
            if got["bytes"] != expected:
                raise RuntimeError(f"weight sync to policy version {version}: rollout engine {rank} received "
                                   f"{got['bytes']} of the plan's {expected} bytes")
        return {"sync/bytes": float(stats[0]["bytes"]), "sync/buckets": float(len(buckets)),
                "sync/tensors": float(stats[0]["tensors"]), "sync/seconds": time.perf_counter() - t0}

    def _ipc(self, buckets: list) -> None:
        """Double-buffered: bucket ``k`` in slot ``k % 2``; slot ``s`` is packed again only once every engine has
        answered for the bucket in it."""
        handles: dict = {}
        for h in self.learners.call_each("sync_begin_ipc",
                                         [(buckets, r in self.route.packers) for r in range(len(self.learners))]):
            handles.update(h)
        in_slot: list[list | None] = [None, None]  # the engines' pending answers per slot
        for bucket in buckets:
            slot = bucket.index % 2
            if in_slot[slot] is not None:
                self.engines.wait("sync_ipc", in_slot[slot])
            self.learners.call("sync_pack", slot)
            msg = IpcBucket(bucket, slot, {k: v[slot] for k, v in handles.items()})
            in_slot[slot] = self.engines.submit("sync_ipc", msg)
        for refs in in_slot:
            if refs is not None:
                self.engines.wait("sync_ipc", refs)

    def _collective(self, buckets: list) -> None:
        receiving = self.engines.submit("sync_collective", buckets)  # they wait for the broadcasts
        self.learners.call("sync_send_collective", buckets)
        self.engines.wait("sync_collective", receiving)

    def _object_store(self, buckets: list) -> None:
        refs = self.learners.first("sync_object_store", buckets)
        self.engines.call("sync_object_store", buckets, refs)
