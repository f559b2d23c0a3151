"""HTTP retrieval service: ``python -m retriever_service.serve --index DIR [--port 8000] [--host 127.0.0.1]``.

One index, two faces (docs/architecture.md). This is the HTTP face of the index the ``RetrieverActor`` serves. It uses
the same ``Retriever`` core and the same cross-request ``SearchBatcher`` (micro-batching on one owner thread, LRU
cache), on FastAPI + uvicorn (uvloop/httptools). Async endpoints await the batcher, so the event loop never blocks
on a search.

It speaks existing clients' APIs exactly:

- Search-R1 ``POST /retrieve`` ``{"queries": [str], "topk": int, "return_scores": bool}`` →
  ``{"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}`` with scores, or
  ``{"result": [[{"id", "contents"}, ...], ...]}`` without. ``topk`` defaults to the server's ``--top-k`` and
  ``return_scores`` to false. Search-R1's own server answers HTTP 500 without ``return_scores: true``; this one does
  not.
- ReSearch (FlashRAG) ``POST /batch_search`` ``{"query": [str], "top_n": int = 10, "return_score": bool = false}`` →
  ``[[{"id", "contents"}, ...], ...]``, or ``[documents, scores]`` with ``return_score``. ``POST /search`` takes
  ``{"query": str, ...}`` and answers ``[{"id", "contents"}, ...]``, or ``[documents, scores]``.
- ``GET /health`` → ``{"status": "ok", "kind", "passages", "index", ...}``. ``GET /stats`` → the batcher's counters
  (requests, cache hit rate, batch size, p50/p99 latency since start).

Passages come back in descending score. Failures are per query (docs/reliability.md):

- In ``/retrieve`` and ``/batch_search`` (batch requests, any length), an empty or blank query, or one that cannot be
  searched (not valid Unicode text such as a lone surrogate, or refused by the backend), gets an empty result list in
  its position; the batch succeeds, and the header ``X-Rejected-Queries`` lists the positions refused as unsearchable.
  Search-R1's client sends ``""`` inside a batch when the model writes ``<search> </search>``.
- In ``/search`` (one query) such a query is refused with 400 and the reason.
- No query fails another request's queries: the batcher searches a failed batch again query by query.

Bad input is refused with a JSON ``{"detail": reason}`` and the server keeps serving:

- 422: malformed JSON (also: nested deeper than 32 levels, a number over 32 digits, ``NaN``/``Infinity``), a body that
  is not an object, a missing field, a wrong type (non-string query, non-integer ``topk``, non-boolean flag).
- 400: an empty query list, ``topk`` < 1 or above ``--max-top-k``; in ``/search``, an empty, blank or unsearchable
  query.
- 413: a body over ``--max-body-bytes``, more than ``--max-queries`` queries, a query over ``--max-query-chars``, or
  more than ``--max-request-chars`` characters in all the request's queries (its cost).
- 408: the request line and headers not received within ``--header-timeout-s`` (of the connection opening or the
  previous response), or the body within ``--body-timeout-s``; 431: headers over ``--max-header-bytes``
  (``retriever_service.connections``).
- 504: no answer within ``--request-timeout-s``. 503: the backend failed on a query (the server's fault).

A connection past ``--max-connections`` closes the one that has waited longest for a request; idle keep-alive
connections close after ``--keep-alive-s``. A large request is served in slices of at most ``--max-batch-chars``
characters, interleaved with other clients' queries. FastAPI's ``/docs`` and ``/openapi.json`` are off unless
``--docs``.

Bound to 127.0.0.1 unless ``--host`` says otherwise: the service has no authentication.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import re
import sys
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from research_rl.retrieval.batcher import QueryRejected, RetrievalError, SearchBatcher, check_query
from research_rl.retrieval.index import Passage
from research_rl.retrieval.retriever import Retriever
from retriever_service.connections import ConnectionLimits, guarded_protocol

log = logging.getLogger("retriever_service")

MAX_JSON_DEPTH = 32  # the APIs need 2 levels
MAX_NUMBER_CHARS = 32  # digits of one JSON number
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


@dataclass(frozen=True)
class Limits:
    """Request limits; a request over one is refused with 400/413 (see module docstring)."""

    max_queries: int = 1024  # per request
    max_query_chars: int = 4096
    max_request_chars: int = 262144  # all of a request's queries together: its cost
    max_top_k: int = 100
    max_body_bytes: int = 8 << 20
    request_timeout_s: float = 30.0


class BadRequest(Exception):
    """A refused request: HTTP ``status`` with a reason for the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class ClientGone(Exception):
    """The client disconnected before its request was read in full."""


