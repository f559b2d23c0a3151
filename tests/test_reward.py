"""Tests for research_rl.algo.reward: hand-computed cases for the ReSearch rule reward and the QA metrics."""

from __future__ import annotations

import ast
import pathlib
import random
import re
import string
from collections import Counter

import pytest

from research_rl.algo import reward as reward_mod
from research_rl.algo.reward import (
    REWARD_FUNCTIONS,
    RewardResult,
    check_format,
    cover_exact_match,
    exact_match,
    extract_answer,
    f1_score,
    last_boxed_content,
    normalize_answer,
    research_reward,
    search_format_reward,
)

pytestmark = pytest.mark.unit

EOS = "<|im_end|>"


def make_response(
    answer: str = "\\boxed{Paris}",
    *,
    searches: tuple[tuple[str, str], ...] = (("capital of France", "Paris is the capital of France."),),
    think: str = "<think>I should search.</think>",
    eos: str = EOS,
) -> str:
    """A well-formed ReSearch response: think, (search, result)*, think, answer, EOS."""
    parts = [think]
    for query, passage in searches:
        parts.append(f"<search>{query}</search><result>{passage}</result>")
    parts.append("<think>Found it.</think>")
    parts.append(f"<answer>The answer is {answer}</answer>")
    return "".join(parts) + eos


# --------------------------------------------------------------------------- normalisation and metrics


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),  # article removed, lower-cased
        ("  a   cat\tand\nAN owl ", "cat and owl"),  # articles a/an, white space folded
        ("Paris!", "paris"),  # punctuation
        ("U.S.A.", "usa"),  # punctuation removed before tokenising: no spaces introduced
        ("theatre", "theatre"),  # "the" only as a whole word
        ("Eiffel-Tower", "eiffeltower"),  # hyphen is punctuation, removed without a space
        ("Café", "café"),  # no Unicode normalisation (accent kept)
        ("“Paris”", "“paris”"),  # curly quotes are not ASCII punctuation
        ("The", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match() -> None:
    assert exact_match("the Eiffel  tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0  # any gold
    assert exact_match("Paris", []) == 0.0


def test_cover_exact_match() -> None:
    assert cover_exact_match("It is the Eiffel Tower, in Paris.", ["eiffel tower"]) == 1.0
    assert cover_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0  # prediction inside gold does not count
    assert cover_exact_match("Paris", ["London", "Paris"]) == 1.0
    assert cover_exact_match("anything", ["The"]) == 0.0  # gold normalises to "": never a match
    assert cover_exact_match("Paris", []) == 0.0


def test_f1_exact() -> None:
    assert f1_score("The Eiffel Tower!", ["eiffel tower"]) == 1.0


def test_f1_partial_overlap_prediction_longer() -> None:
    # pred tokens [eiffel, tower], gold [tower]: common 1; precision 1/2, recall 1/1
    # F1 = 2 * (1/2) * 1 / (1/2 + 1) = 1 / (3/2) = 2/3
    assert f1_score("Eiffel Tower", ["the tower"]) == pytest.approx(2 / 3)


def test_f1_partial_overlap_gold_longer() -> None:
    # pred [barack, obama], gold [barack, hussein, obama, ii]: common 2; precision 2/2, recall 2/4
    # F1 = 2 * 1 * 1/2 / (1 + 1/2) = 1 / (3/2) = 2/3
    assert f1_score("Barack Obama", ["Barack Hussein Obama II"]) == pytest.approx(2 / 3)


def test_f1_counts_tokens_with_multiplicity() -> None:
    # pred [new, new, york], gold [new, york]: Counter overlap = {new: 1, york: 1} = 2
    # precision 2/3, recall 2/2 -> F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 4/5
    assert f1_score("new new york", ["New York"]) == pytest.approx(0.8)


def test_f1_no_overlap_and_empty() -> None:
    assert f1_score("London", ["Paris"]) == 0.0
    assert f1_score("the", ["Paris"]) == 0.0  # prediction normalises to no tokens: no division by zero
    assert f1_score("Paris", []) == 0.0


def test_f1_multiple_golds_take_the_max() -> None:
    # gold 1: pred [john, smith], gold [john]: precision 1/2, recall 1 -> 2/3
    # gold 2: exact -> 1.0; gold 3: no overlap -> 0
    assert f1_score("John Smith", ["John", "john smith", "Mary"]) == 1.0
    assert f1_score("John Smith", ["John", "Mary"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("yes", "no", 0.0),
        ("Yes.", "yes", 1.0),
        ("no", "No", 1.0),
        ("yes", "yes it is", 0.0),  # pred is "yes", sides differ -> 0 although "yes" overlaps
        ("yes it is", "yes", 0.0),  # gold is "yes", sides differ -> 0
        ("noanswer", "no answer", 0.0),
    ],
)
def test_f1_yes_no_rule(pred: str, gold: str, expected: float) -> None:
    assert f1_score(pred, [gold]) == expected


def test_f1_yes_no_rule_applies_per_gold() -> None:
    # gold "no" scores 0 for pred "yes", but the second gold matches exactly.
    assert f1_score("yes", ["no", "yes"]) == 1.0


# The official scorer's logic, transcribed as a plain reference (HotpotQA hotpot_evaluate_v1.py: normalize_answer,
# f1_score, exact_match_score; the normalisation is SQuAD v1.1 evaluate-v1.1.py's; max over golds as SQuAD's
# metric_max_over_ground_truths). research_rl.algo.reward must agree with it on every input.


def _official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def _official_f1(prediction, ground_truth):
    normalized_prediction = _official_normalize_answer(prediction)
    normalized_ground_truth = _official_normalize_answer(ground_truth)
    zero = (0, 0, 0)
    if normalized_prediction in ["yes", "no", "noanswer"] and normalized_prediction != normalized_ground_truth:
        return zero
    if normalized_ground_truth in ["yes", "no", "noanswer"] and normalized_prediction != normalized_ground_truth:
        return zero
    prediction_tokens = normalized_prediction.split()
    ground_truth_tokens = normalized_ground_truth.split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return zero
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall), precision, recall


def _official_em(prediction, ground_truth):
    return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)


