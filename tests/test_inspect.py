"""`python -m research_rl.inspect`: a run directory's rollouts, written in the trainer's own row format, shown with
`<result>` blocks folded; errors for people."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from research_rl.rollout.agent_loop import SEARCH_FAILED_OBSERVATION, format_observation
from research_rl.inspect import fold_results, main

pytestmark = pytest.mark.unit

EOS = "<|im_end|>"
PASSAGES = ['"Paris"\nParis is the capital and most populous city of France.',
            '"Eiffel Tower"\nThe Eiffel Tower is a wrought-iron lattice tower in Paris.',
            '"Seine"\nThe Seine is a river in northern France.']
OBS = format_observation(PASSAGES)  # exactly what the agent loop inserts
GOOD = (f"<think> I should search. </think> <search> capital of France </search>{OBS} <think> Found it. </think> "
        f"<answer> The final answer is \\[ \\boxed{{Paris}} \\] </answer>{EOS}")


def _row(step, qid, question, golds, response, reward, reason, answer, queries, finish="eos", gen=40, result=120):
    """A row with exactly the keys and order of the trainer's rollout dump (checked against it below)."""
    return {"step": step, "question_id": qid, "question": question, "golden_answers": golds, "response": response,
            "reward": reward, "reason": reason, "answer": answer, "searches": len(queries), "queries": queries,
            "finish_reason": finish, "response_len": gen, "result_tokens": result}


