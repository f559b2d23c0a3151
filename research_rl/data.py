"""Question data in the formats users have, the passage corpus, and the resumable prompt stream the driver draws
training batches from.

Question files are chosen by extension:

- ``.jsonl``: FlashRAG JSON lines, one question per line: ``id``, ``question``, ``golden_answers`` (a list of
  strings), optional ``supporting_ids`` and ``metadata``. The dataset name is the file's folder name.
- ``.parquet``: the verl / Search-R1 layout (Search-R1's ``scripts/data_process/*.py``), read with pyarrow. Each
  field of the internal ``Question`` maps from the first column that holds it (``PARQUET_FIELDS``)::

      Question.id             <- id | extra_info.index
      Question.question       <- question | the last user message of prompt (the text after its last
                                 "Question:", as Search-R1's make_prefix writes it)
      Question.golden_answers <- golden_answers | reward_model.ground_truth.target | reward_model.ground_truth
      Question.dataset        <- data_source | the file's folder name
      Question.metadata       <- extra_info, ability, data_source

``python -m research_rl.data convert IN OUT`` converts between the two (``convert``); JSONL -> parquet writes the
Search-R1 columns plus ``prompt`` as the instruct template's chat messages (ReSearch's system prompt, the question
as the user turn), so verl applies the same prompt as ``model.template=instruct``.

The corpus is FlashRAG JSONL (``id``, ``contents``). Malformed input raises ``DataError`` naming the file and the
line (JSONL) or row (parquet, 0-based as ``DataFrame.iloc`` counts), the missing field and what it maps from.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

QUESTION_FORMATS = {".jsonl": "FlashRAG JSONL", ".parquet": "verl / Search-R1 parquet"}
# Question field -> the parquet columns it is read from, first present wins (dotted: a field of a struct column)
PARQUET_FIELDS = {
    "id": ("id", "extra_info.index"),
    "question": ("question", "prompt"),
    "golden_answers": ("golden_answers", "reward_model.ground_truth.target", "reward_model.ground_truth"),
    "dataset": ("data_source",),
}
JSONL_HINT = ('FlashRAG JSONL rows are {"id": ..., "question": ..., "golden_answers": [...]}; verl / Search-R1 '
              "data is read from .parquet files")


class DataError(ValueError):
    """Malformed data; the message starts with ``FILE:LINE:`` (JSONL) or ``FILE: row N:`` (parquet)."""


_BAD_BYTE = re.compile("[\udc80-\udcff]")  # an undecodable byte under errors="surrogateescape"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each non-blank line (1-based line numbers).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a line is not valid UTF-8 or not a JSON object (``FILE:LINE: reason``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    # surrogateescape: an undecodable byte becomes one lone surrogate (U+DC80..U+DCFF), which valid UTF-8 never
    # decodes to, so the bad line is known (strict decoding fails per chunk, with no line number)
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            bad = _BAD_BYTE.search(line)
            if bad:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                                f"column {bad.start() + 1}); data files must be UTF-8 encoded JSON lines")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    golden_answers: tuple[str, ...]
    dataset: str  # e.g. "musique": the question file's folder name
    supporting_ids: tuple[str, ...] = ()  # corpus ids of the gold paragraphs, where the dataset has them
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def load_questions(path: str | Path, dataset: str | None = None) -> list[Question]:
    """Load a question file, FlashRAG JSONL or verl / Search-R1 parquet by its extension (module docstring).

    Args:
        path: a ``.jsonl`` or ``.parquet`` file.
        dataset: the dataset name of every question; default: parquet's ``data_source``, else the folder name.
    Raises:
        FileNotFoundError: the file does not exist.
        DataError: another extension, or a row lacking an id, a non-empty question or a non-empty list of string
            golden answers (naming the file, the line or row, the field and, for parquet, its source columns).
    """
    path = Path(path)
    if path.suffix not in QUESTION_FORMATS:
        raise DataError(f"{path}: unsupported question file extension {path.suffix!r}; expected "
                        + " or ".join(f"{ext} ({name})" for ext, name in QUESTION_FORMATS.items()))
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out = _load_parquet(path, dataset) if path.suffix == ".parquet" else _load_jsonl(path, dataset or path.parent.name)
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def _load_jsonl(path: Path, dataset: str) -> list[Question]:
    out = []
    for lineno, row in iter_jsonl(path):
        qid, question, golds = row.get("id"), row.get("question"), row.get("golden_answers")
        if not isinstance(qid, (str, int)):
            raise DataError(f"{path}:{lineno}: missing or non-string 'id' ({JSONL_HINT})")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}:{lineno}: missing or empty 'question' ({JSONL_HINT})")
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise DataError(f"{path}:{lineno}: 'golden_answers' must be a non-empty list of strings ({JSONL_HINT})")
        out.append(Question(str(qid), question.strip(), tuple(golds), dataset,
                            tuple(row.get("supporting_ids") or ()), row.get("metadata") or {}))
    return out


def _dotted(row: dict, key: str) -> Any:
    """``row["a"]["b"]`` for ``key="a.b"``; None where a level is missing."""
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _question_of_prompt(prompt: Any) -> str | None:
    """The question in a chat-message ``prompt``: the last user turn, after its last "Question:" when it has one."""
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users and isinstance(users[-1], str) else None
    else:
        text = None
    if text is None:
        return None
    marker = text.rfind("Question:")
    return text[marker + len("Question:"):].strip() if marker >= 0 else text.strip()


def _parquet_value(path: Path, index: int, row: dict, name: str) -> Any:
    """The first of ``PARQUET_FIELDS[name]``'s columns present in ``row``, converted; DataError when none is."""
    for key in PARQUET_FIELDS[name]:
        value = _dotted(row, key)
        if value is None:
            continue
        if name == "question":
            value = _question_of_prompt(value) if key == "prompt" else value
            if isinstance(value, str) and value.strip():
                return value.strip()
        elif name == "golden_answers":
            value = [value] if isinstance(value, str) else value
            if isinstance(value, (list, tuple)) and value and all(isinstance(g, str) for g in value):
                return tuple(value)
        elif name == "id" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        elif name == "dataset" and isinstance(value, str) and value:
            return value
    if name == "dataset":
        return None
    expected = {"id": "a string or integer", "question": "a non-empty string (or chat messages with a user turn)",
                "golden_answers": "a non-empty list of strings"}[name]
    raise DataError(f"{path}: row {index}: no usable {name!r}: expected {expected} in "
                    + " or ".join(repr(k) for k in PARQUET_FIELDS[name])
                    + " (the verl / Search-R1 layout: data_source, prompt, reward_model.ground_truth.target, "
                    "extra_info)")


