"""Cross-request dynamic micro-batching for retrieval, with an LRU cache and latency metrics.

One index, two faces (docs/architecture.md) -- the ``RetrieverActor`` the rollout workers call and the HTTP service
(``retriever_service.serve``). Both put this batcher in front of the ``Retriever`` core. Concurrent ``search`` calls
arrive from many trajectories, often with one or a few queries each. A single loop gathers the queued queries for at
most ``max_wait_ms`` after the oldest arrived, or until ``max_batch_size`` are queued, and serves them in ONE backend
call (pyserini ``batch_search`` with threads; one faiss search). With ``max_wait_ms=0`` (the default) a batch leaves
as soon as the owner thread is free. Backend calls run on one owner thread, never
concurrently: GPU faiss is not thread-safe, and one pyserini batch already uses all its threads. Queries that arrive
while a batch runs form the next batch, so batches grow with load.

Cache and coalescing: results are cached by ``(normalised query, k)`` in an LRU of ``cache_size`` entries. The n
samples of a GRPO group often issue near-identical first queries. A query already queued or in flight shares that
pending result instead of being searched twice; both a cache hit and a shared in-flight result count as hits in
``cache_hit_rate``. Normalisation strips the query, collapses whitespace runs to one space and lower-cases. The
backend receives the normalised string, so a cached result is exactly what the backend returns for that key.
Lower-casing does not change what BM25 (whose analyzer lower-cases) or uncased encoders (E5-base-v2, MiniLM) compute.
Cached results are stored as plain tuples of (id, contents, score), which Python's cyclic GC stops tracking, so a
full cache does not lengthen full collections. (The processes that host a batcher also ``gc.freeze()`` what they
imported: pyserini's import heap of ~545k objects otherwise made every full collection stall the event loop and the
owner thread for ~250 ms, which was the p99 latency.)

Fairness: each ``search`` call's queries form a group; a batch takes one query from each queued group in turn
(arrival order), until ``max_batch_size`` queries or ``max_batch_chars`` characters. So one large request is served in
slices of bounded cost, and a query that arrives meanwhile rides in the next slice instead of waiting for the whole
large request (the worst wait beside a maximal request is measured in docs/reliability.md).

Errors, per query: one query must never fail another's search.

- A query that no backend can take (``check_query``: not valid Unicode text, e.g. a lone surrogate ``"\\ud800"``, which
  cannot cross into the JVM) is rejected up front with ``QueryRejected`` and never batched.
- When a backend call raises on a batch, each of its queries is searched again alone. A query that then raises
  ``ValueError`` (the backend's way to refuse a query) gets ``QueryRejected``; one that raises anything else gets
  ``RetrievalError`` (a backend failure); the others get their passages. Rejected queries are remembered (a bounded
  LRU), so a repeated bad query is refused without reaching the backend again. Failures are never cached as results.

``search_each`` returns each query's passages or its error; ``search`` raises the first error.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from research_rl.retrieval.index import Passage

BackendFn = Callable[[list[str], int], list[list[Passage]]]  # (queries, k) -> per query, top-k passages


class RetrievalError(RuntimeError):
    """The backend failed on this query (a server-side failure; the query itself may be fine)."""


class QueryRejected(RetrievalError):
    """This query cannot be searched: refused up front (``check_query``) or by the backend (``ValueError``).
    The client's fault: the HTTP service answers it with 400, or an empty result inside a batch."""


_REJECTED_MEMORY = 4096  # rejected query keys remembered, so a repeated bad query never reaches the backend again


def normalize_query(query: str) -> str:
    """Cache key text: stripped, whitespace runs collapsed to one space, lower-cased."""
    return " ".join(query.split()).lower()


def check_query(query: str) -> str | None:
    """Why no backend can search ``query``, or None when it can.

    A query must be valid Unicode text: a lone surrogate (JSON ``"\\ud800"``) cannot be encoded as UTF-8 or UTF-16,
    so it cannot reach Lucene (pyjnius) or a tokenizer. The reason names the position and is ASCII-safe.
    """
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"the query is not valid Unicode text: lone surrogate {query[e.start]!r} at position {e.start}"
    return None


