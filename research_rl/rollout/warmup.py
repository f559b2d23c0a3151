"""Supervised warm-up for CPU debug mode (a documented deviation: the ReSearch paper uses none).

A randomly initialised tiny model never writes ``<think>``/``<search>``/``<answer>``, so every GRPO reward would
be 0 and no advantage would be non-zero. The warm-up teaches the format on trajectories synthesised from the
training questions: think → search (the question itself, then the title of a gold paragraph the first search
missed) → the real retriever's results → answer in ``\\boxed{}``. Result blocks are produced by the same
``format_observation`` and encoding as the rollout, and loss-masked exactly like RL trajectories (0 on prompt and
results, 1 on model text through EOS). With ``search_fraction < 1`` some trajectories answer without searching.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

from research_rl.algo.experience import Experience
from research_rl.rollout.agent_loop import format_observation
from research_rl.data import Question
from research_rl.algo.templates import encode_prompt

THINK_FIRST = "<think> I need to find facts to answer this question. </think> "
THINK_MORE = " <think> I need one more fact. </think> "
THINK_DONE = " <think> The results answer the question. </think> "
THINK_DIRECT = "<think> I can answer this question directly. </think> "
ANSWER = "<answer> The final answer is \\[ \\boxed{{{answer}}} \\] </answer>"


ANSWER_SOURCES = ("gold", "results")


def split_questions(questions: list[Question], share: float, seed: int) -> tuple[list[Question], list[Question]]:
    """``(warm-up questions, the others)``: a question goes to the warm-up when the SHA-256 of ``"{seed}:{id}"``,
    read as a fraction in [0, 1), is below ``share``. The split depends on the id alone, not on the files' order,
    so it is the same in every run with this ``seed``; both lists keep the input order. ``share=0`` gives
    ``([], questions)``."""
    def draw(q: Question) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}:{q.id}".encode()).digest()[:8], "big") / 2 ** 64

    warm = [q for q in questions if draw(q) < share]
    picked = {id(q) for q in warm}
    return warm, [q for q in questions if id(q) not in picked]


def answer_span(golds: tuple[str, ...] | list[str], passages: list[str]) -> str | None:
    """The first gold answer (in the golds' order) that occurs in a passage as whole words, case-insensitively, as
    that passage writes it (``"North"`` for gold ``"north"``); None when no passage holds one.

    A yes/no gold (a comparison question's: "Are X and Y both ...?") is returned as it is, lower-cased, whatever the
    passages say: such an answer is judged from the passages, never written in them."""
    for gold in golds:
        if gold.strip().lower() in ("yes", "no"):
            return gold.strip().lower()
        pattern = re.compile(r"(?<!\w)" + re.escape(gold.strip()) + r"(?!\w)", re.IGNORECASE)
        for passage in passages:
            m = pattern.search(passage) if gold.strip() else None
            if m:
                return m.group(0)
    return None


def synthesize(questions: list[Question], titles: dict[str, str], search_fn: Callable[[list[str]], list[list[str]]],
               tokenizer, template: str, search_fraction: float, max_seq_len: int, seed: int,
               answer_from: str = "gold") -> list[dict]:
    """Token ids and loss masks of synthetic trajectories (one per question with ``answer_from="gold"``).

    Returns dicts with ``input_ids`` (prompt + response) and ``loss_mask`` (same length). An example is never
    truncated: a question whose two-search trajectory exceeds ``max_seq_len`` gets one search, and one that does
    not fit even so is skipped.

    Args:
        answer_from: ``"gold"``: every trajectory answers ``golden_answers[0]``; ``"results"``: a trajectory
            answers the span ``answer_span`` finds in the results it has seen (its first search's, else its
            second's), and is dropped when they hold no gold answer (as is one that does not search); each
            searching question also gives one single-search trajectory per gold paragraph, searching its title,
            when that search's results hold a gold answer (so up to 1 + the gold paragraphs' count per question).
    Raises:
        ValueError: no example fits ``max_seq_len``, or ``answer_from`` is not one of ``ANSWER_SOURCES``.
    """
    if answer_from not in ANSWER_SOURCES:
        raise ValueError(f"answer_from must be one of {ANSWER_SOURCES}, got {answer_from!r}")
    rng = random.Random(seed)
    searching = [q for q in questions if rng.random() < search_fraction]
    first = search_fn([q.question for q in searching]) if searching else []
    results = {q.id: r for q, r in zip(searching, first)}
    second_queries = {}
    for q in searching:
        missed = [titles[i] for i in q.supporting_ids if i in titles and not any(
            titles[i] in p.split("\n", 1)[0] for p in results[q.id])]
        if missed:
            second_queries[q.id] = missed[0]
    second = dict(zip(second_queries, search_fn(list(second_queries.values())))) if second_queries else {}

    title_results = {}
    if answer_from == "results":  # one more trajectory per gold paragraph: search its title, answer from it
        title_queries = sorted({titles[i] for q in searching for i in q.supporting_ids if i in titles})
        title_results = dict(zip(title_queries, search_fn(title_queries))) if title_queries else {}

    examples = []
    for q in questions:
        plans = [[(q.question, results[q.id])]] if q.id in results else [[]]
        if q.id in second:
            plans.insert(0, plans[0] + [(second_queries[q.id], second[q.id])])
        answers = [q.golden_answers[0]] * len(plans)
        if answer_from == "results":
            answers = [answer_span(q.golden_answers, [p for _, ps in plan for p in ps]) if plan else None
                       for plan in plans]
            if len(plans) == 2 and answers[1] is not None:
                plans, answers = plans[1:], answers[1:]  # the first search already holds it: no second to teach
        kept = [(plan, a) for plan, a in zip(plans, answers) if a is not None]
        for plan, answer in kept:  # the longest plan that fits: an example is never cut before its answer
            ids, mask = _encode_example(q, plan, answer, tokenizer, template)
            if len(ids) <= max_seq_len:
                examples.append({"input_ids": ids, "loss_mask": mask})
                break
        for title in dict.fromkeys(titles[i] for i in q.supporting_ids if i in titles and q.id in results):
            if title not in title_results:  # answer_from="gold": no title searches
                continue
            answer = answer_span(q.golden_answers, title_results[title])
            if answer is not None:
                ids, mask = _encode_example(q, [(title, title_results[title])], answer, tokenizer, template)
                if len(ids) <= max_seq_len:
                    examples.append({"input_ids": ids, "loss_mask": mask})
    if not examples:
        raise ValueError(f"no warm-up example fits warmup.max_seq_len={max_seq_len}; raise it or lower retriever.top_k")
    return examples


def _encode_example(q: Question, searches: list[tuple[str, list[str]]], answer: str, tokenizer,
                    template: str) -> tuple[list[int], list[int]]:
    """One trajectory's token ids and loss mask: the prompt, then for each ``(query, passages)`` a think and the
    search call (trained) and its result block (masked), then the answer, then EOS (trained)."""
    segments: list[tuple[str, int]] = []  # (text, loss mask)
    for i, (query, passages) in enumerate(searches):
        segments += [((THINK_MORE if i else THINK_FIRST) + f"<search> {query} </search>", 1),
                     (format_observation(passages), 0)]
    segments.append(((THINK_DONE if searches else THINK_DIRECT) + ANSWER.format(answer=answer), 1))
    ids = encode_prompt(q.question, template, tokenizer)
    mask = [0] * len(ids)
    for text, m in segments:
        part = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        ids += part
        mask += [m] * len(part)
    return ids + [tokenizer.eos_token_id], mask + [1]


def collate(examples: list[dict], pad_id: int) -> Experience:
    """Right-pad ``synthesize``'s examples into an ``Experience`` (``input_ids``/``attention_mask``/``loss_mask``
    ``[N, L]`` int64, ``L`` = the longest example); each example's own loss mask covers its whole sequence."""
    return Experience.from_sequences([[] for _ in examples], [e["input_ids"] for e in examples],
                                     [e["loss_mask"] for e in examples], pad_id)
