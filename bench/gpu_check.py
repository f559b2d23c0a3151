"""GPU check of the weight sync and the log-prob probe, for a bare GPU machine with torch and transformers only (no Ray,
Hydra, vLLM or package index): ``python bench/gpu_check.py --json OUT.json`` from the repository root, one GPU.

At the Qwen2.5-0.5B shape (random weights built from its config, saved once to a temporary directory, fp32):

a. **ipc between two processes on one GPU, bf16** (``ipc``): process A (this one) holds the fp32 model on the GPU
   and drives ``research_rl.sync.sender.WeightSender`` over its named tensors (tied embeddings once, as
   ``Learner.weight_stream``): ``begin_ipc`` makes two ``SharedBuffer`` slots on the GPU (CUDA IPC handles from
   torch's ``reduce_tensor``), ``pack_next`` casts bucket ``k`` into slot ``k % 2``, and slot ``s`` is packed again
   only once B has answered for the bucket in it, as ``research_rl.driver.weight_sync.WeightSync._ipc`` does (the
   handles travel by a multiprocessing queue instead of Ray). Process B (``torch.multiprocessing`` spawn) holds an
   ``HFEngine`` with the bf16 model on the same GPU and loads each bucket with ``receive_ipc`` (its
   ``WeightReceiver``). Before each sync B zeroes its weights and A perturbs its own, so every sync must move
   every byte; after the last one B's tensors are checked bit-equal to A's bf16 casts (two position-weighted
   checksums of the raw 16-bit patterns per tensor, computed by both sides). Reports seconds per sync (median after
   a warm-up), bytes, buckets and GB/s.
b. **the bf16 probe statistic** (``probe``): an ``HFEngine`` (bf16 weights, ``HFEngine.log_probs``) against an FSDP2
   learner (``fully_shard`` per decoder layer and the root over a world-size-1 NCCL group, fp32 master weights,
   ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, as ``research_rl.learner.fsdp2``), both from the
   same saved weights, on ``--seqs`` random sequences of ``--seq-len`` tokens: mean and max |Δ log-prob| per token
   (``trainer.probe_tolerance`` is 0.05 on the mean). The learner's log-probs are ``Learner.probe_log_probs``'s
   computation, rewritten here (``research_rl.learner.passes`` imports the Hydra schema): the full forward in eval
   mode, ``log_softmax`` of float32 logits. A random model's next-token distribution is almost uniform, which
   hides rounding; the row ``sharpened`` repeats the check with the final norm's weight scaled by
   ``--sharpen`` in both models (logits ×``--sharpen``; entropy and logit std are reported for both rows).
c. **one FSDP2 optimizer step over NCCL** (``fsdp2_step``): a GRPO-shaped loss (advantage-weighted log-probs) on the
   same sequences, backward, gradient clipping, AdamW; then the learner's full tensors (``get_model_state_dict``,
   one ``full_tensor()`` each, as ``FSDP2Backend.full_tensors``) are packed in bf16 buckets on the GPU
   (``research_rl.sync.buckets``), loaded into the engine, and the probe is run again (``probe_after_step``).

A part that raises is recorded under ``errors`` (with its traceback) and the other parts still run; ``ok`` is true
when none failed, the received tensors are bit-equal, the step changed the weights and the probe after it is within
``trainer.probe_tolerance``; the exit status is 1 otherwise.

``--smoke`` runs the same code on CPU with gloo, the tiny shape and fewer syncs: a check that the script runs (the
CPU transport of ``ipc`` is a ``/dev/shm`` file; the CPU learner computes in fp32, as ``research_rl.learner.fsdp2``
does on CPU). Imports from the repository only ``research_rl.sync``, ``research_rl.rollout.hf_engine`` (with
``research_rl.rollout.agent_loop`` and ``research_rl.learner.weights``) and ``research_rl.learner.memory``:
torch, transformers and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research_rl.learner import memory  # noqa: E402
from research_rl.learner.weights import tied_aliases  # noqa: E402
from research_rl.rollout.hf_engine import HFEngine  # noqa: E402
from research_rl.sync.buckets import largest, pack, plan_buckets, unpack  # noqa: E402
from research_rl.sync.receiver import IpcBucket  # noqa: E402
from research_rl.sync.sender import WeightSender  # noqa: E402
from research_rl.sync.transport import free_port  # noqa: E402

SHAPES = {"qwen2.5-0.5b": memory.KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"],
          "tiny": memory.ModelShape(vocab=2048, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tied=True)}
WIRE = "bfloat16"
PROBE_TOLERANCE = 0.05  # trainer.probe_tolerance's default (mean |Δ log-prob| per token)


class _Tokenizer:
    """What ``HFEngine`` reads from a tokenizer outside ``generate`` (nothing is generated here)."""

    pad_token_id = 0
    eos_token_id = 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(shape: memory.ModelShape):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def load_fp32(model_dir: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if next(model.parameters()).dtype != torch.float32:
        raise RuntimeError(f"transformers loaded {next(model.parameters()).dtype}, asked for float32")
    return model.to(device)


def engine(model_dir: str, device: str) -> HFEngine:
    e = HFEngine(model_dir, _Tokenizer(), dtype=torch.bfloat16, device=device, eos_ids=[1])
    if e.weight_dtype != WIRE:  # an old transformers that ignores dtype= would load float32
        raise RuntimeError(f"the HF engine holds {e.weight_dtype} weights, expected {WIRE}")
    return e


@torch.no_grad()
def checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two checksums of a 16-bit tensor's raw bit patterns: their sum, and their sum weighted by position
    (``i % 65521 + 1``), as exact int64 sums on the tensor's device."""
    bits = t.detach().contiguous().view(-1).view(torch.int16).to(torch.int64) & 0xFFFF
    weight = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return int(bits.sum()), int((bits * weight).sum())


