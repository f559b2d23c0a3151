"""Rule reward for ReSearch (arXiv 2503.19470, §2.2/§3 "reward modeling": the rule-based reward).

The paper trains with a rule reward only: answer F1 against the gold answers when the rollout is well formed, a small
floor (0.1) when it is well formed but wrong, and 0 when the format is broken or the rollout ran past its length budget.
This module mirrors the reference implementation (`validate_format` / `compute_score` of the ReSearch repository's
`re_search` reward) rule by rule, in the same order:

1. format, checked over the whole response string -- generated text, the retrieved passages inside `<result>` blocks,
   and the trailing EOS string (so a passage that contains e.g. `<answer>` breaks the format, as in the reference);
2. the response must end exactly with the tokenizer's `eos_token` string ("over length" otherwise);
3. the answer is the content of the last `\\boxed{...}` inside `<answer>...</answer>`;
4. reward = max-over-golds token F1 (official HotpotQA/SQuAD normalisation) if > 0, else 0.1.

Deliberate deviations from the reference:

- The reference scores prompt+response and splits it on `<|im_start|>assistant\\n` / `Assistant:`, so those strings
  appearing inside a response or a retrieved passage change what it scores. We score the response alone.
- The reference's box extraction also accepts `\\boxed ` (space form) and `\\fbox`, and counts braces from `\\boxed`;
  we take only the last `\\boxed{` and match its braces. An unbalanced last box gives "no boxed answer" (the reference
  raised and reported "find box error").
- An empty `eos_token` is rejected with ValueError (the reference would strip the whole response: `s[:-0] == ""`).
- Golds passed as a bare `str` raise TypeError instead of being wrapped in a list (a `str` is a `Sequence[str]` and
  would otherwise be scored character by character).
- Cover-EM ignores golds that normalise to the empty string (an empty string is a substring of everything).

Inherited on purpose: the box content is scored verbatim, so `\\boxed{\\text{Paris}}` yields the answer
`\\text{Paris}`, which normalises to `textparis` and does not match the gold `Paris`.

`reference_reward` (``reward.kind=research_reference``) is the reference's `compute_score` reproduced exactly, the
deviations above undone: it scores prompt + response split on the assistant marker, accepts the space form and
`\\fbox` lookup, counts braces from the last `\\boxed`, wraps a bare-str gold, and returns int 0 on every failure.
Use it to compare numbers with the paper's released code; `research_reward` is the default because the marker
split lets a retrieved passage change what is scored.

`search_format_reward` is a shaped reward, not from the paper: it exists only to check that the training pipeline
learns (the rate of well-formed search calls should rise).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardResult",
    "check_format",
    "cover_exact_match",
    "exact_match",
    "extract_answer",
    "f1_score",
    "last_boxed_content",
    "normalize_answer",
    "reference_last_boxed",
    "reference_reward",
    "research_reward",
    "search_format_reward",
]

WRONG_ANSWER_REWARD = 0.1  # the floor for a well-formed rollout whose answer has zero F1
_YES_NO = frozenset({"yes", "no", "noanswer"})  # HotpotQA's special answers: no partial credit across them
_PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as in the official scorer
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_BOX_OPEN = "\\boxed{"


@dataclass(frozen=True)
class RewardResult:
    """One trajectory's reward.

    score: the reward (float, in [0, 1]).
    reason: human-readable explanation, e.g. "bad format: ...", "over length", "no boxed answer",
        "correct answer, f1=0.67", "wrong answer but good format".
    answer: the extracted `\\boxed{}` content, None when none was extracted.
    f1: F1 of `answer` against the golds (0.0 when there is no answer).
    format_ok: whether the response passed the format gate (rule 1).
    """

    score: float
    reason: str
    answer: str | None
    f1: float
    format_ok: bool


def _check_golds(golds: Sequence[str]) -> Sequence[str]:
    if isinstance(golds, str):
        raise TypeError(
            f"golds must be a sequence of gold answer strings, got a bare str {golds!r}; wrap it in a list"
        )
    return golds


def normalize_answer(s: str) -> str:
    """Normalise an answer like the official HotpotQA/SQuAD scorer.

    Lower-case, remove ASCII punctuation (`string.punctuation`), replace the articles a/an/the (whole words) by a
    space, fold runs of white space to single spaces and strip. No Unicode normalisation.
    Example: "The  Eiffel-Tower!" -> "eiffeltower".
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """Exact match: 1.0 if `normalize_answer(prediction)` equals the normalised form of any gold, else 0.0.

    Mirrors the official SQuAD/HotpotQA `exact_match_score`, maximised over golds. Raises TypeError for a bare str.
    """
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(g) for g in _check_golds(golds)) else 0.0


