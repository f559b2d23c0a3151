"""GPU check of the learner at scale, for a bare GPU machine with torch and transformers only (no Ray, Hydra,
DeepSpeed or package index): ``python bench/gpu_check_learner.py --json OUT.json`` from the repository root.

For the Qwen2.5-0.5B and 1.5B shapes (random weights, built from their configs), one GPU, FSDP2 at world size 1
(fp32 master weights, bf16 compute with fp32 gradient reduction, as ``research_rl.learner.fsdp2``), gradient
checkpointing (non-reentrant), micro-batches of ``--tokens`` (4,096) real tokens packed from sequences of
mixed lengths (position ids restart per sequence, ``research_rl.learner.chunked.pack_rows``), the LM head,
log-probs and entropy over chunks of ``--chunk`` scored tokens (``chunked.head_log_probs``), a GRPO-shaped loss
(advantage-weighted log-probs plus the entropy bonus), gradient clipping and AdamW. It reports:

- tokens/s and MFU: model FLOPs 6·N·T + 12·L·d·Σ len² per step (PaLM Appendix B with each packed sequence's own
  attention span; N without the input embedding; recomputation not counted) over ``--peak-tflops`` (790: the bf16
  dense matmul rate measured on one H200; goal ≥ 40%);
- peak memory of the step (``torch.cuda.max_memory_allocated``);
- the LM head's peak memory for ``--tokens`` scored tokens, chunked and unchunked (vocabulary 151,936);
- packed = padded: log-probs of the same sequences both ways, in float32 on the GPU (the attention path the packed
  rows take there: SDPA with transformers' block-causal mask, or flash-attention's varlen kernel when
  ``flash_attn`` is installed and ``--attn flash_attention_2``).

It imports from the repository only ``research_rl.learner.chunked`` and ``research_rl.learner.memory`` (torch and
the standard library alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research_rl.learner import memory  # noqa: E402
from research_rl.learner.chunked import head_log_probs, pack_rows  # noqa: E402

SHAPES = {"qwen2.5-0.5b": memory.KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"],
          "qwen2.5-1.5b": memory.KNOWN_SHAPES["Qwen/Qwen2.5-1.5B"],
          "tiny": memory.ModelShape(vocab=2048, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tied=True)}
DEVICE = "cuda"  # --smoke: cpu (the same code with gloo, float32, tiny shapes: a check that the script runs)
LENGTHS = [1536, 1024, 768, 512, 256]  # one micro-batch's sequences: 4,096 tokens, packed without padding


def build(shape: memory.ModelShape, attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, attn_implementation=attn)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def log_probs(model, ids, position_ids, labels, scored, chunk: int):
    """Log-probs and entropy of ``labels`` at the ``scored`` positions of a packed row (``[1, T]``), the head run on
    those positions alone, chunked: ``research_rl.learner.passes._token_log_probs_fused`` in short."""
    head = model.get_output_embeddings()

    def select(_module, args):
        return (args[0][scored].unsqueeze(0), *args[1:])

    def chunked(hidden):
        lp, ent = head_log_probs(hidden[0], head.weight, labels, 1.0, chunk, True, True)
        return torch.stack([lp.unsqueeze(0), ent.unsqueeze(0)], dim=-1)

    handle = head.register_forward_pre_hook(select)
    head.forward = chunked
    try:
        out = model(input_ids=ids, position_ids=position_ids, attention_mask=None, use_cache=False,
                    logits_to_keep=0).logits[0]
    finally:
        handle.remove()
        del head.forward
    return out[:, 0], out[:, 1]


def packed_batch(vocab: int, lengths: list[int], device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    ids = torch.randint(0, vocab, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        attn[i, :length] = 1
    flat, pos, _ = pack_rows(ids * attn, attn)
    real = attn.bool()
    scored = torch.zeros_like(real)
    for i, length in enumerate(lengths):
        scored[i, length // 8:length - 1] = True  # the response: every position but the prompt's and the last
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[scored]
    return ids.to(device), attn.to(device), flat.to(device), pos.to(device), scored[real].unsqueeze(0).to(device), \
        labels.to(device)


def step_check(name: str, args) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape = SHAPES[name]
    model = build(shape, args.attn)
    cuda = DEVICE == "cuda"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if cuda else {}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    lengths = [int(x * args.tokens / sum(LENGTHS)) for x in LENGTHS]
    _, _, flat, pos, scored, labels = packed_batch(shape.vocab, lengths, DEVICE)
    adv = torch.randn(labels.shape, device=DEVICE)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.micro_batches):
            lp, ent = log_probs(model, flat, pos, labels, scored, args.chunk)
            loss = -(adv * lp).mean() - 0.001 * ent.mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tokens = args.micro_batches * sum(lengths)
    flop_params = shape.params() - shape.vocab * shape.hidden * (0 if shape.tied else 1)
    flops = args.micro_batches * (6 * flop_params * sum(lengths)
                                  + 12 * shape.layers * shape.hidden * sum(n * n for n in lengths))
    row = {"shape": name, "params": shape.params(), "tokens_per_step": tokens, "step_s": step,
           "tokens_per_s": tokens / step, "tflops": flops / step / 1e12, "mfu": flops / step / 1e12 / args.peak_tflops,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "attn": args.attn,
           "chunk": args.chunk, "lengths": lengths}
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return row


def head_memory(args) -> dict:
    """Peak memory of head + log-probs + entropy + backward for ``--tokens`` scored tokens, bf16, chunked vs not."""
    shape = memory.KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"]
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(shape.vocab, shape.hidden, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    weight.requires_grad_()
    hidden = torch.randn(args.tokens, shape.hidden, device="cuda", generator=g).to(torch.bfloat16)
    labels = torch.randint(0, shape.vocab, (args.tokens,), device="cuda", generator=g)
    out = {}
    for chunk in (0, args.chunk):
        weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        h = hidden.clone().requires_grad_()
        lp, ent = head_log_probs(h, weight, labels, 1.0, chunk, True, True)
        (lp.sum() + 0.001 * ent.sum()).backward()
        torch.cuda.synchronize()
        out["unchunked" if chunk == 0 else f"chunk_{chunk}"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del h, lp, ent
    out["tokens"], out["vocab"] = args.tokens, shape.vocab
    return out


@torch.no_grad()
def packed_equals_padded(args) -> dict:
    """float32 log-probs of the same sequences packed and padded (right padding, causal mask) on the GPU."""
    shape = memory.ModelShape(vocab=4096, hidden=256, intermediate=704, layers=2, heads=4, kv_heads=2, tied=True)
    model = build(shape, args.attn).to(DEVICE).eval()
    ids, attn, flat, pos, scored, labels = packed_batch(shape.vocab, [300, 120, 77, 211], DEVICE)
    packed = torch.log_softmax(model(input_ids=flat, position_ids=pos, attention_mask=None,
                                     use_cache=False).logits[0].float(), -1)
    padded = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)  # [n, l, V]
    real = attn.bool()
    diff = (packed - padded[real]).abs().max().item()
    return {"max_abs_diff": diff, "ok": diff < 1e-4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    p.add_argument("--tokens", type=int, default=4096, help="real tokens per micro-batch")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--chunk", type=int, default=1024, help="scored tokens per LM-head chunk")
    p.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa | flash_attention_2)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, float32, the tiny shape: does the script run")
    args = p.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE, args.shapes, args.tokens, args.chunk, args.steps, args.warmup = "cpu", "tiny", 256, 64, 1, 0
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine (--smoke runs it small on CPU)")
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    import transformers

    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "transformers": transformers.__version__, "steps": []}
    try:
        result["packed_equals_padded"] = packed_equals_padded(args)
        print("packed = padded:", result["packed_equals_padded"], flush=True)
        if DEVICE == "cuda":
            result["head_memory_gib"] = head_memory(args)
            print("LM head peak GiB:", result["head_memory_gib"], flush=True)
        for name in args.shapes.split(","):
            row = step_check(name, args)
            result["steps"].append(row)
            print(f"{name}: {row['tokens_per_s']:.0f} tokens/s, {row['tflops']:.2f} TFLOP/s, MFU {row['mfu']:.1%}, "
                  f"peak {row['peak_gib']} GiB", flush=True)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
