"""Learner throughput benchmark: tokens/s per rank of one GRPO update step, FSDP2 and DeepSpeed side by side.

What it measures: ``Learner.update`` (forward with entropy, GRPO loss, backward, gradient clipping, AdamW step)
on random token sequences of ``--seq-len`` tokens, ``--seqs`` sequences per rank per step, in micro-batches of
``--micro-batch-size`` (or ``--max-tokens-per-micro-batch``), on ``--ranks`` spawned processes forming one process
group (gloo on CPU, NCCL on GPU, one GPU per rank). Each backend runs in its own group, one after the other; each
times ``--steps`` updates after ``--warmup`` untimed ones and reports the median. Model shapes are built from a
config (``--preset``), randomly initialised, no downloads: ``debug`` (the CPU debug model of ``debug_cpu``),
``qwen2.5-0.5b`` and ``qwen2.5-1.5b`` (Qwen2.5's published shapes: layers, hidden, MLP, heads, KV heads, vocab).

Figures per rank: tokens/s = tokens in the rank's batch / step time. Model FLOPs = 6·N·T + 12·L·d·s·T per step (the
PaLM paper's formula, Appendix B: N = parameters except the input embedding, L layers, d hidden size, s sequence
length, T tokens); the loss mask covers every position so logits are computed for every token, as the formula
assumes; recomputation under gradient checkpointing is not counted (so this is MFU, not hardware utilisation).
MFU = model FLOP/s per rank / ``--peak-tflops`` (default 790: the bf16 dense matmul rate measured on one H200),
printed only on GPU.

Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/learner.py --preset debug --seq-len 512 --seqs 8 --ranks 1,2
    # one H200: bf16, 4k tokens, gradient checkpointing
    python bench/learner.py --preset qwen2.5-0.5b,qwen2.5-1.5b --seq-len 4096 --seqs 8 --micro-batch-size 2 \\
        --ranks 1 --dtype bfloat16 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {  # Qwen2Config fields
    "debug": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def build_model(preset: str, out: Path) -> dict:
    """Save a randomly initialised model of ``preset``'s shape to ``out``; returns its FLOP-formula sizes."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**PRESETS[preset], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out))
    embedding = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())  # tied: the shared matrix once, as the output projection
    if not config.tie_word_embeddings:
        n -= embedding
    return {"params": sum(p.numel() for p in model.parameters()), "flop_params": n,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def _batch(seqs: int, seq_len: int, vocab: int, seed: int):
    from research_rl.algo.experience import Experience

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (seqs, seq_len), generator=g)
    mask = torch.ones_like(ids)
    return Experience(ids, mask, mask.clone(), advantages=torch.randn(seqs, generator=g),
                      old_log_probs=-torch.rand(seqs, seq_len - 1, generator=g) * 5,
                      ref_log_probs=-torch.rand(seqs, seq_len - 1, generator=g) * 5)


