"""FlashRAG-format JSONL data: questions (``id``, ``question``, ``golden_answers``) and the passage corpus
(``id``, ``contents``), plus the resumable prompt stream the driver draws training batches from.

Malformed input raises ``DataError`` naming the file and line.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """Malformed data; the message starts with ``FILE:LINE:``."""


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
    """Load a FlashRAG question file.

    Raises:
        DataError: a row lacks a string ``id``/``question`` or a non-empty list of string ``golden_answers``.
    """
    path = Path(path)
    dataset = dataset or path.parent.name
    out = []
    for lineno, row in iter_jsonl(path):
        qid, question, golds = row.get("id"), row.get("question"), row.get("golden_answers")
        if not isinstance(qid, (str, int)):
            raise DataError(f"{path}:{lineno}: missing or non-string 'id'")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}:{lineno}: missing or empty 'question'")
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise DataError(f"{path}:{lineno}: 'golden_answers' must be a non-empty list of strings")
        out.append(Question(str(qid), question.strip(), tuple(golds), dataset,
                            tuple(row.get("supporting_ids") or ()), row.get("metadata") or {}))
    if not out:
        raise DataError(f"{path}: no questions")
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
