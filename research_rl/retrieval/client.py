"""How the rollout (and the driver) reach the retriever: in-cluster actor replicas or a remote HTTP service.

The rollout (docs/concepts.md#the-search-agent-loop): a ``<search>`` query gets the top-k passages inside ``<result>``. A retriever that fails or is too
slow must not lose a GRPO step. ``RetrieverClient.search`` returns ``None`` for every query it could not serve
within ``timeout_s``: the actor died (it restarts; the next call succeeds), the backend raised, or the HTTP service
was unreachable or answered an error. The agent loop then inserts the observation ``search failed``
(``agent_loop.SEARCH_FAILED_OBSERVATION``) and the trajectory goes on; the trainer counts these in
``retriever/errors``. Failures are per query: a query that cannot be searched (``batcher.check_query``, or one
the backend rejects) gets ``None`` alone; the call's other queries still get their passages.

With several replicas, a call's queries are split into contiguous chunks, one per replica, sent concurrently. The
remote service is spoken to in the Search-R1 ``POST /retrieve`` API (``retriever_service.serve`` or any compatible
server).
"""

from __future__ import annotations

import logging
import time

from research_rl.retrieval.batcher import check_query
from research_rl.retrieval.index import Passage

log = logging.getLogger(__name__)


class RetrieverClient:
    """Batched search through Ray actor replicas or a ``/retrieve`` URL, with a per-call timeout.

    Picklable: build it on the driver and pass it to rollout workers.
    """

    def __init__(self, replicas: list | None = None, url: str | None = None, timeout_s: float = 30.0):
        """Args:
            replicas: ``RetrieverActor`` handles (``retriever_actor.start_retrievers``); exclusive with ``url``.
            url: base URL of a service speaking Search-R1 ``POST /retrieve``, e.g. ``http://10.0.0.5:8000``.
            timeout_s: longest wait for one call, in seconds (> 0).

        Raises:
            ValueError: neither or both of ``replicas`` and ``url``; ``timeout_s`` <= 0.
        """
        if bool(replicas) == bool(url):
            raise ValueError("RetrieverClient needs exactly one of replicas (actor handles) or url")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.replicas, self.url, self.timeout_s = list(replicas or []), (url or "").rstrip("/"), float(timeout_s)
        self._session = None
        self._next = 0  # replica that gets the next single-query async call

    def __getstate__(self):
        return {**self.__dict__, "_session": None}

    def search(self, queries: list[str], top_k: int) -> list[list[Passage] | None]:
        """Top-``top_k`` passages per query; ``None`` for each query that failed or timed out (logged as a warning).

        Returns:
            One entry per query, in input order.
        """
        if not queries:
            return []
        if self.url:
            return self._search_http(queries, top_k)
        return self._search_actors(queries, top_k)

    async def search_async(self, queries: list[str], top_k: int) -> list[list[Passage] | None]:
        """``search`` for an asyncio caller (the async agent loop sends each trajectory's query as soon as it is
        produced; the replicas batch concurrent calls). Actor replicas are awaited as ObjectRefs; the HTTP service
        is called in a thread. Same return value and failure handling as ``search``."""
        if not queries:
            return []
        if self.url:
            import asyncio

            return await asyncio.to_thread(self._search_http, queries, top_k)
        return await self._search_actors_async(queries, top_k)

    def _chunks(self, queries: list[str]) -> list[tuple[int, list[str]]]:
        n = min(len(self.replicas), len(queries))
        size = -(-len(queries) // n)
        return [(i, queries[i:i + size]) for i in range(0, len(queries), size)]

    async def _search_actors_async(self, queries: list[str], top_k: int) -> list[list[Passage] | None]:
        import asyncio

        import ray

        # spread single-query calls over the replicas
        replicas = self.replicas[self._next:] + self.replicas[:self._next]
        self._next = (self._next + 1) % len(self.replicas)
        chunks = self._chunks(queries)
        refs = [r.search.remote(qs, top_k) for r, (_, qs) in zip(replicas, chunks)]
        out: list[list[Passage] | None] = [None] * len(queries)

        async def one(ref, start: int, qs: list[str]) -> None:
            try:
                out[start:start + len(qs)] = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.timeout_s)
            except asyncio.TimeoutError:
                ray.cancel(ref)
                log.warning("retriever: %d queries timed out after %.1f s", len(qs), self.timeout_s)
            except (ray.exceptions.RayError, RuntimeError) as e:
                log.warning("retriever: %d queries failed: %s", len(qs), str(e).splitlines()[0][:300])

        await asyncio.gather(*(one(ref, start, qs) for ref, (start, qs) in zip(refs, chunks)))
        return out

    def _search_actors(self, queries: list[str], top_k: int) -> list[list[Passage] | None]:
        import ray

        chunks = self._chunks(queries)
        refs = [r.search.remote(qs, top_k) for r, (_, qs) in zip(self.replicas, chunks)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        done = set(ready)
        out: list[list[Passage] | None] = [None] * len(queries)
        for ref, (start, qs) in zip(refs, chunks):
            if ref not in done:
                ray.cancel(ref)
                log.warning("retriever: %d queries timed out after %.1f s", len(qs), self.timeout_s)
                continue
            try:
                out[start:start + len(qs)] = ray.get(ref)
            except (ray.exceptions.RayError, RuntimeError) as e:
                log.warning("retriever: %d queries failed: %s", len(qs), str(e).splitlines()[0][:300])
        return out

    def _search_http(self, queries: list[str], top_k: int) -> list[list[Passage] | None]:
        import requests

        out: list[list[Passage] | None] = [None] * len(queries)
        # a query no backend can take is never sent: it would cost the request's other queries their answer
        send = [i for i, q in enumerate(queries) if check_query(q) is None]
        if len(send) < len(queries):
            log.warning("retriever %s: %d of %d queries are not valid text; they get no search", self.url,
                        len(queries) - len(send), len(queries))
        if not send:
            return out
        if self._session is None:
            self._session = requests.Session()
        t0 = time.perf_counter()
        try:
            r = self._session.post(f"{self.url}/retrieve", json={"queries": [queries[i] for i in send], "topk": top_k,
                                                                   "return_scores": True}, timeout=self.timeout_s)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            result = r.json()["result"]
            if len(result) != len(send):
                raise RuntimeError(f"{len(result)} result lists for {len(send)} queries")
            rejected = {int(i) for i in r.headers.get("x-rejected-queries", "").split(",") if i.strip()}
            for j, (i, hits) in enumerate(zip(send, result)):
                if j not in rejected:  # a query the service refused keeps None: "search failed", not "no results"
                    out[i] = [Passage(id=str(h["document"]["id"]), contents=h["document"]["contents"],
                                      score=float(h["score"])) for h in hits]
            return out
        except (requests.RequestException, RuntimeError, KeyError, TypeError, ValueError) as e:
            log.warning("retriever %s: %d queries failed after %.2f s: %s", self.url, len(send),
                        time.perf_counter() - t0, e)
            return [None] * len(queries)
