"""LLM-as-a-judge for answer correctness, the second metric of the ReSearch evaluation (arXiv 2503.19470, the
experiments' evaluation metrics: exact match, and gpt-4o-mini judging the answer), for any OpenAI-compatible
chat-completions endpoint (OpenAI, vLLM, SGLang, a local proxy).

The prompt (`JUDGE_PROMPT`) is copied verbatim from the authors' released evaluation script
`scripts/evaluation/llm_judge.py` of the ReSearch repository (github.com/Agent-RL/ReSearch, later renamed ReCall), as
published in the fork github.com/threegold116/ReCall-OCT at commit 9aba086d571a1cba44f374cefebb5e12478daab9. It has
not been compared with the appendix of the paper (arXiv 2503.19470).
The script's other settings, kept here: one user message holding the whole prompt, temperature 0, gpt-4o-mini; the
golden answers are rendered as the Python `str()` of the list (`['Paris', 'paris']`); the judge answers with a JSON
object whose `"judgement"` is `"correct"` or `"incorrect"`; the metric counts only questions the judge answered.

Deliberate deviations from that script:
- No `response_format={"type": "json_object"}` and no `max_tokens`: not every OpenAI-compatible server accepts them.
  The parser instead tolerates ```json fences and text around the object (`parse_verdict`).
- The script also requires a `"rationale"` key; we read only `"judgement"` (or the spelling `"judgment"`), and also
  accept a JSON boolean there.
- The script retried every error 5 times with a 1 s sleep and dropped questions that still failed; we retry only
  what can succeed on a second try (a malformed reply, HTTP 429/5xx, a timeout, a refused connection), with
  exponential backoff, never an HTTP 4xx other than 429, and we return and count every failure (`summarize`).

Errors: an endpoint failure or an unparseable reply does not raise; it comes back as a `JudgeVerdict` with
`correct=None` and the reason in `error`. Bad arguments raise (ValueError, TypeError) before anything is sent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

__all__ = ["JUDGE_PROMPT", "JudgeClient", "JudgeVerdict", "parse_verdict", "summarize"]

# Verbatim from ReSearch's scripts/evaluation/llm_judge.py (see the module docstring). The backslashes join the first
# three sentences into one line, as in the original; "```json " keeps the original's trailing space.
JUDGE_PROMPT = """You will be given a question and its ground truth answer list where each item can be a ground truth answer. \
Provided a pred_answer, you need to judge if the pred_answer correctly answers the question based on the ground truth answer list. \
You should first give your rationale for the judgement, and then give your judgement result (i.e., correct or incorrect).

Here is the criteria for the judgement:
1. The pred_answer doesn't need to be exactly the same as any of the ground truth answers, but should be semantically same for the question.
2. Each item in the ground truth answer list can be viewed as a ground truth answer for the question, and the pred_answer should be semantically same to at least one of them.

question: {question}
ground truth answers: {gt_answer}
pred_answer: {pred_answer}

The output should in the following json format:
```json \n{{
    "rationale": "your rationale for the judgement, as a text",
    "judgement": "your judgement result, can only be 'correct' or 'incorrect'"
}}
```

