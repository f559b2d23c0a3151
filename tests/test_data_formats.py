"""Question files in the formats users have: verl / Search-R1 parquet (written here by pandas and pyarrow in
Search-R1's layout, as its scripts/data_process/*.py write them) and FlashRAG JSONL, converted both ways."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from research_rl.data import DataError, convert, load_questions

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def search_r1_row(i: int, question: str, target: list[str], source: str = "nq") -> dict:
    """One row as Search-R1's nq_search.py builds it (make_prefix puts the question after "Question:")."""
    prefix = ("Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
              "you get new information. ... Question: ")
    return {"data_source": source,
            "prompt": [{"role": "user", "content": prefix + question + "\n"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": target}},
            "extra_info": {"split": "train", "index": i}}


def test_search_r1_parquet_written_by_pandas_maps_to_questions(tmp_path):
    rows = [search_r1_row(0, "who wrote hamlet?", ["Shakespeare", "William Shakespeare"]),
            search_r1_row(1, "capital of france?", ["Paris"], source="hotpotqa")]
    path = tmp_path / "nq" / "train.parquet"
    path.parent.mkdir()
    pd.DataFrame(rows).to_parquet(path)  # pandas -> pyarrow: nested dicts become structs, lists become lists
    qs = load_questions(path)
    assert [(q.id, q.question, q.golden_answers, q.dataset) for q in qs] == [
        ("0", "who wrote hamlet?", ("Shakespeare", "William Shakespeare"), "nq"),
        ("1", "capital of france?", ("Paris",), "hotpotqa")]
    assert qs[0].metadata["extra_info"] == {"split": "train", "index": 0}


def test_own_columns_take_precedence_over_the_verl_ones(tmp_path):
    # Search-R1's Dataset.map keeps the source columns id / question / golden_answers beside verl's
    row = {**search_r1_row(7, "prompt text?", ["from reward model"]), "id": "train_7", "question": "real question?",
           "golden_answers": ["gold"]}
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    (q,) = load_questions(path)
    assert (q.id, q.question, q.golden_answers) == ("train_7", "real question?", ("gold",))


@pytest.mark.parametrize("broken, field, source", [
    ({"reward_model": {"style": "rule", "ground_truth": {"target": []}}}, "golden_answers",
     "'reward_model.ground_truth.target'"),
    ({"prompt": [{"role": "system", "content": "no user turn"}]}, "question", "'prompt'"),
    ({"extra_info": {"split": "train", "index": None}}, "id", "'extra_info.index'"),
])
def test_broken_parquet_row_names_file_row_field_and_source(tmp_path, broken, field, source):
    rows = [search_r1_row(i, f"q{i}?", ["a"]) for i in range(4)]
    rows[2] = {**rows[2], **broken}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as e:
        load_questions(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 2: no usable {field!r}") and source in msg, msg


def test_a_file_that_is_not_parquet_is_one_error_not_a_decode_error(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"\x89PNG not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_questions(path)
    other = tmp_path / "qs.csv"
    other.write_text("id,question\n")
    with pytest.raises(DataError, match=r"unsupported question file extension '\.csv'"):
        load_questions(other)


def test_jsonl_row_without_id_names_the_expected_fields(tmp_path):
    path = tmp_path / "qs.jsonl"
    path.write_text(json.dumps({"question": "q?", "golden_answers": ["a"]}) + "\n")
    with pytest.raises(DataError) as e:
        load_questions(path)
    assert f"{path}:1: missing or non-string 'id'" in str(e.value) and "golden_answers" in str(e.value)
    assert ".parquet" in str(e.value)


def test_convert_round_trip_through_the_cli(tmp_path):
    src = ROOT / "data" / "musique" / "dev.jsonl"
    parquet = tmp_path / "musique" / "dev.parquet"
    back = tmp_path / "musique" / "dev.jsonl"
    for a, b in ((src, parquet), (parquet, back)):
        proc = subprocess.run([sys.executable, "-m", "research_rl.data", "convert", str(a), str(b)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "wrote 50 questions" in proc.stdout
    table = pq.read_table(parquet)
    assert {"data_source", "prompt", "reward_model", "extra_info", "id", "question", "golden_answers"} <= set(
        table.column_names)
    first = table.slice(0, 1).to_pylist()[0]
    assert first["prompt"][-1] == {"role": "user", "content": first["question"]}
    assert first["reward_model"]["ground_truth"]["target"] == first["golden_answers"]
    original, converted = load_questions(src), load_questions(back)
    assert [(q.id, q.question, q.golden_answers, q.supporting_ids, q.dataset) for q in original] == \
        [(q.id, q.question, q.golden_answers, q.supporting_ids, q.dataset) for q in converted]


def _train(args, timeout):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "research_rl.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _search_r1_train_file(tmp_path, broken_row: int | None = None) -> Path:
    rows = [search_r1_row(i, json.loads(line)["question"], json.loads(line)["golden_answers"], "musique")
            for i, line in enumerate((ROOT / "data/musique/train.jsonl").read_text().splitlines()[:8])]
    if broken_row is not None:
        rows[broken_row]["reward_model"] = {"style": "rule", "ground_truth": {"target": []}}
    path = tmp_path / "musique" / "train.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_a_broken_parquet_row_stops_training_before_ray_naming_file_row_and_field(debug_model_dir, bm25_index,
                                                                                  tmp_path):
    path = _search_r1_train_file(tmp_path, broken_row=5)
    proc = _train(["experiment=debug_cpu", f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
                   f"trainer.output_dir={tmp_path / 'run'}", f"data.train_files=[{path}]"], timeout=180)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{path}: row 5: no usable 'golden_answers'") and "reward_model.ground_truth.target" in last
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_training_on_a_search_r1_parquet_file(debug_model_dir, bm25_index, tmp_path):
    path = _search_r1_train_file(tmp_path)
    run = tmp_path / "run"
    proc = _train(["experiment=debug_cpu", f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
                   f"trainer.output_dir={run}", f"data.train_files=[{path}]", "trainer.total_steps=1",
                   "warmup.steps=3", "validation.every=0", "trainer.prompts_per_step=2", "rollout.group_size=2",
                   "rollout.max_response_len=48", "ray.num_cpus=4", "learner.micro_batch_size=2"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "rollouts" / "step_000001.jsonl").read_text().splitlines()]
    questions = {json.loads(line)["question"] for line in (ROOT / "data/musique/train.jsonl").read_text().splitlines()[:8]}
    assert rows and {r["question"] for r in rows} <= questions  # the parquet's questions, parsed from the prompt
    assert "research-rl run finished" in (run / "train.log").read_text()
