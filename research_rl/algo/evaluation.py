"""Evaluation core: per-example scores, per-dataset aggregates, the baselines' prompts and the paper's Table 2.

ReSearch (arXiv 2503.19470) §3.1-3.2 evaluates greedy decoding on the full dev sets of HotpotQA, 2WikiMultiHopQA and
MuSiQue and the Bamboogle test set, with exact match after normalisation and an LLM-as-judge. ``research_rl.evaluate``
(the command) and the trainer's validation both score with the functions here, so a number logged as ``val/em``
during training means what ``em`` means in ``metrics.json`` after ``python -m research_rl.evaluate``.

Pure functions: strings, numbers and lists in, dicts out; no config objects, no Ray, no torch.

Metrics per example (``score_example``):

- ``em`` / ``f1`` / ``cover_em``: ``reward.exact_match`` / ``reward.f1_score`` / ``reward.cover_exact_match`` of the
  prediction against the gold answers (official HotpotQA/SQuAD normalisation; cover-EM = a normalised gold is a
  substring of the normalised prediction).
- ``prediction``: for ``research``, the last ``\\boxed{}`` inside ``<answer>…</answer>`` (``reward.extract_answer``);
  it is scored even when the format gate fails, so EM measures answers and ``format_fail`` measures format. For the
  baselines, the generated text without the EOS string, stripped (FlashRAG scores the raw generation the same way).
- ``format_fail`` (0/1) and ``format_fail_reason``: for ``research``, the reward's reason when it would score 0 for
  form (``bad format: …``, ``over length``, ``no boxed answer``); for the baselines only ``over length`` (no EOS
  within the budget) applies.
- ``searches``: search calls in the trajectory (naive RAG: its one retrieval; naive generation: 0).
- ``response_len``: model tokens (the loss-mask sum: inserted ``<result>`` tokens excluded), as in the paper's
  response-length curves.

Baselines (``BASELINE_PROMPTS``), the paper's "Naive Generation" and "Naive RAG" (§3.1: both run through FlashRAG,
which the ReSearch evaluation code builds on). The wording is FlashRAG's, verbatim:

- naive generation: the ``zero_shot`` template of FlashRAG ``examples/methods/run_exp.py`` (also copied into the
  ReSearch evaluation script ``scripts/evaluation/run_eval.py``, method ``zero-shot``): system *"Answer the question
  based on your own knowledge. Only give me the answer and do not output any other words."*, user
  *"Question: {question}"*;
- naive RAG: FlashRAG's default ``PromptTemplate`` (``flashrag/prompt/base_prompt.py``, used by ``SequentialPipeline``
  = method ``naive``): system *"Answer the question based on the given document.Only give me the answer and do not
  output any other words.\\nThe following are given documents.\\n\\n{reference}"* (the missing space after
  "document." is FlashRAG's), user *"Question: {question}"*; ``{reference}`` is one line
  ``Doc {i}(Title: {title}) {text}`` per passage (i from 1), title = the passage's first line, text = the rest.

FlashRAG renders system + user through the chat template when the model name contains "chat" or "instruct", and
joins them with a blank line otherwise. Here ``model.template`` decides (``instruct``: chat template with
``add_generation_prompt=True``; ``base``: ``system + "\\n\\n" + user``), so the choice is explicit and honoured. (The
reference ReSearch script declares ``--apply_chat`` with argparse ``type=bool``, as copies of it show, so
``--apply_chat False`` evaluates as True and a base model silently gets the chat template.)

Paper numbers (``PAPER_TABLE2``): only the ReSearch rows for Qwen2.5-7B-Instruct and Qwen2.5-32B-Instruct (EM and
LLM-as-judge, %), the paper's headline results (Table 2). The base-model rows and the baselines' rows (naive
generation, naive RAG, Iter-RetGen, IRCoT) are not included; the table says "n/a" for them. Add them to
``PAPER_TABLE2`` from the paper to compare a base model or a baseline.
"""

from __future__ import annotations

import math
import random
import re
from typing import Iterable, Sequence

from research_rl.algo.reward import cover_exact_match, exact_match, extract_answer, f1_score, research_reward
from research_rl.algo.templates import chat_prompt

METHODS = ("research", "naive_generation", "naive_rag")
METRICS = ("em", "f1", "cover_em", "searches", "response_len", "format_fail")  # averaged per dataset and overall
DEV_SPLITS = {"bamboogle": "test"}  # datasets evaluated on a split other than dev (Bamboogle has only test)

# ------------------------------------------------------------------------------------------------ baseline prompts

NAIVE_GENERATION_SYSTEM = (
    "Answer the question based on your own knowledge. Only give me the answer and do not output any other words."
)
NAIVE_RAG_SYSTEM = (
    "Answer the question based on the given document."
    "Only give me the answer and do not output any other words."
    "\nThe following are given documents.\n\n{reference}"
)
BASELINE_USER = "Question: {question}"
BASELINE_PROMPTS = {"naive_generation": NAIVE_GENERATION_SYSTEM, "naive_rag": NAIVE_RAG_SYSTEM}


