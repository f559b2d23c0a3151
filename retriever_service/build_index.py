"""Build a retrieval index from a corpus JSONL.

Usage::

    python -m retriever_service.build_index --corpus X.jsonl --kind bm25 --out DIR [--threads N] [--force]
    python -m retriever_service.build_index --corpus X.jsonl --kind dense --out DIR [--encoder NAME_OR_PATH]
        [--index-type flat|hnsw|ivfpq] [--batch-size 64] [--chunk-size 4096] [--device cpu|cuda] [--fp16]
        [--query-prefix S] [--passage-prefix S] [--hnsw-m 32] [--hnsw-ef-search 128] [--ivf-nlist N]
        [--ivf-nprobe N] [--pq-m 64] [--threads N] [--force]

Retrieval (ReSearch §3.1; docs/retriever.md): ReSearch searches top-5 passages with E5-base-v2 dense retrieval over an exact inner-product index.
``--kind dense`` builds that (``research_rl.retrieval.dense``; default encoder the bundled all-MiniLM-L6-v2, a deviation since
no E5 weights can be downloaded here; ``--encoder intfloat/e5-base-v2`` where it is available). ``--kind bm25`` builds
the pyserini/Lucene BM25 index (``research_rl.retrieval.bm25``), the Search-R1-style alternative used in CPU debug mode.

Steps: validate the corpus (every line a JSON object with string ``id`` and ``contents``, ids unique; the first error
is reported as ``FILE:LINE: reason``, exit 1); if ``--out`` already holds an index of the same kind built from a corpus
with the same sha256 (for dense: also the same encoder, prefixes, index type and any index parameter given), report
it up to date and exit 0 unless ``--force``; otherwise build into a temporary directory next to ``--out``, write
``manifest.json`` (see ``research_rl.retrieval.retriever.write_manifest``) and rename it into place, so a crash never leaves a
half-built index at ``--out``. An existing directory that is not such an index is only replaced with ``--force``.

Dense builds keep their work in ``.<out name>.building-dense/`` next to ``--out``: ``chunks/`` holds the passage
embeddings, one ``.npy`` per ``--chunk-size`` passages, so rerunning the same command after an interruption (Ctrl-C,
a killed job) resumes from the finished chunks; they are reused only for the same corpus sha256, encoder, prefixes,
max sequence length, fp16 and chunk size. The directory is removed once the index is in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from research_rl.retrieval.index import MANIFEST_NAME, read_manifest, write_manifest


class CorpusError(ValueError):
    """A corpus line is not a valid passage; ``str()`` is ``FILE:LINE: reason``."""


def validate_corpus(path: str | Path) -> tuple[int, str]:
    """Check a corpus JSONL and hash it in one pass.

    Args:
        path: JSONL file; each non-blank line a JSON object with string ``id`` and ``contents`` (other keys allowed).

    Returns:
        (number of passages, sha256 of the file's bytes -- equal to ``research_rl.retrieval.retriever.corpus_sha256``).

    Raises:
        FileNotFoundError: the file does not exist.
        CorpusError: the first bad line, as ``FILE:LINE: reason``; also for duplicate ids or an empty corpus.
    """
    h = hashlib.sha256()
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            h.update(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("id", "contents"):
                if not isinstance(row.get(key), str):
                    got = "missing" if key not in row else f"{type(row[key]).__name__}"
                    raise CorpusError(f"{path}:{lineno}: field {key!r} must be a string ({got})")
            if not row["id"]:
                raise CorpusError(f"{path}:{lineno}: field 'id' is empty")
            if row["id"] in first_line:
                first = first_line[row["id"]]
                raise CorpusError(f"{path}:{lineno}: duplicate id {row['id']!r} (first on line {first})")
            first_line[row["id"]] = lineno
    if not first_line:
        raise CorpusError(f"{path}:1: corpus has no passages")
    return len(first_line), h.hexdigest()


def _existing(out: Path, kind: str, sha: str, spec: dict | None = None) -> str | None:
    """What ``out`` holds: None (absent or empty dir), "same" (a ``kind`` index of this corpus whose manifest agrees
    with ``spec`` on every key, looked up at the top level or in ``index_params``) or a description."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError):
        return f"has no readable {MANIFEST_NAME}"
    if manifest.get("kind") == kind and manifest.get("corpus_sha256") == sha:
        params = manifest.get("index_params") or {}
        have = {k: manifest[k] if k in manifest else params.get(k) for k in spec or {}}
        changed = [f"{k} {have[k]!r} (asked {v!r})" for k, v in (spec or {}).items() if have[k] != v]
        if not changed:
            return "same"
        return f"holds a {kind} index of this corpus with " + ", ".join(changed)
    return (f"holds a {manifest.get('kind')} index of {manifest.get('corpus')} "
            f"(sha256 {str(manifest.get('corpus_sha256'))[:12]}…)")


def _install(tmp: Path, out_path: Path) -> None:
    """Rename the finished index ``tmp`` to ``out_path``, replacing what is there (moved aside first, then deleted)."""
    if out_path.exists():
        old = out_path.with_name(f".{out_path.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_path.rename(old)
        tmp.rename(out_path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out_path)


def dense_work_dir(out: str | Path) -> Path:
    """Where a dense build of ``out`` keeps its resumable chunks: ``<parent>/.<name>.building-dense``."""
    out = Path(out)
    return out.with_name(f".{out.name}.building-dense")


def build(corpus: str, kind: str, out: str, threads: int | None = None, force: bool = False,
          **dense_options) -> dict | None:
    """Validate ``corpus`` and build a ``kind`` index at ``out`` (see module docstring).

    Args:
        corpus, kind, out, force: as the CLI's ``--corpus``, ``--kind``, ``--out``, ``--force``.
        threads: bm25: indexing threads (None = 1); dense: torch and faiss threads (None = their defaults).
        dense_options: keyword arguments of ``research_rl.retrieval.dense.build_dense_index`` (``encoder``, ``index_type``,
            ``batch_size``, ``chunk_size``, ``device``, ``fp16``, prefixes, index parameters, ``on_chunk``,
            ``progress``); dense only.

    Returns:
        The new manifest, or None when ``out`` was already up to date.

    Raises:
        CorpusError: bad corpus line (``FILE:LINE: reason``).
        FileExistsError: ``out`` exists, is not an index of this corpus (dense: with this encoder, prefixes and index
            type), and ``force`` is False.
        FileNotFoundError: no corpus file, or a dense ``encoder`` path that does not exist.
        ValueError: unknown ``kind``, dense options with ``kind="bm25"``, or what ``build_dense_index`` raises
            (encoder not loadable or not mean-pooling, fp16 on CPU, bad index parameters).
        RuntimeError: the backend indexed a different number of passages than the corpus holds.
    """
    if kind not in ("bm25", "dense"):
        raise ValueError(f"unknown index kind {kind!r} (expected 'bm25' or 'dense')")
    if kind == "bm25" and dense_options:
        raise ValueError(f"options {sorted(dense_options)} apply to dense indexes only")
    count, sha = validate_corpus(corpus)
    out_path = Path(out)
    spec = None
    if kind == "dense":
        from research_rl.retrieval.dense import DEFAULT_ENCODER, default_prefixes, encoder_id

        encoder = dense_options.get("encoder") or DEFAULT_ENCODER
        q_default, p_default = default_prefixes(encoder)
        q, p = dense_options.get("query_prefix"), dense_options.get("passage_prefix")
        spec = {"encoder": encoder_id(encoder), "query_prefix": q_default if q is None else q,
                "passage_prefix": p_default if p is None else p,
                "index_type": dense_options.get("index_type") or "flat"}
        spec.update({k: dense_options[k] for k in ("hnsw_m", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe", "pq_m")
                     if dense_options.get(k) is not None})
    existing = _existing(out_path, kind, sha, spec)
    if existing == "same" and not force:
        return None
    if existing and existing != "same" and not force:
        same_corpus = existing.startswith(f"holds a {kind} index of this corpus")
        what = "" if same_corpus else f", not a {kind} index of {corpus}"
        raise FileExistsError(f"{out} {existing}{what}; pass --force to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dense":
        return _build_dense(corpus, count, out_path, threads, dense_options)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.building-", dir=out_path.parent))
    try:
        from research_rl.retrieval.bm25 import build_bm25_index

        t0 = time.perf_counter()
        indexed = build_bm25_index(str(corpus), str(tmp), threads=threads or 1)
        seconds = time.perf_counter() - t0
        if indexed != count:
            raise RuntimeError(f"indexed {indexed} passages but {corpus} holds {count}")
        manifest = {
            "corpus": str(Path(corpus).resolve()),
            "corpus_sha256": sha,
            "kind": kind,
            "count": indexed,
            "build_seconds": round(seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pyserini_version": version("pyserini"),
        }
        write_manifest(tmp, manifest)
        _install(tmp, out_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _build_dense(corpus: str, count: int, out_path: Path, threads: int | None, options: dict) -> dict:
    """Encode into ``.<out>.building-dense/chunks`` (kept on failure, for a rerun to resume), build the index in a
    fresh ``index-*`` directory beside it, rename that to ``out_path``, then remove the work directory."""
    from research_rl.retrieval.dense import build_dense_index

    work = dense_work_dir(out_path)
    work.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="index-", dir=work))
    try:
        manifest = build_dense_index(str(corpus), str(stage), chunk_dir=str(work / "chunks"), keep_chunks=True,
                                     threads=threads, **options)
        if manifest["count"] != count:
            raise RuntimeError(f"indexed {manifest['count']} passages but {corpus} holds {count}")
        _install(stage, out_path)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
        if not (work / "chunks").exists():  # failed before encoding anything: nothing to resume
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(work)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 built or up to date, 1 bad corpus, encoder or output, 2 usage)."""
    parser = argparse.ArgumentParser(prog="python -m retriever_service.build_index",
                                     description="Build a retrieval index from a corpus JSONL.")
    parser.add_argument("--corpus", required=True, help="corpus JSONL: one {\"id\", \"contents\"} object per line")
    parser.add_argument("--kind", required=True, choices=["bm25", "dense"], help="index kind")
    parser.add_argument("--out", required=True, help="index directory to create")
    parser.add_argument("--threads", type=int, default=None,
                        help="bm25: indexing threads (default 1); dense: torch/faiss threads (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date, replace it")
    dense = parser.add_argument_group("dense options (--kind dense only)")
    dense.add_argument("--encoder", help="sentence-transformers model folder or Hugging Face id (offline: cached), "
                                         "e.g. intfloat/e5-base-v2 (default: the bundled all-MiniLM-L6-v2)")
    dense.add_argument("--index-type", choices=["flat", "hnsw", "ivfpq"],
                       help="flat = exact IndexFlatIP (default), hnsw = IndexHNSWFlat, ivfpq = IndexIVFPQ")
    dense.add_argument("--batch-size", type=int, help="passages per encoder forward pass (default 64)")
    dense.add_argument("--chunk-size", type=int, help="passages per resumable chunk file (default 4096)")
    dense.add_argument("--device", choices=["cpu", "cuda"], help="encoder device (default cpu)")
    dense.add_argument("--fp16", action="store_true", default=None, help="encode in half precision (CUDA only)")
    dense.add_argument("--query-prefix", help="prepended to queries (default: 'query: ' for E5 encoders, else '')")
    dense.add_argument("--passage-prefix", help="prepended to passages (default: 'passage: ' for E5, else '')")
    dense.add_argument("--hnsw-m", type=int, help="hnsw: neighbours per node M (default 32)")
    dense.add_argument("--hnsw-ef-search", type=int, help="hnsw: efSearch at query time (default 128)")
    dense.add_argument("--ivf-nlist", type=int, help="ivfpq: inverted lists (default min(4*sqrt(N), N/39))")
    dense.add_argument("--ivf-nprobe", type=int, help="ivfpq: lists probed per query (default min(nlist, 64))")
    dense.add_argument("--pq-m", type=int, help="ivfpq: PQ sub-quantizers = bytes per vector; divides dim (default 64)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    names = ["encoder", "index_type", "batch_size", "chunk_size", "device", "fp16", "query_prefix", "passage_prefix",
             "hnsw_m", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe", "pq_m"]
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.kind == "bm25" and options:
        flags = ", ".join("--" + n.replace("_", "-") for n in options)
        parser.error(f"{flags} apply to --kind dense only")
    for n, value in options.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            parser.error(f"--{n.replace('_', '-')} must be >= 1, got {value}")
    try:
        manifest = build(args.corpus, args.kind, args.out, threads=args.threads, force=args.force, **options)
    except FileNotFoundError as e:
        missing_corpus = e.filename is not None and str(e.filename) == str(args.corpus)
        print(f"error: {f'corpus file not found: {args.corpus}' if missing_corpus else e}", file=sys.stderr)
        return 1
    except (CorpusError, FileExistsError, ValueError, ImportError, BlockingIOError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if manifest is None:
        print(f"{args.out}: {args.kind} index of {args.corpus} is up to date (pass --force to rebuild)")
    elif args.kind == "dense":
        print(f"{args.out}: indexed {manifest['count']} passages ({manifest['index_type']}, {manifest['encoder']}, "
              f"dim {manifest['dim']}) in {manifest['build_seconds']:.1f} s "
              f"({manifest['reused_chunks']} chunk(s) reused)")
    else:
        print(f"{args.out}: indexed {manifest['count']} passages in {manifest['build_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
