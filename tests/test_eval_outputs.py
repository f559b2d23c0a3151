"""Evaluation outputs: one folder per model, step and method (the tag read from the checkpoint path or given with
``eval.tag``), never overwritten, and a summary table across every evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from research_rl.config.compose import compose_config
from research_rl.config.preflight import check_eval_output
from research_rl.config.schema import ConfigError, model_tag
from research_rl.evaluate import summary_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_the_tag_comes_from_the_checkpoint_path(tmp_path):
    assert model_tag("/runs/r7b/checkpoints/step_000040/model") == "r7b-step_000040"
    assert model_tag("/runs/r7b/checkpoints/step_000040") == "r7b-step_000040"
    assert model_tag("outputs/debug_cpu/2026-11-21/10-00-00/checkpoints/step_000010/model") == \
        "debug_cpu_2026-11-21_10-00-00-step_000010"  # the default run directory's date and time kept
    best = tmp_path / "run" / "checkpoints" / "best"
    (best / "model").mkdir(parents=True)
    (best / "trainer_state.json").write_text(json.dumps({"step": 30}))
    assert model_tag(str(best / "model")) == "run-best-step_000030"  # best moves: its step names it
    assert model_tag("/runs/r7b/warmup_model") == "r7b-warmup_model"
    assert model_tag("Qwen/Qwen2.5-7B-Instruct") == "Qwen2.5-7B-Instruct"


@pytest.mark.unit
def test_the_output_dir_is_per_model_and_step_unless_tagged():
    a = compose_config(["experiment=debug_cpu", "model.path=/runs/a/checkpoints/step_000010/model"]).eval
    b = compose_config(["experiment=debug_cpu", "model.path=/runs/a/checkpoints/step_000020/model"]).eval
    c = compose_config(["experiment=debug_cpu", "model.path=/runs/a/checkpoints/step_000020/model",
                        "eval.method=naive_rag"]).eval
    assert a.output_dir == "outputs/eval/a-step_000010/research" and b.output_dir == "outputs/eval/a-step_000020/research"
    assert c.output_dir == "outputs/eval/a-step_000020/naive_rag"
    assert compose_config(["experiment=debug_cpu", "eval.tag=mine"]).eval.output_dir == "outputs/eval/mine/research"
    with pytest.raises(ConfigError, match="eval.tag"):
        compose_config(["experiment=debug_cpu", "eval.tag=a/b"])


@pytest.mark.unit
def test_a_folder_holding_an_evaluation_is_refused(tmp_path):
    ev = compose_config(["experiment=debug_cpu", f"eval.output_dir={tmp_path}"]).eval
    check_eval_output(ev)  # empty: fine
    (tmp_path / "metrics.json").write_text(json.dumps({"model": "/m", "method": "research", "metrics": {}}))
    with pytest.raises(ConfigError) as e:
        check_eval_output(ev)
    assert e.value.key == "eval.output_dir" and "of /m" in str(e.value) and "eval.tag=NAME" in str(e.value)


@pytest.mark.unit
def test_summary_table_has_a_row_per_evaluation(tmp_path):
    for tag, em in (("a-step_000010", 0.25), ("a-step_000020", 0.5)):
        (tmp_path / tag / "research").mkdir(parents=True)
        (tmp_path / tag / "research" / "metrics.json").write_text(json.dumps({
            "method": "research", "model": f"/runs/a/{tag}", "questions": {"musique": {}, "hotpotqa": {}},
            "metrics": {"musique/em": em, "musique/f1": em + 0.1, "hotpotqa/em": 0.0, "hotpotqa/f1": 0.05,
                        "em": em / 2, "f1": em / 2 + 0.05, "n": 4}}))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "metrics.json").write_text("{}")  # not an evaluation record: skipped
    lines = summary_table(tmp_path).splitlines()
    assert lines[2] == "| evaluation | method | model | n | hotpotqa EM / F1 | musique EM / F1 | all EM / F1 |"
    rows = [line for line in lines[4:] if line.startswith("|")]
    assert rows == ["| a-step_000010/research | research | /runs/a/a-step_000010 | 4 | 0.0 / 5.0 | 25.0 / 35.0 | "
                    "12.5 / 17.5 |",
                    "| a-step_000020/research | research | /runs/a/a-step_000020 | 4 | 0.0 / 5.0 | 50.0 / 60.0 | "
                    "25.0 / 30.0 |"]


@pytest.mark.slow
def test_two_models_keep_their_results_and_a_rerun_is_refused(debug_model_dir, bm25_index, tmp_path):
    root = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def evaluate(tag):
        return subprocess.run(
            [sys.executable, "-m", "research_rl.evaluate", "experiment=debug_cpu", f"model.path={debug_model_dir}",
             f"retriever.index_dir={bm25_index}", f"eval.output_dir={root}/{tag}/research", "eval.limit=1",
             "eval.datasets=[musique]", "rollout.max_response_len=32", "retriever.top_k=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    for tag in ("first", "second"):
        proc = evaluate(tag)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for tag in ("first", "second"):
        assert (root / tag / "research" / "metrics.json").is_file()
        log = (root / tag / "research" / "evaluate.log").read_text()
        assert "evaluating research with" in log and "\r" not in log
    summary = (root / "summary.md").read_text()
    assert "| first/research |" in summary and "| second/research |" in summary
    again = evaluate("first")
    assert again.returncode == 1 and "already holds an evaluation" in again.stderr
    listing = subprocess.run([sys.executable, "-m", "research_rl.evaluate", "summary", str(root)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and listing.stdout == summary