def _load_parquet(path: Path, dataset: str | None) -> list[Question]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    out = []
    for i, row in enumerate(rows):
        qid = _parquet_value(path, i, row, "id")
        question = _parquet_value(path, i, row, "question")
        golds = _parquet_value(path, i, row, "golden_answers")
        name = dataset or _parquet_value(path, i, row, "dataset") or path.parent.name
        meta = {k: row[k] for k in ("data_source", "ability", "extra_info") if row.get(k) is not None}
        out.append(Question(qid, question, golds, name, tuple(row.get("supporting_ids") or ()), meta))
    return out


def load_corpus(path: str | Path) -> dict[str, dict[str, Any]]:
    """Load a corpus JSONL into ``{id: row}``; every row needs string ``id`` and ``contents``."""
    corpus = {}
    for lineno, row in iter_jsonl(path):
        if not isinstance(row.get("id"), str) or not isinstance(row.get("contents"), str):
            raise DataError(f"{path}:{lineno}: corpus rows need string 'id' and 'contents'")
        corpus[row["id"]] = row
    return corpus


class PromptStream:
    """Epoch-wise shuffled stream of training questions with a resumable cursor.

    ``next_batch(n)`` returns n questions; an epoch's tail smaller than n is carried into the next epoch
    (every question is used once per epoch), or with ``drop_last`` skipped, as the reference's data loader does
    (``drop_last=True``: every batch comes from one epoch, and the tail's questions are not trained on that
    epoch). ``state_dict()`` captures (epoch, position), so a resumed run draws exactly the prompts the
    uninterrupted run would have.
    """

    def __init__(self, questions: list[Question], seed: int, shuffle: bool = True, drop_last: bool = False):
        if not questions:
            raise ValueError("PromptStream needs at least one question")
        self.questions = questions
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.questions)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Question]:
        """The next ``n`` questions.

        Raises:
            ValueError: ``drop_last`` and fewer than ``n`` questions in all (no full batch exists).
        """
        if self.drop_last and n > len(self.questions):
            raise ValueError(f"data.drop_last: a batch of {n} prompts cannot come from {len(self.questions)} questions")
        batch = []
        while len(batch) < n:
            if self.drop_last and not batch and len(self._order) - self.position < n:
                self.position = len(self._order)  # the tail is dropped
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(batch), len(self._order) - self.position)
            batch.extend(self.questions[i] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def steps_per_epoch(self, n: int) -> int:
        """Batches of ``n`` per epoch: ``ceil(len / n)`` (the tail carries over), ``floor(len / n)`` with
        ``drop_last``."""
        return len(self.questions) // n if self.drop_last else -(-len(self.questions) // n)

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.position / len(self.questions)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.questions)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.questions):
            raise ValueError(f"checkpoint data cursor is for {state['size']} questions, this run has {len(self.questions)}")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)