def format_reference(passages: Sequence[str]) -> str:
    """FlashRAG's reference block: ``"Doc {i}(Title: {title}) {text}\\n"`` per passage, i from 1.

    ``passages`` are corpus ``contents`` strings (``"Title"\\ntext``); the title is the first line as it stands (the
    quotes of the wiki-18 corpus included, as in FlashRAG), the text the remaining lines joined by newlines.
    """
    out = []
    for i, contents in enumerate(passages, 1):
        title, _, text = contents.partition("\n")
        out.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(out)


def render_baseline_prompt(question: str, method: str, template: str, tokenizer=None,
                           passages: Sequence[str] | None = None) -> str:
    """The prompt text of a baseline (module docstring has the wording and its source).

    Args:
        question: the question as in the dataset.
        method: ``"naive_generation"`` or ``"naive_rag"``.
        template: ``"instruct"`` (system + user messages through the tokenizer's chat template,
            ``add_generation_prompt=True``) or ``"base"`` (``system + "\\n\\n" + user`` as raw text).
        tokenizer: a Hugging Face tokenizer with a chat template (``instruct`` only).
        passages: retrieved passage contents (``naive_rag`` only; top-k, ranked).
    Raises:
        ValueError: unknown method or template, passages missing for ``naive_rag``, or ``instruct`` without a chat
            template.
    """
    if method not in BASELINE_PROMPTS:
        raise ValueError(f"no baseline prompt for method {method!r}; expected one of {sorted(BASELINE_PROMPTS)}")
    if method == "naive_rag":
        if passages is None:
            raise ValueError("naive_rag needs the retrieved passages")
        system = NAIVE_RAG_SYSTEM.format(reference=format_reference(passages))
    else:
        system = NAIVE_GENERATION_SYSTEM
    user = BASELINE_USER.format(question=question)
    if template == "base":
        return f"{system}\n\n{user}"
    if template == "instruct":
        return chat_prompt(system, user, tokenizer)
    raise ValueError(f"unknown template {template!r}; expected 'base' or 'instruct'")


# ------------------------------------------------------------------------------------------------ datasets

def question_file(data_dir: str, dataset: str) -> str:
    """Where a dataset's evaluation questions live: ``<data_dir>/<dataset>/dev.jsonl`` (``test.jsonl`` for
    Bamboogle, which has no dev split). The path is not checked here."""
    return f"{data_dir.rstrip('/')}/{dataset}/{DEV_SPLITS.get(dataset, 'dev')}.jsonl"


def sample_questions(questions: list, limit: int | None, seed: int) -> list:
    """A fixed-seed sample of ``limit`` questions (all of them, in file order, when ``limit`` is None or not smaller
    than the file). The same (questions, limit, seed) always gives the same sample, in the same order:
    ``random.Random(seed).sample`` (what the trainer's validation has always drawn)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    return random.Random(seed).sample(questions, limit)


# ------------------------------------------------------------------------------------------------ scoring

def score_example(response: str, golden_answers: Sequence[str], eos_token: str, method: str = "research",
                  searches: int = 0, response_len: int = 0, over_length_prediction: str = "extract") -> dict:
    """Score one trajectory.

    Args:
        response: the response text with special tokens kept, cut after the first EOS (``Trajectory.response_text``).
        golden_answers: gold answer strings (a bare ``str`` raises TypeError).
        eos_token: the tokenizer's EOS string (non-empty).
        method: ``research`` (answer = last ``\\boxed{}`` in ``<answer>``) or a baseline (answer = the whole text).
        searches: search calls made (retrievals for naive RAG).
        response_len: model tokens generated (loss-mask sum).
        over_length_prediction: for a response that does not end with ``eos_token``: ``extract`` scores what can be
            read from it; ``empty`` predicts ``""`` (the reference evaluation).
    Returns:
        ``{"prediction", "em", "f1", "cover_em", "format_fail", "format_fail_reason", "searches", "response_len"}``;
        em/f1/cover_em are floats in [0, 1], format_fail is 0.0 or 1.0 (the reason is None when 0).
    Raises:
        ValueError: unknown method or ``over_length_prediction``, or an empty eos_token.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if not eos_token:
        raise ValueError("eos_token must be a non-empty string")
    golds = golden_answers
    if method == "research":
        verdict = research_reward(response, eos_token, golds)
        fail = verdict.reason if verdict.answer is None else None  # bad format / over length / no boxed answer
        prediction = extract_answer(response) or ""
    else:
        fail = None if response.endswith(eos_token) else "over length"
        prediction = response.removesuffix(eos_token).strip()
    if over_length_prediction not in ("extract", "empty"):
        raise ValueError(f"over_length_prediction={over_length_prediction!r}: expected extract or empty")
    if over_length_prediction == "empty" and not response.endswith(eos_token):
        prediction = ""
    return {
        "prediction": prediction,
        "em": exact_match(prediction, golds),
        "f1": f1_score(prediction, golds),
        "cover_em": cover_exact_match(prediction, golds),
        "format_fail": 0.0 if fail is None else 1.0,
        "format_fail_reason": fail,
        "searches": float(searches),
        "response_len": float(response_len),
    }


