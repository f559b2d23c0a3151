"""A role's ranks as one object (after OpenRLHF's ``RayActorGroup``): the driver never loops over actors.

A ``WorkerGroup`` owns the Ray actors of one role (``learner``, ``reference``, ``rollout``, ``retriever``), in rank
order. It creates them with their placement options (``research_rl.roles.placement.Placement.options``), forms the
torch.distributed group of the learner and reference roles (rank 0 hosts the rendezvous), and calls a method on
every rank: the same arguments on every rank (``call``), one shard per rank (``scatter``, with
``Experience.shard``, whose shards are copies: a pickled view would carry the whole batch to every rank), or
per-rank arguments (``call_each``). Results come back in rank order; ``first`` keeps rank 0's (its metrics are
already reduced over the ranks).

A rank that raises or dies fails the call with one ``WorkerError`` naming the role, the rank and the method, e.g.
``learner rank 1 died during update: ...``; the Ray exception is its ``__cause__``. The group waits on all ranks
at once and reports the first failure it sees, so a collective whose peer died does not hang the report.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError


class WorkerError(RuntimeError):
    """A rank of a worker group raised or died; the message names the role, the rank and the method."""

    def __init__(self, role: str, rank: int, method: str, message: str):
        super().__init__(message)
        self.role, self.rank, self.method = role, rank, method


def _describe(role: str, rank: int, method: str, error: BaseException) -> str:
    """``<role> rank <r> died during <method>: ...`` or ``... raised in <method>: <Type>: <message>``."""
    if isinstance(error, (ActorDiedError, ActorUnavailableError)):
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{role} rank {rank} died during {method}: {reason}"
    if isinstance(error, GetTimeoutError):
        return f"{role} rank {rank} did not answer {method} in time: {error}"
    cause = error.cause if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException) else error
    if isinstance(cause, (ActorDiedError, ActorUnavailableError)):  # a nested call to a dead actor
        return _describe(role, rank, method, cause)
    return f"{role} rank {rank} raised in {method}: {type(cause).__name__}: {cause}"


class WorkerGroup:
    """The actors of one role, rank ``r`` = ``actors[r]``.

    Args:
        role: the role's name, used in error messages (``learner``, ``reference``, ``rollout``, ``retriever``).
        actors: Ray actor handles in rank order.
    """

    def __init__(self, role: str, actors: Sequence[Any]):
        self.role = role
        self.actors = list(actors)

    @classmethod
    def start(cls, role: str, actor_class, options: Sequence[dict], args: Callable[[int], tuple]) -> "WorkerGroup":
        """``len(options)`` ranks of ``actor_class``: rank ``r`` is ``actor_class.options(**options[r])`` constructed
        with ``*args(r)``. Construction errors surface at the first call on the rank (``ready``, ``where``)."""
        return cls(role, [actor_class.options(**opts).remote(*args(rank)) for rank, opts in enumerate(options)])

    def __len__(self) -> int:
        return len(self.actors)

    def __bool__(self) -> bool:
        return bool(self.actors)

    # ------------------------------------------------------------------ calls
    def _gather(self, method: str, refs: Sequence[Any], timeout: float | None = None) -> list:
        """Every rank's result in rank order (``None`` for a rank whose ref is ``None``: not called), waiting at most
        ``timeout`` seconds in all; the first rank to fail raises ``WorkerError``."""
        rank_of = {ref: rank for rank, ref in enumerate(refs) if ref is not None}
        results: dict[int, Any] = {}
        pending = [r for r in refs if r is not None]
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                rank = rank_of[pending[0]]
                raise WorkerError(self.role, rank, method,
                                  f"{self.role} rank {rank} did not answer {method} within {timeout:g} s")
            for ref in done:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except (RayTaskError, ActorDiedError, ActorUnavailableError) as e:
                    raise WorkerError(self.role, rank, method, _describe(self.role, rank, method, e)) from e
        return [results.get(rank) for rank in range(len(refs))]

    def submit(self, method: str, *args) -> list:
        """Start ``method(*args)`` on every rank without waiting: the ObjectRefs, for ``wait`` (to overlap two
        groups' calls, e.g. a weight sync's senders and receivers)."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def submit_each(self, method: str, args: Sequence[tuple]) -> list:
        """``submit`` with ``args[r]`` for rank ``r``."""
        if len(args) != len(self.actors):
            raise ValueError(f"{len(args)} argument tuples for {len(self.actors)} {self.role} ranks")
        return [getattr(a, method).remote(*x) for a, x in zip(self.actors, args)]

    def submit_rank(self, rank: int, method: str, *args) -> list:
        """``submit`` on rank ``rank`` only (a one-element list of refs, for ``wait``)."""
        refs: list = [None] * len(self.actors)
        refs[rank] = getattr(self.actors[rank], method).remote(*args)
        return refs

    def wait(self, method: str, refs: Sequence[Any], timeout: float | None = None) -> list:
        """The results of ``submit``'s refs in rank order (``None`` where a rank was not called).

        Raises:
            WorkerError: as ``call``.
        """
        return self._gather(method, refs, timeout)

    def call(self, method: str, *args, timeout: float | None = None) -> list:
        """``method(*args)`` on every rank (collectives need them all); the results in rank order.

        Raises:
            WorkerError: a rank raised, died or (with ``timeout``, seconds) did not answer in time.
        """
        return self._gather(method, [getattr(a, method).remote(*args) for a in self.actors], timeout)

    def call_settled(self, method: str, *args, timeout: float | None = None) -> list:
        """``method(*args)`` on every rank, waiting at most ``timeout`` seconds; per rank its result or the
        ``WorkerError`` it failed with (for reports such as retriever stats, where a restarting replica reports at
        the next call instead of failing the step)."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(ready)
        out: list = []
        for rank, ref in enumerate(refs):
            if ref not in done:
                out.append(WorkerError(self.role, rank, method,
                                       f"{self.role} rank {rank} did not answer {method} within {timeout:g} s"))
                continue
            try:
                out.append(ray.get(ref))
            except (RayTaskError, ActorDiedError, ActorUnavailableError) as e:
                out.append(WorkerError(self.role, rank, method, _describe(self.role, rank, method, e)))
        return out

    def first(self, method: str, *args, timeout: float | None = None) -> Any:
        """``call`` and keep rank 0's result (metrics the ranks already reduced, rank 0's weight buckets)."""
        return self.call(method, *args, timeout=timeout)[0]

    def call_each(self, method: str, args: Sequence[tuple], timeout: float | None = None) -> list:
        """``method(*args[r])`` on rank ``r``; ``len(args)`` must be the number of ranks.

        Raises:
            ValueError: ``len(args)`` is not the number of ranks.
            WorkerError: as ``call``.
        """
        if len(args) != len(self.actors):
            raise ValueError(f"{len(args)} argument tuples for {len(self.actors)} {self.role} ranks")
        return self._gather(method, [getattr(a, method).remote(*x) for a, x in zip(self.actors, args)], timeout)

    def scatter(self, method: str, shards: Sequence[Any], *args, timeout: float | None = None) -> list:
        """``method(shards[r], *args)`` on rank ``r`` (``shards`` from ``Experience.shard(len(group))``); results
        in rank order."""
        return self.call_each(method, [(shard, *args) for shard in shards], timeout)

    def call_rank(self, rank: int, method: str, *args, timeout: float | None = None) -> Any:
        """``method(*args)`` on rank ``rank`` only (not for collectives).

        Raises:
            WorkerError: as ``call``.
        """
        ref = getattr(self.actors[rank], method).remote(*args)
        try:
            return ray.get(ref, timeout=timeout)
        except (RayTaskError, ActorDiedError, ActorUnavailableError, GetTimeoutError) as e:
            raise WorkerError(self.role, rank, method, _describe(self.role, rank, method, e)) from e

    def init_process_group(self) -> None:
        """Form the role's torch.distributed group: rank 0's ``rendezvous_address()``, then every rank's
        ``init_process_group(addr, port)``."""
        addr, port = self.call_rank(0, "rendezvous_address")
        self.call("init_process_group", addr, port)
