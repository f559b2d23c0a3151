"""Shared fixtures: the tiny debug model (built from config, no downloads) and a small real BM25 index."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run the in-process BM25 retriever (a JVM) and in-process Ray drivers in this one process: Ray's failure
# signal handler would replace the JVM's SIGSEGV handler and ray.shutdown() would reset it to the default, killing
# the process at the JVM's next implicit null check (research_rl.retrieval.bm25). Set before anything imports ray.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")


def build_model(out: Path, shape) -> Path:
    """A debug model + tokenizer of ``shape`` (a ``DebugModelConfig``) trained on the shipped corpus and training
    questions, as ``make artifacts`` builds it."""
    from research_rl.debug_model import build_debug_model

    build_debug_model(str(out), str(ROOT / "data/corpus/corpus.jsonl"),
                      [str(ROOT / "data/musique/train.jsonl"), str(ROOT / "data/hotpotqa/train.jsonl")], shape)
    return out


@pytest.fixture(scope="session")
def debug_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 model + tokenizer trained on the shipped corpus (built once per session)."""
    from research_rl.config.schema import DebugModelConfig

    return build_model(tmp_path_factory.mktemp("model") / "debug_model",
                       DebugModelConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=1, num_kv_heads=1))


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory) -> Path:
    """A real BM25 index of the shipped corpus, built with the CLI a user runs."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("index") / "bm25"
    subprocess.run([sys.executable, "-m", "retriever_service.build_index", "--corpus",
                    str(ROOT / "data/corpus/corpus.jsonl"), "--kind", "bm25", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300)
    return out


@pytest.fixture(scope="session")
def tokenizer(debug_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(debug_model_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs for one test module (shut down after it unless one was already running)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()
