"""The LLM judge client against a real local HTTP server speaking the chat-completions API (FastAPI + uvicorn on a
free loopback port, in a background thread), whose reply to each request is scripted by the question in the prompt."""

from __future__ import annotations

import json
import math
import time

import pytest
from helpers import ScriptedChatServer, free_port

from research_rl.algo.judge import JUDGE_PROMPT, JudgeClient, JudgeVerdict, parse_verdict, summarize

pytestmark = pytest.mark.unit

YES = '{"rationale": "same city", "judgement": "correct"}'
NO = '{"rationale": "a different person", "judgement": "incorrect"}'


@pytest.fixture(scope="module")
def server():
    s = ScriptedChatServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    c = JudgeClient(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", timeout_s=5, max_retries=3,
                    max_concurrency=4)
    c.backoff_s = 0.01
    return c


def _script(server, question, *steps):
    server.script[question] = list(steps)
    server.calls.pop(question, None)


def _bodies_for(server, question):
    return [(h, b) for h, b in server.requests if f"question: {question}\n" in b["messages"][-1]["content"]]


# ---------------------------------------------------------------------------------------------- the request
def test_request_body_prompt_and_auth_header(server, client):
    q = "What is the capital of France?"
    _script(server, q, YES)
    v = client.judge(q, ["Paris", "City of Light"], "paris, france")
    assert v == JudgeVerdict(True, YES, None)
    [(headers, body)] = _bodies_for(server, q)
    prompt = JUDGE_PROMPT.format(question=q, gt_answer="['Paris', 'City of Light']", pred_answer="paris, france")
    assert body == {"model": "judge-model", "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    content = body["messages"][0]["content"]
    assert f"question: {q}\n" in content and "ground truth answers: ['Paris', 'City of Light']\n" in content
    assert "pred_answer: paris, france\n" in content
    assert headers["authorization"] == "Bearer sk-test-123"
    assert headers["content-type"] == "application/json"


def test_loopback_endpoint_needs_no_key_and_sends_no_auth_header(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    c = JudgeClient(server.url + "/", "judge-model", api_key_env="NO_SUCH_JUDGE_KEY")  # trailing slash is fine
    q = "Who wrote Hamlet?"
    _script(server, q, NO)
    assert c.judge(q, ["William Shakespeare"], "Marlowe").correct is False
    [(headers, _)] = _bodies_for(server, q)
    assert "authorization" not in headers


def test_remote_endpoint_without_key_fails_at_construction(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_JUDGE_KEY is not set"):
        JudgeClient("https://api.openai.com/v1", "gpt-4o-mini", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(ValueError, match="http"):
        JudgeClient("api.openai.com/v1", "gpt-4o-mini")


def test_bad_items_raise_before_sending(client, server):
    before = len(server.requests)
    with pytest.raises(TypeError, match="golden_answers"):
        client.judge("q?", "Paris", "Paris")
    with pytest.raises(ValueError, match="non-empty"):
        client.judge("q?", [], "Paris")
    with pytest.raises(TypeError, match=r"items\[1\].*prediction"):
        client.judge_many([("q?", ["a"], "a"), ("q?", ["a"], None)])
    assert len(server.requests) == before


# ---------------------------------------------------------------------------------------------- replies
def test_yes_no_and_fenced_verdicts(server, client):
    _script(server, "fenced yes", "Sure.\n```json\n{\n  \"rationale\": \"ok\",\n  \"judgement\": \"correct\"\n}\n```")
    _script(server, "plain no", NO)
    _script(server, "text around", 'Here you go: {"rationale": "no", "judgement": "Incorrect."} Hope it helps')
    assert client.judge("fenced yes", ["a"], "a").correct is True
    assert client.judge("plain no", ["a"], "b").correct is False
    assert client.judge("text around", ["a"], "b").correct is False
    assert all(server.calls[q] == 1 for q in ("fenced yes", "plain no", "text around"))


def test_malformed_reply_is_retried_then_succeeds(server, client):
    q = "malformed then good"
    _script(server, q, "I think it is correct", '{"rationale": "x", "judgement": "incorr', YES)
    v = client.judge(q, ["a"], "a")
    assert v == JudgeVerdict(True, YES, None)
    assert server.calls[q] == 3


def test_always_malformed_is_unparseable_after_all_retries(server, client):
    q = "always malformed"
    _script(server, q, '{"rationale": "x", "judgement": "your judgement result"}')
    v = client.judge(q, ["a"], "a")
    assert v.correct is None and v.unparseable
    assert v.raw == '{"rationale": "x", "judgement": "your judgement result"}'
    assert v.error.startswith("unparseable judge reply after 4 attempt(s)")
    assert server.calls[q] == 4  # 1 + max_retries


def test_server_error_then_success(server, client):
    q = "500 then good"
    _script(server, q, 500, 503, YES)
    assert client.judge(q, ["a"], "a") == JudgeVerdict(True, YES, None)
    assert server.calls[q] == 3


def test_rate_limited_then_success_honours_retry_after(server, client):
    q = "429 then good"
    _script(server, q, ("retry-after", 429, 0), NO)
    assert client.judge(q, ["a"], "b").correct is False
    assert server.calls[q] == 2


def test_client_error_is_not_retried(server, client):
    q = "400 bad request"
    _script(server, q, 400, YES)
    v = client.judge(q, ["a"], "a")
    assert v.correct is None and not v.unparseable and v.raw == ""
    assert "HTTP 400" in v.error and "scripted error 400" in v.error
    assert server.calls[q] == 1
    _script(server, "401 bad key", 401)
    assert "check the API key" in client.judge("401 bad key", ["a"], "a").error


def test_persistent_server_error_fails(server, client):
    q = "always 502"
    _script(server, q, 502)
    v = client.judge(q, ["a"], "a")
    assert v.correct is None and not v.unparseable and v.raw == ""
    assert v.error.startswith("endpoint failed after 4 attempt(s): HTTP 502")
    assert server.calls[q] == 4


def test_hang_past_the_timeout_fails(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    c = JudgeClient(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", timeout_s=0.3, max_retries=1)
    c.backoff_s = 0.01
    q = "hangs"
    _script(server, q, ("sleep", 2.0, YES))
    t0 = time.perf_counter()
    v = c.judge(q, ["a"], "a")
    assert time.perf_counter() - t0 < 1.5
    assert v.correct is None and not v.unparseable and v.raw == ""
    assert "no reply within timeout_s=0.3 s" in v.error
    assert server.calls[q] == 2


def test_unreachable_endpoint_fails(monkeypatch):
    c = JudgeClient(f"http://127.0.0.1:{free_port()}/v1", "m", api_key_env="NO_SUCH_JUDGE_KEY", max_retries=1)
    c.backoff_s = 0.01
    v = c.judge("q?", ["a"], "a")
    assert v.correct is None and "cannot connect" in v.error


# ---------------------------------------------------------------------------------------------- many, summary
def test_judge_many_keeps_order_under_concurrency(server, client):
    n = 8
    items = []
    for i in range(n):  # earlier items answer later, so completion order is the reverse of input order
        q = f"order item {i}"
        _script(server, q, ("sleep", 0.05 * (n - i), YES if i % 2 == 0 else NO))
        items.append((q, ["gold"], f"pred {i}"))
    verdicts = client.judge_many(items)
    assert [v.correct for v in verdicts] == [i % 2 == 0 for i in range(n)]
    # concurrent, but bounded by max_concurrency
    assert 1 < server.max_overlap({q for q, _, _ in items}) <= client.max_concurrency
    for i in range(n):  # each verdict belongs to its own item
        [(_, body)] = _bodies_for(server, f"order item {i}")
        assert f"pred_answer: pred {i}\n" in body["messages"][0]["content"]
    assert client.judge_many([]) == []


def test_summarize_counts(server, client):
    scripts = {"s yes 1": [YES], "s yes 2": [YES], "s no": [NO], "s garbage": ["no idea"], "s 400": [400]}
    for q, steps in scripts.items():
        _script(server, q, *steps)
    verdicts = client.judge_many([(q, ["a"], "a") for q in scripts])
    assert [v.correct for v in verdicts] == [True, True, False, None, None]
    assert summarize(verdicts) == {"judge/accuracy": 2 / 3, "judge/unparseable": 1, "judge/failed": 1, "judge/n": 5}
    empty = summarize([])
    assert math.isnan(empty["judge/accuracy"]) and empty["judge/n"] == 0


@pytest.mark.parametrize("text, expected", [
    (YES, True),
    (NO, False),
    ('```json \n{\n    "rationale": "r",\n    "judgement": "correct"\n}\n```', True),
    ('```\n{"judgement": "incorrect"}\n```', False),
    ('Rationale first. {"judgment": " Correct "} done', True),  # American spelling, case, white space
    ('{"rationale": "r", "judgement": true}', True),
    ('{"rationale": "r", "judgement": "partially correct"}', None),
    ('{"rationale": "r"}', None),
    ("correct", None),
    ("", None),
    ('{"judgement": "correct"', None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) is expected


def test_prompt_is_the_reference_prompt():
    # spot checks of the verbatim ReSearch prompt: one-line preamble, the JSON block with its "```json " line
    lines = JUDGE_PROMPT.split("\n")
    assert lines[0].startswith("You will be given a question") and lines[0].endswith("(i.e., correct or incorrect).")
    assert "```json " in lines and lines[-1] == "Your output:"
    filled = JUDGE_PROMPT.format(question="Q", gt_answer="['A']", pred_answer="P")
    assert json.loads(filled.split("```json \n")[1].split("\n```")[0])["judgement"].startswith("your judgement")