HAND_PAIRS = [  # (prediction, gold): articles, punctuation, white space, case, yes/no, unicode, empty
    ("The  Quick, brown fox!", "quick brown fox"), ("an apple a day", "Apple day"), ("A.B.C.", "abc"),
    ("the_the", "the the"), ("Théâtre de la Ville", "theatre de la ville"), ("Yes.", "yes"), ("No", "noanswer"),
    ("", ""), ("   ", "the"), ("\tThe\nEnd\t", "end"), ("don't", "dont"), ("U.S. Army", "US army"),
    ("1,000", "1000"), ("(The) Beatles", "Beatles"), ("the-best", "best"), ("Anna and Thea", "anna thea"),
    ("THE END AN", "end"), ("New York New York", "new york"), ("yes it is", "yes"), ("“Paris”", "Paris"),
    ("Barack Hussein Obama II", "Barack Obama"), ("a", "an"), ("no no", "no"), ("Ōe Kenzaburō", "oe kenzaburo"),
]


def _random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pieces = ["a", "an", "the", "The", "AN", "yes", "no", "noanswer", "Paris", "new", "york", "x", "é", "’", "—",
              ".", ",", "!", "-", "'", '"', "(", ")", "_", " ", "  ", "\t", "\n", "1", "2,000", "U.S.", "théâtre"]

    def text():
        return "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 8)))

    return [(text(), text()) for _ in range(n)]


@pytest.mark.parametrize("pred, gold", HAND_PAIRS)
def test_metrics_match_the_official_scorer_on_hand_cases(pred: str, gold: str) -> None:
    assert normalize_answer(pred) == _official_normalize_answer(pred)
    assert exact_match(pred, [gold]) == float(_official_em(pred, gold))
    assert f1_score(pred, [gold]) == _official_f1(pred, gold)[0]


