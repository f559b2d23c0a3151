"""Retriever throughput/latency benchmark: our HTTP service and actor against Search-R1's server and pyserini itself.

What it measures -- BM25 top-5 over the full shipped corpus, one index, one query sequence, one system at a time:

- (a)  ``python -m retriever_service.serve`` (FastAPI + uvicorn + ``SearchBatcher``), a subprocess on a free loopback
  port, loaded over HTTP: each client POSTs ``/retrieve`` with one query, ``topk`` 5, ``return_scores`` true.
- (b)  ``RetrieverActor`` (``start_retrievers`` on a local Ray cluster, ``threads=2``, ``num_cpus=1``), called from
  concurrent asyncio tasks on the driver, each awaiting ``actor.search.remote([query], 5)``.
- (b') the same actor called with per-turn batches (``--turn-batch`` queries per call, what a rollout worker sends per
  turn); queries/s is the figure that matters there.
- (r)  the Ray floor, run with (b): a no-op async actor called the same way, i.e. what Ray's per-call cost alone
  allows (b) on this machine.
- (c)  the baseline: Search-R1's BM25 ``retrieval_server.py`` reduced to its serving path: FastAPI, one uvicorn
  worker, a synchronous (``def``) ``POST /retrieve`` that validates with pydantic and, for each query in turn, calls
  pyserini ``LuceneSearcher.search(q, k)`` and reads each hit's document with ``searcher.doc(docid).raw()``; same
  request and response JSON as (a). Two deliberate deviations, both in the baseline's favour: no access log
  (uvicorn's default logs every request) and no ``title``/``text`` fields in the documents.
- (d)  the ceiling: in-process ``research_rl.retrieval.bm25.BM25Searcher(index, threads=2).batch_search`` over batches of
  ``--ceiling-batch`` queries (latency = one batch call), in a spawned process that nothing else competes with.

How: every client is a closed loop (a request, its answer, the next request) for ``--seconds`` per concurrency level
(``--concurrency``, default 1, 16, 64), after a ``--level-warmup`` that is not counted; each server first gets a
``--server-warmup`` at 16 clients (JIT, connection pools). Queries are never repeated within one server's lifetime, so
the LRU cache cannot help: the ~500 distinct questions of ``data/*/{train,dev,test}.jsonl``, then ``question + corpus
title`` variants in a fixed pseudo-random order, distinct by the batcher's cache key (``normalize_query``). Each
system replays the same sequence from its start. Systems run one after another; each server and the Ray cluster are
shut down before the next starts. The load generator (aiohttp, one ``ClientSession`` with a pool sized to the
concurrency, or Ray) runs in this process and shares the machine's cores with the server: "server cores" is the CPU
time of the server process (the Ray actor's worker for b/b') over the measured window, "client cores" the same for
this process (not its children), "other cores" the rest of the machine's busy CPU (Ray's daemons for b/b', or
someone else's load). On a shared machine, each system starts when other processes have been quiet for 3 s (waiting
at most ``--wait-idle`` s), and a level during which they used >= 0.25 cores is measured again (``--retries``); a row
still disturbed says so in its notes.

Goals (from the issue, for a 2-core machine): (a) >= 3x (c)'s requests/s at 64 clients, with p99 <= 50 ms; the actor
>= 80% of the ceiling's queries/s (checked for b and b' at the highest concurrency, against the best (d) row).

Run it offline from the repository root; about 5 minutes at the defaults on an idle 2-core machine, about 1.5 with
``--quick`` (longer while other processes keep the machine busy)::

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python bench/retriever.py [--quick] [--json out.json]
        [--index artifacts/bm25_index] [--systems a,b,c,d] [--seconds 10] [--concurrency 1,16,64]

The index is built with ``python -m retriever_service.build_index`` when ``--index`` holds none (or a stale one) of
``--corpus``. Exit status 1 when a system could not be run (the others are still measured and printed).

``--stall`` measures something else (docs/reliability.md): the worst latency of a normal client (a closed loop of
single distinct questions over HTTP) while one maximal request is served beside it -- ``--stall-queries`` queries of
4,096 characters of corpus words (64: the default ``--max-request-chars``), distinct every run. It runs the service
once as configured by default (slices of ``--max-batch-chars`` 8,192) and once with slicing off (``--max-batch-chars``
as large as the request), and prints both; about 1 minute::

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python bench/retriever.py --stall [--stall-queries 64]
"""