def named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors in state-dict order, tied aliases once (``Learner.weight_stream``'s names)."""
    skip = tied_aliases(model)
    return [(n, t) for n, t in model.state_dict().items() if n not in skip]


# ---------------------------------------------------------------------------------------------------- a. ipc
def receiver_main(model_dir: str, device: str, inbox, outbox) -> None:
    """Process B: an ``HFEngine`` in bf16 on ``device``, answering the sender's messages in order."""
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        e = engine(model_dir, device)
        outbox.put(("ready", e.sync_device_keys()))
        while True:
            msg = inbox.get()
            if msg[0] == "zero":
                with torch.no_grad():
                    for p in e.model.parameters():
                        p.zero_()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                outbox.put(("zeroed",))
            elif msg[0] == "begin":
                e.begin_sync()
            elif msg[0] == "bucket":
                e.receive_ipc(msg[1])
                outbox.put(("loaded", msg[1].bucket.index))
            elif msg[0] == "end":
                s = e.end_sync()
                outbox.put(("stats", {"bytes": s.bytes, "elements": s.elements, "tensors": s.tensors,
                                      "buckets": s.buckets}))
            elif msg[0] == "checksums":
                state = e.model.state_dict()
                outbox.put(("checksums", {n: checksum(state[n]) for n in msg[1]}))
            elif msg[0] == "quit":
                return
    except BaseException as exc:  # the sender would wait forever otherwise
        outbox.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def _expect(outbox, kind: str, timeout: float = 600.0):
    msg = outbox.get(timeout=timeout)
    if msg[0] == "error":
        raise RuntimeError(f"receiver process: {msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"receiver process answered {msg[0]!r}, expected {kind!r}")
    return msg[1] if len(msg) > 1 else None


def ipc_check(model_dir: str, args) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    b = ctx.Process(target=receiver_main, args=(model_dir, args.device, inbox, outbox), daemon=True)
    b.start()
    try:
        model = load_fp32(model_dir, args.device)
        tensors = named_tensors(model)
        buckets = plan_buckets([(n, t.shape) for n, t in tensors], WIRE, args.bucket_mb)
        sender = WeightSender(lambda every_rank, on_device: iter(tensors), args.device, rank=0)
        keys = _expect(outbox, "ready")
        log(f"ipc: receiver ready on {keys}; {len(buckets)} buckets of <= {args.bucket_mb} MiB, "
            f"largest {largest(buckets) / 2**20:.0f} MiB")
        g = torch.Generator(device=args.device).manual_seed(1)
        seconds, stats = [], None
        for i in range(1 + args.syncs):
            inbox.put(("zero",))
            _expect(outbox, "zeroed")
            with torch.no_grad():  # a new policy each time: every byte must move
                for _, t in tensors:
                    t.add_(torch.randn(t.shape, device=t.device, generator=g), alpha=1e-3)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            inbox.put(("begin",))
            handles = sender.begin_ipc(buckets, True)
            (key,) = handles
            if key not in keys:
                raise RuntimeError(f"sender on {key}, receiver on {keys}: not one device")
            answered = 0
            for bucket in buckets:
                while answered < bucket.index - 1:  # the bucket in this slot (index - 2) is loaded
                    _expect(outbox, "loaded")
                    answered += 1
                sender.pack_next(bucket.index % 2)
                inbox.put(("bucket", IpcBucket(bucket, bucket.index % 2, {key: handles[key][bucket.index % 2]})))
            while answered < len(buckets):
                _expect(outbox, "loaded")
                answered += 1
            inbox.put(("end",))
            stats = _expect(outbox, "stats")
            sender.end()
            dt = time.perf_counter() - t0
            if i > 0:
                seconds.append(dt)
            log(f"ipc sync {i}{' (warm-up)' if i == 0 else ''}: {dt * 1e3:.1f} ms, {stats['bytes'] / 2**20:.0f} MiB")
        expected = {n: checksum(t.to(torch.bfloat16)) for n, t in tensors}
        inbox.put(("checksums", list(expected)))
        got = _expect(outbox, "checksums")
        mismatched = sorted(n for n in expected if got[n] != expected[n])
        params = sum(t.numel() for _, t in tensors)
        median = statistics.median(seconds)
        return {"shape": args.shape, "params": params, "bytes": stats["bytes"],
                "bytes_per_param": stats["bytes"] / params,
                "buckets": len(buckets), "bucket_mb": args.bucket_mb, "tensors": stats["tensors"],
                "seconds": median, "seconds_all": seconds, "gb_per_s": stats["bytes"] / median / 1e9,
                "bit_equal": not mismatched, "mismatched": mismatched[:10], "tensors_checked": len(expected)}
    finally:
        inbox.put(("quit",))
        b.join(timeout=60)
        if b.is_alive():
            b.terminate()


# ---------------------------------------------------------------------------------------------------- b, c
def learner_log_probs(model, seq: torch.Tensor) -> torch.Tensor:
    """``Learner.probe_log_probs``: log-probs of tokens 1..L-1 of one sequence, ``[L-1]`` float32."""
    logits = model(input_ids=seq[None]).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, seq[1:, None]).squeeze(-1)


@torch.no_grad()
def probe(e: HFEngine, model, seqs: list[torch.Tensor]) -> dict:
    model.eval()
    diffs, ents, stds = [], [], []
    for seq in seqs:
        lp_learner = learner_log_probs(model, seq).cpu()
        lp_engine = e.log_probs(seq.tolist())
        diffs.append((lp_engine - lp_learner).abs())
        logits = e.model(input_ids=seq[None].to(e.device)).logits[0].float()
        ents.append(float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()))
        stds.append(float(logits.std(-1).mean()))
    model.train()
    d = torch.cat(diffs)
    return {"tokens": d.numel(), "mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()),
            "within_probe_tolerance": float(d.mean()) <= PROBE_TOLERANCE,
            "per_sequence_mean": [float(x.mean()) for x in diffs], "engine_entropy": statistics.mean(ents),
            "engine_logit_std": statistics.mean(stds)}


