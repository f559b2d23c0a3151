"""The RetrieverActor on a real local Ray cluster over a real BM25 index: cross-request batching, the cache,
replicas, timeouts, and a replica killed mid-rollout (the trajectory gets ``search failed``, the actor restarts, the
next call succeeds). Plus the batcher's own logic on a plain in-process backend."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from helpers import ScriptedEngine

from research_rl.rollout.agent_loop import SEARCH_FAILED_OBSERVATION, AgentLoop, SamplingParams, format_observation
from research_rl.config.schema import RetrieverConfig
from research_rl.retrieval.index import Passage
from research_rl.retrieval.client import RetrieverClient
from research_rl.retrieval.batcher import (
    QueryRejected, RetrievalError, SearchBatcher, check_query, merge_stats, normalize_query)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/musique/dev.jsonl").read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(r["question"] for r in rows))


def _start(ray, index, **overrides):
    from research_rl.roles.retriever_actor import start_retrievers

    cfg = RetrieverConfig(index_dir=str(index), top_k=3, threads=1, num_cpus=0.5, **overrides)
    replicas = start_retrievers(cfg, None)
    ray.get([r.ready.remote() for r in replicas])
    return replicas


def _ids(results) -> list[list[str]]:
    return [[p.id for p in ps] for ps in results]


# ----------------------------------------------------------------------------- the batcher, in process
class RecordingBackend:
    """A plain deterministic backend (passage ids derived from the query) that records each batch it serves."""

    def __init__(self, fail_on: str | None = None, delay_s: float = 0.0):
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.fail_on, self.delay_s = fail_on, delay_s

    def __call__(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.batches.append(list(queries))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on in queries:
            raise ValueError(f"cannot search {self.fail_on!r}")
        return [[Passage(f"{q}#{i}", q, float(k - i)) for i in range(k)] for q in queries]


@pytest.mark.unit
def test_batcher_gathers_concurrent_calls_into_one_backend_call_per_k():
    backend = RecordingBackend()

    async def run():
        b = SearchBatcher(backend, max_batch_size=100, max_wait_ms=50)
        calls = [b.search([f"q{i}"], 2) for i in range(30)] + [b.search(["Q5 ", "q31"], 2), b.search(["q1"], 4)]
        out = await asyncio.gather(*calls)
        return out, b.stats()

    out, stats = asyncio.run(run())
    assert [r[0][0].id for r in out[:30]] == [f"q{i}#0" for i in range(30)]  # each caller gets its own answer
    assert _ids(out[30]) == [["q5#0", "q5#1"], ["q31#0", "q31#1"]]  # "Q5 " is normalised to the key "q5"
    assert len(out[31][0]) == 4
    # one call for k=2 with the 31 distinct queries ("Q5 " shared "q5"'s pending result), one for k=4
    assert sorted(len(b) for b in backend.batches) == [1, 31]
    assert backend.threads == {"retriever-owner_0"}  # one owner thread
    assert stats["requests"] == 32 and stats["batches"] == 2 and stats["batch_size"] == 16
    assert stats["cache_hit_rate"] == pytest.approx(1 / 33)


@pytest.mark.unit
def test_batcher_caches_bounded_lru_and_respects_max_batch_size():
    backend = RecordingBackend()

    async def run():
        b = SearchBatcher(backend, max_batch_size=4, max_wait_ms=20, cache_size=3)
        await asyncio.gather(*(b.search([f"q{i}"], 1) for i in range(10)))
        assert [len(x) for x in backend.batches] == [4, 4, 2]
        n = len(backend.batches)
        await b.search(["q9", "Q8", "q7"], 1)  # the 3 most recent entries: all hits
        assert len(backend.batches) == n
        await b.search(["q0"], 1)  # evicted: searched again
        assert backend.batches[-1] == ["q0"]
        return b.stats()

    stats = asyncio.run(run())
    assert stats["cache_entries"] == 3
    assert stats["hits"] == 3 and stats["lookups"] == 14


@pytest.mark.unit
def test_batcher_a_query_the_backend_refuses_fails_alone():
    """The backend raises on any batch holding "bad": the batch is searched again query by query, so only "bad"
    fails (QueryRejected: the backend raised ValueError for it alone), and a repeat of it never reaches the backend."""
    backend = RecordingBackend(fail_on="bad")

    async def run():
        b = SearchBatcher(backend, max_wait_ms=20)
        results = await asyncio.gather(b.search(["bad"], 1), b.search(["fine"], 1), b.search_each(["x", "BAD"], 1),
                                       return_exceptions=True)
        n = len(backend.batches)
        again = await b.search_each(["bad"], 1)  # remembered: refused without a backend call
        assert len(backend.batches) == n
        after = await b.search(["fine", "other"], 1)  # served; "fine" from the cache
        return results, again, after, b.stats()

    (err, fine, each), (again,), after, stats = asyncio.run(run())
    assert isinstance(err, QueryRejected) and "cannot search 'bad'" in str(err)
    assert _ids(fine) == [["fine#0"]]  # same batch as "bad", answered
    assert _ids(each[:1]) == [["x#0"]] and isinstance(each[1], QueryRejected)  # per query, in position
    assert isinstance(again, QueryRejected)
    # batch ["bad", "fine", "x"] failed, then each query alone: 1 + 3 backend calls; then "other"
    assert backend.batches[:4] == [["bad", "fine", "x"], ["bad"], ["fine"], ["x"]] and backend.batches[4:] == [["other"]]
    assert _ids(after) == [["fine#0"], ["other#0"]]
    assert stats["errors"] == 0 and stats["rejected"] == 3  # 3 requests each lost their one bad query


@pytest.mark.unit
def test_batcher_rejects_unsearchable_text_up_front_and_keeps_blank_queries_empty():
    backend = RecordingBackend()

    async def run():
        b = SearchBatcher(backend)
        return await b.search_each(["who?", "\ud800", "", "   ", "a\udfffb"], 1)

    out = asyncio.run(run())
    assert _ids(out[:1]) == [["who?#0"]] and out[2] == [] and out[3] == []
    assert isinstance(out[1], QueryRejected) and "lone surrogate '\\ud800' at position 0" in str(out[1])
    assert isinstance(out[4], QueryRejected) and "position 1" in str(out[4])
    assert backend.batches == [["who?"]]  # neither surrogate query reached the backend
    assert check_query("plain text, ünïcode, 😀") is None


@pytest.mark.unit
def test_batcher_backend_failure_is_a_retrieval_error_per_query_and_not_cached():
    """A backend that raises something other than ValueError fails (RetrievalError, not QueryRejected) only the
    query it fails on; nothing of the failure is cached."""
    calls = []

    def backend(queries, k):
        calls.append(list(queries))
        if "down" in queries:
            raise OSError("index file vanished")
        return [[Passage(q, q, 1.0)] for q in queries]

    async def run():
        b = SearchBatcher(backend, max_wait_ms=20)
        out = await asyncio.gather(b.search(["down"], 1), b.search(["up"], 1), return_exceptions=True)
        return out, await b.search_each(["down"], 1)

    (err, up), (again,) = asyncio.run(run())
    assert type(err) is RetrievalError and "index file vanished" in str(err) and _ids(up) == [["up"]]
    assert type(again) is RetrievalError and calls[-1] == ["down"]  # searched again: a failure is not remembered


@pytest.mark.unit
def test_batcher_slices_a_large_request_and_interleaves_other_callers():
    """One request of 40 queries of 100 characters with max_batch_chars=1000: slices of 10 queries; a caller that
    arrives meanwhile is served in the next slice, not after the whole request."""
    backend = RecordingBackend(delay_s=0.05)

    async def run():
        b = SearchBatcher(backend, max_batch_chars=1000)
        big = asyncio.ensure_future(b.search([f"{i:03d}" + "x" * 97 for i in range(40)], 1))
        await asyncio.sleep(0.02)  # the first slice is running
        small = await b.search(["small"], 1)
        done_early = not big.done()
        await big
        return small, done_early

    small, done_early = asyncio.run(run())
    assert _ids(small) == [["small#0"]] and done_early
    sizes = [len(x) for x in backend.batches]
    assert sizes[0] == 10 and ["small"] not in backend.batches  # never alone: it rode in the second slice
    assert "small" in backend.batches[1] and sum(sizes) == 41 and max(sum(map(len, x)) for x in backend.batches) <= 1000


@pytest.mark.unit
def test_batcher_malformed_backend_result_fails_the_request_and_is_retried_afresh():
    """A backend answer that breaks while being cached or delivered must fail its waiters, not leave them on a
    future nobody resolves (every later request for that query would then hang)."""
    calls = []

    def backend(queries, k):
        calls.append(list(queries))
        return [7 if len(calls) == 1 else [Passage("p", "text", 1.0)] for _ in queries]  # 7: not a passage list

    async def run():
        b = SearchBatcher(backend)
        with pytest.raises(RetrievalError, match="failed on the query 'q'"):
            await asyncio.wait_for(b.search(["q"], 1), 5)
        return await asyncio.wait_for(b.search(["q"], 1), 5)

    assert _ids(asyncio.run(run())) == [["p"]] and calls == [["q"], ["q"]]


@pytest.mark.unit
def test_batcher_argument_checks_and_merge_stats():
    with pytest.raises(ValueError, match="max_batch_size"):
        SearchBatcher(RecordingBackend(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch_chars"):
        SearchBatcher(RecordingBackend(), max_batch_chars=0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        asyncio.run(SearchBatcher(RecordingBackend()).search(["x"], 0))
    assert normalize_query("  Who  IS\tX? ") == "who is x?"
    a = {"latencies_ms": [1.0, 2.0, 3.0], "queries": 4, "lookups": 4, "hits": 1, "batches": 1, "batched_queries": 3,
         "requests": 3}
    b = {"latencies_ms": [10.0], "queries": 2, "lookups": 2, "hits": 2, "batches": 0, "batched_queries": 0,
         "requests": 1}
    m = merge_stats([a, b])
    # samples 1, 2, 3, 10: median 2.5; hits 3 of 6 lookups; 3 queries in 1 backend call
    assert m["retriever/p50_ms"] == 2.5 and m["retriever/cache_hit_rate"] == 0.5 and m["retriever/batch_size"] == 3


# ----------------------------------------------------------------------------- the actor on Ray
@pytest.mark.ray
def test_actor_batches_concurrent_callers_and_answers_like_one_batch(ray_cluster, bm25_index, questions):
    ray = ray_cluster
    (actor,) = _start(ray, bm25_index, cache_size=0, max_wait_ms=20)
    try:
        qs = questions[:32]
        expected = _ids(ray.get(actor.search.remote(qs)))  # one request, one backend batch
        ray.get(actor.stats.remote())  # reset the window
        answers = ray.get([actor.search.remote([q]) for q in qs])  # 32 concurrent single-query callers
        assert [_ids(a)[0] for a in answers] == expected
        stats = ray.get(actor.stats.remote())
        assert stats["requests"] == 32 and stats["batches"] < 32 and stats["batch_size"] > 1
        assert stats["p99_ms"] >= stats["p50_ms"] > 0 and stats["cache_hit_rate"] == 0
    finally:
        ray.kill(actor)


@pytest.mark.ray
def test_cache_serves_repeated_group_queries(ray_cluster, bm25_index, questions):
    ray = ray_cluster
    (actor,) = _start(ray, bm25_index)
    try:
        group = [questions[0], questions[0].upper(), f"  {questions[0]}  "]  # the near-identical first queries
        first = ray.get(actor.search.remote(group))
        assert _ids(first)[0] == _ids(first)[1] == _ids(first)[2]
        ray.get(actor.search.remote([questions[0]]))
        stats = ray.get(actor.stats.remote())
        assert stats["batches"] == 1 and stats["cache_hit_rate"] == pytest.approx(3 / 4)
    finally:
        ray.kill(actor)


@pytest.mark.ray
def test_replicas_split_a_call_and_agree_with_one_actor(ray_cluster, bm25_index, questions):
    ray = ray_cluster
    replicas = _start(ray, bm25_index, num_replicas=2)
    try:
        qs = questions[:10]
        client = RetrieverClient(replicas, timeout_s=60)
        assert _ids(client.search(qs, 3)) == _ids(ray.get(replicas[0].search.remote(qs)))
        stats = ray.get([r.stats.remote() for r in replicas])
        assert [s["queries"] for s in stats] == [15, 5]  # replica 0: its half, then the whole list
    finally:
        for r in replicas:
            ray.kill(r)


@pytest.mark.ray
def test_timeout_gives_none_and_the_actor_keeps_serving(ray_cluster, bm25_index, questions):
    ray = ray_cluster
    (actor,) = _start(ray, bm25_index, max_wait_ms=3000)  # a query waits 3 s for its batch to fill
    try:
        t0 = time.perf_counter()
        assert RetrieverClient([actor], timeout_s=0.5).search(questions[:2], 3) == [None, None]
        assert time.perf_counter() - t0 < 2.5
        assert len(RetrieverClient([actor], timeout_s=30).search(questions[2:3], 3)[0]) == 3
    finally:
        ray.kill(actor)


@pytest.mark.ray
@pytest.mark.reliability
def test_an_unsearchable_query_costs_its_trajectory_one_failed_search_not_the_call(ray_cluster, bm25_index,
                                                                                   questions):
    """The actor answers None for a lone surrogate and passages for the call's other queries; RetrieverClient passes
    that through (the agent loop then writes ``search failed`` for that trajectory alone)."""
    ray = ray_cluster
    (actor,) = _start(ray, bm25_index)
    try:
        out = ray.get(actor.search.remote([questions[0], "\ud800", "", questions[1]]))
        assert out[1] is None and out[2] == [] and [len(out[0]), len(out[3])] == [3, 3]
        via_client = RetrieverClient([actor], timeout_s=30).search([questions[0], "x \udfff"], 3)
        assert _ids(via_client[:1]) == _ids(out[:1]) and via_client[1] is None
        assert ray.get(actor.stats.remote())["rejected"] == 2
    finally:
        ray.kill(actor)


@pytest.mark.unit
def test_http_client_never_sends_unsearchable_text():
    """Nothing listens on the URL: a call of only unsearchable queries answers None without a request (no
    connection error logged), and a call with a real query tries the service."""
    from helpers import free_port

    client = RetrieverClient(url=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    t0 = time.perf_counter()
    assert client.search(["\ud800", "a\udfff"], 3) == [None, None] and client._session is None
    assert time.perf_counter() - t0 < 0.5
    assert client.search(["fine"], 3) == [None] and client._session is not None


@pytest.mark.ray
@pytest.mark.reliability
def test_one_of_two_replicas_killed_mid_call_costs_only_its_chunk(ray_cluster, bm25_index, questions):
    """Two replicas split a call; replica 0 dies while its chunk waits in its batcher: its queries get None
    (``search failed``), replica 1's chunk gets passages, and after the restart every query is served again."""
    ray = ray_cluster
    replicas = _start(ray, bm25_index, num_replicas=2, max_wait_ms=1500, max_restarts=1)
    client = RetrieverClient(replicas, timeout_s=60)
    try:
        out: list = []
        call = threading.Thread(target=lambda: out.extend(client.search(questions[20:24], 3)))
        call.start()
        deadline = time.time() + 30
        while ray.get(replicas[0].stats.remote(reset=False))["requests"] == 0:
            assert time.time() < deadline, "the call never reached replica 0"
            time.sleep(0.05)
        ray.kill(replicas[0], no_restart=False)
        call.join(timeout=60)
        assert out[:2] == [None, None] and [len(r) for r in out[2:]] == [3, 3]
        deadline = time.time() + 120
        while True:
            try:
                assert ray.get(replicas[0].ready.remote(), timeout=120) is True
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.time() < deadline, "replica 0 did not restart within 120 s"
                time.sleep(0.5)
        assert [len(r) for r in client.search(questions[20:24], 3)] == [3, 3, 3, 3]
    finally:
        for r in replicas:
            ray.kill(r)