def _field(body: dict, name: str, kind: type, default=None, required: bool = False):
    if name not in body:
        if required:
            raise BadRequest(422, f"missing field {name!r}")
        return default
    value = body[name]
    # bool is an int subclass: refuse true/false for an integer field, and 1/0 for a boolean one
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(422, f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _check_queries(queries: list, field: str, limits: Limits) -> list[str]:
    """Shape and size checks of a query list (empty and unsearchable queries pass: they are answered per query)."""
    if not queries:
        raise BadRequest(400, f"field {field!r} is an empty list")
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"{len(queries)} queries in one request; the limit is {limits.max_queries}")
    total = 0
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise BadRequest(422, f"{field}[{i}] must be a string, got {type(q).__name__}")
        if len(q) > limits.max_query_chars:
            raise BadRequest(413, f"{field}[{i}] has {len(q)} characters; the limit is {limits.max_query_chars}")
        total += len(q)
    if total > limits.max_request_chars:
        raise BadRequest(413, f"{total} query characters in one request; the limit is {limits.max_request_chars} "
                              f"(--max-request-chars)")
    return queries


def _check_top_k(k: int, field: str, limits: Limits) -> int:
    if not 1 <= k <= limits.max_top_k:
        raise BadRequest(400, f"field {field!r} must be between 1 and {limits.max_top_k}, got {k}")
    return k


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # the common case: cannot be deeper than that
        return 0
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (bare == ord("[")).astype(np.int32) + (bare == ord("{")) - (bare == ord("]")) - (bare == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise BadRequest(422, f"malformed JSON: a number of {len(text)} characters; at most {MAX_NUMBER_CHARS}")
        return kind(text)
    return parse


def _constant(name: str):
    raise BadRequest(422, f"malformed JSON: {name} is not a JSON value")


def parse_json(raw: bytes):
    """Parse a request body with bounded cost: nesting depth at most ``MAX_JSON_DEPTH``, numbers at most
    ``MAX_NUMBER_CHARS`` characters, no ``NaN``/``Infinity``.

    Raises:
        BadRequest: 422 with the reason, for anything that is not such JSON (never ``RecursionError`` or the
            ``ValueError`` of an over-long integer).
    """
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(422, f"malformed JSON: nested {depth} levels deep; at most {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw, parse_int=_number(int), parse_float=_number(float), parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(422, f"malformed JSON: {e}") from None
    except RecursionError:  # unreachable after the depth check; kept so that no parse error is ever a 500
        raise BadRequest(422, "malformed JSON: nested too deeply") from None


def _document(p: Passage) -> dict:
    return {"id": p.id, "contents": p.contents}


def _error(status: int, detail: str) -> Response:
    # ASCII JSON: a reason may quote the client's text, lone surrogates included
    return Response(json.dumps({"detail": detail}).encode(), status_code=status, media_type="application/json")


def create_app(batcher: SearchBatcher, info: dict, default_top_k: int = 5, limits: Limits = Limits(),
               docs: bool = False):
    """The FastAPI application over a running ``SearchBatcher``.

    Args:
        batcher: the batching core; its backend is the index's ``Retriever.search``.
        info: what ``GET /health`` reports besides ``status`` (e.g. kind, passages, index).
        default_top_k: ``topk`` of a ``/retrieve`` request that gives none.
        limits: request limits.
        docs: serve FastAPI's ``/docs``, ``/redoc`` and ``/openapi.json`` (off: they describe no real schema, and
            an unauthenticated service should show no more than it must).
    """
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="research-rl retriever", description=__doc__.split("\n\n")[1], lifespan=lifespan,
                  **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))

    def ok(payload, rejected: dict[int, str] | None = None) -> Response:
        headers = {"X-Rejected-Queries": ",".join(map(str, rejected))} if rejected else None
        return Response(json.dumps(payload, ensure_ascii=False).encode(), media_type="application/json",
                        headers=headers)

    async def parse(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise BadRequest(413, f"request body of {size} bytes; the limit is {limits.max_body_bytes}")
        chunks, received = [], 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limits.max_body_bytes:
                    raise BadRequest(413, f"request body over {limits.max_body_bytes} bytes; the limit is "
                                          f"{limits.max_body_bytes}")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone(f"client disconnected after {received} bytes of its request body") from None
        body = parse_json(b"".join(chunks))
        if not isinstance(body, dict):
            raise BadRequest(422, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    async def search(queries: list[str], k: int) -> tuple[list[list[Passage]], dict[int, str]]:
        """Each query's passages ([] for a blank or rejected one) and the reasons of those rejected as
        unsearchable, by position."""
        try:
            outcomes = await asyncio.wait_for(batcher.search_each(queries, k), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(504, f"no answer within {limits.request_timeout_s:g} s") from None
        failed = next((r for r in outcomes if isinstance(r, RetrievalError) and not isinstance(r, QueryRejected)),
                      None)
        if failed is not None:
            raise BadRequest(503, str(failed))
        rejected = {i: str(r) for i, r in enumerate(outcomes) if isinstance(r, QueryRejected)}
        return [[] if i in rejected else r for i, r in enumerate(outcomes)], rejected

    @app.exception_handler(BadRequest)
    async def refused(request: Request, e: BadRequest):
        if e.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, e.status, e.detail)
        return _error(e.status, e.detail)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone):
        client = f"{request.client.host}:{request.client.port}" if request.client else "client"
        log.warning("%s %s from %s: %s", request.method, request.url.path, client, e)
        return _error(400, str(e))  # never delivered: the connection is gone

    @app.get("/health")
    async def health():
        return {"status": "ok", **info}

    @app.get("/stats")
    async def stats():
        s = batcher.stats(reset=False)  # never reset here: the window is the server's lifetime
        s.pop("latencies_ms")
        return s

    @app.post("/retrieve")
    async def retrieve(request: Request):
        """Search-R1 API."""
        body = await parse(request)
        queries = _check_queries(_field(body, "queries", list, required=True), "queries", limits)
        k = _check_top_k(_field(body, "topk", int, default_top_k), "topk", limits)
        scores = _field(body, "return_scores", bool, False)
        results, rejected = await search(queries, k)
        if scores:
            return ok({"result": [[{"document": _document(p), "score": p.score} for p in ps] for ps in results]},
                      rejected)
        return ok({"result": [[_document(p) for p in ps] for ps in results]}, rejected)

    @app.post("/batch_search")
    async def batch_search(request: Request):
        """ReSearch (FlashRAG) API, a batch of queries."""
        body = await parse(request)
        queries = _check_queries(_field(body, "query", list, required=True), "query", limits)
        k = _check_top_k(_field(body, "top_n", int, 10), "top_n", limits)
        return_score = _field(body, "return_score", bool, False)
        results, rejected = await search(queries, k)
        docs = [[_document(p) for p in ps] for ps in results]
        if return_score:
            return ok([docs, [[p.score for p in ps] for ps in results]], rejected)
        return ok(docs, rejected)

    @app.post("/search")
    async def search_one(request: Request):
        """ReSearch (FlashRAG) API, one query."""
        body = await parse(request)
        query = _field(body, "query", str, required=True)
        _check_queries([query], "query", limits)
        if not query.strip():
            raise BadRequest(400, "field 'query' is an empty query")
        reason = check_query(query)
        if reason is not None:
            raise BadRequest(400, f"field 'query': {reason}")
        k = _check_top_k(_field(body, "top_n", int, 10), "top_n", limits)
        return_score = _field(body, "return_score", bool, False)
        (passages,), rejected = await search([query], k)
        if rejected:
            raise BadRequest(400, f"field 'query': {rejected[0]}")
        docs = [_document(p) for p in passages]
        if return_score:
            return ok([docs, [p.score for p in passages]])
        return ok(docs)

    return app


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit status 1 when the index cannot be opened (the message says why and how to build it)."""
    parser = argparse.ArgumentParser(prog="python -m retriever_service.serve",
                                     description="Serve a retrieval index over HTTP (Search-R1 and ReSearch APIs).")
    parser.add_argument("--index", required=True, help="index directory (python -m retriever_service.build_index)")
    parser.add_argument("--kind", choices=["bm25", "dense"], default=None, help="index kind (default: the manifest's)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--corpus", default=None, help="refuse to start unless the index was built from this corpus")
    parser.add_argument("--top-k", type=int, default=5, help="topk of a /retrieve request that gives none")
    parser.add_argument("--threads", type=int, default=2, help="backend search threads per batch")
    parser.add_argument("--max-batch-size", type=int, default=256, help="distinct queries per backend call")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="extra wait for a batch to fill, ms (0: send when the backend is free)")
    parser.add_argument("--cache-size", type=int, default=65536, help="LRU cache entries (0 = off)")
    parser.add_argument("--max-batch-chars", type=int, default=8192,
                        help="query characters per backend call: a large request is served in slices this big, "
                             "interleaved with other clients' queries")
    for name, default in (*vars(Limits()).items(), *vars(ConnectionLimits()).items()):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--keep-alive-s", type=int, default=5,
                        help="close a keep-alive connection idle this long after a response (uvicorn's "
                             "timeout_keep_alive)")
    parser.add_argument("--docs", action="store_true", help="serve FastAPI's /docs, /redoc and /openapi.json")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (info logs every request)")
    args = parser.parse_args(argv)
    for name in ("top_k", "threads", "max_batch_size", "max_batch_chars", "max_queries", "max_query_chars",
                 "max_request_chars", "max_top_k", "max_body_bytes", "max_header_bytes", "max_connections",
                 "keep_alive_s"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")

    import uvicorn

    from research_rl.retrieval.index import read_manifest

    try:
        kind = args.kind or read_manifest(args.index).get("kind", "bm25")
        retriever = Retriever(args.index, kind=kind, top_k=args.top_k, threads=args.threads, corpus_path=args.corpus)
        batcher = SearchBatcher(retriever.search, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                cache_size=args.cache_size, max_batch_chars=args.max_batch_chars)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    limits = Limits(**{name: getattr(args, name) for name in vars(Limits())})
    protocol = guarded_protocol(ConnectionLimits(**{name: getattr(args, name) for name in vars(ConnectionLimits())}))
    info = {"kind": kind, "passages": retriever.manifest.get("count"), "index": args.index,
            "corpus": retriever.manifest.get("corpus"), "top_k": args.top_k}
    app = create_app(batcher, info, args.top_k, limits, docs=args.docs)
    # Everything loaded so far (pyserini, the JVM bridge, torch, FastAPI) lives as long as the process: move it out
    # of the cyclic GC's reach, so full collections under load scan only request-time objects.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)  # each request allocates hundreds of objects: collect young ones less often
    print(f"serving {kind} index {args.index} ({info['passages']} passages) on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, http=protocol,
                timeout_keep_alive=args.keep_alive_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
