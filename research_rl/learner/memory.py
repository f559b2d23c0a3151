"""Per-GPU memory of the learner and the colocated engine, from the model's shape (``python -m research_rl.plan``;
docs/learner.md#the-memory-plan).

Pure arithmetic on a ``ModelShape``: no torch, no config objects, so the planner, the benchmarks and the GPU check
share it. The terms:

- **weights, gradients, optimizer state** (FSDP2 / ZeRO-3, sharded over the learner's ranks): fp32 master
  parameters (4 B/param), fp32 gradients (4 B), AdamW's two fp32 moments (8 B), each divided by the ranks; plus the
  unsharded compute copy in the compute dtype of the root (embeddings, LM head, final norm: FSDP2 keeps the root
  unsharded from forward to the end of backward) and of two decoder layers (the one computing and the one
  prefetched).
- **activations per token** of a Qwen2/Llama decoder layer, what autograd saves between forward and backward (HF
  eager code with SDPA; counted from its ops and checked against saved-tensor hooks on CPU within
  ``ACTIVATION_MARGIN``, tests/test_plan.py): the two RMSNorms save their fp32 input and the normalised output in
  the compute dtype (fp32 for both in float32), the attention saves q, its output and the ``o_proj`` input
  (``3d``), k and v before and after RoPE (``4·kv``), the MLP saves gate, up, SiLU(gate) and their product
  (``4·i``); SDPA's log-sum-exp is 4 B per head. With gradient checkpointing (non-reentrant) a layer keeps only
  its input (``d`` per token) and one layer's activations exist at a time, during its recompute.
- **logits**: unchunked, the scored tokens' ``[K, V]`` logits and the log-softmax and entropy on them keep
  ``LOGIT_BYTES_PER_VOCAB`` bytes per scored token and vocabulary entry (fp32 copies, measured with saved-tensor
  hooks: bench/learner.py --memory); chunked (``learner.logits_chunk_tokens``), only the head's input is kept (``d``
  per scored token) and one chunk's block exists at a time.
- **vLLM** during rollout: ``gpu_memory_utilization`` × the GPU (its weights, KV cache and activations together;
  the KV cache is what is left after its bf16 weights); asleep during the update (sleep level ≥ 1,
  ``research_rl.config.pools.vllm_sleep_level``: its KV cache freed, its weights freed at level 2 or copied to host
  memory at level 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVATION_MARGIN = 0.10  # the activation formula against saved-tensor hooks on CPU (tests/test_plan.py)
LOGIT_BYTES_PER_VOCAB = 12  # unchunked: three fp32 [K, V] tensors saved per scored token (measured, any temperature)
ADAM_BYTES = 8  # two fp32 moments per parameter
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2/Llama-style decoder: ``vocab`` V, ``hidden`` d, ``intermediate`` i, ``layers`` L, attention and KV
    heads, tied embeddings, q/k/v biases (Qwen2)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        d, kv, i = self.hidden, self.kv, self.intermediate
        attn = d * (d + 2 * kv) + (d + 2 * kv if self.qkv_bias else 0) + d * d
        return attn + 3 * d * i + 2 * d  # + gate/up/down, two norms

    def root_params(self) -> int:
        """Embeddings, the LM head unless tied, the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.root_params() + self.layers * self.layer_params()


# Shapes of the recipes' models, for a plan without the model's config.json at hand (from their HF configs).
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-0.5B": ModelShape(151936, 896, 4864, 24, 14, 2, tied=True),
    "Qwen/Qwen2.5-1.5B": ModelShape(151936, 1536, 8960, 28, 12, 2, tied=True),
    "Qwen/Qwen2.5-3B": ModelShape(151936, 2048, 11008, 36, 16, 2, tied=True),
    "Qwen/Qwen2.5-7B": ModelShape(152064, 3584, 18944, 28, 28, 4),
    "Qwen/Qwen2.5-14B": ModelShape(152064, 5120, 13824, 48, 40, 8),
}
for _name in list(KNOWN_SHAPES):
    KNOWN_SHAPES[_name + "-Instruct"] = KNOWN_SHAPES[_name]


def shape_from_hf_config(config: dict) -> ModelShape:
    """A ``ModelShape`` from an HF ``config.json`` dict (Qwen2, Llama, Mistral keys).

    Raises:
        KeyError: a key the shape needs is missing.
    """
    return ModelShape(vocab=config["vocab_size"], hidden=config["hidden_size"],
                      intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
                      heads=config["num_attention_heads"],
                      kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                      tied=bool(config.get("tie_word_embeddings", False)),
                      qkv_bias=config.get("model_type", "qwen2") == "qwen2" or bool(config.get("attention_bias")))


def _norm_bytes(d: int, b: int) -> int:
    """An RMSNorm's saved tensors per token: its fp32 input and the normalised output (in the compute dtype; in
    float32 the weight's product too, as the cast is a no-op), measured on HF's ``Qwen2RMSNorm``."""
    return 8 * d if b == 4 else 4 * d + 2 * b * d


def layer_activation_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes one decoder layer saves per token for backward (module docstring)."""
    d, kv, i = shape.hidden, shape.kv, shape.intermediate
    return 2 * _norm_bytes(d, dtype_bytes) + dtype_bytes * (3 * d + 4 * kv + 4 * i) + 4 * shape.heads


def activation_bytes_per_token(shape: ModelShape, dtype_bytes: int, checkpointing: bool) -> int:
    """Bytes per token of a micro-batch held for backward by the decoder (not the LM head): every layer's
    activations, or with checkpointing every layer's input plus one layer's activations during its recompute;
    plus the final norm and RoPE's cos/sin."""
    layer = layer_activation_bytes(shape, dtype_bytes)
    base = _norm_bytes(shape.hidden, dtype_bytes) + 2 * dtype_bytes * shape.head_dim
    if checkpointing:
        return shape.layers * dtype_bytes * shape.hidden + layer + base
    return shape.layers * layer + base