Your output:"""  # noqa: E501

_UNPARSEABLE = "unparseable judge reply"
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.S | re.I)
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class JudgeVerdict:
    """The judge's verdict on one prediction.

    correct: True / False; None when the reply stayed unparseable after every retry, or the endpoint failed.
    raw: the judge's last reply text ("" when the endpoint failed).
    error: why `correct` is None ("unparseable judge reply ..." or "endpoint failed ..."); None otherwise.
    """

    correct: bool | None
    raw: str
    error: str | None

    @property
    def unparseable(self) -> bool:
        """The judge answered, but no reply held a readable verdict."""
        return self.correct is None and (self.error or "").startswith(_UNPARSEABLE)


def parse_verdict(text: str) -> bool | None:
    """The verdict in a judge reply: True for "correct", False for "incorrect", None if there is none.

    Looks, in order, at the whole reply, the inside of each ``` / ```json fence, then every JSON object embedded in
    the text, and takes the first JSON object with a "judgement" (or "judgment") key whose value is "correct" /
    "incorrect" (case and surrounding white space or a final period ignored) or a JSON boolean.
    """
    if not isinstance(text, str):
        return None
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        verdict = _verdict_of(obj)
        if verdict is not None:
            return verdict
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        verdict = _verdict_of(obj)
        if verdict is not None:
            return verdict
    return None


def _verdict_of(obj) -> bool | None:
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if isinstance(key, str) and key.strip().lower() in ("judgement", "judgment"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                word = value.strip().rstrip(".").strip().lower()
                if word in ("correct", "incorrect"):
                    return word == "correct"
    return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JudgeClient:
    """Judges predictions with an LLM behind `POST {base_url}/chat/completions` (OpenAI chat-completions API).

    Args:
        base_url: the API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1" (http/https).
        model: the judge model, e.g. "gpt-4o-mini" (the paper's).
        api_key_env: name of the environment variable holding the API key, sent as `Authorization: Bearer KEY`.
            Read once, here. It may be unset only for a loopback endpoint (localhost, 127.0.0.0/8, ::1), which then
            gets no Authorization header.
        timeout_s: per-request timeout in seconds (connect, and each read of the reply).
        max_retries: retries after the first attempt, for a malformed reply (at once) and for HTTP 429/5xx,
            timeouts and refused connections (after `backoff_s * 2**retry` s, or the server's Retry-After, at most
            30 s). HTTP 4xx other than 429 is never retried.
        max_concurrency: requests in flight at once in `judge_many`.
    Raises:
        ValueError: a bad argument, or the key variable is unset for a non-loopback endpoint.
    """

    backoff_s: float = 1.0  # first backoff; an instance attribute may override it (the tests shorten it)

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, max_concurrency: int = 8):
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"judge base_url must be an http(s) URL like https://api.openai.com/v1, got {base_url!r}")
        if not model:
            raise ValueError("judge model must be a non-empty model name, e.g. 'gpt-4o-mini'")
        if not timeout_s > 0:
            raise ValueError(f"judge timeout_s must be > 0 seconds, got {timeout_s}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"judge max_retries must be an int >= 0, got {max_retries!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"judge max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None and not _is_loopback(parts.hostname):
            raise ValueError(
                f"judge: the environment variable {api_key_env} is not set; export the API key for {base_url} in "
                f"it, or name another variable with api_key_env (only loopback endpoints may go without a key)")
        self._local = threading.local()  # one requests.Session per thread (Session is not thread-safe)

    def __repr__(self) -> str:  # never shows the key
        return f"JudgeClient(url={self.url!r}, model={self.model!r})"

    def prompt(self, question: str, golden_answers: Sequence[str], prediction: str) -> str:
        """The judge prompt for one item (`JUDGE_PROMPT` filled in as the reference script fills it)."""
        return JUDGE_PROMPT.format(question=question, gt_answer=str(list(golden_answers)), pred_answer=prediction)

    def judge(self, question: str, golden_answers: list[str], prediction: str) -> JudgeVerdict:
        """Whether `prediction` answers `question`, given the gold answers; blocking, with retries.

        prediction: the extracted final answer (the reference judges FlashRAG's `pred`, i.e. the `\\boxed{}`
            content), "" when the model gave none.
        Raises TypeError / ValueError for bad arguments (a bare str as golden_answers, no golds); never for
        endpoint or reply problems, which come back in the verdict.
        """
        _check_item(question, golden_answers, prediction)
        return self._judge(self.prompt(question, golden_answers, prediction))

    def judge_many(self, items: list[tuple[str, list[str], str]]) -> list[JudgeVerdict]:
        """`judge` over `(question, golden_answers, prediction)` items, `max_concurrency` at a time, with a tqdm
        progress bar on stderr. Returns the verdicts in the order of `items`. Every item is checked before any
        request is sent."""
        from tqdm import tqdm

        prompts = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise TypeError(f"judge_many items[{i}] must be (question, golden_answers, prediction), got {item!r}")
            _check_item(*item, where=f"items[{i}]")
            prompts.append(self.prompt(*item))
        verdicts: list[JudgeVerdict | None] = [None] * len(prompts)
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool, \
                tqdm(total=len(prompts), desc="judge", unit="q") as bar:
            futures = {pool.submit(self._judge, p): i for i, p in enumerate(prompts)}
            for fut in as_completed(futures):
                verdicts[futures[fut]] = fut.result()
                bar.update(1)
        return verdicts  # type: ignore[return-value]

    # ------------------------------------------------------------------ one item, with retries
    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _judge(self, prompt: str) -> JudgeVerdict:
        import requests

        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            wait = self.backoff_s * 2 ** attempt
            try:
                resp = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                failure = f"no reply within timeout_s={self.timeout_s:g} s"
            except requests.ConnectionError as e:
                failure = f"cannot connect to {self.url}: {e}"
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    failure = f"HTTP {resp.status_code}: {_snippet(resp.text)}"
                    wait = _retry_after(resp, wait)
                elif not 200 <= resp.status_code < 300:  # 4xx: retrying the same request cannot help
                    hint = " (check the API key)" if resp.status_code in (401, 403) else ""
                    return JudgeVerdict(None, "", f"endpoint failed: HTTP {resp.status_code}{hint} from {self.url}: "
                                                  f"{_snippet(resp.text)}")
                else:
                    reply, failure = _reply_text(resp)
                    if failure is None:
                        verdict = parse_verdict(reply)
                        if verdict is not None:
                            return JudgeVerdict(verdict, reply, None)
                        if last:
                            return JudgeVerdict(None, reply, f"{_UNPARSEABLE} after {attempts} attempt(s): no JSON "
                                                              f"object with \"judgement\": \"correct\"|\"incorrect\"")
                        continue  # same prompt again at once: waiting does not fix a malformed reply
            if last:
                return JudgeVerdict(None, "", f"endpoint failed after {attempts} attempt(s): {failure}")
            time.sleep(min(wait, _MAX_BACKOFF_S))
        raise AssertionError("unreachable")


def _check_item(question, golden_answers, prediction, where: str = "judge") -> None:
    if not isinstance(question, str):
        raise TypeError(f"{where}: question must be a str, got {type(question).__name__}")
    if isinstance(golden_answers, str) or not isinstance(golden_answers, (list, tuple)):
        raise TypeError(f"{where}: golden_answers must be a list of str, got {golden_answers!r}")
    if not golden_answers or not all(isinstance(g, str) for g in golden_answers):
        raise ValueError(f"{where}: golden_answers must be a non-empty list of str, got {golden_answers!r}")
    if not isinstance(prediction, str):
        raise TypeError(f"{where}: prediction must be a str ('' for no answer), got {type(prediction).__name__}")


def _reply_text(resp) -> tuple[str, str | None]:
    """(the first choice's message content, None), or ("", why) for a body that is not a chat completion."""
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "", f"HTTP {resp.status_code} but not a chat completion: {_snippet(resp.text)}"
    return (content if isinstance(content, str) else ""), None


def _retry_after(resp, default: float) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:
        return default


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit] + " ..."


def summarize(verdicts: list[JudgeVerdict]) -> dict:
    """Judge metrics over a list of verdicts.

    Returns {"judge/accuracy": correct / parseable verdicts (NaN if none), "judge/unparseable": count,
    "judge/failed": count of endpoint failures, "judge/n": all verdicts}. Like the reference script, the accuracy
    counts only the questions the judge answered; report the two failure counts next to it.
    """
    n = len(verdicts)
    parsed = [v.correct for v in verdicts if v.correct is not None]
    unparseable = sum(v.unparseable for v in verdicts)
    return {
        "judge/accuracy": sum(parsed) / len(parsed) if parsed else float("nan"),
        "judge/unparseable": unparseable,
        "judge/failed": n - len(parsed) - unparseable,
        "judge/n": n,
    }