def _write(run: Path, step: int, rows: list[dict]) -> None:
    (run / "rollouts").mkdir(parents=True, exist_ok=True)
    with (run / "rollouts" / f"step_{step:06d}.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "run"
    rows = [
        _row(3, "hp1", "What is the capital of France?", ["Paris"], GOOD, 1.0, "correct answer, f1=1.00", "Paris",
             ["capital of France"]),
        _row(3, "hp1", "What is the capital of France?", ["Paris"],
             "<think> no idea </think> <answer> \\boxed{Lyon} </answer>" + EOS, 0.1, "wrong answer but good format",
             "Lyon", []),
        _row(3, "mq1", "Who founded the city where the Seine rises?", ["Nobody", "no one"],
             "<think> x </think> <search> source of the Seine </search>"
             f"{format_observation([SEARCH_FAILED_OBSERVATION])} <answer> unsure </answer>{EOS}", 0.0, "bad format: answer is missing \\boxed{} format", None,
             ["source of the Seine"]),
        _row(3, "mq1", "Who founded the city where the Seine rises?", ["Nobody"],
             "<think> x </think> <search> Seine </search>" + OBS[:60], 0.0, "bad format: <think> </think> not paired",
             None, ["Seine"], finish="length", gen=12, result=30),
    ]
    for step in (1, 2):
        _write(run, step, rows[:1])
    _write(run, 3, rows)
    return run


def test_rows_match_what_the_trainer_writes(tmp_path):
    """`_row` has the keys, in order, of the rows the trainer writes (`rollouts.rollout_rows` of a step's batch)."""
    from research_rl.algo.reward import RewardResult
    from research_rl.data import Question
    from research_rl.driver.rollouts import build_experience, rollout_rows
    from research_rl.rollout.agent_loop import Trajectory

    q = Question("q1", "What is the capital of France?", ("Paris",), "hotpotqa")
    t = Trajectory([5, 6, 7], response_ids=list(range(160)), loss_mask=[1] * 40 + [0] * 120,
                   queries=["capital of France"], finish_reason="eos", response_text=GOOD)
    r = RewardResult(1.0, "correct answer, f1=1.00", "Paris", 1.0, True)
    exp = build_experience([q, q], [t, t], [r, r], pad_id=0, policy_version=6)
    rows = rollout_rows(7, exp, [q, q], [t, t], [r, r], limit=1)  # trainer.rollouts_to_log=1
    assert len(rows) == 1 and len(rollout_rows(7, exp, [q, q], [t, t], [r, r])) == 2
    _write(tmp_path, 7, rows)
    written = json.loads((tmp_path / "rollouts" / "step_000007.jsonl").read_text())
    expected = _row(7, "q1", q.question, ["Paris"], GOOD, 1.0, "correct answer, f1=1.00", "Paris",
                    ["capital of France"])
    assert list(written) == list(expected) and written == expected
    assert main([str(tmp_path), "--step", "7"]) == 0  # and the command reads it


def test_fold_results():
    folded = fold_results(GOOD)
    chars = len("\n\n".join(PASSAGES))
    assert f"</search> <result> [3 passages, {chars:,} chars folded] </result> <think> Found it." in folded
    assert "wrought-iron" not in folded and folded.endswith(EOS)
    assert fold_results("no results here") == "no results here"
    one = fold_results(f"<search> q </search>{format_observation(['just one passage'])} and{OBS}")
    assert "<result> [1 passage, 16 chars folded] </result> and <result> [3 passages," in one
    assert fold_results(f"a{format_observation([SEARCH_FAILED_OBSERVATION])}b") == "a <result> search failed </result>b"
    cut = fold_results("<search> q </search>" + OBS[:60])  # the budget ran out inside the block
    assert cut == "<search> q </search> <result> [1 passage, 50 chars folded; cut off by the length budget]"


def test_prints_the_rollouts_with_results_folded(run, capsys):
    assert main([str(run), "--step", "3", "--num", "3"]) == 0
    out = capsys.readouterr().out
    assert "step_000003.jsonl: 4 rollouts, mean reward 0.275; showing 3" in out
    blocks = out.split("━━ rollout ")[1:]
    assert len(blocks) == 3
    first = blocks[0]
    assert first.startswith("1 of 4 ━━ step 3 ━━ question hp1")
    assert "question  What is the capital of France?" in first
    assert "gold      Paris\n" in first and "answer    Paris\n" in first
    assert "reward    1.000  correct answer, f1=1.00  (F1 1.00, EM 1)" in first
    assert 'searches  1: "capital of France"' in first
    assert "finish    eos, 40 generated tokens + 120 result tokens" in first
    assert "<result> [3 passages," in first and "wrought-iron" not in first
    assert "\\boxed{Paris}" in first
    assert "reward    0.100  wrong answer but good format  (F1 0.00, EM 0)" in blocks[1]
    assert "searches  0\n" in blocks[1]
    third = blocks[2]  # format failure: its cause, no answer, the failed search shown as is
    assert "reward    0.000  bad format: answer is missing \\boxed{} format\n" in third
    assert "answer    (none extracted)" in third and "gold      Nobody | no one" in third
    assert "<result> search failed </result>" in third


def test_show_results_and_latest(run, capsys):
    assert main([str(run), "--step", "latest", "--num", "1", "--show-results"]) == 0
    out = capsys.readouterr().out
    assert "showing 1" in out and out.count("━━ rollout ") == 1
    assert OBS in out and "chars folded" not in out


def test_dataset_filter_uses_the_runs_question_files(run, tmp_path, capsys):
    data = tmp_path / "data"
    for name, qid in (("hotpotqa", "hp1"), ("musique", "mq1")):
        (data / name).mkdir(parents=True)
        (data / name / "dev.jsonl").write_text(json.dumps({"id": qid, "question": "q", "golden_answers": ["a"]}) + "\n")
    state = run / "checkpoints" / "step_000003" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"step": 3, "config": {"data": {
        "train_files": [str(data / "hotpotqa/dev.jsonl")], "val_files": [str(data / "musique/dev.jsonl")]}}}))
    assert main([str(run), "--step", "3", "--dataset", "musique", "--num", "5"]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 rollouts from musique" in out and "question hp1" not in out and out.count("question mq1") == 2
    assert main([str(run), "--step", "3", "--dataset", "nq"]) == 1
    assert "dataset 'nq' is not among the run's question files; its datasets: hotpotqa, musique" in \
        capsys.readouterr().err


def test_dataset_filter_without_a_config_explains(run, capsys):
    assert main([str(run), "--step", "3", "--dataset", "hotpotqa"]) == 1
    assert "trainer_state.json" in capsys.readouterr().err


def test_errors_list_the_available_steps(run, tmp_path, capsys):
    assert main([str(run), "--step", "9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: no rollouts for step 9 in {run / 'rollouts'}; available steps: 1-3"
    assert main([str(tmp_path / "missing"), "--step", "1"]) == 1
    assert "run directory" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main([str(tmp_path / "empty_run"), "--step", "latest"]) == 1
    assert "has no rollouts/step_*.jsonl" in capsys.readouterr().err
    (run / "rollouts" / "step_000005.jsonl").write_text('{"step": 5}\n')
    assert main([str(run), "--step", "5"]) == 1
    assert "step_000005.jsonl:1: rollout row lacks question_id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(run), "--step", "last"])
    assert e.value.code == 2 and "expected a step number or 'latest'" in capsys.readouterr().err


def test_terminal_output_through_rich(run, monkeypatch):
    pytest.importorskip("rich")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main([str(run), "--step", "3", "--num", "1"]) == 0
    raw = out.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    assert "\x1b[" in raw  # coloured
    assert "reward    1.000  correct answer, f1=1.00" in plain and "<result> [3 passages," in plain
