"""The per-GPU memory plan of a run, before Ray starts: ``python -m research_rl.plan experiment=NAME [--gpu-gib=80]``.

Prints, for one GPU of the configured placement, the learner's weights, gradients and optimizer state (sharded over
``learner.num_workers``), the unsharded compute copy, the reference policy, activations per token with and without
gradient checkpointing, the logits (chunked or not, ``learner.logits_chunk_tokens``), vLLM's share during rollout
(``rollout.vllm_gpu_memory_utilization``: its bf16 weights and the KV cache in the rest), the two phases' totals and
the largest micro-batch (tokens) whose update fits. The formulas are ``research_rl.learner.memory``'s
(docs/learner.md#the-memory-plan).

The model's shape comes from ``model.path``'s ``config.json`` when it is a local directory, else from
``memory.KNOWN_SHAPES`` (the recipes' models). The GPU's memory is ``--gpu-gib``, else
``learner.plan_gpu_memory_gib``, else the local GPU's; with none of them (a CPU-only run) there is nothing to plan.
``check(cfg)`` is what ``python -m research_rl.train`` calls before ``ray.init``: warnings when a phase exceeds the GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from research_rl.config.pools import vllm_sleep_level
from research_rl.config.schema import Config, ConfigError
from research_rl.learner import memory

GPU_FLAG = "--gpu-gib="


def model_shape(cfg: Config) -> memory.ModelShape:
    """The policy's shape from its local ``config.json`` or ``memory.KNOWN_SHAPES``.

    Raises:
        ConfigError: (``model.path``) neither a local model directory nor a known model id.
    """
    local = Path(cfg.model.path) / "config.json"
    if local.is_file():
        return memory.shape_from_hf_config(json.loads(local.read_text()))
    if cfg.model.path in memory.KNOWN_SHAPES:
        return memory.KNOWN_SHAPES[cfg.model.path]
    raise ConfigError("model.path", f"{cfg.model.path!r} has no local config.json and is not one of "
                      f"{sorted(memory.KNOWN_SHAPES)}; the memory plan needs the model's shape")


def gpu_bytes(cfg: Config, gpu_gib: float | None = None) -> int | None:
    """The memory of one GPU: ``gpu_gib``, ``learner.plan_gpu_memory_gib``, the local GPU's, or None."""
    if gpu_gib:
        return int(gpu_gib * memory.GIB)
    if cfg.learner.plan_gpu_memory_gib:
        return int(cfg.learner.plan_gpu_memory_gib * memory.GIB)
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return None


def micro_batch_tokens(cfg: Config) -> int:
    """Tokens of the largest micro-batch: the token budget, else ``micro_batch_size`` rows of the longest sequence
    (prompt + response budget)."""
    if cfg.learner.max_tokens_per_micro_batch is not None:
        return cfg.learner.max_tokens_per_micro_batch
    return cfg.learner.micro_batch_size * (cfg.data.max_prompt_len + cfg.rollout.max_response_len)


def make_plan(cfg: Config, gpu: int) -> memory.MemoryPlan:
    """``memory.plan`` for ``cfg`` on a GPU of ``gpu`` bytes (the scored tokens: every response token of the
    micro-batch, the worst case)."""
    colocated = cfg.placement.mode == "colocated"
    tokens = micro_batch_tokens(cfg)
    ref_colocated = cfg.reference.placement == "colocated"
    ref_ranks = cfg.learner.num_workers if ref_colocated else (cfg.reference.num_workers if colocated else 0)
    return memory.plan(
        model_shape(cfg), gpu_bytes=gpu, learner_ranks=cfg.learner.num_workers,
        dtype_bytes=4 if cfg.model.dtype == "float32" else 2, checkpointing=cfg.model.gradient_checkpointing,
        micro_batch_tokens=tokens, scored_tokens=tokens, logits_chunk=cfg.learner.logits_chunk_tokens,
        offload=cfg.learner.offload, reference_ranks=ref_ranks if cfg.algo.kl_coef > 0 else 0,
        reference_on_gpu=not cfg.reference.offload, vllm_utilization=cfg.rollout.vllm_gpu_memory_utilization,
        vllm_tensor_parallel=cfg.rollout.vllm_tensor_parallel_size, vllm_asleep=vllm_sleep_level(cfg) >= 1,
        colocated=colocated and cfg.rollout.engine == "vllm")