import argparse
import asyncio
import glob
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from research_rl.retrieval.batcher import normalize_query  # the batcher's cache key: what "distinct" means

REPO = Path(__file__).resolve().parent.parent
TOP_K = 5
BUSY_CORES = 0.25  # CPU used by other processes above which a measurement is disturbed
ALL_SYSTEMS = ("a", "b", "c", "d")  # b also runs b'
LABELS = {"a": "(a) HTTP service", "b": "(b) actor", "b'": "(b') actor, per-turn batches",
          "r": "(r) Ray floor: no-op actor",
          "c": "(c) baseline (Search-R1 style)", "d": "(d) ceiling: batch_search"}


# ----------------------------------------------------------------------------------------------------------- queries

def load_questions(data_dir: Path) -> list[str]:
    """Distinct (by cache key) ``question`` fields of ``data_dir/*/{train,dev,test}.jsonl``, in file order."""
    paths = sorted(p for split in ("train", "dev", "test") for p in glob.glob(str(data_dir / "*" / f"{split}.jsonl")))
    if not paths:
        raise FileNotFoundError(f"no {data_dir}/*/{{train,dev,test}}.jsonl files to take questions from")
    seen, out = set(), []
    for path in paths:
        with open(path) as f:
            for line in f:
                q = json.loads(line).get("question") if line.strip() else None
                if isinstance(q, str) and normalize_query(q) and normalize_query(q) not in seen:
                    seen.add(normalize_query(q))
                    out.append(q)
    return out


def load_titles(corpus: Path) -> list[str]:
    """Distinct passage titles of the corpus (``title`` field, else the quoted first line of ``contents``)."""
    seen, out = set(), []
    with open(corpus) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            title = row.get("title") or row.get("contents", "").split("\n")[0].strip('"')
            if title and normalize_query(title) not in seen:
                seen.add(normalize_query(title))
                out.append(title)
    return out


class QueryStream:
    """An endless-enough sequence of distinct queries: the questions, then ``question + " " + title`` variants.

    Variants are visited in a fixed pseudo-random order (a stride through all question x title pairs, coprime with
    their count), so consecutive queries do not share a title. Distinctness is by the batcher's cache key.
    """

    def __init__(self, questions: list[str], titles: list[str]):
        self.questions, self.titles = questions, titles
        self.drawn = 0
        self._seen: set[str] = set()
        self._it = self._generate()

    def _generate(self):
        yield from self.questions
        n = len(self.questions) * len(self.titles)
        stride = int(n * 0.6180339887) | 1
        while math.gcd(stride, n) != 1:
            stride += 2
        for j in range(n):
            p = (j * stride) % n
            yield f"{self.questions[p % len(self.questions)]} {self.titles[p // len(self.questions)]}"

    def take(self, n: int = 1) -> list[str]:
        out = []
        while len(out) < n:
            q = next(self._it, None)
            if q is None:  # after ~2.7M queries with the shipped data: far beyond any run
                raise RuntimeError(f"out of distinct queries after {self.drawn:,}; use fewer --seconds")
            key = normalize_query(q)
            if key not in self._seen:
                self._seen.add(key)
                out.append(q)
        self.drawn += n
        return out


def query_stream(args) -> QueryStream:
    return QueryStream(load_questions(Path(args.data)), load_titles(Path(args.corpus)))


# ------------------------------------------------------------------------------------------------------- measuring

@dataclass
class Row:
    system: str  # a, b, b', c, d
    clients: int  # concurrent closed-loop clients (d: 1)
    batch: int  # queries per request
    seconds: float
    requests: int
    requests_per_s: float
    queries_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cores: float
    client_cores: float
    other_cores: float  # the rest of the machine's busy CPU: other processes (another load, Ray's daemons)
    notes: dict = field(default_factory=dict)


class CpuMeter:
    """CPU seconds (user + system) between ``start()`` and ``cores()``: of a process and, with ``children``, its
    descendants; of the whole machine with ``pid=-1``."""

    def __init__(self, pid: int | None, children: bool = True):
        import psutil

        self.machine = pid == -1
        self.proc = None if self.machine else psutil.Process(pid) if pid else psutil.Process()
        self.children = children

    def _cpu(self) -> float:
        import psutil

        if self.machine:
            t = psutil.cpu_times()
            return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        total = 0.0
        for p in [self.proc, *(self.proc.children(recursive=True) if self.children else [])]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 -- a child that exited meanwhile
                pass
        return total

    def start(self) -> None:
        self._t0, self._c0 = time.perf_counter(), self._cpu()

    def cores(self) -> float:
        return (self._cpu() - self._c0) / max(time.perf_counter() - self._t0, 1e-9)