def shard(model, device: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh}
    if device.startswith("cuda"):  # research_rl.learner.fsdp2: mixed precision on GPU only
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


@torch.no_grad()
def sync_in_process(model, skip: set[str], e: HFEngine, bucket_mb: float, device: str) -> int:
    """The learner's full tensors (``FSDP2Backend.full_tensors``) packed in bf16 buckets on ``device`` and loaded
    into the engine; returns bytes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    state = {n: (t.full_tensor() if isinstance(t, DTensor) else t)
             for n, t in get_model_state_dict(model).items() if n not in skip}
    buckets = plan_buckets([(n, t.shape) for n, t in state.items()], WIRE, bucket_mb)
    flat = torch.empty(largest(buckets), dtype=torch.uint8, device=device)
    e.begin_sync()
    for bucket in buckets:
        pack(bucket, state, flat)
        e.load_weights(dict(unpack(bucket, flat)))
    return sum(b.nbytes for b in buckets)


def probe_and_step(model_dir: str, args) -> dict:
    cuda = args.device.startswith("cuda")
    g = torch.Generator().manual_seed(2)
    vocab = SHAPES[args.shape].vocab
    seqs = [torch.randint(0, vocab, (args.seq_len,), generator=g).to(args.device) for _ in range(args.seqs)]
    e = engine(model_dir, args.device)
    model = load_fp32(model_dir, "cpu")
    skip = tied_aliases(model)
    model = shard(model, args.device)
    out = {"seqs": args.seqs, "seq_len": args.seq_len, "learner_compute_dtype": "bfloat16" if cuda else "float32"}
    out["probe"] = probe(e, model, seqs)
    log(f"probe (init): {out['probe']['mean_abs_diff']:.2e} mean, {out['probe']['max_abs_diff']:.2e} max")
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # the root keeps its parameters unsharded after a forward: scale the sharded masters
        if isinstance(m, FSDPModule):
            m.reshard()
    with torch.no_grad():
        model.model.norm.weight.mul_(args.sharpen)
        e.model.model.norm.weight.mul_(args.sharpen)
    out["probe_sharpened"] = probe(e, model, seqs)
    out["probe_sharpened"]["sharpen"] = args.sharpen
    log(f"probe (final norm x{args.sharpen}): {out['probe_sharpened']['mean_abs_diff']:.2e} mean, "
        f"{out['probe_sharpened']['max_abs_diff']:.2e} max")

    # c. one optimizer step
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    before = {n: p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
              for n, p in list(model.named_parameters())[:3]}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    adv = torch.randn(len(seqs), generator=g).tolist()
    loss_total = 0.0
    for a, seq in zip(adv, seqs):
        loss = -a * learner_log_probs(model, seq).mean() / len(seqs)
        loss.backward()
        loss_total += float(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    moved = max(float(((p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()) - before[n])
                      .abs().max()) for n, p in list(model.named_parameters())[:3])
    out["fsdp2_step"] = {"backend": "nccl" if cuda else "gloo", "loss": loss_total, "grad_norm": norm,
                         "max_param_change": moved, "seconds": step_s,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                         "ok": bool(moved > 0 and torch.isfinite(torch.tensor(norm)))}
    log(f"FSDP2 step: loss {loss_total:.4f}, grad norm {norm:.3f}, max param change {moved:.2e}, {step_s:.2f} s")
    nbytes = sync_in_process(model, skip, e, args.bucket_mb, args.device)
    out["probe_after_step"] = probe(e, model, seqs)
    out["probe_after_step"]["synced_bytes"] = nbytes
    log(f"probe after the step and a sync: {out['probe_after_step']['mean_abs_diff']:.2e} mean, "
        f"{out['probe_after_step']['max_abs_diff']:.2e} max")
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--syncs", type=int, default=5, help="timed ipc syncs, after one warm-up")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="MiB per bucket (learner.weight_sync_bucket_mb)")
    p.add_argument("--seqs", type=int, default=8, help="probe sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per probe sequence")
    p.add_argument("--sharpen", type=float, default=4.0, help="final-norm scale of the sharpened probe row")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny shape: does the script run")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.shape, args.syncs, args.seqs, args.seq_len, args.bucket_mb = "cpu", "tiny", 2, 2, 64, 0.05
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine (--smoke runs it small on CPU)")
    else:
        args.device = "cuda:0"
        torch.cuda.set_device(0)
    import torch.distributed as dist
    import transformers

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if not args.smoke else "gloo", rank=0, world_size=1)
    t_start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)", "smoke": args.smoke,
              "torch": torch.__version__, "transformers": transformers.__version__, "shape": args.shape}
    errors = result["errors"] = {}

    def part(name: str, fn, *fargs) -> dict | None:
        """Run one check; a failure is recorded (with its traceback) and the other checks still run."""
        try:
            return fn(*fargs)
        except Exception as exc:  # one run on a lent machine: keep what the other parts measure
            import traceback

            errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            return None

    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            t0 = time.perf_counter()
            build(SHAPES[args.shape]).save_pretrained(tmp)
            log(f"built and saved {args.shape} (fp32) in {time.perf_counter() - t0:.0f} s")
            ipc = result["ipc"] = part("ipc", ipc_check, tmp, args)
            if ipc:
                log(f"ipc: {ipc['seconds'] * 1e3:.1f} ms/sync, {ipc['bytes']} bytes "
                    f"({ipc['bytes_per_param']:.2f}/param), {ipc['gb_per_s']:.1f} GB/s, bit-equal {ipc['bit_equal']}")
            if not args.smoke:
                torch.cuda.empty_cache()
            result.update(part("probe_and_step", probe_and_step, tmp, args) or {})
        result["ok"] = bool(not errors and result["ipc"]["bit_equal"] and result["fsdp2_step"]["ok"]
                            and result["probe_after_step"]["within_probe_tolerance"])
    finally:
        result["seconds"] = time.perf_counter() - t_start
        result.setdefault("ok", False)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        dist.destroy_process_group()
    log(f"done in {result['seconds']:.0f} s; ok = {result['ok']}" + (f"; failed: {sorted(errors)}" if errors else ""))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
