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

``--memory`` measures instead, on CPU (``--json PATH`` writes them as the ``memory`` object): the bytes autograd
saves per scored token for the LM head, log-softmax and entropy at a 152,064-token vocabulary, unchunked and
chunked (``learner.logits_chunk_tokens``; saved-tensor hooks, unique storages, parameters excluded, the head's
input included); the fraction of the learner's token FLOPs (6·N per token) spent on padding, before (fixed
micro-batches of 4 rows in batch order, contiguous rank shards) and after (packed micro-batches to a budget of real
tokens, ``balanced_shards``), on the lengths of a real rollout dump (``--rollouts DIR``: prompt tokens re-encoded
from each ``question`` with the run's template and tokenizer, plus ``response_len`` + ``result_tokens``); and the
peak RSS of rank 1 of 2 while it loads the policy, with ``learner.rank0_load`` and without.

Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/learner.py --preset debug --seq-len 512 --seqs 8 --ranks 1,2
    # one H200: bf16, 4k tokens, gradient checkpointing
    python bench/learner.py --preset qwen2.5-0.5b,qwen2.5-1.5b --seq-len 4096 --seqs 8 --micro-batch-size 2 \\
        --ranks 1 --dtype bfloat16 --gradient-checkpointing
    # memory figures (CPU), from a debug run's rollout dump
    HF_HUB_OFFLINE=1 .venv/bin/python bench/learner.py --memory --rollouts RUN_DIR/rollouts \\
        --model-dir artifacts/debug_model --json memory.json
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
                        max_tokens_per_micro_batch=args["max_tokens_per_micro_batch"],
                        logits_chunk_tokens=args["logits_chunk_tokens"], pack=args["pack"])
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
            "vocab": vocab, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "logits_chunk_tokens": args.logits_chunk_tokens, "pack": args.pack}
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
    p.add_argument("--logits-chunk-tokens", type=int, default=0, help="learner.logits_chunk_tokens (0: unchunked)")
    p.add_argument("--pack", action="store_true", help="learner.pack: micro-batches without padding")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--memory", action="store_true", help="the memory figures instead of throughput (CPU)")
    p.add_argument("--rollouts", help="--memory: a run's rollouts/ directory (step_*.jsonl)")
    p.add_argument("--model-dir", default="artifacts/debug_model", help="--memory: the run's model (tokenizer)")
    p.add_argument("--template", default="instruct", help="--memory: the run's model.template")
    p.add_argument("--memory-ranks", type=int, default=2, help="--memory: ranks the padding figure splits over")
    p.add_argument("--pack-budget", type=int, default=0,
                   help="--memory: real tokens per packed micro-batch (0: 4 × the longest sequence)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory:
        return memory_main(args)
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


# ------------------------------------------------------------------------------------------------ --memory
VOCAB_7B = 152064


def saved_bytes(fn, exclude: list[torch.Tensor]) -> tuple[int, object]:
    """Run ``fn()`` and count the bytes of the distinct storages autograd saves for backward (saved-tensor hooks),
    except those of ``exclude`` (parameters). Returns (bytes, fn's result)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def head_bytes_per_token(chunk: int, tokens: int = 256, hidden: int = 896, vocab: int = VOCAB_7B) -> float:
    """Saved bytes per scored token of the LM head + log-probs + entropy (entropy in the graph, as with
    ``algo.entropy_coef`` > 0), float32 on CPU. The head's input ``[K, d]`` is counted: it is what the chunked path
    keeps. ``hidden`` 896 (Qwen2.5-0.5B) keeps the weight small; only the input's ``d`` term depends on it."""
    from research_rl.learner.chunked import head_log_probs

    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.02)
    h = torch.randn(tokens, hidden, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)

    def run():
        x = h.clone().requires_grad_()  # the head's input, as the decoder hands it over
        lp, ent = head_log_probs(x * 1.0, weight, labels, 1.0, chunk, with_entropy=True, entropy_grad=True)
        return (lp.sum() + 0.001 * ent.sum())

    nbytes, loss = saved_bytes(run, [weight])
    loss.backward()  # the graph is sound
    return nbytes / tokens


def dump_lengths(rollouts: Path, model_dir: str, template: str) -> list[list[int]]:
    """Per step of a rollout dump: every trajectory's length in tokens (prompt + response + inserted results)."""
    from transformers import AutoTokenizer

    from research_rl.algo.templates import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steps = []
    for path in sorted(rollouts.glob("step_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps.append([len(encode_prompt(r["question"], template, tokenizer)) + r["response_len"] + r["result_tokens"]
                      for r in rows])
    if not steps:
        raise SystemExit(f"no step_*.jsonl under {rollouts}")
    return steps


def padding_fraction(lengths: list[int], ranks: int, pack: bool, budget: int) -> float:
    """Share of the token FLOPs (6·N per processed token) spent on padding for one step's batch over ``ranks``:
    padded positions inside micro-batches and the zero-weighted passes a rank runs to match the others' count."""
    from research_rl.learner.passes import balanced_shards, plan_micro_batches

    n = len(lengths) - len(lengths) % ranks
    lengths = lengths[:n]
    if pack:
        shards = balanced_shards(lengths, ranks)
    else:
        size = n // ranks
        shards = [list(range(r * size, (r + 1) * size)) for r in range(ranks)]
    plans = [[[shard[i] for i in mb] for mb in plan_micro_batches([lengths[i] for i in shard], 4,
                                                                   budget if pack else None, pack)]
             for shard in shards]
    most = max(len(p) for p in plans)
    processed = 0
    for shard, p in zip(shards, plans):
        for mb in p:
            processed += sum(lengths[i] for i in mb) if pack else len(mb) * max(lengths[i] for i in mb)
        processed += (most - len(p)) * lengths[shard[0]]  # the padding pass runs the shard's first row
    return 1 - sum(lengths) / processed


def peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM``: per address space, so unlike ``ru_maxrss`` it does not carry
    the parent's peak over a fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _rss_rank(rank: int, world: int, port: int, model_dir: str, rank0_load: bool, out: str) -> None:
    import torch.distributed as dist

    from research_rl.config.schema import AlgoConfig, LearnerConfig
    from research_rl.learner.core import Learner

    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (imported before the baseline: ~165 MiB of code)

    torch.set_num_threads(1)
    learner = Learner(LearnerConfig(rank0_load=rank0_load), AlgoConfig(), rank, world)
    try:
        learner.init_process_group("127.0.0.1", port)
        before = peak_rss_bytes()
        learner.load_policy(model_dir)
        peak = peak_rss_bytes()
        state = learner.full_state_dict()
        if rank == 1:
            Path(out).write_text(json.dumps({"before": before, "peak": peak}))
        if rank == 0:
            torch.save(state, out + ".state.pt")
    finally:
        dist.destroy_process_group()


def rank1_rss(model_dir: Path, rank0_load: bool) -> dict:
    """Peak RSS of rank 1 of 2 (FSDP2, gloo) through ``load_policy``; before it; and rank 0's full state dict."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rss.json")
        mp.start_processes(_rss_rank, args=(2, port, str(model_dir), rank0_load, out), nprocs=2, join=True,
                           start_method="spawn")
        result = json.loads(Path(out).read_text())
        result["state"] = torch.load(out + ".state.pt")
    return result


# ~98M parameters (374 MiB fp32) whose largest tensor (16 MiB) is small beside a rank's half, as at 7B (2.2 GiB
# embedding beside 30 GiB): rank 1's peak is its shard plus the one tensor in flight
RSS_PRESET = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)


def memory_main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, Qwen2Config

    memory: dict = {"vocabulary": VOCAB_7B}
    memory["bytes_per_scored_token_unchunked"] = head_bytes_per_token(0)
    memory["bytes_per_scored_token_chunked"] = head_bytes_per_token(args.logits_chunk_tokens or 64)
    memory["logits_chunk_tokens"] = args.logits_chunk_tokens or 64
    memory["chunked_over_unchunked"] = (memory["bytes_per_scored_token_chunked"]
                                        / memory["bytes_per_scored_token_unchunked"])
    print(f"LM head + log-probs + entropy, V={VOCAB_7B}: {memory['bytes_per_scored_token_unchunked'] / 2**20:.3f} "
          f"MiB saved per scored token unchunked, {memory['bytes_per_scored_token_chunked'] / 2**10:.1f} KiB chunked "
          f"({memory['chunked_over_unchunked']:.2%})", flush=True)
    if args.rollouts:
        steps = dump_lengths(Path(args.rollouts), args.model_dir, args.template)
        flat = [n for s in steps for n in s]
        budget = args.pack_budget or 4 * max(flat)
        before = [padding_fraction(s, args.memory_ranks, False, budget) for s in steps]
        after = [padding_fraction(s, args.memory_ranks, True, budget) for s in steps]
        memory.update(padding_fraction_before=statistics.mean(before), padding_fraction_after=statistics.mean(after),
                      padding_ranks=args.memory_ranks, pack_budget_tokens=budget, rollout_steps=len(steps),
                      trajectories=len(flat), length_min=min(flat), length_max=max(flat),
                      length_mean=statistics.mean(flat), rollouts=str(args.rollouts))
        print(f"padding share of token FLOPs over {len(steps)} steps ({len(flat)} trajectories, {min(flat)}-"
              f"{max(flat)} tokens), {args.memory_ranks} ranks: {memory['padding_fraction_before']:.1%} with 4-row "
              f"micro-batches in batch order, {memory['padding_fraction_after']:.1%} packed to {budget} tokens and "
              "balanced", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**RSS_PRESET), dtype=torch.float32)
        model.save_pretrained(str(model_dir))
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        new, old = rank1_rss(model_dir, True), rank1_rss(model_dir, False)
    same = new["state"].keys() == old["state"].keys() and all(torch.equal(new["state"][k], old["state"][k])
                                                              for k in new["state"])
    memory.update(rank1_peak_rss_bytes=new["peak"], rank1_rss_before_load_bytes=new["before"],
                  rank1_peak_rss_bytes_without_rank0_load=old["peak"], model_bytes=model_bytes,
                  rank0_load_model_equal=same)
    print(f"rank 1 of 2 loading a {model_bytes / 2**20:.0f} MiB fp32 model: peak RSS {new['peak'] / 2**20:.0f} MiB "
          f"with rank0_load ({new['before'] / 2**20:.0f} MiB before loading), {old['peak'] / 2**20:.0f} MiB without;"
          f" same weights: {same}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": memory}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
