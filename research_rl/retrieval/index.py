"""The index's shared pieces: ``Passage``, the index manifest and the not-found error.

Every index directory holds ``manifest.json`` (written by ``retriever_service.build_index``): the corpus path and
sha256, kind, passage count, build seconds and creation time, plus per kind the pyserini version (bm25) or the
encoder, prefixes, dimension, index type and parameters and the faiss / sentence-transformers versions (dense). A
corpus whose sha256 differs from the manifest's is refused rather than searched with a stale index, for both kinds.
The backends (``bm25``, ``dense``) and the ``Retriever`` facade import this module; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

MANIFEST_NAME = "manifest.json"
KINDS = ("bm25", "dense")


class Passage(NamedTuple):
    """One retrieved passage: corpus ``id``, ``contents`` (``"Title"\ntext``), backend ``score`` (higher = better).

    A NamedTuple: cheap to build, compare and pickle across Ray and HTTP boundaries."""

    id: str
    contents: str
    score: float


def build_command(corpus: str, index_dir: str, kind: str = "bm25") -> str:
    """The shell command that builds ``index_dir`` from ``corpus``."""
    return f"python -m retriever_service.build_index --corpus {corpus} --kind {kind} --out {index_dir}"


class IndexNotFoundError(FileNotFoundError):
    """The index directory or its manifest is missing; the message gives the command that builds it."""


def missing_index(index_dir: str | Path) -> str | None:
    """Why ``index_dir`` is not a usable index (directory or manifest missing), or None when both exist."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        return f"retriever index directory not found: {index_dir}"
    if not (index_dir / MANIFEST_NAME).is_file():
        return f"no {MANIFEST_NAME} in {index_dir} (missing or incomplete index)"
    return None


def index_not_found(index_dir: str | Path, reason: str, corpus: str | None = None,
                     kind: str = "bm25") -> IndexNotFoundError:
    command = build_command(corpus or "<corpus.jsonl>", str(index_dir), kind)
    return IndexNotFoundError(f"{reason}; build it with: {command}")


def corpus_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes (read in 1 MiB chunks).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(index_dir: str | Path) -> dict:
    """Read ``<index_dir>/manifest.json``.

    Returns:
        The manifest dict (keys ``corpus``, ``corpus_sha256``, ``kind``, ``count``, ``build_seconds``, ``created``;
        bm25 adds ``pyserini_version``, dense the keys listed in ``research_rl.retrieval.dense.build_dense_index``).

    Raises:
        IndexNotFoundError: if the directory or its manifest is missing (the message names the build command).
        ValueError: if the manifest is not a JSON object.
    """
    reason = missing_index(index_dir)
    if reason:
        raise index_not_found(index_dir, reason)
    path = Path(index_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def write_manifest(index_dir: str | Path, manifest: dict) -> None:
    """Write ``manifest`` as ``<index_dir>/manifest.json`` (atomically: temp file + rename)."""
    path = Path(index_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
