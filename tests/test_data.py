"""FlashRAG JSONL loaders: real shipped data loads; malformed lines fail naming file and line."""

import json
from pathlib import Path

import pytest

from research_rl.data import DataError, PromptStream, load_corpus, load_questions

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def test_shipped_data_loads_with_attribution():
    for f in ["musique/train.jsonl", "hotpotqa/train.jsonl", "musique/dev.jsonl", "hotpotqa/dev.jsonl",
              "2wikimultihopqa/dev.jsonl", "bamboogle/test.jsonl"]:
        qs = load_questions(ROOT / "data" / f)
        assert qs and all(q.golden_answers for q in qs)
        assert all(q.metadata.get("source") for q in qs), f
    corpus = load_corpus(ROOT / "data/corpus/corpus.jsonl")
    gold = {i for q in load_questions(ROOT / "data/musique/train.jsonl") for i in q.supporting_ids}
    assert gold and gold <= set(corpus)  # every gold paragraph of the training questions is in the corpus


@pytest.mark.parametrize("line, reason", [
    ('{"id": "a", "question": "q?", "golden_answers": ["x"]', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"id": "a", "question": "", "golden_answers": ["x"]}', "question"),
    ('{"id": "a", "question": "q?", "golden_answers": "x"}', "golden_answers"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, reason):
    good = json.dumps({"id": "1", "question": "Who?", "golden_answers": ["me"]})
    path = tmp_path / "qs.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_questions(path)
    assert f"{path}:3:" in str(e.value) and reason in str(e.value)


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    good = json.dumps({"id": "1", "question": "Who wrote Faust?", "golden_answers": ["Goethe"]}, ensure_ascii=False)
    path = tmp_path / "qs.jsonl"
    # line 2 is valid UTF-8 (ü); line 3 holds a Latin-1 "é" (byte 0xe9), as a file saved in the wrong encoding has
    path.write_bytes((good + "\n" + good.replace("Goethe", "Müller") + "\n").encode("utf-8")
                     + b'{"id": "3", "question": "Caf\xe9?", "golden_answers": ["x"]}\n')
    with pytest.raises(DataError) as e:
        load_questions(path)
    # column 29: the é after {"id": "3", "question": "Caf (28 characters)
    assert str(e.value).startswith(f"{path}:3: not valid UTF-8 (byte 0xe9 at column 29)")
    path.write_bytes(path.read_bytes().replace(b"\xe9", "é".encode("utf-8")))  # the same file, re-encoded
    assert [q.question for q in load_questions(path)][2] == "Café?"
    # a UTF-16 corpus fails on its first line, not with a bare UnicodeDecodeError
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "p1", "contents": "x"}\n', encoding="utf-16")
    with pytest.raises(DataError, match=f"{corpus}:1: not valid UTF-8"):
        load_corpus(corpus)


def test_corpus_row_without_contents(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "p1", "contents": "x"}\n{"id": "p2", "title": "t"}\n')
    with pytest.raises(DataError, match=f"{path}:2:"):
        load_corpus(path)


def test_prompt_stream_epochs_and_resume():
    qs = load_questions(ROOT / "data/musique/dev.jsonl")[:10]
    a = PromptStream(qs, seed=3)
    first_epoch = a.next_batch(4) + a.next_batch(4) + a.next_batch(2)
    assert sorted(q.id for q in first_epoch) == sorted(q.id for q in qs)  # each question once per epoch
    a.next_batch(3)
    state = a.state_dict()
    b = PromptStream(qs, seed=3)
    b.load_state_dict(state)
    assert [q.id for q in a.next_batch(9)] == [q.id for q in b.next_batch(9)]
    assert a.epoch == b.epoch == 2 or a.epoch_float == b.epoch_float


def test_prompt_stream_drop_last_skips_the_tail_as_the_reference_loader_does():
    qs = load_questions(ROOT / "data/musique/dev.jsonl")[:10]
    carry, drop = PromptStream(qs, seed=3), PromptStream(qs, seed=3, drop_last=True)
    assert (carry.steps_per_epoch(4), drop.steps_per_epoch(4)) == (3, 2)
    first = drop.next_batch(4) + drop.next_batch(4)
    assert first == carry.next_batch(4) + carry.next_batch(4)  # same order within the epoch
    tail = carry.next_batch(4)  # 2 from epoch 0, then 2 from epoch 1
    assert carry.epoch == 1 and len({q.id for q in tail}) == 4
    nxt = drop.next_batch(4)  # epoch 0's last 2 are dropped: the batch is epoch 1's first 4
    assert drop.epoch == 1 and drop.position == 4
    assert nxt == [qs[i] for i in drop._epoch_order(1)[:4]]
    state = drop.state_dict()
    again = PromptStream(qs, seed=3, drop_last=True)
    again.load_state_dict(state)
    assert again.next_batch(4) == drop.next_batch(4)
    with pytest.raises(ValueError, match="drop_last"):
        PromptStream(qs, seed=3, drop_last=True).next_batch(11)