async def closed_loop(call, stream: QueryStream, clients: int, batch: int, seconds: float) -> dict:
    """``clients`` tasks, each awaiting ``call(queries)`` back to back with ``batch`` fresh queries, for ``seconds``.

    Returns ``latencies`` (s, successful requests), ``errors`` (messages of failed ones) and ``elapsed`` (s, until
    the last request finished). A client pauses 10 ms after a failure, so that a dead server is not hammered.
    """
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client():
        while time.perf_counter() < deadline:
            queries = stream.take(batch)
            t0 = time.perf_counter()
            try:
                await call(queries)
            except Exception as e:  # noqa: BLE001 -- counted and reported, the load goes on
                errors.append(f"{type(e).__name__}: {e}"[:300])
                await asyncio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies": latencies, "errors": errors, "elapsed": time.perf_counter() - t0}


def make_row(system: str, clients: int, batch: int, out: dict, server_cores: float, client_cores: float,
             machine_cores: float, notes: dict | None = None) -> Row:
    lat_ms = np.asarray(out["latencies"]) * 1000
    n, elapsed = len(lat_ms), out["elapsed"]
    notes = dict(notes or {})
    if out["errors"]:
        notes["first_error"] = out["errors"][0]
    return Row(system, clients, batch, round(elapsed, 2), n, n / elapsed, n * batch / elapsed,
               float(np.percentile(lat_ms, 50)) if n else float("nan"),
               float(np.percentile(lat_ms, 99)) if n else float("nan"),
               len(out["errors"]), server_cores, client_cores,
               max(machine_cores - server_cores - (0 if math.isnan(client_cores) else client_cores), 0.0), notes)


async def run_levels(system: str, call, stream: QueryStream, args, server_pid: int | None, batch: int = 1,
                     server_warmup: bool = True, after_level=None) -> list[Row]:
    """Server warm-up, then per concurrency level: warm-up (not counted), the measured closed loop, one Row."""
    if server_warmup:
        await closed_loop(call, stream, 16, batch, args.server_warmup)
    rows = []
    server, client, machine = CpuMeter(server_pid), CpuMeter(None, children=False), CpuMeter(-1)
    for clients in args.concurrency:
        for attempt in range(args.retries + 1):
            await closed_loop(call, stream, clients, batch, args.level_warmup)
            server.start(), client.start(), machine.start()
            out = await closed_loop(call, stream, clients, batch, args.seconds)
            row = make_row(system, clients, batch, out, server.cores(), client.cores(), machine.cores())
            if after_level is not None:
                row.notes.update(await after_level())
            if not retry_disturbed(row, attempt, args):
                break
        rows.append(row)
        print(f"  {format_row(row)}", flush=True)
    return rows


def retry_disturbed(row: Row, attempt: int, args) -> bool:
    """True when other processes disturbed ``row`` and a retry is left (after waiting for quiet); marks a
    disturbed row that is kept in its notes."""
    if row.other_cores < BUSY_CORES:
        return False
    if attempt < args.retries:
        print(f"  ({LABELS[row.system]}, {row.clients} clients: other processes used {row.other_cores:.2f} cores; "
              f"waiting up to {args.wait_idle:g} s for quiet, then measuring again)", flush=True)
        wait_idle(args.wait_idle)
        return True
    row.notes["disturbed"] = f"other processes used {row.other_cores:.2f} cores"
    return False


