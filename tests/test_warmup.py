"""The warm-up's collate: synthetic examples become the learner's ``Experience``, right-padded, each example's own
loss mask in place."""

from __future__ import annotations

import pytest
import torch

from research_rl.algo.experience import Experience
from research_rl.rollout.warmup import collate

pytestmark = pytest.mark.unit


def test_collate_right_pads_examples_into_an_experience():
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10], "loss_mask": [0, 1]}]
    exp = collate(examples, pad_id=0)
    assert isinstance(exp, Experience) and len(exp) == 2
    assert exp.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert exp.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in (exp.input_ids, exp.attention_mask, exp.loss_mask))
    assert exp.advantages is None and exp.ref_log_probs is None


def test_split_questions_is_disjoint_seeded_and_independent_of_order():
    from research_rl.data import Question
    from research_rl.rollout.warmup import split_questions

    qs = [Question(f"q{i}", f"question {i}?", ("a",), "musique") for i in range(400)]
    warm, rest = split_questions(qs, 0.5, seed=0)
    assert {q.id for q in warm}.isdisjoint(q.id for q in rest) and len(warm) + len(rest) == 400
    assert 150 < len(warm) < 250  # a fair coin per question: 200 ± 10 (std)
    assert [q.id for q in split_questions(qs[::-1], 0.5, seed=0)[0]] == [q.id for q in warm][::-1]
    assert {q.id for q in split_questions(qs, 0.5, seed=1)[0]} != {q.id for q in warm}
    assert split_questions(qs, 0.0, seed=0) == ([], qs)


def test_answer_span_copies_the_answer_as_the_passage_writes_it():
    from research_rl.rollout.warmup import answer_span

    passages = ['"Nissedal"\nNissedal is a municipality in Telemark.', '"Norway"\nNorway means the way North.']
    assert answer_span(("north", "N"), passages) == "North"
    assert answer_span(("telemark county", "Telemark"), passages) == "Telemark"  # the golds in their order
    assert answer_span(("way n",), passages) is None  # whole words only
    assert answer_span(("Oslo",), passages) is None
    assert answer_span(("Yes",), passages) == "yes" and answer_span((" no",), []) == "no"  # comparisons: not spans


def test_synthesize_answers_a_comparison_from_either_source(tokenizer):
    """A yes/no question (a comparison's gold is no passage's span): ``answer_from="gold"`` gives its one
    trajectory and searches no titles; ``"results"`` adds one title-search trajectory per gold paragraph, every
    trajectory answering ``yes``."""
    from research_rl.data import Question
    from research_rl.rollout.warmup import synthesize

    q = Question("c1", "Are Oslo and Bergen both in Norway?", ("Yes",), "hotpotqa", supporting_ids=("p1", "p2"))
    titles = {"p1": "Oslo", "p2": "Bergen"}
    queries: list[str] = []

    def search(batch):
        queries.extend(batch)
        return [['"Oslo"\nOslo is the capital of Norway.', '"Bergen"\nBergen is a city in Norway.'] for _ in batch]

    gold = synthesize([q], titles, search, tokenizer, "instruct", 1.0, 1024, 0, answer_from="gold")
    assert len(gold) == 1 and queries == [q.question]
    queries.clear()
    copied = synthesize([q], titles, search, tokenizer, "instruct", 1.0, 1024, 0, answer_from="results")
    assert len(copied) == 3 and sorted(queries) == sorted([q.question, "Bergen", "Oslo"])
    for ex in copied:
        answer = tokenizer.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
        assert "\\boxed{yes}" in answer, answer
