"""Evaluation: the scoring core by hand, the baselines' prompts verbatim, and real runs on the tiny model and the
shipped data -- one as a subprocess (as a user runs it), the others in-process -- producing every metric and file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ScriptedChatServer

from research_rl.algo import evaluation as ev
from research_rl.config.compose import compose_config
from research_rl.config.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["hotpotqa", "2wikimultihopqa", "musique", "bamboogle"]
EOS = "<|im_end|>"
ROW_KEYS = {"id", "dataset", "question", "golden_answers", "prediction", "em", "f1", "cover_em", "format_fail",
            "format_fail_reason", "searches", "response_len", "finish_reason", "prompt", "trajectory"}


# --------------------------------------------------------------------------- the pure core, by hand

@pytest.mark.unit
def test_score_example_research_by_hand():
    good = f"<think> a </think> <search> q </search> <result>\np\n</result> <think> b </think> " \
           f"<answer> The final answer is \\[ \\boxed{{The Eiffel Tower}} \\] </answer>{EOS}"
    s = ev.score_example(good, ["Eiffel Tower", "Paris"], EOS, "research", searches=1, response_len=30)
    assert s == {"prediction": "The Eiffel Tower", "em": 1.0, "f1": 1.0, "cover_em": 1.0, "format_fail": 0.0,
                 "format_fail_reason": None, "searches": 1.0, "response_len": 30.0}
    # "Eiffel" vs gold "Eiffel Tower": EM 0; F1 = 2 * (1/1 * 1/2) / (1/1 + 1/2) = 2/3; cover-EM 0 (gold not inside)
    partial = good.replace("The Eiffel Tower", "Eiffel")
    s = ev.score_example(partial, ["Eiffel Tower"], EOS)
    assert (s["em"], s["f1"], s["cover_em"]) == (0.0, pytest.approx(2 / 3), 0.0)


@pytest.mark.unit
def test_score_example_format_failures_still_score_the_answer():
    no_think = f"<answer> \\boxed{{Paris}} </answer>{EOS}"  # fails the format gate, but the answer is extractable
    s = ev.score_example(no_think, ["Paris"], EOS)
    assert s["format_fail"] == 1.0 and s["format_fail_reason"].startswith("bad format")
    assert s["prediction"] == "Paris" and s["em"] == 1.0
    over = "<think> a </think> <answer> \\boxed{Paris} </answer>"  # no EOS: ran out of budget
    s = ev.score_example(over, ["Paris"], EOS)
    assert (s["format_fail"], s["format_fail_reason"], s["em"]) == (1.0, "over length", 1.0)
    s = ev.score_example(f"<think> a </think> <answer> \\boxed{{Pa{{ris}} </answer>{EOS}", ["Paris"], EOS)  # unclosed
    assert (s["format_fail_reason"], s["prediction"], s["em"]) == ("no boxed answer", "", 0.0)


@pytest.mark.unit
def test_score_example_baselines():
    s = ev.score_example(f" The Eiffel Tower.\n{EOS}", ["eiffel tower"], EOS, "naive_generation", 0, 6)
    assert (s["prediction"], s["em"], s["format_fail"], s["response_len"]) == ("The Eiffel Tower.", 1.0, 0.0, 6.0)
    s = ev.score_example("It is in Paris, France and", ["Paris"], EOS, "naive_rag", 1, 64)  # cut by the budget
    assert (s["em"], s["cover_em"], s["format_fail_reason"], s["searches"]) == (0.0, 1.0, "over length", 1.0)
    with pytest.raises(ValueError, match="unknown method"):
        ev.score_example("x", ["x"], EOS, "ircot")
    with pytest.raises(TypeError):
        ev.score_example("x", "x", EOS)


@pytest.mark.unit
def test_aggregate_by_hand():
    def row(ds, em, searches):
        return {"dataset": ds, "em": em, "f1": em, "cover_em": em, "searches": searches, "response_len": 10.0,
                "format_fail": 0.0}
    m = ev.aggregate([row("a", 1.0, 2), row("a", 0.0, 0), row("b", 1.0, 1)])
    assert m["a/em"] == 0.5 and m["a/searches"] == 1.0 and m["a/n"] == 2
    assert m["b/em"] == 1.0 and m["b/n"] == 1
    assert m["em"] == pytest.approx(2 / 3) and m["searches"] == 1.0 and m["n"] == 3  # micro average: (1+0+1)/3
    assert ev.aggregate([]) == {"n": 0}


@pytest.mark.unit
def test_fixed_seed_sample_and_question_files():
    qs = list(range(50))
    assert ev.sample_questions(qs, 5, seed=0) == ev.sample_questions(qs, 5, seed=0)
    assert ev.sample_questions(qs, 5, seed=0) != ev.sample_questions(qs, 5, seed=1)
    assert ev.sample_questions(qs, None, 0) == qs and ev.sample_questions(qs, 80, 0) == qs  # all, file order
    assert ev.question_file("data", "hotpotqa") == "data/hotpotqa/dev.jsonl"
    assert ev.question_file("data/full/", "bamboogle") == "data/full/bamboogle/test.jsonl"


@pytest.mark.unit
def test_baseline_prompts_are_flashrag_verbatim(tokenizer):
    # FlashRAG flashrag/prompt/base_prompt.py format_reference: title = first line, text = the rest
    ref = ev.format_reference(['"Eiffel Tower"\nA tower in Paris.', '"Paris"\nCapital of France.\nLine 2.'])
    assert ref == ('Doc 1(Title: "Eiffel Tower") A tower in Paris.\n'
                   'Doc 2(Title: "Paris") Capital of France.\nLine 2.\n')
    base = ev.render_baseline_prompt("Where is it?", "naive_generation", "base")
    assert base == ("Answer the question based on your own knowledge. Only give me the answer and do not output any "
                    "other words.\n\nQuestion: Where is it?")
    rag = ev.render_baseline_prompt("Where is it?", "naive_rag", "base", passages=['"T"\ntext'])
    assert rag == ("Answer the question based on the given document.Only give me the answer and do not output any "
                   "other words.\nThe following are given documents.\n\nDoc 1(Title: \"T\") text\n\n\n"
                   "Question: Where is it?")
    chat = ev.render_baseline_prompt("Where is it?", "naive_rag", "instruct", tokenizer, ['"T"\ntext'])
    assert chat.startswith("<|im_start|>system\nAnswer the question based on the given document.")
    assert chat.endswith("<|im_start|>user\nQuestion: Where is it?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="passages"):
        ev.render_baseline_prompt("q", "naive_rag", "base")


@pytest.mark.unit
def test_paper_rows_and_table():
    assert ev.model_size("Qwen/Qwen2.5-7B-Instruct") == "7b"
    assert ev.model_size("agentrl/ReSearch-Qwen-32B-Instruct") == "32b"
    assert ev.model_size("artifacts/debug_model") is None
    assert ev.paper_row("research", "7b", "instruct")["musique"] == (22.30, 33.43)
    assert ev.paper_row("research", "7b", "base") is None  # not stored: shown as n/a, never guessed
    m = {"musique/em": 0.25, "musique/f1": 0.5, "musique/cover_em": 0.5, "musique/searches": 1.5,
         "musique/response_len": 100.0, "musique/format_fail": 0.0, "musique/n": 4, "musique/judge/accuracy": 0.75,
         "em": 0.25, "f1": 0.5, "cover_em": 0.5, "searches": 1.5, "response_len": 100.0, "format_fail": 0.0, "n": 4}
    table = ev.markdown_table(m, ["musique"], "title", ev.paper_row("research", "7b", "instruct"), "ReSearch 7B")
    assert "| musique | 4 | 25.00 | 50.00 | 50.00 | 75.00 | 1.50 | 100.0 | 0.00 | 22.30 | 33.43 |" in table
    assert "| **all** | 4 | 25.00 |" in table and "Table 2" in table
    assert "n/a: no Table 2 row" in ev.markdown_table(m, ["musique"], "t", None, "Naive RAG on Qwen2.5-7B")


@pytest.mark.unit
def test_evaluation_core_is_pure_python():
    out = subprocess.run([sys.executable, "-c", "import sys, research_rl.algo.evaluation, research_rl.evaluate; "
                          "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.unit
@pytest.mark.parametrize("override, key", [
    ("eval.method=ircot", "eval.method"),
    ("eval.limit=0", "eval.limit"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.datasets=[]", "eval.datasets"),
    ("eval.model_size=seven", "eval.model_size"),
    ("eval.judge.base_url=localhost:8000", "eval.judge.base_url"),
    ("eval.judge.base_url=http://localhost:8000/v1", "eval.judge.model"),
    ("validation.best_metric=em", "validation.best_metric"),
    ("trainer.logger=mlflow", "trainer.logger"),
])
def test_bad_eval_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        compose_config(["experiment=debug_cpu", override])
    assert key in str(e.value)


# --------------------------------------------------------------------------- real runs

def _overrides(model_dir, index_dir, out_dir, *extra) -> list[str]:
    return ["experiment=debug_cpu", f"model.path={model_dir}", f"retriever.index_dir={index_dir}",
            f"eval.output_dir={out_dir}", "eval.limit=2", "eval.batch_size=8", "rollout.max_response_len=48",
            "retriever.top_k=2", *extra]


def _evaluate_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "research_rl.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(out_dir: Path, dataset: str) -> list[dict]:
    return [json.loads(line) for line in (out_dir / f"examples_{dataset}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def research_run(debug_model_dir, bm25_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "research"
    proc = _evaluate_cli(_overrides(debug_model_dir, bm25_index, out, f"eval.datasets=[{','.join(DATASETS)}]"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


@pytest.mark.slow
def test_research_evaluation_writes_every_metric_and_file(research_run):
    out, proc = research_run
    record = json.loads((out / "metrics.json").read_text())
    metrics = record["metrics"]
    for ds in DATASETS:
        for m in (*ev.METRICS, "n"):
            assert f"{ds}/{m}" in metrics, f"{ds}/{m}"
        rows = _rows(out, ds)
        assert len(rows) == 2 and metrics[f"{ds}/n"] == 2
        for r in rows:
            assert ROW_KEYS <= set(r) and r["dataset"] == ds
            assert r["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant")  # instruct template
            assert 0 < r["response_len"] <= 48 and r["finish_reason"] in ("eos", "length", "max_turns")
    assert all(m in metrics for m in ev.METRICS) and metrics["n"] == 8
    assert record["method"] == "research" and record["decoding"] == "greedy" and record["retriever"]["top_k"] == 2
    table = (out / "results.md").read_text()
    for ds in DATASETS:
        assert f"| {ds} | 2 |" in table
    assert "paper EM" in table and table in proc.stdout  # printed too
    # off a terminal, progress is plain lines (research_rl.driver.metrics.PlainProgress), the last at 100%
    assert "evaluate research: 8/8 questions (100%)" in proc.stdout
    assert not (out / ".hydra").exists()  # the folder holds results only; metrics.json records what was run


@pytest.mark.slow
def test_baselines_same_harness_same_sample(research_run, debug_model_dir, bm25_index, tmp_path):
    from research_rl.evaluate import run_evaluation

    research_out, _ = research_run
    # naive RAG: top-k passages in the prompt as FlashRAG's "Doc i(Title: ...)" lines, one retrieval per question
    cfg = compose_config(_overrides(debug_model_dir, bm25_index, tmp_path / "rag", "eval.method=naive_rag",
                                    "eval.datasets=[hotpotqa,bamboogle]"))
    result = run_evaluation(cfg)
    for ds in ("hotpotqa", "bamboogle"):
        rows = _rows(tmp_path / "rag", ds)
        assert [r["id"] for r in rows] == [r["id"] for r in _rows(research_out, ds)]  # the same fixed-seed sample
        for r in rows:
            assert ROW_KEYS <= set(r) and r["searches"] == 1.0 and r["queries"] == [r["question"]]
            assert "Answer the question based on the given document.Only give me the answer" in r["prompt"]
            assert "Doc 1(Title: " in r["prompt"] and "Doc 2(Title: " in r["prompt"] and "Doc 3(" not in r["prompt"]
            assert r["prompt"].endswith(f"Question: {r['question']}<|im_end|>\n<|im_start|>assistant\n")
    assert result["metrics"]["searches"] == 1.0 and (tmp_path / "rag" / "results.md").is_file()

    # naive generation with the base template, judged by the real JudgeClient against a local chat-completions
    # server that calls the first musique question's prediction correct and the second incorrect
    questions = [r["question"] for r in _rows(research_out, "musique")]
    judge = ScriptedChatServer()
    judge.script = {questions[0]: ['{"rationale": "r", "judgement": "correct"}'],
                    questions[1]: ['{"rationale": "r", "judgement": "incorrect"}']}
    judge.start()
    cfg = compose_config(_overrides(debug_model_dir, bm25_index, tmp_path / "gen", "eval.method=naive_generation",
                                    "model.template=base", "eval.datasets=[musique]",
                                    f"eval.judge.base_url={judge.url}", "eval.judge.model=gpt-4o-mini"))
    try:
        result = run_evaluation(cfg)
    finally:
        judge.stop()
    rows = _rows(tmp_path / "gen", "musique")
    assert [r["id"] for r in rows] == [r["id"] for r in _rows(research_out, "musique")]
    for r in rows:  # base template: FlashRAG's non-chat join, no chat markup
        assert r["prompt"] == (f"{ev.NAIVE_GENERATION_SYSTEM}\n\nQuestion: {r['question']}")
        assert r["searches"] == 0.0 and "judge" in r
    assert [b["model"] for _, b in judge.requests] == ["gpt-4o-mini"] * 2
    assert sorted(r["judge"]["correct"] for r in rows) == [False, True]
    assert result["metrics"]["musique/judge/accuracy"] == 0.5 and result["metrics"]["judge/accuracy"] == 0.5
    assert "| musique | 2 |" in result["table"] and "| 50.00 |" in result["table"]


@pytest.mark.slow
def test_base_template_is_honoured(debug_model_dir, bm25_index, tmp_path):
    from research_rl.evaluate import run_evaluation

    cfg = compose_config(_overrides(debug_model_dir, bm25_index, tmp_path, "model.template=base", "eval.limit=1",
                                    "eval.datasets=[bamboogle]", "rollout.max_response_len=8"))
    run_evaluation(cfg)
    (row,) = _rows(tmp_path, "bamboogle")
    assert row["prompt"].startswith("A conversation between User and Assistant.")
    assert row["prompt"].endswith(f"User: {row['question']}. Assistant:") and "<|im_start|>" not in row["prompt"]


@pytest.mark.slow
def test_a_searching_trajectory_is_scored_with_its_retrieval(debug_model_dir, bm25_index, tokenizer):
    """The evaluator's own agent loop and retriever, with a scripted engine: a search, the inserted result, a boxed
    answer -- EM 1, one search, the result tokens outside the response length."""
    from helpers import ScriptedEngine

    from research_rl.data import load_questions
    from research_rl.evaluate import Evaluator
    from research_rl.algo.templates import encode_prompt

    cfg = compose_config(_overrides(debug_model_dir, bm25_index, "unused", "eval.datasets=[hotpotqa]",
                                    "rollout.max_response_len=1024"))
    evaluator = Evaluator(cfg)
    q = load_questions(ROOT / "data/hotpotqa/dev.jsonl", "hotpotqa")[0]
    prompt = tuple(encode_prompt(q.question, "instruct", evaluator.tokenizer))
    script = [f"<think> look it up </think> <search> {q.question} </search>",
              f"<think> found </think> <answer> \\boxed{{{q.golden_answers[0]}}} </answer>{EOS}"]
    evaluator.loop.engine = ScriptedEngine(evaluator.tokenizer, {prompt: script})
    (row,) = evaluator.run_batch([q], "hotpotqa")
    generated = sum(len(tokenizer.encode(s, add_special_tokens=False)) for s in script)
    assert (row["em"], row["f1"], row["format_fail"], row["searches"]) == (1.0, 1.0, 0.0, 1.0)
    assert row["queries"] == [q.question] and row["trajectory"].count("<result>") == 1
    assert row["response_len"] == generated and row["result_tokens"] > 0 and row["finish_reason"] == "eos"


@pytest.mark.slow
def test_bad_eval_override_fails_before_loading_anything(tmp_path):
    proc = _evaluate_cli(["experiment=debug_cpu", "eval.datasets=[hotpotqa,no_such_set]",
                          f"eval.output_dir={tmp_path}"], timeout=120)
    assert proc.returncode != 0
    assert "eval.datasets" in proc.stderr and "data/no_such_set/dev.jsonl" in proc.stderr
    proc = _evaluate_cli(["experiment=debug_cpu", "eval.method=ircot", f"eval.output_dir={tmp_path}"], timeout=120)
    assert proc.returncode != 0 and "eval.method" in proc.stderr


# --------------------------------------------------------------------------- the trainer's validation

@pytest.mark.unit
def test_trainer_validation_uses_the_evaluator_and_tracks_the_best(tmp_path):
    """The driver's validation metrics are the evaluator's (``rollouts.validation_metrics``), and the best
    checkpoint follows ``RunState.update_best`` on them; a best metric naming an unvalidated dataset is caught
    before Ray starts."""
    from research_rl.config import preflight
    from research_rl.data import Question
    from research_rl.driver.rollouts import validation_metrics
    from research_rl.driver.state import Best, RunState
    from research_rl.rollout.agent_loop import Trajectory

    qa = Question("1", "q1", ("Paris",), "hotpotqa")
    qb = Question("2", "q2", ("Rome",), "musique")
    answer = "<think> x </think> <search> s </search> <result>\nr\n</result> <answer> \\boxed{Paris} </answer>" + EOS
    traj = Trajectory([1], response_ids=list(range(20)), loss_mask=[1] * 12 + [0] * 8, queries=["s"],
                      finish_reason="eos", response_text=answer)
    val = validation_metrics([qa, qb], [traj, traj], EOS)
    assert val["val/hotpotqa/em"] == 1.0 and val["val/musique/em"] == 0.0 and val["val/em"] == 0.5
    assert val["val/f1"] == 0.5 and val["val/cover_em"] == 0.5 and val["val/searches"] == 1.0
    assert val["val/searches_per_question"] == 1.0 and val["val/response_len"] == 12.0
    assert val["val/format_fail"] == 0.0 and val["val/n"] == 2.0
    assert validation_metrics([], [], EOS) == {}

    state, best = RunState(), str(tmp_path / "checkpoints" / "best")
    assert state.update_best("val/em", {"val/em": 0.2}, 10, best)
    assert not state.update_best("val/em", {"val/em": 0.2}, 20, best)  # ties keep the earlier checkpoint
    assert state.update_best("val/em", {"val/em": 0.3}, 30, best)
    assert state.best == Best("val/em", 30, 0.3, best)
    with pytest.raises(ValueError, match="validation.best_metric=val/em"):
        state.update_best("val/em", {"val/f1": 0.9}, 40, best)
    preflight.check_best_metric(compose_config(["experiment=debug_cpu"]), {"hotpotqa", "musique"})
    cfg = compose_config(["experiment=debug_cpu", "validation.best_metric=val/bamboogle/em"])
    with pytest.raises(ConfigError, match="validation.best_metric"):  # caught at setup, before Ray starts
        preflight.check_best_metric(cfg, {"hotpotqa", "musique"})


def test_over_length_prediction_empty_is_the_reference_rule():
    """A response cut by the budget (no EOS) still yields its boxed answer by default; the reference predicts ""."""
    cut = "<think> t </think> <answer> \\boxed{Paris} </answer> and more"
    s = ev.score_example(cut, ["Paris"], EOS)
    assert (s["prediction"], s["em"]) == ("Paris", 1.0)
    s = ev.score_example(cut, ["Paris"], EOS, over_length_prediction="empty")
    assert (s["prediction"], s["em"], s["f1"]) == ("", 0.0, 0.0)
    done = cut + EOS
    assert ev.score_example(done, ["Paris"], EOS, over_length_prediction="empty")["prediction"] == "Paris"
    assert ev.score_example("Paris", ["Paris"], EOS, "naive_generation", over_length_prediction="empty")["em"] == 0.0
    with pytest.raises(ValueError, match="over_length_prediction"):
        ev.score_example(done, ["Paris"], EOS, over_length_prediction="drop")