# ------------------------------------------------------------------------------------------------------- HTTP load

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive, timeout_s: float, log_path: str | None = None) -> None:
    """Poll ``GET url/health`` until 200; raise (with the server log's tail) if the server dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server exited before {url}/health answered{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:g} s{_tail(log_path)}")


def _tail(log_path: str | None, lines: int = 20) -> str:
    if not log_path or not os.path.exists(log_path):
        return ""
    text = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return "; server log tail:\n    " + "\n    ".join(text)


def _check_result(payload: dict, n: int) -> None:
    result = payload["result"]
    if len(result) != n:
        raise ValueError(f"{len(result)} result lists for {n} queries")
    for hits in result:
        if len(hits) > TOP_K:
            raise ValueError(f"{len(hits)} hits for topk {TOP_K}")
        for h in hits[:1]:
            if not isinstance(h["document"]["contents"], str) or not isinstance(h["score"], float):
                raise ValueError(f"unexpected hit {str(h)[:200]}")


async def http_levels(system: str, url: str, stream: QueryStream, args, server_pid: int,
                      stats_path: str | None = None) -> list[Row]:
    import aiohttp

    rows: list[Row] = []
    headers = {"Content-Type": "application/json"}
    counters: dict = {}  # the service's /stats counters at the end of the previous level
    for i, clients in enumerate([16, *args.concurrency]):
        # one session per level, its pool sized to the level's concurrency (warm-up opens the connections);
        # the first, at 16 clients, is the server's warm-up
        connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def call(queries: list[str]) -> None:
                body = json.dumps({"queries": queries, "topk": TOP_K, "return_scores": True}).encode()
                async with session.post(f"{url}/retrieve", data=body, headers=headers) as r:
                    raw = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {raw[:200]!r}")
                _check_result(json.loads(raw), len(queries))

            async def after_level() -> dict:
                if not stats_path:
                    return {}
                async with session.get(f"{url}{stats_path}") as r:
                    s = await r.json() if r.status == 200 else {}
                # the service's counters cover its lifetime: difference them between levels (warm-up included)
                d = {k: s.get(k, 0) - counters.get(k, 0) for k in ("batches", "batched_queries", "hits", "lookups")}
                counters.update(s)
                return {"batch_size": round(d["batched_queries"] / max(d["batches"], 1), 2),
                        "cache_hit_rate": round(d["hits"] / max(d["lookups"], 1), 4)} if s else {}

            if i == 0:
                await closed_loop(call, stream, clients, 1, args.server_warmup)
                await after_level()  # counters from here on
                continue
            level_args = argparse.Namespace(**{**vars(args), "concurrency": [clients]})
            rows += await run_levels(system, call, stream, level_args, server_pid, server_warmup=False,
                                     after_level=after_level)
    rows[-1].notes["queries_drawn"] = stream.drawn
    return rows


def run_http_service(args) -> list[Row]:
    """(a): ``python -m retriever_service.serve`` in a subprocess."""
    port = free_port()
    cmd = [sys.executable, "-m", "retriever_service.serve", "--index", args.index, "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(args.threads)]
    for flag in ("max_wait_ms", "max_batch_size"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    with tempfile.NamedTemporaryFile("w", prefix="bench-serve-", suffix=".log", delete=False) as log:
        log_path = log.name
    print(f"  $ {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url, started = f"http://127.0.0.1:{port}", False
    try:
        wait_healthy(url, lambda: proc.poll() is None, args.startup_timeout, log_path)  # raises with the log's tail
        started = True
        return asyncio.run(http_levels("a", url, query_stream(args), args, proc.pid, stats_path="/stats"))
    finally:
        # SIGINT: uvicorn shuts down cleanly (SIGTERM reaches the JVM's handler, which exits at once)
        stop_process(lambda: proc.send_signal(signal.SIGINT), proc.kill, lambda t: proc.wait(t))
        if started and proc.returncode not in (0, -2, -15, 130, 143, None):
            print(f"  server exit status {proc.returncode}{_tail(log_path)}", flush=True)


def run_stall(args) -> int:
    """``--stall``: a normal client's latency beside one maximal request, with and without slicing (docstring)."""
    import random
    import threading

    words = " ".join(json.loads(line)["contents"] for line in open(args.corpus) if line.strip()).split()
    rng = random.Random(time.time_ns())
    questions = load_questions(Path(args.data))
    chars = args.stall_queries * 4096
    cases = [("sliced (default --max-batch-chars 8192)", []),
             (f"not sliced (--max-batch-chars {chars})", ["--max-batch-chars", str(chars)])]
    print(f"one request of {args.stall_queries} x 4,096 characters ({chars:,}) beside a closed-loop client of single "
          f"questions; {os.cpu_count()} CPUs")
    for label, extra in cases:
        port = free_port()
        cmd = [sys.executable, "-m", "retriever_service.serve", "--index", args.index, "--port", str(port),
               "--threads", str(args.threads), "--max-request-chars", str(max(chars, 262144)), *extra]
        with tempfile.NamedTemporaryFile("w", prefix="bench-stall-", suffix=".log", delete=False) as log:
            log_path = log.name
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, lambda: proc.poll() is None, args.startup_timeout, log_path)

            def post(queries: list[str], timeout: float = 300) -> float:
                body = json.dumps({"queries": queries, "topk": TOP_K}).encode()
                req = urllib.request.Request(f"{url}/retrieve", data=body, headers={"Content-Type": "application/json"})
                t0 = time.perf_counter()
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    if r.status != 200 or len(json.loads(r.read())["result"]) != len(queries):
                        raise RuntimeError(f"HTTP {r.status} from {url}/retrieve")
                return time.perf_counter() - t0

            for i in range(20):  # warm-up: JIT, connection
                post([f"{questions[i]} warm-up"])
            big = [" ".join(rng.choice(words) for _ in range(900))[:4096] for _ in range(args.stall_queries)]
            big_s: list[float] = []
            thread = threading.Thread(target=lambda: big_s.append(post(big)))
            thread.start()
            latencies, n = [], 0
            while thread.is_alive() and n < 100_000:
                latencies.append(post([f"{questions[n % len(questions)]} {n}"]))
                n += 1
            thread.join()
            lat = np.asarray(latencies) * 1000
            print(f"  {label:<42} large request {big_s[0]:6.2f} s; normal client: {len(lat)} requests, "
                  f"p50 {np.percentile(lat, 50):7.1f} ms, p99 {np.percentile(lat, 99):7.1f} ms, "
                  f"worst {lat.max():7.1f} ms", flush=True)
        finally:
            stop_process(lambda: proc.send_signal(signal.SIGINT), proc.kill, lambda t: proc.wait(t))
    return 0