def logits_bytes(shape: ModelShape, scored_tokens: int, chunk: int, dtype_bytes: int) -> int:
    """Bytes the LM head and the log-softmax/entropy need for ``scored_tokens`` at their peak: unchunked, the saved
    fp32 ``[K, V]`` tensors plus, in half precision, the logits themselves; chunked, the saved head input plus one
    chunk's block at a time."""
    half = dtype_bytes if dtype_bytes != 4 else 0  # half-precision logits beside their fp32 copies
    per_token = (LOGIT_BYTES_PER_VOCAB + half) * shape.vocab
    if chunk <= 0:
        return scored_tokens * per_token
    return scored_tokens * dtype_bytes * shape.hidden + min(chunk, scored_tokens) * per_token


@dataclass
class MemoryPlan:
    """Bytes per GPU; ``rollout`` and ``update`` are the two phases' totals, ``largest_micro_batch_tokens`` the
    biggest micro-batch (tokens) whose update fits ``gpu_bytes``."""

    gpu_bytes: int
    weights: int
    gradients: int
    optimizer: int
    unsharded: int
    activations_per_token: int  # as configured
    activations_per_token_plain: int  # without gradient checkpointing
    activations_per_token_checkpointed: int
    logits: int  # as configured, for the micro-batch's scored tokens
    logits_per_token_unchunked: int
    micro_batch_tokens: int
    vllm_rollout: int
    vllm_weights: int
    vllm_kv_cache: int
    reference: int
    rollout: int
    update: int
    largest_micro_batch_tokens: int

    def rows(self) -> list[tuple[str, int]]:
        return [("policy weights (fp32 shard)", self.weights), ("gradients (fp32 shard)", self.gradients),
                ("optimizer state (AdamW, fp32 shard)", self.optimizer),
                ("unsharded compute copy (root + 2 layers)", self.unsharded),
                ("reference policy (shard)", self.reference),
                (f"activations ({self.micro_batch_tokens} tokens)", self.activations_per_token *
                 self.micro_batch_tokens), ("logits", self.logits),
                ("vLLM during rollout (gpu_memory_utilization)", self.vllm_rollout),
                ("  of which vLLM weights (bf16)", self.vllm_weights), ("  of which KV cache", self.vllm_kv_cache)]


def plan(shape: ModelShape, *, gpu_bytes: int, learner_ranks: int, dtype_bytes: int, checkpointing: bool,
         micro_batch_tokens: int, scored_tokens: int, logits_chunk: int, offload: str, reference_ranks: int,
         reference_on_gpu: bool, vllm_utilization: float, vllm_tensor_parallel: int, vllm_asleep: bool,
         colocated: bool) -> MemoryPlan:
    """The per-GPU memory of one learner rank (and, ``colocated``, the engine and reference sharing its GPU).

    Args:
        gpu_bytes: memory of one GPU. learner_ranks, reference_ranks: ranks sharding the policy / reference (0: no
            reference on this GPU). dtype_bytes: compute dtype (2 for bf16). micro_batch_tokens: tokens of the
            largest micro-batch (padded, or real when packed); scored_tokens: its loss tokens. logits_chunk:
            ``learner.logits_chunk_tokens``. offload: ``learner.offload`` (what leaves the GPU during rollout).
        vllm_utilization: ``rollout.vllm_gpu_memory_utilization``; vllm_asleep: the engine frees its memory for the
            update (sleep level ≥ 1: ``research_rl.config.pools.vllm_sleep_level``).

    Returns:
        ``MemoryPlan``; ``rollout`` = what stays on the GPU while vLLM generates, ``update`` = the update's peak.
    """
    p = shape.params()
    weights, grads, optim = 4 * p // learner_ranks, 4 * p // learner_ranks, ADAM_BYTES * p // learner_ranks
    unsharded = dtype_bytes * (shape.root_params() + 2 * shape.layer_params())
    act = activation_bytes_per_token(shape, dtype_bytes, checkpointing)
    act_plain = activation_bytes_per_token(shape, dtype_bytes, False)
    act_ckpt = activation_bytes_per_token(shape, dtype_bytes, True)
    logits = logits_bytes(shape, scored_tokens, logits_chunk, dtype_bytes)
    head_token = logits_bytes(shape, 1, 0, dtype_bytes)  # one scored token, unchunked
    reference = 4 * p // reference_ranks if reference_ranks and reference_on_gpu else 0
    vllm = int(vllm_utilization * gpu_bytes) if colocated else 0
    vllm_weights = 2 * p // max(vllm_tensor_parallel, 1) if colocated else 0
    kept = {"none": weights + optim, "optimizer": weights, "all": 0}[offload]  # gradients are dropped after a step
    rollout = vllm + kept + (0 if offload == "all" else reference)
    fixed = weights + grads + optim + unsharded + reference + (0 if vllm_asleep or not colocated else vllm)
    update = fixed + act * micro_batch_tokens + logits
    free = gpu_bytes - fixed
    per_token = act + (dtype_bytes * shape.hidden if logits_chunk > 0 else head_token)  # every token scored
    chunk_block = logits_chunk * head_token if logits_chunk > 0 else 0
    largest = max(0, math.floor((free - chunk_block) / per_token))
    return MemoryPlan(gpu_bytes, weights, grads, optim, unsharded, act, act_plain, act_ckpt, logits,
                      head_token, micro_batch_tokens, vllm,
                      vllm_weights, max(vllm - vllm_weights, 0), reference, rollout, update, largest)
