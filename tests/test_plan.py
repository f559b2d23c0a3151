"""The memory plan (``research_rl.learner.memory``, ``python -m research_rl.plan``): parameter counts equal real HF
models'; the activation and logits formulas agree with what autograd saves on CPU for shapes they were not fitted
on (within ``memory.ACTIVATION_MARGIN``); the 7B recipe's plan and the warning ``train`` prints before ``ray.init``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from research_rl.learner import memory

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def _hf(shape: memory.ModelShape):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied))


def _saved_bytes(fn, params) -> int:
    """Distinct storages autograd saves during ``fn()`` (saved-tensor hooks), parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_the_hf_model(tied):
    shape = memory.ModelShape(vocab=300, hidden=48, intermediate=96, layers=3, heads=6, kv_heads=2, tied=tied)
    assert shape.params() == sum(p.numel() for p in _hf(shape).parameters())


def test_known_7b_shape_has_the_published_parameter_count():
    assert memory.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"].params() == 7_615_616_512  # Qwen2.5-7B's model card: 7.61B


@pytest.mark.parametrize("shape", [
    memory.ModelShape(vocab=256, hidden=192, intermediate=512, layers=3, heads=6, kv_heads=2),
    memory.ModelShape(vocab=256, hidden=96, intermediate=352, layers=2, heads=4, kv_heads=4),
], ids=["gqa", "mha"])
def test_activation_formula_matches_saved_tensors_on_cpu(shape):
    """float32, no checkpointing: the decoder's saved bytes per token within the stated margin, and one layer's
    share (the difference between L and L-1 layers) too. Not the shapes the formula was counted on (d=128)."""
    tokens = 192
    ids = torch.randint(0, shape.vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    model = _hf(shape).train()
    measured = _saved_bytes(lambda: model.model(input_ids=ids).last_hidden_state, list(model.parameters())) / tokens
    planned = memory.activation_bytes_per_token(shape, 4, checkpointing=False)
    assert abs(planned - measured) <= memory.ACTIVATION_MARGIN * measured, (planned, measured)
    fewer = memory.ModelShape(**{**shape.__dict__, "layers": shape.layers - 1})
    small = _hf(fewer).train()
    per_layer = measured - _saved_bytes(lambda: small.model(input_ids=ids).last_hidden_state,
                                        list(small.parameters())) / tokens
    planned_layer = memory.layer_activation_bytes(shape, 4)
    assert abs(planned_layer - per_layer) <= memory.ACTIVATION_MARGIN * per_layer, (planned_layer, per_layer)


def test_logits_formula_matches_saved_tensors_on_cpu():
    """Unchunked head + log-probs + entropy at the 7B vocabulary, float32: the planned bytes per scored token within
    the margin of what autograd saves, at T = 1 and at T = 0.7 (logits / T replaces the logits it was made from)."""
    from research_rl.learner.chunked import head_log_probs

    shape = memory.KNOWN_SHAPES["Qwen/Qwen2.5-7B"]
    k, d = 32, 64
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape.vocab, d, generator=g) * 0.02)
    x = torch.randn(k, d, generator=g).requires_grad_()
    labels = torch.randint(0, shape.vocab, (k,), generator=g)
    for temperature in (1.0, 0.7):
        measured = _saved_bytes(lambda: head_log_probs(x * 1.0, weight, labels, temperature, 0, True, True),
                                [weight]) / k
        planned = memory.logits_bytes(shape, 1, 0, 4)
        assert abs(planned - measured) <= memory.ACTIVATION_MARGIN * measured, (temperature, planned, measured)
    chunked = memory.logits_bytes(shape, 8192, 1024, 2)
    assert chunked < 0.15 * memory.logits_bytes(shape, 8192, 0, 2)  # the chunk block, not every token's


def _compose(*overrides):
    from research_rl.config.compose import compose_config

    return compose_config(["experiment=research_qwen2.5_7b_instruct", *overrides])


def test_7b_recipe_plan_terms_and_the_warning_before_ray():
    from research_rl import plan

    # the recipe without its memory settings (chunked head, packing, optimizer offload)
    unfitted = ("learner.logits_chunk_tokens=0", "learner.pack=false", "learner.max_tokens_per_micro_batch=null",
                "learner.offload=none")
    cfg = _compose(*unfitted)
    p = plan.make_plan(cfg, 80 * memory.GIB)
    params = memory.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"].params()
    assert p.weights == 4 * params // 64 and p.optimizer == 8 * params // 64  # 64 learner ranks
    assert p.vllm_rollout == int(0.5 * 80 * memory.GIB)  # rollout.vllm_gpu_memory_utilization
    assert p.activations_per_token_checkpointed < p.activations_per_token_plain / 10
    # 4 rows × (512 + 8192) tokens with [K, V] logits for every one of them exceed an 80 GB GPU ...
    warnings = plan.check(cfg, gpu_gib=80)
    assert len(warnings) == 1 and "update phase" in warnings[0], warnings
    # ... the chunked head and a packed token budget fit it
    fitted = _compose(*unfitted, "learner.logits_chunk_tokens=1024", "learner.pack=true",
                      "learner.max_tokens_per_micro_batch=16384")
    assert plan.check(fitted, gpu_gib=80) == []
    assert plan.make_plan(fitted, 80 * memory.GIB).largest_micro_batch_tokens > 16384
    assert plan.check(_compose(*unfitted), gpu_gib=141) == []  # 141 GB fits even unchunked
    assert plan.check(_compose(), gpu_gib=80) == []  # the recipe as shipped fits an 80 GB GPU


def test_the_update_has_vllms_memory_back_exactly_when_vllm_sleeps():
    from research_rl import plan

    gpu = 80 * memory.GIB
    auto = plan.make_plan(_compose(), gpu).update  # the colocated recipe, rollout.vllm_sleep_level=null: level 2
    assert plan.make_plan(_compose("rollout.vllm_sleep_level=2"), gpu).update == auto
    assert plan.make_plan(_compose("rollout.vllm_sleep_level=1"), gpu).update == auto  # GPU memory freed either way
    awake = plan.make_plan(_compose("rollout.vllm_sleep_level=0"), gpu).update
    assert awake - auto == int(0.5 * gpu)  # awake, vLLM keeps its rollout.vllm_gpu_memory_utilization share


def test_cpu_runs_have_nothing_to_plan_and_an_unknown_model_warns():
    from research_rl import plan
    from research_rl.config.compose import compose_config

    assert plan.check(compose_config(["experiment=debug_cpu"])) == []  # placement.gpus_per_node = 0
    unknown = _compose("model.path=someone/unknown-model")
    assert plan.check(unknown, gpu_gib=80)[0].startswith("memory plan: not made")


def test_plan_cli_prints_every_term():
    out = subprocess.run([sys.executable, "-m", "research_rl.plan", "experiment=research_qwen2.5_7b_instruct",
                          "learner.logits_chunk_tokens=0", "learner.pack=false",
                          "learner.max_tokens_per_micro_batch=null", "learner.offload=none", "--gpu-gib=80"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for term in ("optimizer state", "activations per token without checkpointing",
                 "activations per token with checkpointing", "logits", "KV cache", "largest micro-batch",
                 "update: EXCEEDS THE GPU"):
        assert term in out.stdout, term
    bad = subprocess.run([sys.executable, "-m", "research_rl.plan", "experiment=debug_cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--gpu-gib" in bad.stderr
