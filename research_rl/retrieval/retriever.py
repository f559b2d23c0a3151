"""Retriever core: top-k passage search over a built index.

Retrieval (ReSearch §3.1; docs/retriever.md): ReSearch retrieves the top-5 passages for each ``<search>`` query (E5-base-v2 dense retrieval over
Wikipedia); the rollout inserts their ``contents`` joined by a blank line between ``<result>\\n`` and ``\\n</result>``
(``research_rl.rollout.agent_loop.format_observation``). Two backends, chosen by ``kind``:

- ``"dense"`` (``research_rl.retrieval.dense``, faiss + sentence-transformers): the paper's method -- E5-style bi-encoder with
  query/passage prefixes and mean pooling, inner-product search (exact ``flat`` by default). Deviation: the default
  encoder is the bundled all-MiniLM-L6-v2, since no E5 weights can be downloaded here; ``intfloat/e5-base-v2`` works
  where it is available.
- ``"bm25"`` (``research_rl.retrieval.bm25``, pyserini): the Search-R1-style alternative the project uses in CPU debug mode.

This module is the plain core that ``RetrieverActor`` wraps and tests build directly. It imports
neither pyserini nor faiss/sentence-transformers: the backend is imported when a ``Retriever`` is built.

The manifest and ``Passage`` live in ``research_rl.retrieval.index``, which the backends import.
"""

from __future__ import annotations

from pathlib import Path

from research_rl.retrieval.index import (
    KINDS, MANIFEST_NAME, Passage, index_not_found, missing_index, build_command, corpus_sha256, read_manifest)


class Retriever:
    """Plain core used by RetrieverActor and tests. Wraps one backend (``BM25Searcher`` or ``DenseSearcher``).

    Not thread-safe: one thread must own it (the dense backend's faiss/torch calls must not run concurrently).
    """

    def __init__(self, index_dir: str, kind: str = "bm25", top_k: int = 5, threads: int = 1,
                 corpus_path: str | None = None):
        """Open a built index.

        Args:
            index_dir: directory built by ``python -m retriever_service.build_index``.
            kind: backend, ``"bm25"`` or ``"dense"``; must match the manifest's ``kind``.
            top_k: default passages per query (ReSearch: 5).
            threads: backend search threads per batch (pyserini threads / faiss OpenMP threads, process-wide).
            corpus_path: if given, the corpus the caller expects; its sha256 must match the manifest's.

        Raises:
            ValueError: unknown ``kind``, ``top_k`` < 1, a manifest of another kind, or a corpus sha256 mismatch
                (the message names both paths).
            IndexNotFoundError: ``index_dir`` or its manifest is missing.
            FileNotFoundError: a dense index lacks one of its files.
            ImportError: the backend's packages are not installed (dense: the ``dense`` extra).
        """
        if kind not in KINDS:
            raise ValueError(f"retriever kind {kind!r} is not implemented (expected one of {KINDS})")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.index_dir, self.kind, self.top_k = str(index_dir), kind, int(top_k)
        reason = missing_index(index_dir)
        if reason:
            raise index_not_found(index_dir, reason, corpus_path, kind)
        self.manifest = read_manifest(index_dir)
        if self.manifest.get("kind") != kind:
            raise ValueError(f"{Path(index_dir) / MANIFEST_NAME}: index kind is {self.manifest.get('kind')!r}, "
                             f"expected {kind!r}")
        if corpus_path is not None:
            sha = corpus_sha256(corpus_path)
            if sha != self.manifest.get("corpus_sha256"):
                raise ValueError(
                    f"corpus {corpus_path} (sha256 {sha[:12]}…) differs from the corpus the index at {index_dir} was "
                    f"built from ({self.manifest.get('corpus')}, "
                    f"sha256 {str(self.manifest.get('corpus_sha256'))[:12]}…); "
                    f"rebuild it: {build_command(corpus_path, self.index_dir, kind)} --force")
        if kind == "dense":
            from research_rl.retrieval.dense import DenseSearcher

            self._backend = DenseSearcher(self.index_dir, threads=threads)
        else:
            from research_rl.retrieval.bm25 import BM25Searcher

            self._backend = BM25Searcher(self.index_dir, threads=threads)

    def search(self, queries: list[str], top_k: int | None = None) -> list[list[Passage]]:
        """Top-k passages per query, with one batched backend call for all non-empty queries.

        Args:
            queries: query strings. Empty or whitespace-only queries never reach the backend and get [] (the agent
                loop substitutes the observation ``nothing to search``).
            top_k: passages per query; defaults to the constructor's ``top_k``.

        Returns:
            One list per query, in input order, of at most ``top_k`` passages in descending score.

        Raises:
            ValueError: ``top_k`` < 1, or the backend refuses a query (BM25: text that is not valid Unicode); the
                message names the query.
            RuntimeError: the backend failed on a query (the message names it).
        """
        k = self.top_k if top_k is None else int(top_k)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        nonempty = [i for i, q in enumerate(queries) if q.strip()]
        results: list[list[Passage]] = [[] for _ in queries]
        if nonempty:
            for i, passages in zip(nonempty, self._backend.batch_search([queries[i] for i in nonempty], k)):
                results[i] = passages
        return results