# ------------------------------------------------------------------------------------------------ conversion

def question_record(q: Question) -> dict:
    """A FlashRAG JSONL row of ``q`` (its dataset kept in ``metadata.data_source`` when the metadata lacks one)."""
    row = {"id": q.id, "question": q.question, "golden_answers": list(q.golden_answers)}
    if q.supporting_ids:
        row["supporting_ids"] = list(q.supporting_ids)
    row["metadata"] = {"data_source": q.dataset, **q.metadata}
    return row


def search_r1_record(q: Question, index: int, split: str) -> dict:
    """A parquet row of ``q`` in the Search-R1 layout: its own columns (``id``, ``question``, ``golden_answers``)
    and verl's (``data_source``, ``prompt`` as the instruct template's chat messages, ``ability``,
    ``reward_model.ground_truth.target``, ``extra_info.split`` / ``index``)."""
    from research_rl.algo.templates import SYSTEM_PROMPT

    return {"id": q.id, "question": q.question, "golden_answers": list(q.golden_answers),
            "supporting_ids": list(q.supporting_ids), "data_source": q.dataset,
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q.question}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(q.golden_answers)}},
            "extra_info": {"split": split, "index": index}}


def convert(src: str | Path, dst: str | Path, dataset: str | None = None) -> int:
    """Convert a question file between FlashRAG JSONL and verl / Search-R1 parquet, by the extensions of ``src``
    and ``dst`` (module docstring). Returns the number of questions written.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        DataError: an unsupported extension, or a malformed row of ``src``.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix not in QUESTION_FORMATS:
        raise DataError(f"{dst}: unsupported output extension {dst.suffix!r}; expected "
                        + " or ".join(f"{ext} ({name})" for ext, name in QUESTION_FORMATS.items()))
    questions = load_questions(src, dataset)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        split = src.stem  # train.jsonl -> "train", as Search-R1 names its splits
        pq.write_table(pa.Table.from_pylist([search_r1_record(q, i, split) for i, q in enumerate(questions)]), dst)
    else:
        with dst.open("w", encoding="utf-8") as f:
            for q in questions:
                f.write(json.dumps(question_record(q), ensure_ascii=False) + "\n")
    return len(questions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research_rl.data",
                                     description="Convert question files between FlashRAG JSONL and verl / Search-R1 "
                                                 "parquet (chosen by extension).")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="IN OUT: .jsonl -> .parquet or .parquet -> .jsonl")
    conv.add_argument("src", help="input question file (.jsonl or .parquet)")
    conv.add_argument("dst", help="output question file (.jsonl or .parquet)")
    conv.add_argument("--dataset", help="dataset name of every question (default: data_source, else the folder)")
    args = parser.parse_args(argv)
    try:
        n = convert(args.src, args.dst, args.dataset)
    except (FileNotFoundError, DataError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {n} questions to {args.dst}")


if __name__ == "__main__":
    main()
