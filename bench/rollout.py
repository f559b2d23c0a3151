"""Rollout wall time and generated tokens/s: ``rollout.mode=turn_sync`` against ``async``, per engine, with an added
retrieval latency that models a remote index (docs/rollout.md records the figures and the commands).

Both schedules run the same prompts (``--questions`` dev questions × ``--group-size``), the same seed, sampling
settings and retriever (the project's HTTP service, ``python -m retriever_service.serve``, over the real BM25
index). The added latency is paid once per retriever call: turn_sync makes one batched call per turn, async one call
per query, concurrently. A random model seldom searches, so by default the policy is first given the debug
warm-up (``research_rl.rollout.warmup``: supervised steps on synthesised search trajectories, as ``conf/experiment/
debug_cpu.yaml`` does), written once to ``--warm-model`` and reused by later runs (also from the vLLM venv).

    # terminal 1 (the project's venv): the retrieval service
    python -m retriever_service.serve --index artifacts/bm25_index --port 8123
    # terminal 2: HF engine (project venv) and vLLM engine (make install-vllm; .venv-vllm)
    python bench/rollout.py --url http://127.0.0.1:8123 --engines hf
    .venv-vllm/bin/python bench/rollout.py --url http://127.0.0.1:8123 --engines vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def warm_up(model_dir: str, out_dir: Path, client, args) -> None:
    """The debug warm-up in one process (plain AdamW, masked NLL) on the training questions; saves to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from research_rl.data import load_corpus, load_questions
    from research_rl.rollout.warmup import collate, synthesize

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = [q for f in ("data/musique/train.jsonl", "data/hotpotqa/train.jsonl")
                 for q in load_questions(str(ROOT / f))]
    corpus = load_corpus(str(ROOT / "data/corpus/corpus.jsonl"))
    titles = {pid: row.get("title") or row["contents"].split("\n", 1)[0].strip('"') for pid, row in corpus.items()}

    def search(queries):
        return [[p.contents for p in ps] for ps in client.search(queries, args.top_k)]

    examples = synthesize(questions, titles, search, tok, args.template, 1.0, 1024, 0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    t0 = time.time()
    for step in range(args.warmup_steps):
        batch = collate(rng.sample(examples, 8), tok.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        mask = batch.loss_mask[:, 1:].float()
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"warm-up step {step}: nll {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)


def make_engine(name: str, model_dir: str, tok, args):
    if name == "hf":
        from research_rl.rollout.hf_engine import HFEngine

        return HFEngine(model_dir, tok, max_batch_size=args.max_batch_size)
    from research_rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, tok, dtype="float32", max_model_len=512 + args.max_response_len,
                      max_num_seqs=args.max_batch_size)


def run_once(engine, tok, client, prompts, mode: str, latency_s: float, args) -> dict:
    from research_rl.rollout.agent_loop import AgentLoop, SamplingParams

    calls = []

    def search(queries):  # turn_sync: one batched call per turn
        calls.append(len(queries))
        out = client.search(queries, args.top_k)
        time.sleep(latency_s)
        return [None if ps is None else [p.contents for p in ps] for ps in out]

    async def search_async(queries):  # async: one call per query, as soon as it is produced
        calls.append(len(queries))
        out = await client.search_async(queries, args.top_k)
        await asyncio.sleep(latency_s)
        return [None if ps is None else [p.contents for p in ps] for ps in out]

    loop = AgentLoop(engine, search, tok, args.max_response_len, args.max_turns, mode=mode,
                     async_search_fn=search_async, max_batch_size=args.max_batch_size,
                     batch_wait_s=args.batch_wait_ms / 1000)
    t0 = time.perf_counter()
    trajs = loop.run(prompts, SamplingParams(temperature=1.0, seed=args.seed))
    wall = time.perf_counter() - t0
    generated = sum(t.num_generated for t in trajs)
    return {"wall_s": wall, "gen_tokens": generated, "tok_s": generated / wall,
            "searches": sum(t.num_searches for t in trajs) / len(trajs), "retriever_calls": len(calls),
            "engine_batches": len(loop.last_batch_sizes) if mode == "async" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="retrieval service (python -m retriever_service.serve)")
    p.add_argument("--model", default=str(ROOT / "artifacts/debug_model"), help="base model (warmed up first)")
    p.add_argument("--warm-model", default=str(ROOT / "artifacts/bench_rollout_model"),
                   help="where the warmed-up model is kept (built when missing)")
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm (skipped when not importable)")
    p.add_argument("--latencies-ms", default="0,20,100", help="added latency per retriever call")
    p.add_argument("--questions", type=int, default=16, help="MuSiQue dev questions")
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--max-response-len", type=int, default=1024)
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="rollout.batch_wait_ms (HF engine, async)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--template", default="instruct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the median by wall time is reported")
    p.add_argument("--threads", type=int, default=2, help="torch threads (HF engine)")
    p.add_argument("--json", help="also write the settings and rows here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from research_rl.data import load_questions
    from research_rl.retrieval.client import RetrieverClient
    from research_rl.algo.templates import encode_prompt

    torch.set_num_threads(args.threads)
    client = RetrieverClient(url=args.url, timeout_s=60)
    warm = Path(args.warm_model)
    if not (warm / "config.json").is_file():
        warm_up(args.model, warm, client, args)
    tok = AutoTokenizer.from_pretrained(warm)
    questions = load_questions(str(ROOT / "data/musique/dev.jsonl"))[: args.questions]
    prompts = [encode_prompt(q.question, args.template, tok) for q in questions for _ in range(args.group_size)]
    rows = []
    for name in args.engines.split(","):
        if name == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                print("vllm is not importable here: skipping the vLLM engine (make install-vllm)")
                continue
        engine = make_engine(name, str(warm), tok, args)
        run_once(engine, tok, client, prompts[: args.group_size], "turn_sync", 0.0, args)  # warm caches
        for latency in [float(x) for x in args.latencies_ms.split(",")]:
            base = None
            for mode in ("turn_sync", "async"):
                runs = sorted((run_once(engine, tok, client, prompts, mode, latency / 1000, args)
                               for _ in range(args.repeats)), key=lambda r: r["wall_s"])
                r = runs[len(runs) // 2]  # the median run by wall time
                assert len({x["gen_tokens"] for x in runs}) == 1, "the same seed must give the same trajectories"
                base = base or r["wall_s"]
                rows.append({"engine": name, "latency_ms": latency, "mode": mode, **r, "speedup": base / r["wall_s"]})
                print(rows[-1], flush=True)
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    print(f"\n{len(prompts)} trajectories ({args.questions} questions × group {args.group_size}), max_response_len "
          f"{args.max_response_len}, max_turns {args.max_turns}, top-{args.top_k}, temperature 1.0, seed {args.seed}; "
          f"median of {args.repeats} runs; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| engine | added retrieval latency | mode | wall s | generated tokens | tokens/s | searches/traj | "
          "retriever calls | speedup vs turn_sync |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['latency_ms']:.0f} ms | {r['mode']} | {r['wall_s']:.2f} | {r['gen_tokens']} | "
              f"{r['tok_s']:.0f} | {r['searches']:.2f} | {r['retriever_calls']} | {r['speedup']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "trajectories": len(prompts),
                                               "load_average": os.getloadavg()[0], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