@pytest.mark.ray
@pytest.mark.reliability
def test_actor_killed_mid_rollout_restarts_and_the_trajectory_goes_on(ray_cluster, bm25_index, tokenizer,
                                                                     questions):
    """A replica dies while a rollout's search is in flight (held in the batcher for 2 s): the in-flight
    trajectories get ``search failed`` and finish, Ray restarts the replica, and the next call succeeds."""
    ray = ray_cluster
    (actor,) = _start(ray, bm25_index, max_wait_ms=2000, max_restarts=1)
    client = RetrieverClient([actor], timeout_s=60)
    eos = tokenizer.eos_token
    prompts = [tuple(tokenizer.encode(f"User: q{i}", add_special_tokens=False)) for i in range(2)]
    engine = ScriptedEngine(tokenizer, {p: [f"<search> {questions[i]} </search>", f" <answer> x </answer>{eos}"]
                                        for i, p in enumerate(prompts)})

    def search(queries):
        return [None if r is None else [p.contents for p in r] for r in client.search(queries, 3)]

    loop = AgentLoop(engine, search, tokenizer, 400)
    out: list = []
    rollout = threading.Thread(target=lambda: out.extend(loop.run([list(p) for p in prompts], SamplingParams())))
    rollout.start()
    deadline = time.time() + 30
    while ray.get(actor.stats.remote(reset=False))["requests"] == 0:  # the rollout's search is in the batcher
        assert time.time() < deadline, "the rollout never reached the retriever"
        time.sleep(0.05)
    ray.kill(actor, no_restart=False)
    rollout.join(timeout=60)
    assert len(out) == 2
    for t in out:
        assert t.finish_reason == "eos" and t.failed_searches == 1
        assert format_observation([SEARCH_FAILED_OBSERVATION]) in t.response_text
    # calls fail fast (None) while Ray restarts the replica; once the index has reopened, the next call succeeds
    deadline = time.time() + 120
    while True:
        try:
            assert ray.get(actor.ready.remote(), timeout=120) is True
            break
        except ray.exceptions.ActorUnavailableError:
            assert time.time() < deadline, "the retriever actor did not restart within 120 s"
            time.sleep(0.5)
    again = client.search(questions[:2], 3)
    assert [len(r) for r in again] == [3, 3]
