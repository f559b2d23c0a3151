"""Peer clients against the real service: the client sides of Search-R1 and ReSearch, re-implemented here from
their documented request and response shapes, sent to ``python -m retriever_service.serve`` over loopback.

- Search-R1 (``search_r1/llm_agent/generation.py``): ``POST /retrieve`` with ``{"queries": [...], "topk": k,
  "return_scores": true}``; reads ``response["result"][i][j]["document"]["contents"]`` and formats each passage as
  ``Doc j(Title: first line) rest``. It sends ``""`` inside a batch when the model writes ``<search> </search>``,
  and a non-200 answer makes it fail (``KeyError: 'result'``).
- ReSearch (its rollout's FlashRAG retriever client): ``POST /batch_search`` with ``{"query": [...], "top_n": k}``;
  reads ``response[i][j]["contents"]``; retries a failed request, then raises.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from helpers import start_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(bm25_index):
    proc, url = start_server(bm25_index, "--threads", "2")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/musique/dev.jsonl").read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(r["question"] for r in rows))


def search_r1_batch_search(url: str, queries: list[str], topk: int = 3) -> list[str]:
    """Search-R1's client: one observation string per query."""
    payload = {"queries": queries, "topk": topk, "return_scores": True}
    results = requests.post(f"{url}/retrieve", json=payload, timeout=30).json()["result"]  # KeyError on an error
    out = []
    for hits in results:
        text = ""
        for j, hit in enumerate(hits):
            contents = hit["document"]["contents"]
            title, _, rest = contents.partition("\n")
            text += f"Doc {j + 1}(Title: {title}) {rest}\n"
        out.append(text)
    return out


def research_batch_search(url: str, queries: list[str], top_n: int = 5, retries: int = 3) -> list[list[str]]:
    """ReSearch's client: the passages' contents per query; retries, then raises."""
    for attempt in range(retries):
        r = requests.post(f"{url}/batch_search", json={"query": queries, "top_n": top_n}, timeout=30)
        if r.status_code == 200:
            return [[doc["contents"] for doc in docs] for docs in r.json()]
        time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"retriever answered {r.status_code} {retries} times: {r.text[:200]}")


def test_search_r1_client_with_a_blank_query_in_its_batch(server, questions):
    queries = [questions[0], "", questions[1], " ", questions[2]]
    out = search_r1_batch_search(server, queries)
    assert len(out) == len(queries)  # one result list per query
    assert out[1] == "" and out[3] == ""  # nothing to search: no passages
    for i in (0, 2, 4):
        assert out[i].startswith("Doc 1(Title: ") and "Doc 3(Title: " in out[i]
    assert out[0] == search_r1_batch_search(server, [questions[0]])[0]  # what the query gets alone


def test_research_client_with_a_blank_query_in_its_batch(server, questions):
    queries = ["", questions[3], questions[4]]
    out = research_batch_search(server, queries)
    assert len(out) == 3 and out[0] == [] and [len(x) for x in out[1:]] == [5, 5]
    # the same passages as the Search-R1 face of the same service
    r1 = requests.post(f"{server}/retrieve", json={"queries": [questions[3]], "topk": 5}, timeout=30).json()
    assert out[1] == [d["contents"] for d in r1["result"][0]]


def test_peer_clients_survive_an_unsearchable_query_in_their_batch(server, questions):
    """A lone surrogate in a batch (json.dumps writes it as the escape \\ud800) costs that query alone."""
    out = search_r1_batch_search(server, [questions[5], "\ud800"])
    assert out[1] == "" and out[0].startswith("Doc 1(Title: ")
    out = research_batch_search(server, ["\ud800", questions[5]])
    assert out[0] == [] and len(out[1]) == 5
