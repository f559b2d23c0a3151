"""Retrieval quality of a built index: recall@k of the gold supporting passages of question files.

Usage::

    python -m retriever_service.evaluate --index DIR --questions Q.jsonl [--questions Q2.jsonl ...]
        [--k 1 5 10] [--limit N] [--batch-size 256] [--threads N] [--corpus C.jsonl] [--json OUT]

Retrieval (docs/retriever.md): the policy sees the top-5 passages per query, so recall@5 of the gold paragraphs for the question
text is a first check of an index (BM25 or dense) before training on it. The questions are FlashRAG JSONL rows
(``research_rl.data.load_questions``) with ``supporting_ids`` = corpus ids of the gold paragraphs; questions without
them are skipped (and counted).

Metrics per question file, averaged over its questions that have supporting ids:

- ``recall@k``: fraction of the question's supporting ids among the top-k passages retrieved for the question text;
- ``all_gold@k``: fraction of questions with *all* their supporting passages in the top-k.

One search per question at ``max(k)`` (batched, ``--batch-size`` queries per ``Retriever.search`` call); top-k is
its prefix. For ``flat`` and BM25 that is exactly the top-k; for approximate indexes (hnsw, ivfpq) a search at a
smaller k could differ slightly. The question is the query, unchanged (multi-hop questions often need a second
search for the second paragraph, so recall@k of one search understates what the agent can reach).

Exit status: 0, or 1 for a missing index or question file or malformed input (the message names it), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from research_rl.data import DataError, Question, load_questions
from research_rl.retrieval.retriever import Retriever
from research_rl.retrieval.index import IndexNotFoundError, read_manifest


def recall_at_k(questions: list[Question], retrieved: list[list[str]], ks: list[int]) -> dict:
    """Recall and all-gold rates of retrieved passage ids against ``supporting_ids``.

    Args:
        questions: questions, each with non-empty ``supporting_ids``.
        retrieved: per question, the retrieved passage ids in rank order (at least ``max(ks)`` where available).
        ks: cut-offs.

    Returns:
        ``{"recall@k": float, "all_gold@k": float for each k}``, each in [0, 1] (0.0 for no questions).
    """
    out = {}
    for k in ks:
        recalls, all_gold = [], []
        for q, ids in zip(questions, retrieved):
            gold = set(q.supporting_ids)
            found = len(gold & set(ids[:k]))
            recalls.append(found / len(gold))
            all_gold.append(found == len(gold))
        n = max(len(recalls), 1)
        out[f"recall@{k}"] = sum(recalls) / n
        out[f"all_gold@{k}"] = sum(all_gold) / n
    return out


def evaluate(retriever: Retriever, question_files: list[str], ks: list[int], limit: int | None = None,
             batch_size: int = 256) -> dict:
    """Recall@k per question file (see module docstring).

    Returns:
        ``{path: {"questions": n evaluated, "skipped": n without supporting_ids, "seconds": search time,
        "recall@k": .., "all_gold@k": ..}}`` in the order of ``question_files``.

    Raises:
        FileNotFoundError: a question file is missing.
        DataError: a malformed question row (``FILE:LINE: reason``), or a file none of whose (first ``limit``)
            questions has ``supporting_ids``.
    """
    results = {}
    for path in question_files:
        questions = load_questions(path)[:limit] if limit else load_questions(path)
        with_gold = [q for q in questions if q.supporting_ids]
        if not with_gold:
            raise DataError(f"{path}: no question has 'supporting_ids' (nothing to compute recall against)")
        t0 = time.perf_counter()
        retrieved: list[list[str]] = []
        for s in range(0, len(with_gold), batch_size):
            batch = with_gold[s:s + batch_size]
            retrieved += [[p.id for p in ps] for ps in retriever.search([q.question for q in batch], top_k=max(ks))]
        seconds = time.perf_counter() - t0
        results[str(path)] = {"questions": len(with_gold), "skipped": len(questions) - len(with_gold),
                              "seconds": round(seconds, 3), **recall_at_k(with_gold, retrieved, ks)}
    return results


def format_table(results: dict, ks: list[int]) -> str:
    """A plain-text table: one row per question file, columns n, recall@k..., all-gold@k..."""
    header = ["questions", "n"] + [f"recall@{k}" for k in ks] + [f"all-gold@{k}" for k in ks]
    rows = [[path, str(r["questions"])] + [f"{r[f'recall@{k}']:.3f}" for k in ks]
            + [f"{r[f'all_gold@{k}']:.3f}" for k in ks] for path, r in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 missing or malformed input, 2 usage)."""
    parser = argparse.ArgumentParser(prog="python -m retriever_service.evaluate",
                                     description="Recall@k of gold supporting passages for question files.")
    parser.add_argument("--index", required=True, help="index directory (bm25 or dense; kind read from manifest)")
    parser.add_argument("--questions", required=True, action="append",
                        help="FlashRAG question JSONL with supporting_ids; repeat for several files")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="cut-offs (default 1 5 10)")
    parser.add_argument("--limit", type=int, help="first N questions of each file")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per search call (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="backend search threads (default 1)")
    parser.add_argument("--corpus", help="check the index was built from this corpus (sha256)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if min(args.k) < 1:
        parser.error(f"--k values must be >= 1, got {args.k}")
    ks = sorted(set(args.k))
    for path in args.questions:
        if not Path(path).is_file():
            print(f"error: questions file not found: {path}", file=sys.stderr)
            return 1
    try:
        manifest = read_manifest(args.index)
        retriever = Retriever(args.index, kind=manifest.get("kind"), threads=args.threads, corpus_path=args.corpus)
        results = evaluate(retriever, args.questions, ks, limit=args.limit, batch_size=args.batch_size)
    except (IndexNotFoundError, FileNotFoundError, DataError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    described = (f"{manifest['index_type']}, {manifest['encoder']}" if manifest.get("kind") == "dense"
                 else f"pyserini {manifest.get('pyserini_version')}")
    print(f"index {args.index}: {manifest.get('kind')} ({described}), {manifest.get('count')} passages")
    print(format_table(results, ks))
    if args.json:
        report = {"index": str(args.index), "kind": manifest.get("kind"), "count": manifest.get("count"),
                  "k": ks, "results": results}
        if manifest.get("kind") == "dense":
            report.update(encoder=manifest.get("encoder"), index_type=manifest.get("index_type"))
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