def _rank(rank: int, world: int, port: int, args: dict, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from research_rl.config.schema import AlgoConfig, LearnerConfig
    from research_rl.learner.core import Learner

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
        os.environ["LOCAL_RANK"] = str(rank)
    else:  # the ranks share the machine's cores
        torch.set_num_threads(args["threads"] or max(1, (os.cpu_count() or 1) // world))
    cfg = LearnerConfig(backend=args["backend"], zero_stage=args["zero_stage"], lr=1e-6,
                        micro_batch_size=args["micro_batch_size"],
                        max_tokens_per_micro_batch=args["max_tokens_per_micro_batch"])
    learner = Learner(cfg, AlgoConfig(), rank, world, device="cuda" if cuda else "cpu",
                      param_dtype=getattr(torch, args["dtype"]), gradient_checkpointing=args["gradient_checkpointing"])
    try:
        learner.init_process_group("127.0.0.1", port)
        learner.load_policy(model_dir)
        batch = _batch(args["seqs"], args["seq_len"], args["vocab"], seed=rank)
        times = []
        for i in range(args["warmup"] + args["steps"]):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            learner.update(batch)  # returns floats: the step has finished on the device
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        if rank == 0:
            Path(out).write_text(json.dumps({"times": times, "peak_gib": peak}))
    finally:
        dist.destroy_process_group()


def run(backend: str, world: int, args: argparse.Namespace, model_dir: Path, sizes: dict, vocab: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"backend": backend, "zero_stage": args.zero_stage, "micro_batch_size": args.micro_batch_size,
            "max_tokens_per_micro_batch": args.max_tokens_per_micro_batch, "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing, "seqs": args.seqs, "seq_len": args.seq_len_now,
            "vocab": vocab, "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(_rank, args=(world, port, spec, str(model_dir), str(out)), nprocs=world, join=True,
                           start_method="spawn")
        result = json.loads(out.read_text())
    step = statistics.median(result["times"])
    tokens = args.seqs * args.seq_len_now
    flops = 6 * sizes["flop_params"] * tokens + 12 * sizes["layers"] * sizes["hidden"] * args.seq_len_now * tokens
    row = {"backend": backend if backend == "fsdp2" else f"deepspeed-zero{args.zero_stage}", "ranks": world,
           "seq_len": args.seq_len_now, "seqs_per_rank": args.seqs, "tokens_per_rank": tokens, "step_s": step,
           "tokens_per_s_per_rank": tokens / step, "tflops_per_rank": flops / step / 1e12,
           "peak_gib": result["peak_gib"]}
    if torch.cuda.is_available():
        row["mfu"] = row["tflops_per_rank"] / args.peak_tflops
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="debug", help=f"comma-separated, from {list(PRESETS)}")
    p.add_argument("--seq-len", default="512", help="comma-separated sequence lengths (tokens)")
    p.add_argument("--seqs", type=int, default=8, help="sequences per rank per update")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=None)
    p.add_argument("--ranks", default="1", help="comma-separated world sizes")
    p.add_argument("--backends", default="fsdp2,deepspeed")
    p.add_argument("--zero-stage", type=int, default=3, choices=[2, 3])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype on GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank on CPU (0: cores / ranks)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="per-GPU peak for MFU (790: bf16 on one H200)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backends = args.backends.split(",")
    if "deepspeed" in backends:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            print("deepspeed is not installed (pip install -e '.[deepspeed]'): measuring fsdp2 only")
            backends.remove("deepspeed")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; dtype {args.dtype if torch.cuda.is_available() else 'float32'}"
          f"; gradient checkpointing {args.gradient_checkpointing}; median of {args.steps} steps after {args.warmup}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.1f} "
          "(other processes' load distorts CPU figures)")
    rows = []
    header = (f"{'preset':<13} {'backend':<16} {'ranks':>5} {'seq':>5} {'tok/rank':>8} {'s/step':>8} "
              f"{'tok/s/rank':>10} {'TFLOP/s/rank':>12} {'MFU':>6} {'peak GiB':>8}")
    print(header, flush=True)
    for preset in args.preset.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            sizes = build_model(preset, Path(tmp) / "model")
            for seq_len in (int(s) for s in args.seq_len.split(",")):
                args.seq_len_now = seq_len
                for world in (int(r) for r in args.ranks.split(",")):
                    for backend in backends:
                        row = {"preset": preset, "params": sizes["params"],
                               **run(backend, world, args, Path(tmp) / "model", sizes, PRESETS[preset]["vocab_size"])}
                        rows.append(row)
                        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
                        print(f"{preset:<13} {row['backend']:<16} {world:>5} {seq_len:>5} {row['tokens_per_rank']:>8} "
                              f"{row['step_s']:>8.3f} {row['tokens_per_s_per_rank']:>10.0f} "
                              f"{row['tflops_per_rank']:>12.4f} {mfu:>6} {row['peak_gib']:>8.2f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