def test_metrics_match_the_official_scorer_on_random_strings() -> None:
    pairs = _random_pairs(2000)
    for pred, gold in pairs:
        assert normalize_answer(pred) == _official_normalize_answer(pred), repr(pred)
        assert exact_match(pred, [gold]) == float(_official_em(pred, gold)), (pred, gold)
        assert f1_score(pred, [gold]) == _official_f1(pred, gold)[0], (pred, gold)
    # max over golds, as SQuAD's metric_max_over_ground_truths
    for (pred, g1), (_, g2) in zip(pairs[::2], pairs[1::2]):
        assert f1_score(pred, [g1, g2]) == max(_official_f1(pred, g)[0] for g in (g1, g2))
        assert exact_match(pred, [g1, g2]) == float(any(_official_em(pred, g) for g in (g1, g2)))


def test_bare_string_golds_are_rejected() -> None:
    with pytest.raises(TypeError, match="bare str"):
        f1_score("Paris", "Paris")
    with pytest.raises(TypeError, match="bare str"):
        exact_match("Paris", "Paris")
    with pytest.raises(TypeError, match="bare str"):
        research_reward(make_response(), EOS, "Paris")


# --------------------------------------------------------------------------- boxed extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{Paris}", "Paris"),
        ("\\boxed{\\text{Paris}}", "\\text{Paris}"),  # inner braces kept verbatim
        ("x \\boxed{a{b}{c{d}}e} y", "a{b}{c{d}}e"),  # nested braces matched
        ("\\boxed{first} and then \\boxed{second}", "second"),  # last box wins
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{unclosed", None),
        ("\\boxed{ok} then \\boxed{open{x}", None),  # last box unbalanced: no fallback to the earlier one
        ("\\boxed Paris", None),  # only the brace form is accepted
    ],
)
def test_last_boxed_content(text: str, expected: str | None) -> None:
    assert last_boxed_content(text) == expected


def test_extract_answer_reads_only_the_answer_span() -> None:
    text = "<think>\\boxed{wrong}</think><answer>so \\boxed{Rome}</answer> \\boxed{after}"
    assert extract_answer(text) == "Rome"
    assert extract_answer("<answer>\\boxed{a} \\boxed{b{c}}</answer>") == "b{c}"
    assert extract_answer("\\boxed{Rome}") is None  # no answer span
    assert extract_answer("<answer>\\boxed{Rome}") is None  # unclosed span
    assert extract_answer("<answer>Rome</answer>") is None


# --------------------------------------------------------------------------- format gate (rule 1)


def test_well_formed_response_passes() -> None:
    assert check_format(make_response()) == (True, "format is correct")
    assert check_format(make_response(searches=())) == (True, "format is correct")  # searching is optional
    two = make_response(searches=(("q1", "p1"), ("q2", "p2")))
    assert check_format(two) == (True, "format is correct")


def test_think_order_is_not_checked() -> None:
    # Counts only (as in the reference): a closing tag before the opening one still passes.
    resp = "</think>x<think><answer>\\boxed{Paris}</answer>" + EOS
    assert check_format(resp)[0] is True


def _assert_bad_format(response: str, reason_part: str) -> None:
    ok, reason = check_format(response)
    assert not ok
    assert reason_part in reason
    result = research_reward(response, EOS, ["Paris"])
    assert result.score == 0.0
    assert result.format_ok is False
    assert result.reason.startswith("bad format: ")
    assert reason_part in result.reason
    assert result.answer is None and result.f1 == 0.0


def test_unpaired_think() -> None:
    _assert_bad_format(make_response(think="<think>unclosed"), "<think> </think> not paired")


def test_no_think() -> None:
    resp = "<answer>\\boxed{Paris}</answer>" + EOS
    _assert_bad_format(resp, "<think> or </think> not found")


def test_two_answer_blocks() -> None:
    resp = "<think>t</think><answer>\\boxed{London}</answer><answer>\\boxed{Paris}</answer>" + EOS
    _assert_bad_format(resp, "<answer> or </answer> not found")


def test_no_answer_block() -> None:
    resp = "<think>t</think>\\boxed{Paris}" + EOS
    _assert_bad_format(resp, "<answer> or </answer> not found")


def test_answer_close_before_open() -> None:
    resp = "<think>t</think></answer>\\boxed{Paris}<answer>" + EOS
    _assert_bad_format(resp, "<answer> must be before </answer>")


def test_missing_boxed() -> None:
    _assert_bad_format(make_response(answer="Paris"), "answer is missing \\boxed{} format")