def aggregate(rows: Iterable[dict]) -> dict[str, float]:
    """Means of ``METRICS`` per dataset and over every row.

    Args:
        rows: dicts with a ``"dataset"`` key and every key of ``METRICS`` (e.g. ``score_example`` output + dataset).
    Returns:
        ``{"<dataset>/<metric>": mean, "<dataset>/n": count, ..., "<metric>": mean over all rows, "n": count}``;
        the overall means weight every example equally (micro average). Empty input gives ``{"n": 0}``.
    """
    per: dict[str, list[dict]] = {}
    for r in rows:
        per.setdefault(r["dataset"], []).append(r)
    out: dict[str, float] = {}
    everything = [r for group in per.values() for r in group]
    for name, group in per.items():
        for m in METRICS:
            out[f"{name}/{m}"] = sum(r[m] for r in group) / len(group)
        out[f"{name}/n"] = len(group)
    for m in METRICS:
        if everything:
            out[m] = sum(r[m] for r in everything) / len(everything)
    out["n"] = len(everything)
    return out


# ------------------------------------------------------------------------------------------------ the paper's table

PAPER_SOURCE = ("ReSearch (arXiv 2503.19470) Table 2: full dev sets (Bamboogle: test), E5 retrieval over wiki-18, "
                "EM and LLM-as-judge (gpt-4o-mini), in %")
# (method, model size, template) -> {dataset: (EM %, judge %)}. Only rows actually retrieved; see module docstring.
PAPER_TABLE2: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {
    ("research", "7b", "instruct"): {"hotpotqa": (43.52, 63.62), "2wikimultihopqa": (47.59, 54.22),
                                     "musique": (22.30, 33.43), "bamboogle": (42.40, 54.40)},
    ("research", "32b", "instruct"): {"hotpotqa": (46.73, 67.70), "2wikimultihopqa": (44.90, 50.30),
                                      "musique": (26.40, 38.56), "bamboogle": (56.80, 67.20)},
}
_SIZE = re.compile(r"(?<![\d.xX])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")


def model_size(model_path: str) -> str | None:
    """The parameter count in a model name, lower-cased (``Qwen/Qwen2.5-7B-Instruct`` -> ``"7b"``), or None."""
    m = _SIZE.search(model_path.rsplit("/", 1)[-1]) or _SIZE.search(model_path)
    return f"{m.group(1)}b" if m else None


def paper_row(method: str, size: str | None, template: str) -> dict[str, tuple[float, float]] | None:
    """Table 2 numbers for this method, model size and template, or None where the paper's row is not stored."""
    return PAPER_TABLE2.get((method, (size or "").lower(), template))


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def markdown_table(metrics: dict, datasets: Sequence[str], title: str,
                   paper: dict[str, tuple[float, float]] | None, paper_label: str) -> str:
    """Our numbers next to the paper's, one row per dataset plus the overall row.

    Args:
        metrics: ``aggregate`` output, optionally with ``<dataset>/judge/accuracy`` and ``judge/accuracy``.
        datasets: row order.
        title: the heading line (method, model, template).
        paper: ``paper_row`` output or None (every paper cell then reads "n/a").
        paper_label: which paper row this is, e.g. "ReSearch-Qwen2.5-7B-Instruct".
    Returns:
        Markdown: a heading, the table (EM, F1, cover-EM, judge and format-failure in %; searches and response
        length in plain units) and a note on the source of the paper's numbers.
    """
    head = ("| dataset | n | EM | F1 | cover-EM | judge | searches / q | response len (tokens) | format fail | "
            "paper EM | paper judge |")
    lines = [f"## {title}", "", head, "|" + "---|" * 11]
    for name in [*datasets, None]:
        key = "" if name is None else f"{name}/"
        if f"{key}n" not in metrics:
            continue
        p = (paper or {}).get(name) if name else None
        searches = metrics.get(f"{key}searches")
        length = metrics.get(f"{key}response_len")
        lines.append("| " + " | ".join([
            name or "**all**", str(int(metrics[f"{key}n"])), _pct(metrics.get(f"{key}em")),
            _pct(metrics.get(f"{key}f1")), _pct(metrics.get(f"{key}cover_em")),
            _pct(metrics.get(f"{key}judge/accuracy")),
            "n/a" if searches is None else f"{searches:.2f}", "n/a" if length is None else f"{length:.1f}",
            _pct(metrics.get(f"{key}format_fail")),
            "n/a" if p is None else f"{p[0]:.2f}", "n/a" if p is None else f"{p[1]:.2f}"]) + " |")
    lines.append("")
    if paper:
        lines.append(f"Paper columns: {paper_label}; {PAPER_SOURCE}.")
    else:
        lines.append(f"Paper columns: n/a: no Table 2 row stored for {paper_label} (stored rows: "
                     + ", ".join(f"{m} {s} {t}" for m, s, t in PAPER_TABLE2) + ").")
    lines.append("Scores in %. A sample (eval.limit), another retriever or corpus than the paper's makes the "
                 "comparison indicative only.")
    return "\n".join(lines) + "\n"