def stop_process(terminate, kill, wait) -> None:
    terminate()
    try:
        wait(15)
    except Exception:  # noqa: BLE001 -- subprocess.TimeoutExpired or a multiprocessing wait that returned None
        kill()
        wait(15)


# ------------------------------------------------------------------------------------------------- (c) baseline

def serve_baseline(index_dir: str, port: int) -> None:
    """Search-R1's BM25 ``retrieval_server.py`` serving path (see the module docstring); runs until terminated."""
    import research_rl.retrieval.bm25  # noqa: F401 -- prepares Java before pyserini/jnius are imported

    from typing import List, Optional

    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from pyserini.search.lucene import LuceneSearcher

    searcher = LuceneSearcher(index_dir)

    class QueryRequest(BaseModel):
        queries: List[str]
        topk: Optional[int] = None
        return_scores: bool = False

    app = FastAPI()

    def _search(query: str, num: int):
        hits = searcher.search(query, num)
        if len(hits) < 1:
            return [], []
        scores = [hit.score for hit in hits]
        hits = hits[:num]
        contents = [json.loads(searcher.doc(hit.docid).raw())["contents"] for hit in hits]
        return [{"id": hit.docid, "contents": c} for hit, c in zip(hits, contents)], scores

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/retrieve")
    def retrieve_endpoint(request: QueryRequest):  # def, not async: FastAPI runs it on its thread pool
        if not request.topk:
            request.topk = TOP_K
        results, scores = [], []
        for query in request.queries:  # one query at a time, as Search-R1's BM25Retriever._batch_search
            docs, s = _search(query, request.topk)
            results.append(docs)
            scores.append(s)
        resp = []
        for i, single in enumerate(results):
            if request.return_scores:
                resp.append([{"document": doc, "score": score} for doc, score in zip(single, scores[i])])
            else:
                resp.append(single)
        return {"result": resp}

    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


def run_baseline(args) -> list[Row]:
    """(c): ``serve_baseline`` in a spawned process."""
    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=serve_baseline, args=(args.index, port), daemon=True)
    proc.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc.is_alive, args.startup_timeout)
        return asyncio.run(http_levels("c", url, query_stream(args), args, proc.pid))
    finally:
        stop_process(proc.terminate, proc.kill, lambda t: proc.join(t) if proc.is_alive() else None)


# ------------------------------------------------------------------------------------------------------ (b) actor