def test_boxed_without_closing_brace_in_span() -> None:
    _assert_bad_format(make_response(answer="\\boxed{Paris"), "answer is missing \\boxed{} format")


def test_search_without_result() -> None:
    resp = "<think>t</think><search>capital of France</search><answer>\\boxed{Paris}</answer>" + EOS
    _assert_bad_format(resp, "search/result tags are incomplete")


def test_search_without_close() -> None:
    resp = "<think>t</think><search>capital of France<result>p</result><answer>\\boxed{Paris}</answer>" + EOS
    _assert_bad_format(resp, "search/result tags are incomplete")


def test_result_without_close() -> None:
    resp = "<think>t</think><search>q</search><result>p<answer>\\boxed{Paris}</answer>" + EOS
    _assert_bad_format(resp, "search/result tags are incomplete")


def test_result_before_search_close() -> None:
    resp = "<think>t</think><search>q<result>p</result></search><answer>\\boxed{Paris}</answer>" + EOS
    _assert_bad_format(resp, "search/result tags are nested in the wrong order")


def test_second_search_incomplete() -> None:
    resp = make_response(searches=(("q1", "p1"),)).replace(
        "<think>Found it.</think>", "<search>q2</search><think>Found it.</think>"
    )
    _assert_bad_format(resp, "search/result tags are incomplete")


def test_answer_tag_inside_retrieved_passage_breaks_format() -> None:
    # The check runs over retrieved passages too: a passage quoting "<answer>" makes two <answer> tags.
    resp = make_response(searches=(("q", "A web page says <answer> is an HTML-like tag."),))
    _assert_bad_format(resp, "<answer> or </answer> not found")


def test_search_tag_inside_retrieved_passage_is_skipped_by_the_walk() -> None:
    # The walk resumes after the passage's </result>, so a bare "<search>" inside the passage is never looked at
    # (reference behaviour).
    resp = make_response(searches=(("q", "use the <search> element"),))
    assert check_format(resp) == (True, "format is correct")


def test_result_close_and_search_inside_retrieved_passage_break_format() -> None:
    # A passage containing "</result>" ends the walk step early; the "<search>" after it then starts a new step
    # that has no "</search>" after it.
    resp = make_response(searches=(("q", "tags: </result> and <search>"),))
    _assert_bad_format(resp, "search/result tags are incomplete")


def test_think_tag_inside_retrieved_passage_breaks_format() -> None:
    resp = make_response(searches=(("q", "models emit <think> first"),))
    _assert_bad_format(resp, "<think> </think> not paired")


# --------------------------------------------------------------------------- EOS rule (rule 2)


def test_wrong_eos_is_over_length() -> None:
    resp = make_response(eos="<|endoftext|>")
    result = research_reward(resp, EOS, ["Paris"])
    assert result == RewardResult(0.0, "over length", None, 0.0, True)


def test_missing_eos_is_over_length() -> None:
    result = research_reward(make_response(eos=""), EOS, ["Paris"])
    assert (result.score, result.reason, result.format_ok) == (0.0, "over length", True)


def test_format_is_checked_before_eos() -> None:
    # Bad format and no EOS: the format reason wins (rule order).
    result = research_reward("<think>t</think>" + "no answer", EOS, ["Paris"])
    assert result.reason.startswith("bad format")


def test_eos_must_be_at_the_very_end() -> None:
    result = research_reward(make_response() + "\n", EOS, ["Paris"])
    assert result.reason == "over length"


def test_empty_eos_token_rejected() -> None:
    with pytest.raises(ValueError, match="eos_token"):
        research_reward(make_response(), "", ["Paris"])


# --------------------------------------------------------------------------- answer and score (rules 3-4)


def test_correct_answer_full_score() -> None:
    result = research_reward(make_response(), EOS, ["Paris"])
    assert result == RewardResult(1.0, "correct answer, f1=1.00", "Paris", 1.0, True)


def test_partial_answer_scores_f1() -> None:
    # answer [eiffel, tower] vs gold [tower]: precision 1/2, recall 1 -> F1 2/3
    result = research_reward(make_response(answer="\\boxed{Eiffel Tower}"), EOS, ["The Tower"])
    assert result.score == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 / 3)
    assert result.reason == "correct answer, f1=0.67"
    assert result.answer == "Eiffel Tower"


