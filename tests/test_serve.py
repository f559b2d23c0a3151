"""The HTTP retrieval service, started as a user starts it (``python -m retriever_service.serve``) on a free loopback
port over a real BM25 index of the shipped corpus; real HTTP requests, no test client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data/corpus/corpus.jsonl"
pytestmark = pytest.mark.slow

# small limits, so the 413 cases are cheap to send
LIMITS = {"--max-queries": "64", "--max-query-chars": "512", "--max-request-chars": "2048", "--max-top-k": "20",
          "--max-body-bytes": "65536"}


@pytest.fixture(scope="module")
def server(bm25_index):
    proc, url = start_server(bm25_index, "--threads", "2", *[x for kv in LIMITS.items() for x in kv])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    rows = (json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip())
    return {r["id"]: r["contents"] for r in rows}


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/hotpotqa/dev.jsonl").read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows]


def _post(url: str, path: str, body) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30)


def test_health_reports_the_index(server):
    r = requests.get(f"{server}/health", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["kind"] == "bm25" and body["passages"] == 5479


def test_retrieve_search_r1_contract(server, corpus, questions):
    queries = questions[:6]
    r = _post(server, "/retrieve", {"queries": queries, "topk": 4, "return_scores": True})
    assert r.status_code == 200
    result = r.json()["result"]
    assert len(result) == len(queries)
    for hits in result:
        assert len(hits) == 4
        assert set(hits[0]) == {"document", "score"} and set(hits[0]["document"]) == {"id", "contents"}
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
        for h in hits:  # the real passage behind each id
            assert corpus[h["document"]["id"]] == h["document"]["contents"]
    # documents only without return_scores (Search-R1's server answers 500 here), same ranking
    plain = _post(server, "/retrieve", {"queries": queries, "topk": 4}).json()["result"]
    assert [[d["id"] for d in hits] for hits in plain] == [[h["document"]["id"] for h in hits] for hits in result]
    # topk defaults to the server's --top-k (5)
    assert all(len(h) == 5 for h in _post(server, "/retrieve", {"queries": queries[:2]}).json()["result"])


def test_a_passage_title_finds_that_passage_first(server, corpus):
    pid, contents = next((i, c) for i, c in corpus.items() if len(c.split("\n", 1)[0]) > 12)
    title = contents.split("\n", 1)[0].strip('"')
    hits = _post(server, "/retrieve", {"queries": [contents], "topk": 3, "return_scores": True}).json()["result"][0]
    assert hits[0]["document"]["id"] == pid, title


def test_research_batch_search_and_search_agree_with_retrieve(server, questions):
    queries = questions[6:10]
    expected = [[h["document"]["id"] for h in hits] for hits in
                _post(server, "/retrieve", {"queries": queries, "topk": 3, "return_scores": True}).json()["result"]]
    docs = _post(server, "/batch_search", {"query": queries, "top_n": 3}).json()
    assert [[d["id"] for d in ds] for ds in docs] == expected
    docs, scores = _post(server, "/batch_search", {"query": queries, "top_n": 3, "return_score": True}).json()
    assert [[d["id"] for d in ds] for ds in docs] == expected
    assert all(len(s) == 3 and s == sorted(s, reverse=True) for s in scores)
    one = _post(server, "/search", {"query": queries[0], "top_n": 3}).json()
    assert [d["id"] for d in one] == expected[0] and set(one[0]) == {"id", "contents"}
    one_docs, one_scores = _post(server, "/search", {"query": queries[0], "top_n": 3, "return_score": True}).json()
    assert [d["id"] for d in one_docs] == expected[0] and one_scores == scores[0]
    # FlashRAG's default top_n is 10
    assert len(_post(server, "/search", {"query": queries[0]}).json()) == 10


BAD = [
    ("/retrieve", '{"queries": ["x"', 422, "malformed JSON"),
    ("/retrieve", "[1, 2]", 422, "must be a JSON object"),
    ("/retrieve", {"topk": 3}, 422, "missing field 'queries'"),
    ("/retrieve", {"queries": "who?"}, 422, "field 'queries' must be list"),
    ("/retrieve", {"queries": ["ok", 7]}, 422, "queries[1] must be a string"),
    ("/retrieve", {"queries": ["x"], "topk": "5"}, 422, "field 'topk' must be int"),
    ("/retrieve", {"queries": ["x"], "return_scores": "yes"}, 422, "field 'return_scores' must be bool"),
    ("/retrieve", {"queries": []}, 400, "empty list"),
    ("/retrieve", {"queries": ["x"], "topk": 0}, 400, "between 1 and 20, got 0"),
    ("/retrieve", {"queries": ["x"], "topk": -3}, 400, "between 1 and 20, got -3"),
    ("/retrieve", {"queries": ["x"], "topk": 21}, 400, "between 1 and 20, got 21"),
    ("/retrieve", {"queries": ["q"] * 65}, 413, "65 queries in one request; the limit is 64"),
    ("/retrieve", {"queries": ["a" * 513]}, 413, "513 characters; the limit is 512"),
    ("/retrieve", {"queries": ["a" * 500] * 5}, 413, "2500 query characters in one request; the limit is 2048"),
    ("/retrieve", {"queries": ["x"], "pad": "p" * 70000}, 413, "the limit is 65536"),
    ("/batch_search", {"query": "who?"}, 422, "field 'query' must be list"),
    ("/batch_search", {"query": []}, 400, "field 'query' is an empty list"),
    ("/batch_search", {"query": ["x"], "top_n": 0}, 400, "between 1 and 20"),
    ("/search", {"query": ["a list"]}, 422, "field 'query' must be str"),
    ("/search", {"query": ""}, 400, "empty query"),
    ("/search", {"query": " \t "}, 400, "empty query"),
    ("/search", '{"query": "\\ud800"}', 400, "lone surrogate '\\ud800' at position 0"),
    ("/search", {}, 422, "missing field 'query'"),
]


@pytest.mark.parametrize("path,body,status,reason", BAD, ids=[f"{p}:{r[:30]}" for p, _, _, r in BAD])
def test_bad_input_is_refused_with_a_reason_and_the_server_keeps_serving(server, path, body, status, reason):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"]
    ok = _post(server, "/retrieve", {"queries": ["Who directed Ed Wood?"], "topk": 2})
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 2


def test_blank_and_unsearchable_queries_in_a_batch_get_empty_results_in_position(server, questions):
    """Search-R1's client sends "" when the model writes ``<search> </search>``: the batch succeeds, one result list
    per query, [] for the blank and the unsearchable ones, and the real queries get what they get alone."""
    alone = _post(server, "/retrieve", {"queries": questions[:2], "topk": 3}).json()["result"]
    body = json.dumps({"queries": [questions[0], "", "   ", "@", questions[1]], "topk": 3}).replace('"@"', '"\\ud800"')
    r = _post(server, "/retrieve", body)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result[1:4] == [[], [], []] and [result[0], result[4]] == alone
    assert r.headers["x-rejected-queries"] == "3"  # the blank ones are not rejected: they have nothing to search
    docs = _post(server, "/batch_search", {"query": ["", questions[0]], "top_n": 3}).json()
    assert docs[0] == [] and docs[1] == alone[0]


def test_load_64_concurrent_clients_all_answers_correct(server, questions):
    """64 concurrent clients × 20 single-query requests: zero errors, and every answer equals the answer the same
    query gets alone in one batch request (so batching and the cache never mix up results)."""
    import aiohttp

    distinct = list(dict.fromkeys(questions))[:40]
    expected = {}
    for i in range(0, len(distinct), 20):
        chunk = distinct[i:i + 20]
        res = _post(server, "/retrieve", {"queries": chunk, "topk": 5, "return_scores": True}).json()["result"]
        expected.update({q: [h["document"]["id"] for h in hits] for q, hits in zip(chunk, res)})

    async def client(session, c: int) -> list[tuple[str, int, list[str]]]:
        out = []
        for j in range(20):
            q = distinct[(c * 20 + j) % len(distinct)]
            async with session.post(f"{server}/retrieve", json={"queries": [q], "topk": 5,
                                                                 "return_scores": True}) as r:
                body = await r.json()
                out.append((q, r.status, [h["document"]["id"] for h in body["result"][0]] if r.status == 200 else []))
        return out

    async def load():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            return await asyncio.gather(*(client(session, c) for c in range(64)))

    answers = [a for part in asyncio.run(load()) for a in part]
    assert len(answers) == 64 * 20
    assert [s for _, s, _ in answers if s != 200] == []
    wrong = [q for q, _, ids in answers if ids != expected[q]]
    assert wrong == []
    stats = requests.get(f"{server}/stats", timeout=5).json()
    assert stats["errors"] == 0 and stats["cache_hit_rate"] > 0.5  # 40 distinct queries asked 1,280 times


def test_remote_client_through_retrieve(server, questions):
    """``RetrieverClient(url=...)`` (what rollouts use with ``retriever.url``) gets passages; an unreachable service
    gives ``None`` per query instead of raising."""
    from research_rl.retrieval.client import RetrieverClient

    results = RetrieverClient(url=server, timeout_s=10).search(questions[:3], 2)
    assert [len(r) for r in results] == [2, 2, 2] and results[0][0].score >= results[0][1].score
    dead = RetrieverClient(url=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert dead.search(questions[:3], 2) == [None, None, None]


def test_server_refuses_an_index_of_another_corpus(bm25_index, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "a", "contents": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "retriever_service.serve", "--index", str(bm25_index), "--corpus",
                           str(other), "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "differs from the corpus the index" in proc.stderr and str(other) in proc.stderr
