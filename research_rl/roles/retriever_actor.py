"""Ray shell of the retriever role: one index in one actor process, behind the cross-request batcher.

Rollout workers call ``RetrieverActor.search``. The actor is an asyncio actor, so calls from
many workers (or many trajectories) run concurrently. ``SearchBatcher`` gathers them into batched backend calls on
one owner thread, with an LRU cache. The plain cores are ``Retriever`` (retriever.py) and ``SearchBatcher``
(search_batcher.py). BM25 (pyserini) or dense (faiss) is chosen by ``kind``.

Resources (``num_cpus``), ``max_restarts`` and replicas are set by the caller (``start_retrievers``). Restarted
actors reopen the index in ``__init__``. In-flight calls to an actor that died fail at once (``max_task_retries=0``):
the caller (``RetrieverClient``) turns the failure into a ``search failed`` observation instead of losing the step.

Failures are per query: a query the backend rejects or fails on comes back as ``None`` in its position (one
``search failed`` observation for that trajectory), and the call's other queries -- and every other caller's --
get their passages (``SearchBatcher.search_each``).
"""

from __future__ import annotations

import gc
import logging

import ray

from research_rl.roles.placement import where
from research_rl.retrieval.retriever import Retriever
from research_rl.retrieval.index import Passage
from research_rl.retrieval.batcher import SearchBatcher

log = logging.getLogger(__name__)

@ray.remote
class RetrieverActor:
    def __init__(self, index_dir: str, kind: str = "bm25", top_k: int = 5, threads: int = 1,
                 corpus_path: str | None = None, max_batch_size: int = 256, max_wait_ms: float = 0.0,
                 cache_size: int = 65536):
        """Open the index; raises what ``Retriever`` and ``SearchBatcher`` raise (IndexNotFoundError, ValueError)."""
        self.retriever = Retriever(index_dir, kind=kind, top_k=top_k, threads=threads, corpus_path=corpus_path)
        self.batcher = SearchBatcher(self.retriever.search, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                     cache_size=cache_size)
        # the index, the JVM bridge and the imports live as long as the actor: keep them out of full GC collections
        gc.collect()
        gc.freeze()

    async def search(self, queries: list[str], top_k: int | None = None) -> list[list[Passage] | None]:
        """Top-k passages per query, in input order; [] for empty queries; ``None`` for a query that could not be
        searched (rejected as unsearchable, or the backend failed on it alone), logged as one warning line
        (``SearchBatcher.search_each``)."""
        out = await self.batcher.search_each(queries, self.retriever.top_k if top_k is None else top_k)
        for i, r in enumerate(out):
            if isinstance(r, Exception):
                log.warning("retriever: query %d of %d failed: %s", i, len(out), str(r)[:300])
                out[i] = None
        return out

    async def stats(self, reset: bool = True) -> dict:
        """``SearchBatcher.stats``: the window's latency samples, hit rate, batch size, errors."""
        return self.batcher.stats(reset)

    async def ready(self) -> bool:
        """True once the index is open (callers ``ray.get`` it to surface construction errors early)."""
        return True

    async def where(self) -> dict:
        """``placement.where()``: node, pid and assigned resources of this replica."""
        return where()


def start_retrievers(cfg, corpus_path: str | None, scheduling: list[dict] | None = None) -> list:
    """Start ``cfg.num_replicas`` ``RetrieverActor`` replicas from a ``RetrieverConfig``.

    Replicas ask for ``cfg.num_cpus`` CPUs and no GPU and restart up to ``cfg.max_restarts`` times (-1: forever) with
    ``max_task_retries=0``. ``scheduling`` gives extra Ray options per replica (``Placement.retriever_options``:
    node affinity to CPU-only nodes); a replica without them is spread over nodes (``SPREAD``) when there are
    several. Returns the handles; ``ray.get`` each one's ``ready()`` to surface construction errors.
    """
    base = dict(num_cpus=cfg.num_cpus, num_gpus=0, max_restarts=cfg.max_restarts, max_task_retries=0)
    if cfg.num_replicas > 1:
        base["scheduling_strategy"] = "SPREAD"
    scheduling = scheduling or [{} for _ in range(cfg.num_replicas)]
    return [RetrieverActor.options(**{**base, **extra}).remote(
        cfg.index_dir, cfg.kind, cfg.top_k, cfg.threads, corpus_path, cfg.max_batch_size, cfg.max_wait_ms,
        cfg.cache_size) for extra in scheduling]
