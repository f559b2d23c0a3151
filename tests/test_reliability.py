"""The retrieval service under hostile input, load and slow clients, as a tester attacks it: the real service
(``python -m retriever_service.serve``) on a loopback port over a real BM25 index, real sockets. Every load loop is
bounded in count and time. The promises tested here are listed in docs/reliability.md."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import start_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.reliability, pytest.mark.slow]

HEADER_TIMEOUT_S, BODY_TIMEOUT_S, MAX_CONNECTIONS = 1.5, 1.5, 64


@pytest.fixture(scope="module")
def served(bm25_index, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_server(bm25_index, "--threads", "2", "--header-timeout-s", str(HEADER_TIMEOUT_S),
                             "--body-timeout-s", str(BODY_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
                             log=log)
    yield proc, url, log
    proc.terminate()
    proc.wait(timeout=30)
    # no request, however hostile, made the service print a traceback
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[1]


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/hotpotqa/dev.jsonl").read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(r["question"] for r in rows))


def _post(url: str, path: str, raw: bytes | str, **headers) -> requests.Response:
    return requests.post(f"{url}{path}", data=raw, headers={"Content-Type": "application/json", **headers},
                         timeout=30)


SURROGATE = '"\\ud800"'  # JSON text of a lone surrogate: valid JSON, not valid Unicode
GOOD = '{"queries": ["Who directed Ed Wood?"], "topk": 2}'

# (name, path, raw body, expected status, what the reason says)
HOSTILE = [
    ("deep-array", "/retrieve", "[" * 100_000, 422, "nested 100000 levels deep"),
    ("deep-queries", "/retrieve", '{"queries": ' + "[" * 50_000 + "]" * 50_000 + "}", 422, "nested 50001 levels"),
    ("deep-object", "/batch_search", '{"a":' * 10_000 + "1" + "}" * 10_000, 422, "levels deep"),
    ("huge-topk", "/retrieve", '{"queries": ["x"], "topk": ' + "9" * 5000 + "}", 422, "number of 5000 characters"),
    ("huge-float", "/search", '{"query": "x", "top_n": ' + "1" * 400 + ".5}", 422, "number of 402 characters"),
    ("nan", "/retrieve", '{"queries": ["x"], "topk": NaN}', 422, "NaN is not a JSON value"),
    ("infinity", "/retrieve", '{"queries": ["x"], "topk": -Infinity}', 422, "-Infinity is not a JSON value"),
    ("bad-utf8", "/retrieve", b'{"queries": ["\xff\xfe"]}', 422, "malformed JSON"),
    ("truncated", "/retrieve", '{"queries": ["x"', 422, "malformed JSON"),
    ("empty-body", "/retrieve", "", 422, "malformed JSON"),
    ("not-object", "/search", '"just a string"', 422, "must be a JSON object"),
    ("null-queries", "/retrieve", '{"queries": null}', 422, "must be list"),
    ("nested-query", "/retrieve", '{"queries": [["x"]]}', 422, "queries[0] must be a string"),
    ("bool-topk", "/retrieve", '{"queries": ["x"], "topk": true}', 422, "must be int"),
    ("float-topk", "/retrieve", '{"queries": ["x"], "topk": 5.0}', 422, "must be int"),
    ("zero-topk", "/batch_search", '{"query": ["x"], "top_n": 0}', 400, "between 1 and 100"),
    ("empty-list", "/retrieve", '{"queries": []}', 400, "empty list"),
    ("surrogate-search", "/search", '{"query": ' + SURROGATE + "}", 400, "lone surrogate"),
    ("surrogate-in-text", "/search", '{"query": "who \\udfff is"}', 400, "position 4"),
    ("blank-search", "/search", '{"query": "  "}', 400, "empty query"),
    ("too-many", "/retrieve", json.dumps({"queries": ["q"] * 1025}), 413, "1025 queries"),
    ("too-long", "/retrieve", json.dumps({"queries": ["a" * 4097]}), 413, "4097 characters"),
    ("too-costly", "/retrieve", json.dumps({"queries": ["a" * 4096] * 65}), 413, "266240 query characters"),
]


@pytest.mark.parametrize("name,path,raw,status,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_payload_gets_its_4xx_with_a_reason_then_a_good_request_gets_200(server, name, path, raw, status,
                                                                                 reason):
    r = _post(server, path, raw)
    assert r.status_code == status, r.text[:300]
    assert reason in r.json()["detail"]
    ok = _post(server, "/retrieve", GOOD)
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 2


@pytest.mark.parametrize("path,raw", [
    ("/retrieve", '{"queries": ["Who directed Ed Wood?", "", ' + SURROGATE + ', "  \\t"]}'),
    ("/batch_search", '{"query": ["Who directed Ed Wood?", "", ' + SURROGATE + ', "  \\t"]}'),
])
def test_a_batch_with_blank_and_unsearchable_queries_succeeds_per_position(server, path, raw):
    r = _post(server, path, raw)
    assert r.status_code == 200, r.text
    result = r.json()["result"] if path == "/retrieve" else r.json()
    assert len(result) == 4 and len(result[0]) > 0 and result[1:] == [[], [], []]
    assert r.headers["x-rejected-queries"] == "2"


def test_docs_and_openapi_are_off_by_default(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{server}{path}", timeout=5).status_code == 404


def test_poisoned_clients_never_fail_innocent_ones(server, questions):
    """16 normal clients beside 4 that send a lone surrogate (alone in /search, inside a batch in /retrieve), for
    8 s: not one innocent request fails, and each poisoned request gets its own answer (400, or 200 with [] in
    position)."""
    import aiohttp

    duration_s, max_requests = 8.0, 4000  # per client: bounded in time and count
    innocent: list[tuple[int, int]] = []  # (status, result lists)
    poisoned: list[tuple[str, int, str]] = []

    async def normal(session, c: int) -> None:
        deadline, n = time.monotonic() + duration_s, 0
        while time.monotonic() < deadline and n < max_requests:
            # distinct queries (the cache must not hide the backend), batches of 1-3
            qs = [f"{questions[(c * 97 + n * 7 + j) % len(questions)]} {c} {n}" for j in range(1 + n % 3)]
            async with session.post(f"{server}/retrieve", json={"queries": qs, "topk": 3}) as r:
                body = await r.json()
                innocent.append((r.status, sum(len(x) > 0 for x in body["result"]) if r.status == 200 else 0))
                assert r.status != 200 or len(body["result"]) == len(qs)
            n += 1

    async def poison(session, c: int) -> None:
        deadline, n = time.monotonic() + duration_s, 0
        while time.monotonic() < deadline and n < max_requests:
            if n % 2:
                raw = '{"query": "x \\ud800 %d"}' % n
                async with session.post(f"{server}/search", data=raw,
                                        headers={"Content-Type": "application/json"}) as r:
                    poisoned.append(("search", r.status, await r.text()))
            else:
                raw = json.dumps({"queries": ["@", f"{questions[c]} {n}"], "topk": 3}).replace('"@"', SURROGATE)
                async with session.post(f"{server}/retrieve", data=raw,
                                        headers={"Content-Type": "application/json"}) as r:
                    poisoned.append(("batch", r.status, await r.text()))
            n += 1

    async def load():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(normal(session, c) for c in range(16)), *(poison(session, c) for c in range(4)))

    asyncio.run(asyncio.wait_for(load(), duration_s + 60))
    assert len(innocent) > 100 and len(poisoned) > 20  # the load really ran
    assert [s for s, _ in innocent if s != 200] == []  # 0 innocent failures
    assert all(k > 0 for _, k in innocent)  # and every innocent query found passages
    for kind, status, text in poisoned:
        if kind == "search":
            assert status == 400 and "lone surrogate" in json.loads(text)["detail"]
        else:
            result = json.loads(text)["result"]
            assert status == 200 and result[0] == [] and len(result[1]) == 3
    stats = requests.get(f"{server}/stats", timeout=5).json()
    # the batched surrogates reached the batcher and were refused there, alone (/search refuses its own up front)
    assert stats["errors"] == 0 and stats["rejected"] >= sum(kind == "batch" for kind, _, _ in poisoned)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slow_clients_are_timed_out_and_bounded_while_probes_are_answered(served):
    """300 connections that trickle their headers or their body one byte every 0.3 s, opened in a burst (far
    above --max-connections 64): the server keeps its file handles within the cap, answers every probe within 1 s,
    closes each slow connection within the read timeout (408 or closed), and logs no traceback."""
    proc, url, log = served
    host, port = url.removeprefix("http://").split(":")
    base = _open_fds(proc.pid)
    slow: list[socket.socket] = []
    stop = threading.Event()
    opened = time.monotonic()
    for i in range(300):
        s = socket.create_connection((host, int(port)), timeout=5)
        if i % 2:  # slow body: complete headers, then a body that never ends in time
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
        else:  # slow headers
            s.sendall(b"POST /retrieve HTTP/1.1\r\n")
        slow.append(s)

    def trickle() -> None:
        for _ in range(30):  # bounded: 30 rounds x 0.3 s
            if stop.wait(0.3):
                return
            for s in slow:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    time.sleep(0.3)  # the server has taken in the burst
    fds, probe_s = [], []
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            fds.append(_open_fds(proc.pid))
            t0 = time.monotonic()
            r = requests.post(f"{url}/retrieve", json={"queries": [f"Ed Wood {len(probe_s)}"], "topk": 1}, timeout=10)
            probe_s.append(time.monotonic() - t0)
            assert r.status_code == 200
            time.sleep(0.1)
        # every slow connection was closed by the server within the read timeout (plus eviction at the cap)
        for s in slow:
            s.settimeout(max(0.1, opened + HEADER_TIMEOUT_S + 3 - time.monotonic()))
            try:
                data = s.recv(4096)
                while data and b"408" not in data.split(b"\r\n", 1)[0]:
                    data = s.recv(4096)
            except ConnectionResetError:  # evicted at the cap: closed at once
                pass
            except socket.timeout:
                pytest.fail("a slow connection was still open past the read timeout")
    finally:
        stop.set()
        t.join(timeout=5)
        for s in slow:
            s.close()
    assert len(probe_s) >= 10 and max(probe_s) < 1.0, probe_s
    assert max(fds) <= base + MAX_CONNECTIONS + 16, (base, max(fds))
    time.sleep(0.5)
    text = log.read_text()
    assert "not received within" in text and "waited longest for a request" in text


def test_a_maximal_request_does_not_stall_a_normal_client(server, questions):
    """One request at the cost limit (64 queries x 4,096 characters of corpus words, a few seconds of BM25) beside a
    closed-loop client sending single questions: the large request is served in slices, so the normal client's
    worst latency stays far below the large request's time (the 2-core figure is in docs/reliability.md)."""
    words = " ".join(json.loads(line)["contents"] for line in
                     (ROOT / "data/corpus/corpus.jsonl").read_text().splitlines()[:3000]).split()
    rng = random.Random(time.time_ns())  # distinct every run: the cache must not answer it
    big = [" ".join(rng.choice(words) for _ in range(900))[:4096] for _ in range(64)]
    latencies: list[float] = []
    big_s: list[float] = []

    def send_big() -> None:
        t0 = time.monotonic()
        r = requests.post(f"{server}/retrieve", json={"queries": big, "topk": 5}, timeout=120)
        big_s.append(time.monotonic() - t0)
        assert r.status_code == 200 and len(r.json()["result"]) == 64

    t = threading.Thread(target=send_big)
    t.start()
    n = 0
    while t.is_alive() and n < 2000:
        t0 = time.monotonic()
        r = requests.post(f"{server}/retrieve", json={"queries": [f"{questions[n % len(questions)]} {n}"]},
                          timeout=60)
        latencies.append(time.monotonic() - t0)
        assert r.status_code == 200
        n += 1
    t.join(timeout=120)
    # the large request really held the backend for a while: many times a single question's median latency
    # (a fixed number of seconds would depend on the machine: 0.9 s on a fast one, several on 2 busy cores)
    median = sorted(latencies)[len(latencies) // 2] if latencies else 0.0
    assert big_s and big_s[0] > 10 * median, (big_s, median)
    # unsliced, the normal client's first request waits for the whole large one (max ≈ big_s); sliced, it waits
    # for a slice. 0.8 of big_s and the 90th percentile at half of it leave room for a scheduling spike on a busy
    # machine without letting an unsliced server pass
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    assert len(latencies) >= 5 and max(latencies) < 0.8 * big_s[0] and p90 < 0.5 * big_s[0], (
        max(latencies), p90, big_s)