def run_actor(args) -> list[Row]:
    """(b) and (b'): one ``RetrieverActor`` on a local Ray cluster, called from asyncio tasks on this driver."""
    import ray

    from research_rl.config.schema import RetrieverConfig
    from research_rl.roles.retriever_actor import start_retrievers

    overrides = {k: getattr(args, k) for k in ("max_wait_ms", "max_batch_size") if getattr(args, k) is not None}
    cfg = RetrieverConfig(index_dir=args.index, top_k=TOP_K, threads=args.threads, num_cpus=1, **overrides)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="warning", log_to_driver=True)
    try:
        (actor,) = start_retrievers(cfg, None)
        ray.get(actor.ready.remote(), timeout=args.startup_timeout)
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        stream = query_stream(args)  # one actor, one cache: b and b' share the sequence

        async def call(queries: list[str]) -> None:
            result = await actor.search.remote(queries, TOP_K)
            if len(result) != len(queries):
                raise ValueError(f"{len(result)} result lists for {len(queries)} queries")

        async def after_level() -> dict:
            s = await actor.stats.remote(True)  # window since the last reset: this level (+ its warm-up)
            return {"batch_size": round(s["batch_size"], 2), "cache_hit_rate": round(s["cache_hit_rate"], 4)}

        async def both() -> list[Row]:
            rows = await run_levels("b", call, stream, args, pid, after_level=after_level)
            await actor.stats.remote(True)
            return rows + await run_levels("b'", call, stream, args, pid, batch=args.turn_batch,
                                           server_warmup=False, after_level=after_level)

        rows = asyncio.run(both())
        rows[-1].notes["queries_drawn"] = stream.drawn
        ray.kill(actor)
        return rows + run_ray_floor(args, stream)
    finally:
        ray.shutdown()


def run_ray_floor(args, stream: QueryStream) -> list[Row]:
    """(r): what Ray alone costs per call -- an async actor whose ``search`` returns empty lists at once, called
    exactly as (b) calls the retriever. (b) cannot pass this line however fast the search."""
    import ray

    @ray.remote
    class NoOp:
        async def search(self, queries, k):
            return [[] for _ in queries]

        def pid(self):
            return os.getpid()

    actor = NoOp.options(num_cpus=1).remote()
    pid = ray.get(actor.pid.remote())

    async def call(queries: list[str]) -> None:
        await actor.search.remote(queries, TOP_K)

    return asyncio.run(run_levels("r", call, stream, args, pid))


# ---------------------------------------------------------------------------------------------------- (d) ceiling

def ceiling_worker(args_dict: dict) -> list[dict]:
    """In a spawned process: ``BM25Searcher.batch_search`` over batches of distinct queries, per batch size."""
    from research_rl.retrieval.bm25 import BM25Searcher

    args = argparse.Namespace(**args_dict)
    searcher = BM25Searcher(args.index, threads=args.threads)
    stream = query_stream(args)
    rows = []
    meter, machine = CpuMeter(None), CpuMeter(-1)
    for i, batch in enumerate(args.ceiling_batch):
        for attempt in range(args.retries + 1):
            warm = args.server_warmup + args.level_warmup if i == attempt == 0 else args.level_warmup
            for seconds in (warm, args.seconds):  # the warm-up's figures are overwritten by the measurement's
                latencies, deadline = [], time.perf_counter() + seconds
                meter.start(), machine.start()
                t0 = time.perf_counter()
                while time.perf_counter() < deadline:
                    queries = stream.take(batch)
                    t = time.perf_counter()
                    results = searcher.batch_search(queries, TOP_K)
                    latencies.append(time.perf_counter() - t)
                    assert len(results) == len(queries)
                out = {"latencies": latencies, "errors": [], "elapsed": time.perf_counter() - t0}
            row = make_row("d", 1, batch, out, meter.cores(), float("nan"), machine.cores())
            if not retry_disturbed(row, attempt, args):
                break
        rows.append(asdict(row))
    rows[-1]["notes"]["queries_drawn"] = stream.drawn
    return rows