def check(cfg: Config, gpu_gib: float | None = None) -> list[str]:
    """Warnings, one line each, when the plan of ``cfg`` exceeds the GPU in either phase; [] when it fits or when
    there is no GPU to plan for (CPU-only runs, ``placement.gpus_per_node = 0``). Call it before ``ray.init``.

    A model whose shape is unknown (``model_shape``) gets one warning that no plan was made, not an error.
    """
    gpu = gpu_bytes(cfg, gpu_gib) if cfg.placement.gpus_per_node > 0 else None
    if gpu is None:
        return []
    try:
        p = make_plan(cfg, gpu)
    except ConfigError as e:
        return [f"memory plan: not made ({e})"]
    out = []
    for phase, need in (("rollout", p.rollout), ("update", p.update)):
        if need > gpu:
            out.append(f"memory plan: the {phase} phase needs {need / memory.GIB:.1f} GiB per GPU, the GPU has "
                       f"{gpu / memory.GIB:.1f} GiB (python -m research_rl.plan shows the terms; the largest "
                       f"micro-batch that fits is {p.largest_micro_batch_tokens} tokens: learner."
                       "max_tokens_per_micro_batch, logits_chunk_tokens, offload and model.gradient_checkpointing "
                       "change it)")
    return out


def format_plan(cfg: Config, p: memory.MemoryPlan) -> str:
    gib = memory.GIB
    lines = [f"memory plan: {cfg.model.path}, {cfg.learner.num_workers} learner ranks, placement {cfg.placement.mode}"
             f" ({cfg.placement.nnodes} x {cfg.placement.gpus_per_node} GPUs of {p.gpu_bytes / gib:.1f} GiB)"]
    lines += [f"  {name:<46} {value / gib:9.2f} GiB" for name, value in p.rows()]
    mib = 2**20
    lines += [f"  {'activations per token without checkpointing':<46} {p.activations_per_token_plain / mib:9.3f} MiB",
              f"  {'activations per token with checkpointing':<46} "
              f"{p.activations_per_token_checkpointed / mib:9.3f} MiB",
              f"  {'logits per scored token, unchunked':<46} {p.logits_per_token_unchunked / mib:9.3f} MiB",
              f"  {'rollout phase total':<46} {p.rollout / gib:9.2f} GiB",
              f"  {'update phase peak':<46} {p.update / gib:9.2f} GiB",
              f"  {'largest micro-batch that fits (tokens)':<46} {p.largest_micro_batch_tokens:9d}"]
    for phase, need in (("rollout", p.rollout), ("update", p.update)):
        lines.append(f"  {phase}: {'fits' if need <= p.gpu_bytes else 'EXCEEDS THE GPU'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from research_rl.config.compose import compose_from_argv

    argv = sys.argv[1:] if argv is None else list(argv)
    gib = [a for a in argv if a.startswith(GPU_FLAG)]
    try:
        gpu_gib = float(gib[-1][len(GPU_FLAG):]) if gib else None
    except ValueError:
        sys.exit(f"{GPU_FLAG}X takes a number of GiB, got {gib[-1]!r}")
    cfg, _ = compose_from_argv(argv=[a for a in argv if not a.startswith(GPU_FLAG)])
    gpu = gpu_bytes(cfg, gpu_gib)
    if gpu is None:
        sys.exit("no GPU to plan for: pass --gpu-gib=N or set learner.plan_gpu_memory_gib (no local GPU found)")
    try:
        print(format_plan(cfg, make_plan(cfg, gpu)))
    except ConfigError as e:
        sys.exit(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