def test_wrong_answer_gets_floor() -> None:
    result = research_reward(make_response(answer="\\boxed{London}"), EOS, ["Paris"])
    assert result == RewardResult(0.1, "wrong answer but good format", "London", 0.0, True)


def test_yes_no_in_reward() -> None:
    assert research_reward(make_response(answer="\\boxed{yes}"), EOS, ["no"]).score == 0.1
    assert research_reward(make_response(answer="\\boxed{yes}"), EOS, ["yes"]).score == 1.0


def test_multiple_golds_in_reward() -> None:
    result = research_reward(make_response(answer="\\boxed{NYC}"), EOS, ["New York City", "nyc"])
    assert result.score == 1.0


def test_last_box_in_answer_wins() -> None:
    resp = make_response(answer="maybe \\boxed{London}, no: \\boxed{Paris}")
    result = research_reward(resp, EOS, ["Paris"])
    assert (result.answer, result.score) == ("Paris", 1.0)


def test_nested_braces_scored_verbatim() -> None:
    # "\\text{Paris}" normalises to "textparis" (backslash and braces are punctuation): no overlap with "paris".
    # Inherited from the reference; pinned so that a change is deliberate.
    result = research_reward(make_response(answer="\\boxed{\\text{Paris}}"), EOS, ["Paris"])
    assert result.answer == "\\text{Paris}"
    assert result.score == 0.1


def test_unbalanced_last_box_is_no_boxed_answer() -> None:
    # Passes the gate ("\\boxed{" and a "}" are in the span) but the last box never closes.
    resp = make_response(answer="} \\boxed{Paris")
    assert check_format(resp)[0] is True
    result = research_reward(resp, EOS, ["Paris"])
    assert result == RewardResult(0.0, "no boxed answer", None, 0.0, True)


def test_im_start_assistant_inside_response_is_not_split() -> None:
    # Deviation from the reference: we score the response alone and never split on "Assistant:".
    resp = make_response(searches=(("q", "Assistant: the capital is Rome"),))
    assert research_reward(resp, EOS, ["Paris"]).score == 1.0


# --------------------------------------------------------------------------- shaped pipeline-test reward


@pytest.mark.parametrize(
    "response",
    [
        "<search>capital of France</search><result>Paris ...</result>",
        "<think>t</think><search> q </search>\n<result></result>" + EOS,  # empty passage is fine
        "<search>  </search><search>real query</search><result>p</result>",  # a later call counts
        make_response(),
    ],
)
def test_search_format_reward_positive(response: str) -> None:
    result = search_format_reward(response, EOS, ["Paris"])
    assert result == RewardResult(1.0, "well-formed search call", None, 0.0, True)


@pytest.mark.parametrize(
    "response",
    [
        "",
        make_response(searches=()),  # a perfect answer without searching scores 0 here
        "<search>   </search><result>p</result>",  # blank query
        "<search>q</search>",  # no result
        "<search>q</search><result>p",  # unclosed result
        "<search>q<result>p</result></search>",  # result before </search>
        "<result>p</result><search>q</search>",  # result before the search
        "<search>q",
    ],
)
def test_search_format_reward_negative(response: str) -> None:
    result = search_format_reward(response, EOS, ["Paris"])
    assert result == RewardResult(0.0, "no well-formed search call", None, 0.0, False)


def test_reward_functions_registry() -> None:
    from research_rl.algo.reward import reference_reward

    assert REWARD_FUNCTIONS == {"research": research_reward, "research_reference": reference_reward,
                                "search_format": search_format_reward}
    for name, fn in REWARD_FUNCTIONS.items():
        text = make_response() if name != "research_reference" else "<|im_start|>assistant\n" + make_response()
        assert isinstance(fn(text, EOS, ["Paris"]), RewardResult)