def _f1_one(pred: str, gold: str) -> float:
    """Token F1 between two already-normalised strings, with HotpotQA's yes/no/noanswer rule."""
    if (pred in _YES_NO or gold in _YES_NO) and pred != gold:
        return 0.0
    pred_tokens = pred.split()
    gold_tokens = gold.split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-level F1 of `prediction` against the golds, the max over golds (0.0 for no golds).

    Both sides go through `normalize_answer` and are split on white space; overlap counts tokens with multiplicity.
    If either normalised side is "yes", "no" or "noanswer" and the two differ, that gold scores 0 (HotpotQA's rule).
    Mirrors the reference `get_f1_score` / official HotpotQA `f1_score`. Raises TypeError for a bare str.
    """
    pred = normalize_answer(prediction)
    return max((_f1_one(pred, normalize_answer(g)) for g in _check_golds(golds)), default=0.0)


def cover_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """Cover exact match: 1.0 if some normalised gold is a substring of the normalised prediction, else 0.0.

    Mirrors Search-R1's `subem_check`, except that golds normalising to "" never match (see module docstring).
    Raises TypeError for a bare str.
    """
    pred = normalize_answer(prediction)
    for g in _check_golds(golds):
        gold = normalize_answer(g)
        if gold and gold in pred:
            return 1.0
    return 0.0


def check_format(response: str) -> tuple[bool, str]:
    """Rule 1: the ReSearch format gate, over the whole response (passages and trailing EOS included).

    Checks, in the reference `validate_format`'s order: `<think>`/`</think>` counts equal and non-zero (order not
    checked); exactly one `<answer>` and one `</answer>`; from each `<search>` (walking left to right) the next
    `</search>`, `<result>` and the `</result>` after that `<result>` exist and come in that order, then the walk
    continues from that `</result>`; `<answer>` precedes `</answer>`; the answer span contains `\\boxed{` and a `}`.
    Returns (ok, reason); reason is "format is correct" when ok, else names the first failed check.
    """
    n_think, n_think_end = response.count("<think>"), response.count("</think>")
    if n_think != n_think_end:
        return False, "<think> </think> not paired"
    if n_think == 0:
        return False, "<think> or </think> not found"
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return False, "<answer> or </answer> not found"

    pos = 0
    while (search := response.find("<search>", pos)) != -1:
        search_end = response.find("</search>", search)
        result = response.find("<result>", search)
        result_end = response.find("</result>", result) if result != -1 else -1
        if -1 in (search_end, result, result_end):
            return False, "search/result tags are incomplete"
        if not search < search_end < result < result_end:
            return False, "search/result tags are nested in the wrong order"
        pos = result_end

    answer_start, answer_end = response.find("<answer>"), response.find("</answer>")
    if answer_start > answer_end:
        return False, "<answer> must be before </answer>"
    span = response[answer_start:answer_end]
    if _BOX_OPEN not in span or "}" not in span:
        return False, "answer is missing \\boxed{} format"
    return True, "format is correct"


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, braces matched, inner braces kept verbatim.

    "\\boxed{\\text{Paris}}" -> "\\text{Paris}"; "\\boxed{a} then \\boxed{b}" -> "b".
    Returns None if there is no `\\boxed{` or the last one is not closed (no fallback to an earlier box).
    Mirrors the reference `remove_boxed(last_boxed_only_string(...))` for the `\\boxed{` form only.
    """
    start = text.rfind(_BOX_OPEN)
    if start == -1:
        return None
    content_start = start + len(_BOX_OPEN)
    depth = 1
    for i in range(content_start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[content_start:i]
    return None


def extract_answer(response: str) -> str | None:
    """The answer: `last_boxed_content` of the text between the first `<answer>` and the next `</answer>`.

    Returns None if there is no such span or it holds no balanced `\\boxed{...}`.
    Mirrors the reference `extract_answer` followed by its box extraction.
    """
    start = response.find("<answer>")
    if start == -1:
        return None
    start += len("<answer>")
    end = response.find("</answer>", start)
    if end == -1:
        return None
    return last_boxed_content(response[start:end])


def research_reward(response: str, eos_token: str, golds: Sequence[str]) -> RewardResult:
    """The ReSearch rule reward for one trajectory (rules 1-4 of the module docstring, in that order).

    response: the decoded response with special tokens kept (generated text and inserted `<result>` blocks), cut after
        the first EOS; the prompt is NOT included (deviation from the reference, see module docstring).
    eos_token: the tokenizer's EOS string, e.g. "<|im_end|>"; must be non-empty (ValueError otherwise).
    golds: gold answer strings (TypeError for a bare str).
    Returns a RewardResult: 0.0 for bad format / over length / no boxed answer, the F1 if > 0, else 0.1.
    Mirrors the reference `compute_score`.
    """
    if not eos_token:
        raise ValueError("eos_token must be a non-empty string (the tokenizer's eos_token, e.g. '<|im_end|>')")
    _check_golds(golds)
    return _rule_reward(response, eos_token, golds, extract_answer, 0.0, "no boxed answer")


def _rule_reward(text: str, eos_token: str, golds: Sequence[str], extract: Callable[[str], str | None],
                 zero: float, no_answer: str) -> RewardResult:
    """Rules 1-4 on ``text``, in the reference's order: the format gate, the EOS suffix, ``extract`` on the text
    without that EOS, then max-over-golds F1 (or the 0.1 floor). ``zero`` is the failure score (the reference's is
    int 0) and ``no_answer`` the reason when ``extract`` finds nothing."""
    ok, why = check_format(text)
    if not ok:
        return RewardResult(zero, f"bad format: {why}", None, 0.0, False)
    if not text.endswith(eos_token):
        return RewardResult(zero, "over length", None, 0.0, True)
    answer = extract(text[: -len(eos_token)])
    if answer is None:
        return RewardResult(zero, no_answer, None, 0.0, True)
    f1 = f1_score(answer, golds)
    if f1 > 0:
        return RewardResult(f1, f"correct answer, f1={f1:.2f}", answer, f1, True)
    return RewardResult(WRONG_ANSWER_REWARD, "wrong answer but good format", answer, 0.0, True)


_ASSISTANT_CHAT = "<|im_start|>assistant\n"  # the reference's split markers, tried in this order
_ASSISTANT_BASE = "Assistant:"


def reference_last_boxed(text: str) -> str | None:
    """The reference's box extraction (`last_boxed_only_string` then `remove_boxed`), exactly.

    - If ``"\\boxed "`` (with a space) occurs anywhere, the answer is the text after its last occurrence up to the
      first ``$`` (``"\\boxed 42$ end"`` -> ``"42"``; no ``$``: to the end).
    - Otherwise from the last ``\\boxed`` (or, only when no ``\\boxed`` occurs, the last ``\\fbox``) count braces:
      ``{`` opens, ``}`` closes, and the first ``}`` that brings the count to 0 ends the block (a ``}`` before any
      ``{`` drives it negative, so such a block never closes). The block must start with ``\\boxed{`` and end with
      ``}``; the answer is what lies between (inner braces kept).

    Returns None where the reference raised (its "find box error"): no box, an unclosed block, or a block not of the
    ``\\boxed{…}`` form (``\\boxedtext{a}``, any ``\\fbox{…}``).
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth, end = 0, None
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end is None:
        return None
    block = text[start:end + 1]
    if not block.startswith(_BOX_OPEN) or not block.endswith("}"):
        return None
    return block[len(_BOX_OPEN):-1]


def reference_reward(solution_str: str, eos_token: str, golds: Sequence[str] | str) -> RewardResult:
    """The ReSearch reference reward, exactly as the authors' `compute_score` computes it (ReSearch repository,
    `re_search.py` at 4bdb872; rules in docs/concepts.md#the-reward).

    solution_str: the decoded prompt + response with special tokens kept (inserted results included), cut after the
        first EOS (whose text is kept) -- the reference's input, not the response alone.
    eos_token: the tokenizer's EOS string; non-empty (ValueError otherwise).
    golds: gold answer strings; a bare str is wrapped in a list, as the reference does.

    Rules, in order: (1) the scored text is the part of `solution_str` after the first ``<|im_start|>assistant\\n``
    and before the second, or, when that marker is absent, between the first and second ``Assistant:``; (2) the
    format gate (`check_format`) on that text; (3) it must end with `eos_token` ("over length"); (4) one EOS is cut
    and the answer span is the first ``<answer>…</answer>`` (across lines); (5) `reference_last_boxed`; (6) max-over-
    golds F1 (`f1_score`): the F1 if > 0, else 0.1. Every failure scores int 0, as in the reference.

    Raises:
        ValueError: `eos_token` is empty, or `solution_str` holds neither marker (the reference would raise
            IndexError: its input always holds the prompt).
    """
    if not eos_token:
        raise ValueError("eos_token must be a non-empty string (the tokenizer's eos_token, e.g. '<|im_end|>')")
    golds = [golds] if isinstance(golds, str) else golds
    marker = _ASSISTANT_CHAT if _ASSISTANT_CHAT in solution_str else _ASSISTANT_BASE
    parts = solution_str.split(marker)
    if len(parts) < 2:
        raise ValueError(f"the reference reward scores prompt + response, but the text holds neither "
                         f"{_ASSISTANT_CHAT!r} nor {_ASSISTANT_BASE!r}")
    return _rule_reward(parts[1], eos_token, golds, _reference_answer, 0, "find box error")


def _reference_answer(text: str) -> str | None:
    """The reference's answer: ``reference_last_boxed`` of the first ``<answer>…</answer>`` (across lines)."""
    span = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return reference_last_boxed(span.group(1)) if span else None


def _has_search_call(response: str) -> bool:
    """True if some `<search>` is followed by a non-blank query, `</search>`, then `<result>` ... `</result>`."""
    pos = 0
    while (search := response.find("<search>", pos)) != -1:
        query_start = search + len("<search>")
        search_end = response.find("</search>", query_start)
        if search_end == -1:
            return False  # no later <search> can close either
        if response[query_start:search_end].strip():
            result = response.find("<result>", search_end + len("</search>"))
            if result == -1:
                return False  # no later <search> can be followed by a <result> either
            if response.find("</result>", result + len("<result>")) != -1:
                return True
            return False
        pos = query_start
    return False


def search_format_reward(response: str, eos_token: str, golds: Sequence[str]) -> RewardResult:
    """Shaped pipeline-test reward: 1.0 if the response holds a well-formed search call, else 0.0.

    Well-formed: "<search>", a query that is non-empty after strip, "</search>", then "<result>" ... "</result>", in
    that order. `eos_token` and `golds` are ignored; the signature matches `research_reward` so the two are
    interchangeable. format_ok is that condition; answer is None and f1 is 0.0. Not from the paper.
    """
    if _has_search_call(response):
        return RewardResult(1.0, "well-formed search call", None, 0.0, True)
    return RewardResult(0.0, "no well-formed search call", None, 0.0, False)


REWARD_FUNCTIONS: dict[str, Callable[[str, str, Sequence[str]], RewardResult]] = {
    "research": research_reward,
    "research_reference": reference_reward,
    "search_format": search_format_reward,
}
