"""Heavy imports stay at the edges: the package imports without pyserini, jnius, vllm, deepspeed, faiss or
sentence-transformers."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

MODULES = ["research_rl.config.schema", "research_rl.data", "research_rl.algo.reward", "research_rl.algo.grpo", "research_rl.rollout.agent_loop",
           "research_rl.algo.templates", "research_rl.learner.core", "research_rl.driver.trainer", "research_rl.retrieval.retriever",
           "research_rl.rollout.warmup", "research_rl.driver.checkpoint", "research_rl.rollout.hf_engine", "research_rl.algo.evaluation",
           "research_rl.evaluate", "research_rl.driver.metrics", "research_rl.export",
           "research_rl.roles.learner_worker", "research_rl.rollout.vllm_engine", "research_rl.roles.rollout_worker"]


def test_core_modules_do_not_import_heavy_backends():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES) +
            "bad = [m for m in ('pyserini', 'jnius', 'vllm', 'deepspeed', 'faiss', 'sentence_transformers')\n"
            "       if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_reward_is_pure_python():
    out = subprocess.run([sys.executable, "-c", "import sys, research_rl.algo.reward; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_vllm_engine_without_vllm_names_the_install():
    code = ("import sys; sys.modules['vllm'] = None\n"  # as if vllm were not installed
            "from research_rl.rollout.vllm_engine import VLLMEngine\n"
            "try:\n    VLLMEngine('m', None)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "rollout.engine=vllm needs vllm: pip install -e '.[vllm]'" in out.stdout, out.stderr


def test_vllm_older_than_the_floor_is_refused_naming_it():
    """An installed vLLM below ``VLLM_MIN_VERSION`` fails when the engine is built, before anything starts; a local
    build or pre-release of the floor passes (the CPU build reports ``0.32.0``)."""
    from research_rl.rollout.vllm_engine import VLLM_MIN_VERSION, check_vllm_version

    for ok in (VLLM_MIN_VERSION, f"{VLLM_MIN_VERSION}+cpu", f"{VLLM_MIN_VERSION}rc1", "1.0.0"):
        check_vllm_version(ok)
    with pytest.raises(ImportError, match=rf"needs vllm>={VLLM_MIN_VERSION}, but vllm 0\.10\.1 is installed"):
        check_vllm_version("0.10.1")
    code = ("import sys, types; sys.modules['vllm'] = types.SimpleNamespace(__version__='0.8.5')\n"  # an old vllm
            "from research_rl.rollout.vllm_engine import VLLMEngine\n"
            "try:\n    VLLMEngine('m', None)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"needs vllm>={VLLM_MIN_VERSION}, but vllm 0.8.5 is installed" in out.stdout, out.stderr


def test_the_vllm_extra_has_the_engines_floor():
    import tomllib
    from pathlib import Path

    from research_rl.rollout.vllm_engine import VLLM_MIN_VERSION

    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert extra["project"]["optional-dependencies"]["vllm"] == [f"vllm>={VLLM_MIN_VERSION}"]