def test_reward_module_imports_only_stdlib() -> None:
    tree = ast.parse(pathlib.Path(reward_mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "re", "string", "collections", "dataclasses", "typing"}


# ------------------------------------------------------------------------------------------ reference_reward
CHAT_PROMPT = "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"
BASE_PROMPT = "A conversation between User and Assistant. ... User: Where?. Assistant:"


def test_reference_reward_scores_prompt_plus_response_after_the_chat_marker():
    from research_rl.algo.reward import reference_reward

    r = reference_reward(CHAT_PROMPT + make_response("\\boxed{Paris}"), EOS, ["Paris"])
    assert (r.score, r.answer, r.format_ok) == (1.0, "Paris", True)
    # the base template's marker when the chat marker is absent
    r = reference_reward(BASE_PROMPT + make_response("\\boxed{Paris}", eos="</s>"), "</s>", ["Paris"])
    assert (r.score, r.answer) == (1.0, "Paris")
    assert REWARD_FUNCTIONS["research_reference"] is reference_reward


def test_reference_reward_split_cuts_at_a_second_marker_inside_a_passage():
    from research_rl.algo.reward import reference_reward

    # a retrieved passage holding "Assistant:" cuts the base-template text there: the scored part ends inside the
    # <result> block, so the format gate fails (research_reward, which scores the response alone, gives 1.0)
    response = make_response("\\boxed{Paris}", searches=(("q", "Assistant: Paris is in France."),), eos="</s>")
    assert research_reward(response, "</s>", ["Paris"]).score == 1.0
    r = reference_reward(BASE_PROMPT + response, "</s>", ["Paris"])
    assert r.score == 0 and isinstance(r.score, int) and r.reason.startswith("bad format")
    # the chat marker wins over "Assistant:" even when the latter comes first (it is tried first)
    r = reference_reward("Assistant: noise " + CHAT_PROMPT + make_response("\\boxed{Paris}"), EOS, ["Paris"])
    assert r.score == 1.0


def test_reference_reward_box_forms():
    from research_rl.algo.reward import reference_last_boxed, reference_reward

    # the space form: after the last "\boxed " up to the first "$", wherever it stands in the answer span
    assert reference_last_boxed("The answer is $\\boxed Paris$ ok") == "Paris"
    assert reference_last_boxed("\\boxed{x} and \\boxed Rome") == "Rome"
    # braces counted from the last \boxed; inner braces kept
    assert reference_last_boxed("\\boxed{a} \\boxed{\\text{Paris}}") == "\\text{Paris}"
    # not of the \boxed{...} form, unclosed, \fbox only, nothing: the reference's "find box error"
    assert reference_last_boxed("\\boxedtext{a}") is None
    assert reference_last_boxed("\\boxed{a") is None
    assert reference_last_boxed("\\fbox{a}") is None
    assert reference_last_boxed("no box") is None
    # end to end: the format gate needs \boxed{ in the span; the space form then decides the answer
    r = reference_reward(CHAT_PROMPT + make_response("\\boxed{x} \\boxed Paris$"), EOS, ["Paris"])
    assert (r.score, r.answer) == (1.0, "Paris")
    r = reference_reward(CHAT_PROMPT + make_response("\\boxed{Paris}"), EOS, "Paris")  # a bare str is wrapped
    assert r.score == 1.0


def test_reference_reward_failure_paths_and_order():
    from research_rl.algo.reward import reference_reward

    # EOS is an exact suffix: EOS + "\n" fails, EOS EOS passes (one EOS is stripped, the rest is outside <answer>)
    assert reference_reward(CHAT_PROMPT + make_response() + "\n", EOS, ["Paris"]).reason == "over length"
    assert reference_reward(CHAT_PROMPT + make_response() + EOS, EOS, ["Paris"]).score == 1.0
    # format is checked before EOS: a bad format without EOS reports the format
    assert reference_reward(CHAT_PROMPT + "<answer>\\boxed{Paris}</answer>", EOS, ["Paris"]).reason.startswith(
        "bad format")
    r = reference_reward(CHAT_PROMPT + make_response("\\boxed{Berlin}"), EOS, ["Paris"])
    assert (r.score, r.reason) == (0.1, "wrong answer but good format")
    with pytest.raises(ValueError, match="neither"):
        reference_reward(make_response(), EOS, ["Paris"])
    with pytest.raises(ValueError, match="eos_token"):
        reference_reward(CHAT_PROMPT + make_response(), "", ["Paris"])
