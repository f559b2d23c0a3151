"""Test helpers: a deterministic scripted generation engine, the HTTP retrieval service started as a user starts it,
and a scripted chat-completions server (an LLM judge endpoint)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from research_rl.rollout.agent_loop import GenerationOutput

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, *args: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m retriever_service.serve --index INDEX`` on a free loopback port; returns (process, base URL) once
    ``GET /health`` answers 200. The caller terminates the process. With ``log``, the server's output goes to that
    file (a server that logs much would otherwise block on a full pipe nobody reads)."""
    import requests

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = open(log, "w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "retriever_service.serve", "--index", str(index), "--port",
                             str(port), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True)
    if log is not None:
        out.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            output = log.read_text() if log is not None else proc.stdout.read()
            raise RuntimeError(f"server exited with {proc.returncode}: {output}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not answer /health within 120 s")


class ScriptedEngine:
    """Replays a fixed list of text segments per trajectory (one segment per engine call), tokenised once.

    A segment ending in ``</search>`` stops with ``search``, one ending in an EOS id (``eos_ids``, default the
    tokenizer's) with ``eos``; a budget smaller than the segment truncates it (``length``), as a real engine would.
    With ``log_probs``, a sampled (non-greedy) request reports ``token_log_prob(id)`` for each id, as a real engine
    reports its sampling log-probs; otherwise none.
    """

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[str]], eos_ids=None, log_probs: bool = False):
        self.tok = tokenizer
        self.log_probs = log_probs
        self.eos_ids = set(eos_ids or [tokenizer.eos_token_id])
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls: list[int] = []  # batch size of each call
        self.generated: dict[tuple[int, ...], list[list[int]]] = {k: [] for k in scripts}

    def generate(self, prompts, max_new_tokens, sampling, seeds=None):
        self.calls.append(len(prompts))
        outs = []
        for ids, budget in zip(prompts, max_new_tokens):
            key = next(k for k in self.scripts if tuple(ids[:len(k)]) == k)
            text = self.scripts[key].pop(0)
            out = self.tok.encode(text, add_special_tokens=False)
            finish = "eos" if out and out[-1] in self.eos_ids else "search" if text.endswith("</search>") else "length"
            if len(out) > budget:
                out, finish = out[:budget], "length"
            self.generated[key].append(out)
            lps = [token_log_prob(t) for t in out] if self.log_probs and not sampling.is_greedy else None
            outs.append(GenerationOutput(out, finish, lps))
        return outs


def token_log_prob(token_id: int) -> float:
    """The scripted engine's log-prob of ``token_id``: a value that tells ids apart (-0.1 .. -0.7)."""
    return -(token_id % 7 + 1) / 10


class ScriptedChatServer:
    """`POST /v1/chat/completions`; the n-th request for a question gets `script[question][n]` (the last entry
    repeats): a str is the reply's message content, an int an HTTP status with an error body, ("sleep", s, reply)
    answers after s seconds, ("retry-after", status, s) an error status with a Retry-After header."""

    def __init__(self):
        self.script: dict[str, list] = {}
        self.default: list = [500]  # the script of a question that has none
        self.calls: dict[str, int] = {}
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.spans: list[tuple[str, float, float]] = []  # (question, start, end) of each answered request
        self.lock = threading.Lock()
        app = FastAPI()
        app.post("/v1/chat/completions")(self._chat)
        self.port = free_port()
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("scripted chat server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def _chat(self, request: Request):
        body = await request.json()
        question = re.search(r"^question: (.*)$", body["messages"][-1]["content"], re.M).group(1)
        with self.lock:
            self.requests.append((dict(request.headers), body))
            n = self.calls.get(question, 0)
            self.calls[question] = n + 1
        start = time.perf_counter()
        try:
            steps = self.script.get(question, self.default)
            action = steps[min(n, len(steps) - 1)]
            if isinstance(action, tuple) and action[0] == "sleep":
                await asyncio.sleep(action[1])
                action = action[2]
            if isinstance(action, tuple) and action[0] == "retry-after":
                return PlainTextResponse("slow down", status_code=action[1], headers={"Retry-After": str(action[2])})
            if isinstance(action, int):
                return JSONResponse({"error": {"message": f"scripted error {action}"}}, status_code=action)
            return {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": action}}]}
        finally:
            with self.lock:
                self.spans.append((question, start, time.perf_counter()))

    def max_overlap(self, questions) -> int:
        """The most requests for `questions` the server was serving at one time."""
        events = sorted((t, d) for q, a, b in self.spans if q in questions for t, d in ((a, 1), (b, -1)))
        now = best = 0
        for _, d in events:
            now += d
            best = max(best, now)
        return best
