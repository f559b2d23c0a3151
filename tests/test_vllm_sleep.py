"""Sleep/wake bookkeeping of the vLLM engine (research_rl/rollout/vllm_engine.py), with the real ``VLLMEngine`` and
only vLLM's ``AsyncLLM`` replaced by a recording stand-in: vLLM's CPU backend has no sleep mode, so this is where the
order of ``sleep(level)`` / ``wake_up(tags)`` calls a GPU run makes is checked. The real engine on CPU:
tests/test_vllm_engine.py; the trainer with it in Ray actors: tests/test_vllm_train.py.

One training step as the rollout worker drives the engine (research_rl/roles/rollout_worker.py): a rollout
(``wake_up()``, generation, ``sleep()``), the sync (``load_buckets``), the probe (``log_probs``), the next rollout.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from research_rl.rollout.agent_loop import SamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm


class RecordingAsyncLLM:
    """What ``VLLMEngine`` calls on vLLM's ``AsyncLLM``, recorded in order; generation returns fixed ids."""

    def __init__(self, args: dict):
        self.args = args
        self.calls: list[tuple] = []

    async def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", None if tags is None else list(tags)))
        return True

    async def collective_rpc(self, method: str, args: tuple = (), **kwargs):
        self.calls.append(("rpc", method))
        if method == "rl_end_sync":  # one worker's SyncStats
            return [{"bytes": 4, "elements": 1, "tensors": 1, "buckets": 1}]
        return [None]

    async def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    async def generate(self, prompt, params, request_id: str):
        self.calls.append(("generate", request_id.split("-")[0]))
        ids = list(prompt["prompt_token_ids"])
        yield SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=[7, 7], finish_reason="length", stop_reason=None,
                                     logprobs=[{7: SimpleNamespace(logprob=-0.5)}] * 2)],  # as with logprobs=0
            prompt_logprobs=[None] + [{t: SimpleNamespace(logprob=-1.0)} for t in ids[1:]])

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A config-only Qwen2 directory: the engine reads the parameter names from it (no weights needed)."""
    from transformers import Qwen2Config

    out = tmp_path_factory.mktemp("sleep") / "model"
    Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, tie_word_embeddings=True).save_pretrained(out)
    return out


@pytest.fixture
def make_engine(model_dir, monkeypatch):
    """``VLLMEngine`` on a GPU-like platform (sleep mode available) whose ``AsyncLLM`` is the recorder."""
    from vllm.platforms import current_platform

    from research_rl.rollout.vllm_engine import VLLMEngine

    async def start(self, args):
        return RecordingAsyncLLM(args)

    monkeypatch.setattr(VLLMEngine, "_start", start)
    engines = []

    def make(sleep_level: int, sleep_mode_available: bool = True, **kwargs) -> VLLMEngine:
        monkeypatch.setattr(current_platform, "is_sleep_mode_available", lambda: sleep_mode_available)
        engines.append(VLLMEngine(str(model_dir), None, eos_ids=[0], sleep_level=sleep_level, **kwargs))
        return engines[-1]

    yield make
    for e in engines:
        e.shutdown()


def _step(engine) -> None:
    """rollout → sync → probe → rollout, in the rollout worker's order."""
    def rollout():
        engine.wake_up()
        engine.generate([[1, 2, 3]], [2], SamplingParams(greedy=True))
        engine.sleep()

    from research_rl.sync.buckets import plan_buckets

    rollout()
    (bucket,) = plan_buckets([("model.norm.weight", (1,))], "float32", 1)
    engine.begin_sync()  # RolloutWorker.sync_begin ... sync_end, one bucket by the object store
    engine.receive_packed(bucket, torch.zeros(bucket.nbytes, dtype=torch.uint8))
    engine.end_sync()
    assert engine.log_probs([1, 2, 3]).tolist() == [-1.0, -1.0]  # RolloutWorker.probe_log_probs
    rollout()


@pytest.mark.parametrize("level", [1, 2])
def test_colocated_step_sleeps_after_rollouts_and_wakes_each_tag_once(make_engine, level):
    engine = make_engine(level)
    assert engine.engine_args["enable_sleep_mode"] is True
    _step(engine)
    assert engine.llm.calls == [
        ("generate", "rollout"),         # the engine starts awake: nothing to wake
        ("sleep", level),                # after the rollout: the learner gets the memory
        ("wake_up", ["weights"]),        # the sync needs the weights mapped ...
        ("rpc", "rl_begin_sync"), ("rpc", "rl_receive_packed"), ("rpc", "rl_end_sync"), ("reset_prefix_cache",),
        ("wake_up", ["kv_cache"]),       # ... the probe the KV cache; "weights" is never woken twice
        ("generate", "probe"),
        ("generate", "rollout"),         # everything is awake: the rollout wakes nothing
        ("sleep", level),
    ]
    assert engine.asleep == {"weights", "kv_cache"}


def test_a_full_wake_asks_for_exactly_the_sleeping_tags(make_engine):
    engine = make_engine(2)
    engine.sleep()
    engine.sleep()  # already asleep: not asked again
    engine.wake_up()  # both tags sleep: both named, never None (which would include tags already awake)
    engine.wake_up()
    engine.sleep()
    engine.wake_up(["kv_cache"])
    engine.wake_up()
    assert engine.llm.calls == [("sleep", 2), ("wake_up", ["weights", "kv_cache"]), ("sleep", 2),
                                ("wake_up", ["kv_cache"]), ("wake_up", ["weights"])]
    with pytest.raises(ValueError, match="unknown vLLM sleep tag 'weight'"):
        engine.wake_up(["weight"])


@pytest.mark.parametrize("level, available", [(0, True), (2, False)])
def test_no_sleep_calls_when_disaggregated_or_without_sleep_mode(make_engine, level, available):
    """Level 0 (disaggregated placement), or a platform without sleep mode (vLLM's CPU backend) at any level:
    sleep mode stays off and vLLM is never asked to sleep or wake."""
    engine = make_engine(level, sleep_mode_available=available)
    assert engine.engine_args["enable_sleep_mode"] is False and engine.sleep_level == 0
    _step(engine)
    assert not [c for c in engine.llm.calls if c[0] in ("sleep", "wake_up")], engine.llm.calls


def test_tensor_parallel_engines_use_the_mp_executor(make_engine):
    """Inside a Ray placement group vLLM would pick its ``ray`` executor for TP > 1 (tests/test_vllm_train.py runs
    TP 2 in a rollout actor); TP 1 keeps vLLM's own choice."""
    assert make_engine(0, tensor_parallel_size=2).engine_args["distributed_executor_backend"] == "mp"
    assert "distributed_executor_backend" not in make_engine(0).engine_args