def percentile_ms(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of latency samples in ms, linear interpolation; 0.0 for no samples."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q)) if len(samples) else 0.0


class SearchBatcher:
    """Gathers concurrent searches into batched backend calls, from one owner thread, behind an LRU cache.

    Use from one asyncio event loop (the Ray async actor's or uvicorn's). ``search`` is a coroutine; the batching loop
    starts on the first call.
    """

    def __init__(self, backend: BackendFn, max_batch_size: int = 256, max_wait_ms: float = 0.0,
                 cache_size: int = 65536, max_latency_samples: int = 100_000, max_batch_chars: int = 8192):
        """Args:
            backend: ``(queries, k) -> list of top-k passage lists``, in input order (``Retriever.search``). It
                raises ``ValueError`` for a query it refuses, anything else for a failure of its own.
            max_batch_size: most distinct uncached queries per backend call (>= 1).
            max_wait_ms: longest time in ms the oldest queued query waits for company before its batch is sent
                (>= 0). The default 0 sends what is queued as soon as the owner thread is free: no added latency
                at low load, and under load batches still form from what arrives while the previous batch runs.
            cache_size: LRU entries kept (0 disables the cache; in-flight coalescing still applies).
            max_latency_samples: request latencies kept between two ``stats(reset=True)`` calls (oldest dropped).
            max_batch_chars: most characters (normalised query text) per backend call (>= 1); a batch always takes
                at least one query. BM25 time grows with query length (~4-22 µs per character on 2 cores), so this
                bounds how long one batch holds the owner thread: 8,192 characters is at most ~0.2 s.

        Raises:
            ValueError: a limit out of range (the message names it).
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if max_batch_chars < 1:
            raise ValueError(f"max_batch_chars must be >= 1, got {max_batch_chars}")
        self._backend = backend
        self.max_batch_size, self.max_wait_s, self.cache_size = int(max_batch_size), max_wait_ms / 1000, int(cache_size)
        self.max_batch_chars = int(max_batch_chars)
        self._max_samples = int(max_latency_samples)
        self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-owner")
        self._cache: OrderedDict[tuple[str, int], tuple[tuple[str, str, float], ...]] = OrderedDict()
        self._pending: dict[tuple[str, int], asyncio.Future] = {}  # queued or running
        self._rejected: OrderedDict[tuple[str, int], str] = OrderedDict()  # key -> reason
        # one group per search call, in arrival order: [enqueue time, keys not yet sent]
        self._groups: deque[tuple[float, deque[tuple[str, int]]]] = deque()
        self._queued = 0
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._reset_window()
        self.totals = {"requests": 0, "queries": 0, "hits": 0, "batches": 0, "errors": 0, "rejected": 0}

    def _reset_window(self) -> None:
        self._latencies_ms: deque[float] = deque(maxlen=self._max_samples)
        self._window = {"requests": 0, "queries": 0, "hits": 0, "batches": 0, "batched_queries": 0, "errors": 0,
                        "rejected": 0, "lookups": 0}

    def _count(self, **deltas: int) -> None:
        for key, d in deltas.items():
            self._window[key] += d
            if key in self.totals:
                self.totals[key] += d

    async def search(self, queries: Sequence[str], top_k: int) -> list[list[Passage]]:
        """Top-``top_k`` passages for each query, served from the cache or a batched backend call.

        Args:
            queries: query strings; an empty or whitespace-only query gets [] without reaching the backend.
            top_k: passages per query (>= 1).

        Returns:
            One list per query, in input order, of at most ``top_k`` passages in descending score.

        Raises:
            ValueError: ``top_k`` < 1.
            QueryRejected: one of these queries cannot be searched (the first one's reason).
            RetrievalError: the backend failed on one of these queries.
        """
        out = await self.search_each(queries, top_k)
        for r in out:
            if isinstance(r, RetrievalError):
                raise r
        return out  # type: ignore[return-value]

    async def search_each(self, queries: Sequence[str], top_k: int) -> list[list[Passage] | RetrievalError]:
        """``search`` with per-query outcomes: each query's passages, or the error of that query alone.

        Returns:
            One entry per query, in input order: a list of at most ``top_k`` passages in descending score ([] for an
            empty or blank query), or the query's ``QueryRejected`` / ``RetrievalError``.

        Raises:
            ValueError: ``top_k`` < 1.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._batch_loop())
        out: list[list[Passage] | RetrievalError | None] = [None] * len(queries)
        waits: list[tuple[int, asyncio.Future]] = []
        new_keys: deque[tuple[str, int]] = deque()
        hits = lookups = 0
        for i, query in enumerate(queries):
            reason = check_query(query)
            if reason is not None:
                out[i] = QueryRejected(reason)
                continue
            key = (normalize_query(query), int(top_k))
            if not key[0]:
                out[i] = []
                continue
            if key in self._rejected:
                out[i] = QueryRejected(self._rejected[key])
                continue
            lookups += 1
            if key in self._cache:
                self._cache.move_to_end(key)
                out[i] = [Passage._make(p) for p in self._cache[key]]
                hits += 1
            elif key in self._pending:
                waits.append((i, self._pending[key]))
                hits += 1
            else:
                fut = loop.create_future()
                self._pending[key] = fut
                new_keys.append(key)
                waits.append((i, fut))
        self._count(requests=1, queries=len(queries), lookups=lookups, hits=hits)
        if new_keys:
            self._groups.append((start, new_keys))
            self._queued += len(new_keys)
            self._wakeup.set()
        try:
            if waits:
                # shield: a cancelled caller (e.g. a disconnected HTTP client) must not cancel a shared result
                results = await asyncio.gather(*(asyncio.shield(f) for _, f in waits), return_exceptions=True)
                for (i, _), passages in zip(waits, results):
                    if isinstance(passages, BaseException) and not isinstance(passages, RetrievalError):
                        raise passages
                    out[i] = passages
        finally:
            self._latencies_ms.append((time.perf_counter() - start) * 1000)
        rejected = sum(isinstance(r, QueryRejected) for r in out)
        failed = sum(isinstance(r, RetrievalError) for r in out) - rejected
        if failed or rejected:
            self._count(errors=int(failed > 0), rejected=rejected)
        return out  # type: ignore[return-value]

    def _take_batch(self) -> list[tuple[str, int]]:
        """Up to ``max_batch_size`` queued keys and ``max_batch_chars`` characters, one per group in turn."""
        batch: list[tuple[str, int]] = []
        chars, full = 0, False
        while self._groups and not full:
            for _, keys in self._groups:  # one pass: one query from each group, oldest group first
                if len(batch) >= self.max_batch_size or (batch and chars + len(keys[0][0]) > self.max_batch_chars):
                    full = True
                    break
                key = keys.popleft()
                batch.append(key)
                chars += len(key[0])
            self._groups = deque(g for g in self._groups if g[1])
        self._queued -= len(batch)
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queued:
                wait = self._groups[0][0] + self.max_wait_s - time.perf_counter()
                while self._queued < self.max_batch_size and wait > 0:
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        break
                    self._wakeup.clear()
                    wait = self._groups[0][0] + self.max_wait_s - time.perf_counter()
                batch = self._take_batch()
                try:
                    await self._run_batch(loop, batch)
                except BaseException as e:  # cancelled (close) or a bug: never leave a waiter on a dead future
                    self._fail(batch, RetrievalError(f"retrieval batch of {len(batch)} queries aborted: {e!r}"))
                    raise

    def _fail(self, keys: list[tuple[str, int]], error: RetrievalError) -> None:
        """Fail the still-pending futures of ``keys`` and forget them, so a later request searches afresh."""
        for key in keys:
            fut = self._pending.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a waiter that went away must not log "never retrieved"

    def _search_alone(self, texts: list[str], k: int) -> list[list[Passage] | RetrievalError]:
        """On the owner thread, after a batch failed: each query on its own, its passages or its error."""
        out: list[list[Passage] | RetrievalError] = []
        for text in texts:
            try:
                (passages,) = self._backend([text], k)
                out.append(passages)
            except ValueError as e:
                out.append(QueryRejected(f"the backend refused the query {text[:200]!r}: {e}"))
            except Exception as e:  # noqa: BLE001 -- that query's waiters get the cause
                out.append(RetrievalError(f"retrieval backend failed on the query {text[:200]!r} (k={k}): {e!r}"))
        return out

    def _deliver(self, key: tuple[str, int], passages) -> None:
        if self.cache_size:
            self._cache[key] = tuple((p[0], p[1], p[2]) for p in passages)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        fut = self._pending.pop(key)
        if not fut.done():
            fut.set_result(passages)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[str, int]]) -> None:
        by_k: dict[int, list[str]] = {}
        for text, k in batch:
            by_k.setdefault(k, []).append(text)
        for k, texts in by_k.items():
            self._count(batches=1, batched_queries=len(texts))
            keys = [(text, k) for text in texts]
            try:
                results = await loop.run_in_executor(self._owner, self._backend, texts, k)
                if len(results) != len(texts):
                    raise RuntimeError(f"backend returned {len(results)} result lists for {len(texts)} queries")
                for key, passages in zip(keys, results):
                    self._deliver(key, passages)
                continue
            except Exception as e:  # noqa: BLE001 -- isolate the failing query below
                batch_error = e
            if len(texts) == 1:
                alone = [QueryRejected(f"the backend refused the query {texts[0][:200]!r}: {batch_error}")
                         if isinstance(batch_error, ValueError) else RetrievalError(
                    f"retrieval backend failed on the query {texts[0][:200]!r} (k={k}): {batch_error!r}")]
            else:
                alone = await loop.run_in_executor(self._owner, self._search_alone, texts, k)
            for key, outcome in zip(keys, alone):
                if key not in self._pending:
                    continue
                try:
                    if isinstance(outcome, RetrievalError):
                        raise outcome
                    self._deliver(key, outcome)
                except RetrievalError as error:
                    if isinstance(error, QueryRejected):
                        self._rejected[key] = str(error)
                        if len(self._rejected) > _REJECTED_MEMORY:
                            self._rejected.popitem(last=False)
                    self._fail([key], error)
                except Exception as e:  # noqa: BLE001 -- a malformed answer for this query
                    self._fail([key], RetrievalError(
                        f"retrieval backend failed on a batch of {len(texts)} queries (k={k}): {e!r}"))

    def stats(self, reset: bool = True) -> dict:
        """Metrics of the window since the last reset.

        Returns:
            ``requests`` and ``queries`` received, ``cache_hit_rate`` (cache or in-flight hits / non-empty queries,
            0-1),
            ``batches`` (backend calls), ``batch_size`` (mean distinct queries per backend call), ``errors``
            (requests the backend failed on, for at least one query), ``rejected`` (queries refused as unsearchable:
            the client's fault, not an error of the service), ``p50_ms`` / ``p99_ms`` (request latency, arrival to answer, ms),
            ``latencies_ms`` (the samples, for merging replicas with ``merge_stats``), ``cache_entries``.
        """
        w, lat = dict(self._window), list(self._latencies_ms)
        out = {
            "requests": w["requests"], "queries": w["queries"], "batches": w["batches"], "errors": w["errors"],
            "rejected": w["rejected"],
            "cache_hit_rate": w["hits"] / w["lookups"] if w["lookups"] else 0.0,
            "batch_size": w["batched_queries"] / w["batches"] if w["batches"] else 0.0,
            "p50_ms": percentile_ms(lat, 50), "p99_ms": percentile_ms(lat, 99),
            "latencies_ms": lat, "hits": w["hits"], "lookups": w["lookups"], "batched_queries": w["batched_queries"],
            "cache_entries": len(self._cache),
        }
        if reset:
            self._reset_window()
        return out

    def close(self) -> None:
        """Stop the batching loop and the owner thread (queued queries are not served)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._owner.shutdown(wait=False, cancel_futures=True)


def merge_stats(stats: Sequence[dict]) -> dict[str, float]:
    """Combine ``SearchBatcher.stats()`` of several replicas into the ``retriever/*`` training metrics.

    Returns:
        ``{"retriever/p50_ms", "retriever/p99_ms", "retriever/batch_size", "retriever/cache_hit_rate",
        "retriever/requests", "retriever/queries"}``; percentiles over all replicas' samples, rates weighted by counts.
    """
    lat = [x for s in stats for x in s["latencies_ms"]]
    queries = sum(s["queries"] for s in stats)
    lookups = sum(s["lookups"] for s in stats)
    batches = sum(s["batches"] for s in stats)
    return {
        "retriever/p50_ms": percentile_ms(lat, 50),
        "retriever/p99_ms": percentile_ms(lat, 99),
        "retriever/batch_size": sum(s["batched_queries"] for s in stats) / batches if batches else 0.0,
        "retriever/cache_hit_rate": sum(s["hits"] for s in stats) / lookups if lookups else 0.0,
        "retriever/requests": float(sum(s["requests"] for s in stats)),
        "retriever/queries": float(queries),
    }