def run_ceiling(args) -> list[Row]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [Row(**r) for r in pool.submit(ceiling_worker, vars(args)).result()]
    for row in rows:
        print(f"  {format_row(row)}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- reporting

HEADER = (f"{'system':<31}{'clients':>8}{'batch':>6}{'requests/s':>12}{'queries/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'server cores':>14}{'client cores':>14}{'other cores':>13}")


def _num(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_row(r: Row) -> str:
    return (f"{LABELS[r.system]:<31}{r.clients:>8}{r.batch:>6}{_num(r.requests_per_s, ',.0f'):>12}"
            f"{_num(r.queries_per_s, ',.0f'):>11}{_num(r.p50_ms, '.1f'):>9}{_num(r.p99_ms, '.1f'):>9}{r.errors:>8}"
            f"{_num(r.server_cores, '.2f'):>14}{_num(r.client_cores, '.2f'):>14}{_num(r.other_cores, '.2f'):>13}")


def goal_checks(rows: list[Row], top: int) -> list[dict]:
    def find(system: str, clients: int | None = None) -> list[Row]:
        return [r for r in rows if r.system == system and (clients is None or r.clients == clients)]

    goals = []
    a, c = find("a", top), find("c", top)
    if a and c:
        ratio = a[0].requests_per_s / c[0].requests_per_s
        goals.append({"goal": f"HTTP service >= 3x baseline requests/s at {top} clients",
                      "measured": f"{a[0].requests_per_s:,.0f} / {c[0].requests_per_s:,.0f} = {ratio:.2f}x",
                      "value": ratio, "pass": ratio >= 3})
    if a:
        goals.append({"goal": f"HTTP service p99 <= 50 ms at {top} clients", "measured": f"{a[0].p99_ms:.1f} ms",
                      "value": a[0].p99_ms, "pass": a[0].p99_ms <= 50})
    d = find("d")
    if d:
        best = max(d, key=lambda r: r.queries_per_s)
        for system in ("b", "b'"):
            for r in find(system, top):
                ratio = r.queries_per_s / best.queries_per_s
                goals.append({"goal": f"{LABELS[system]} >= 80% of the ceiling's queries/s at {top} clients",
                              "measured": f"{r.queries_per_s:,.0f} / {best.queries_per_s:,.0f} (batch {best.batch}) "
                                          f"= {ratio:.0%}", "value": ratio, "pass": ratio >= 0.8})
    return goals


# ----------------------------------------------------------------------------------------------------------- main

def wait_idle(max_wait_s: float, busy_cores: float = BUSY_CORES, quiet_s: float = 3.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``busy_cores`` for ``quiet_s`` in a row; returns
    the busy cores of the last ``quiet_s`` (this process is idle meanwhile, so that is everyone else's load)."""
    machine = CpuMeter(-1)
    deadline = time.monotonic() + max_wait_s
    while True:
        machine.start()
        time.sleep(quiet_s)
        busy = machine.cores()
        if busy < busy_cores or time.monotonic() >= deadline:
            return busy


def ensure_index(args) -> None:
    """Build ``args.index`` from ``args.corpus`` unless its manifest names that corpus's sha256 (exit on failure)."""
    from research_rl.retrieval.index import corpus_sha256, read_manifest

    try:
        if read_manifest(args.index).get("corpus_sha256") == corpus_sha256(args.corpus):
            return
    except (FileNotFoundError, ValueError):
        pass
    cmd = [sys.executable, "-m", "retriever_service.build_index", "--corpus", args.corpus, "--kind", "bm25",
           "--out", args.index]
    print(f"building the index: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        sys.exit(f"error: building the index at {args.index} failed (see above)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--index", default="artifacts/bm25_index", help="BM25 index directory (built if missing)")
    p.add_argument("--corpus", default="data/corpus/corpus.jsonl", help="corpus the index is built from")
    p.add_argument("--data", default="data", help="directory holding */{train,dev,test}.jsonl with questions")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset of a,b,c,d (b runs b')")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated closed-loop client counts")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--level-warmup", type=float, default=1.0, help="uncounted seconds before each level")
    p.add_argument("--server-warmup", type=float, default=5.0, help="uncounted seconds at 16 clients per server")
    p.add_argument("--turn-batch", type=int, default=8, help="queries per actor call in (b')")
    p.add_argument("--ceiling-batch", default="64,256", help="comma-separated batch sizes for (d)")
    p.add_argument("--threads", type=int, default=2, help="pyserini batch_search threads in (a), (b), (d)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="batcher max_wait_ms in (a) and (b); None: their defaults")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="batcher max_batch_size in (a) and (b); None: their defaults")
    p.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local Ray cluster in (b)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for a server to become ready")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each system and each retry, wait up to this many seconds for other processes to "
                        "go idle (0: do not wait)")
    p.add_argument("--retries", type=int, default=2,
                   help="measure a level again when other processes used >= 0.25 cores meanwhile, at most this often")
    p.add_argument("--json", default=None, help="also write the rows and goal checks here as JSON")
    p.add_argument("--stall", action="store_true",
                   help="measure a normal client's worst latency beside one maximal request instead (docstring)")
    p.add_argument("--stall-queries", type=int, default=64, help="queries of 4,096 characters in that request")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~1.5 min): 2 s per level, short warm-ups; too short for the JIT to settle, so its "
                        "figures do not judge the goals")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.level_warmup, args.server_warmup = 2.0, 0.5, 1.0
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.ceiling_batch = [int(x) for x in args.ceiling_batch.split(",")]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        p.error(f"--systems: unknown {sorted(unknown)}; expected a subset of {','.join(ALL_SYSTEMS)}")
    if min(args.concurrency) < 1 or args.turn_batch < 1 or min(args.ceiling_batch) < 1:
        p.error("--concurrency, --turn-batch and --ceiling-batch values must be >= 1")
    # children (serve subprocess, spawned processes) resolve these from the repository root
    for name in ("index", "corpus", "data"):
        setattr(args, name, str((Path.cwd() / getattr(args, name)).resolve()))
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    ensure_index(args)
    if args.stall:
        return run_stall(args)
    stream = query_stream(args)
    print(f"index {args.index}; BM25 top-{TOP_K}; queries: {len(stream.questions)} distinct questions, then "
          f"question + title variants over {len(stream.titles):,} titles (never repeated within a server)")
    print(f"levels: {args.concurrency} clients x {args.seconds:g} s (+{args.level_warmup:g} s warm-up each, "
          f"+{args.server_warmup:g} s per server); {os.cpu_count()} CPUs\n", flush=True)

    runners = {"d": run_ceiling, "c": run_baseline, "a": run_http_service, "b": run_actor}
    rows: list[Row] = []
    failed: dict[str, str] = {}
    for system in ("d", "c", "a", "b"):  # one at a time; each stops its server before the next starts
        if system not in args.systems:
            continue
        busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")
        print(f"{LABELS[system]} ... (other processes busy: {_num(busy, '.2f')} cores"
              f"{'; results will be noisy' if busy >= BUSY_CORES else ''})", flush=True)
        try:
            rows += runners[system](args)
        except Exception as e:  # noqa: BLE001 -- report it, measure the others
            failed[system] = f"{type(e).__name__}: {e}"
            # RuntimeError: this script's own checks, whose message says it all
            trace = "" if isinstance(e, RuntimeError) else "\n" + traceback.format_exc()
            print(f"  FAILED: {failed[system]}{trace}", flush=True)

    order = {"a": 0, "b": 1, "b'": 2, "r": 3, "c": 4, "d": 5}
    rows.sort(key=lambda r: (order[r.system], r.clients, r.batch))
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    notes = [(r, r.notes) for r in rows if r.notes]
    if notes:
        print("\nnotes (batch_size: mean queries per backend call in the level and its warm-up; cache_hit_rate: "
              "0 expected, the queries are distinct; queries_drawn: distinct queries the system was sent):")
        for r, n in notes:
            print(f"  {LABELS[r.system]:<31} clients {r.clients:>3} batch {r.batch:>3}: "
                  + ", ".join(f"{k}={v}" for k, v in n.items()))
    drawn = [r.notes["queries_drawn"] for r in rows if "queries_drawn" in r.notes]
    if drawn:
        print(f"\ndistinct queries: {len(stream.questions)} questions + variants; at most {max(drawn):,} sent to one "
              f"system, none repeated within a system")
    goals = goal_checks(rows, max(args.concurrency))
    print("\ngoals:")
    for g in goals:
        print(f"  [{'PASS' if g['pass'] else 'FAIL'}] {g['goal']}: {g['measured']}")
    for system, why in failed.items():
        print(f"  [n/a ] {LABELS[system]} did not run: {why.splitlines()[0]}")
    if args.json:
        def finite(x):  # NaN (a figure that does not apply) -> null: keep the file strict JSON
            return None if isinstance(x, float) and math.isnan(x) else x

        Path(args.json).write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k != "json"}, "cpu_count": os.cpu_count(),
            "rows": [{k: finite(v) for k, v in asdict(r).items()} for r in rows], "goals": goals, "failed": failed},
            indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
