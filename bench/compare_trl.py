"""The same ReSearch GRPO task trained by research-rl (local mode) and by TRL's ``GRPOTrainer``, side by side.

What is the same on both sides:

- the policy: one warm-up model (the debug model of ``debug_cpu`` after the debug supervised warm-up of
  ``research_rl.rollout.warmup``, built once by ``bench/rollout.py``'s ``warm_up`` and kept in ``--warm-model``), so both
  start from a policy that already writes ``<think>``/``<search>``/``<answer>``;
- the prompts: the first ``--steps × --prompts`` training questions in the order research-rl's ``PromptStream``
  draws them (seed ``trainer.seed`` = 42), rendered with the ``instruct`` template; TRL gets them in that order
  (``shuffle_dataset=False``);
- the search loop: TRL's rollout runs research-rl's ``AgentLoop`` (same ``<search>``/``<result>`` protocol, async
  schedule, ``max_turns``, shared response budget ``--max-response-len``) on an ``HFEngine`` whose model *is* the
  model TRL trains, over the same BM25 index (``research_rl.retrieval.retriever.Retriever``, top-3); result tokens are
  masked out of TRL's loss through ``env_mask``;
- the reward: ``research_rl.algo.reward.research_reward`` on the decoded response with its EOS string;
- the algorithm: group size, lr, AdamW betas and weight decay, gradient clip 1.0, constant lr, KL coefficient
  with the k3 estimator, clip ε 0.2, one update per rollout batch (the whole batch in one optimizer step),
  token-mean loss over the batch (TRL ``loss_type="dapo"``), group advantages ``(r - mean) / (std + ε)``;
  research-rl's entropy bonus is set to 0 because TRL has none; float32; 2 torch threads.

Why ``rollout_func`` and not TRL's ``tools=``: TRL's tool loop parses tool calls in the chat template's JSON
format (``<tool_call>{...}</tool_call>``) and answers as a ``tool`` message, while ReSearch's policy writes
``<search> query </search>`` and receives ``<result> ... </result>`` inline. Using ``tools=`` would change the task
(a different protocol, prompt and warm-up), so TRL's experimental ``rollout_func`` (TRL 1.16: prompts in, token
ids and ``env_mask`` out) runs the ReSearch loop instead. Consequence: generation code is shared, so the ratio
measures everything around it — orchestration, reference log-probs, the update, weight sync (research-rl
copies weights from the learner to its rollout engine each step; TRL generates with the model it trains).

What differs, and why:

- research-rl runs its distributed pipeline (Ray actors: rollout worker, learner with FSDP2 on gloo, retriever
  actor) in one machine, as ``python -m research_rl.train experiment=debug_cpu`` does; TRL runs in one process.
  That is the point of the comparison: the cost of research-rl's architecture at this tiny scale.
- Neither computes old log-probs in a separate pass (one update per rollout batch: both take the ratio against a
  detached copy of the same log-probs). research-rl computes logits only at loss positions; TRL over every
  completion position, inserted result tokens included (masked out of its loss afterwards).
- TRL's reward is computed after its rollout in the main process; research-rl's on the driver.
- Reward after N steps is noisy at 2 prompts × 5 (one step's 10 rollouts): compare it as "did it learn as much",
  not as a precise figure.

Runs are paired A B A B (research-rl, TRL, research-rl, TRL, ...) so that drift in the machine's load hits both;
pair ``i`` runs both systems with seed ``--seed + i`` (prompt order, rollout seeds), so the two runs of a pair start
from identical step-1 trajectories while pairs differ. Each run reports its per-step figures and the report gives
medians over runs of the per-run medians, and ratios; the reward difference is the mean over pairs of each pair's
difference in mean reward over the last half of the steps.

Run from the repository root with the TRL venv (``make install-trl``), which also holds research-rl, so both
trainers run on the same torch and transformers::

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv-trl/bin/python bench/compare_trl.py \\
        --steps 4 --prompts 2 --group-size 5 --max-response-len 1024 --pairs 2 --json compare_trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_FILES = ["data/musique/train.jsonl", "data/hotpotqa/train.jsonl"]
TEMPLATE = "instruct"
TOP_K = 3
MAX_TURNS = 2
KL_COEF = 0.05  # debug_cpu's algo.kl_coef
LR = 5e-4  # debug_cpu's learner.lr
MAX_PROMPT_LEN = 512


def ensure_warm_model(args) -> Path:
    """The debug warm-up model both trainers start from (built once, ~3 min on 2 cores)."""
    warm = Path(args.warm_model)
    if (warm / "config.json").is_file():
        return warm
    sys.path.insert(0, str(ROOT / "bench"))
    from rollout import warm_up

    from research_rl.retrieval.retriever import Retriever

    print(f"building the warm-up model in {warm} (150 supervised steps)", flush=True)
    warm.parent.mkdir(parents=True, exist_ok=True)
    retriever = Retriever(args.index, top_k=TOP_K, threads=1)
    warm_up(args.model, warm, retriever, argparse.Namespace(top_k=TOP_K, template=TEMPLATE, warmup_steps=150))
    return warm


def training_questions(tok, n: int, seed: int):
    """The first ``n`` questions research-rl's trainer draws with ``trainer.seed=seed`` (same filter, same stream)."""
    from research_rl.data import PromptStream, load_questions
    from research_rl.algo.templates import encode_prompt

    keep = [q for f in TRAIN_FILES for q in load_questions(str(ROOT / f))
            if len(encode_prompt(q.question, TEMPLATE, tok)) <= MAX_PROMPT_LEN]
    return PromptStream(keep, seed=seed, shuffle=True).next_batch(n)


# ---------------------------------------------------------------------------------------------------- research-rl
def run_research_rl(args, warm: Path, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "research_rl.train", "experiment=debug_cpu", f"model.path={warm}",
           "warmup.enabled=false", f"trainer.total_steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
           f"rollout.group_size={args.group_size}", f"rollout.max_response_len={args.max_response_len}",
           f"learner.micro_batch_size={args.prompts * args.group_size}", "algo.entropy_coef=0",
           "validation.every=0", "validation.before_training=false", "trainer.save_every=0",
           "trainer.max_minutes=null", f"trainer.seed={args.seed}", f"retriever.index_dir={args.index}",
           f"trainer.output_dir={out_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"research-rl failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("step", 0) >= 1 and "timing/step" in r]
    n = args.prompts * args.group_size
    return {"system": "research-rl", "command": " ".join(cmd), "process_s": total,
            "steps": [{"step": r["step"], "step_s": r["timing/step"],
                       "gen_tokens": r["rollout/response_len"] * n, "reward": r["rollout/reward_mean"],
                       "searches": r["rollout/searches_per_traj"],
                       "phases": {k: v for k, v in r.items() if k.startswith("timing/")}} for r in steps]}


# ---------------------------------------------------------------------------------------------------- TRL
def trl_side(args) -> None:
    """Runs in its own process: TRL ``GRPOTrainer`` with a ReSearch ``rollout_func``; writes ``--out``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from research_rl.rollout.agent_loop import AgentLoop, SamplingParams
    from research_rl.rollout.hf_engine import HFEngine
    from research_rl.retrieval.retriever import Retriever
    from research_rl.algo.reward import research_reward
    from research_rl.algo.templates import encode_prompt

    torch.set_num_threads(args.threads)
    warm = str(args.warm_model)
    tok = AutoTokenizer.from_pretrained(warm)
    questions = training_questions(tok, args.steps * args.prompts, args.seed)
    golds = {q.question: list(q.golden_answers) for q in questions}
    data = Dataset.from_list([{"prompt": q.question} for q in questions])
    retriever = Retriever(args.index, top_k=TOP_K, threads=1)
    model = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32)
    engine = HFEngine(warm, tok, max_batch_size=64)
    engine.model = model  # generate with the model being trained: no weight copy needed
    engine._params = dict(model.named_parameters(remove_duplicate=False))
    record: dict = {"gen_tokens": [], "searches": [], "rollout_s": []}

    def search(queries):
        return [[p.contents for p in ps] for ps in retriever.search(queries, TOP_K)]

    def rollout_func(prompts, trainer):
        loop = AgentLoop(engine, search, tok, args.max_response_len, MAX_TURNS, mode="async")
        ids = [encode_prompt(p, TEMPLATE, tok) for p in prompts]  # prompts arrive repeated num_generations times
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        trajs = loop.run(ids, SamplingParams(temperature=1.0, top_p=1.0, seed=args.seed * 100_003 +
                                             trainer.state.global_step + 1))
        record["rollout_s"].append(time.perf_counter() - t0)
        model.train(was_training)
        record["gen_tokens"].append(sum(t.num_generated for t in trajs))
        record["searches"].append(sum(t.num_searches for t in trajs) / len(trajs))
        return {"prompt_ids": ids, "completion_ids": [t.response_ids for t in trajs], "logprobs": None,
                "env_mask": [t.loss_mask for t in trajs], "response_text": [t.response_text for t in trajs]}

    def research(prompts, completions, response_text, **kwargs):
        return [research_reward(text, tok.eos_token, golds[p]).score for p, text in zip(prompts, response_text)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.rewards, self.t0 = [], [], 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])

    n = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="compare_trl_"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=args.group_size,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.01, max_grad_norm=1.0, beta=KL_COEF, epsilon=0.2,
        loss_type="dapo", scale_rewards="group", num_iterations=1, temperature=1.0,
        max_completion_length=args.max_response_len, shuffle_dataset=False, seed=args.seed, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    timer = Timer()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = GRPOTrainer(model=model, reward_funcs=[research], args=config, train_dataset=data,
                          processing_class=tok, rollout_func=rollout_func, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = [{"step": i + 1, "step_s": s, "gen_tokens": g, "reward": r, "searches": q,
              "phases": {"timing/rollout": ro, "timing/rest": s - ro}}
             for i, (s, g, r, q, ro) in enumerate(zip(timer.times, record["gen_tokens"], timer.rewards,
                                                       record["searches"], record["rollout_s"]))]
    Path(args.out).write_text(json.dumps({"system": "trl", "train_s": total, "steps": steps}))


def run_trl(args, warm: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", "trl", "--out", str(out), "--warm-model", str(warm),
           "--index", args.index, "--steps", str(args.steps), "--prompts", str(args.prompts),
           "--group-size", str(args.group_size), "--max-response-len", str(args.max_response_len),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["command"] = " ".join(cmd)
    result["process_s"] = total
    return result


# ---------------------------------------------------------------------------------------------------- report
def summarize(run: dict, skip_first: bool) -> dict:
    steps = run["steps"][1:] if skip_first and len(run["steps"]) > 1 else run["steps"]
    return {"step_s": statistics.median(s["step_s"] for s in steps),
            "tokens_per_s": statistics.median(s["gen_tokens"] / s["step_s"] for s in steps),
            "reward_last": run["steps"][-1]["reward"], "reward_first": run["steps"][0]["reward"],
            "reward_mean": statistics.mean(s["reward"] for s in run["steps"]),
            "reward_late": statistics.mean(s["reward"] for s in run["steps"][len(run["steps"]) // 2:]),
            "searches_per_traj": statistics.mean(s["searches"] for s in run["steps"]),
            "process_s": run["process_s"], "steps_run": len(run["steps"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per run")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--max-response-len", type=int, default=1024, help="tokens per trajectory (generated + results)")
    p.add_argument("--pairs", type=int, default=2, help="A B pairs (research-rl, TRL) to run")
    p.add_argument("--seed", type=int, default=42,
                   help="pair i runs both systems with seed SEED + i (prompt order, rollout seeds, TRL's seed)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the TRL process")
    p.add_argument("--model", default=str(ROOT / "artifacts/debug_model"), help="debug model to warm up")
    p.add_argument("--warm-model", default=str(ROOT / "artifacts/bench_warm_model"),
                   help="the warm-up model both start from (built when missing)")
    p.add_argument("--index", default=str(ROOT / "artifacts/bm25_index"), help="BM25 index")
    p.add_argument("--json", help="also write the runs and the summary here")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.side == "trl":
        trl_side(args)
        return 0
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        print(f"trl is not importable by {sys.executable}: run with .venv-trl/bin/python (make install-trl)")
        return 1
    load = [os.getloadavg()[0]]
    warm = ensure_warm_model(args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="compare_trl_") as tmp:
        for i in range(args.pairs):
            for system in ("research-rl", "trl"):
                t = time.strftime("%H:%M:%S")
                print(f"[{t}] pair {i + 1}/{args.pairs}: {system} (load average {os.getloadavg()[0]:.1f})", flush=True)
                out = Path(tmp) / f"{system}_{i}"
                pair_args = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
                run = (run_research_rl(pair_args, warm, out) if system == "research-rl"
                       else run_trl(pair_args, warm, out.with_suffix(".json")))
                run["pair"], run["seed"] = i, args.seed + i
                run["summary"] = summarize(run, skip_first=True)
                runs.append(run)
                s = run["summary"]
                print(f"  {system}: median {s['step_s']:.2f} s/step, {s['tokens_per_s']:.0f} generated tokens/s, "
                      f"reward step 1 {s['reward_first']:.3f} -> step {s['steps_run']} {s['reward_last']:.3f}, "
                      f"process {s['process_s']:.0f} s", flush=True)
                for st in run["steps"]:
                    phases = ", ".join(f"{k.removeprefix('timing/')} {v:.2f}" for k, v in st["phases"].items()
                                       if k != "timing/step")
                    print(f"    step {st['step']}: {st['step_s']:.2f} s ({phases}), "
                          f"{st['gen_tokens'] / st['step_s']:.0f} generated tokens/s, reward {st['reward']:.3f}, "
                          f"searches/traj {st['searches']:.2f}", flush=True)
                load.append(os.getloadavg()[0])
    keys = ("step_s", "tokens_per_s", "reward_last", "reward_mean", "reward_late", "searches_per_traj", "process_s")
    med = {sysname: {k: statistics.median(r["summary"][k] for r in runs if r["system"] == sysname) for k in keys}
           for sysname in ("research-rl", "trl")}
    ratios = {"step_time_trl_over_rrl": med["trl"]["step_s"] / med["research-rl"]["step_s"],
              "tokens_per_s_rrl_over_trl": med["research-rl"]["tokens_per_s"] / med["trl"]["tokens_per_s"],
              "reward_last_rrl_minus_trl": med["research-rl"]["reward_last"] - med["trl"]["reward_last"],
              # same seed within a pair: the mean over pairs of each pair's difference
              "reward_late_rrl_minus_trl": statistics.mean(
                  a["summary"]["reward_late"] - b["summary"]["reward_late"]
                  for a, b in zip(runs[0::2], runs[1::2])),
              "process_time_trl_over_rrl": med["trl"]["process_s"] / med["research-rl"]["process_s"]}
    setting = (f"{args.steps} steps × {args.prompts} prompts × group {args.group_size}, {args.max_response_len}-token "
               f"budget, top-{TOP_K}, ≤{MAX_TURNS} searches, {args.pairs} A/B pairs; per-run medians over steps 2.."
               f"{args.steps}; load average {min(load):.1f}–{max(load):.1f} on {os.cpu_count()} CPUs")
    print(f"\n{setting}\n")
    print("| system | s/step | generated tokens/s | reward at last step | mean reward | reward, last half of steps "
          "| searches/traj | process s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['step_s']:.2f} | {m['tokens_per_s']:.0f} | {m['reward_last']:.3f} | "
              f"{m['reward_mean']:.3f} | {m['reward_late']:.3f} | {m['searches_per_traj']:.2f} | "
              f"{m['process_s']:.0f} |")
    print(f"\nratios: TRL s/step ÷ research-rl s/step = {ratios['step_time_trl_over_rrl']:.2f}; research-rl tokens/s ÷ "
          f"TRL tokens/s = {ratios['tokens_per_s_rrl_over_trl']:.2f}; reward at last step, research-rl − TRL = "
          f"{ratios['reward_last_rrl_minus_trl']:+.3f}; reward over the last half of the steps, research-rl − TRL "
          f"(mean over pairs) = {ratios['reward_late_rrl_minus_trl']:+.3f}; whole process, TRL ÷ research-rl = "
          f"{ratios['process_time_trl_over_rrl']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "setting": setting, "load_average": load,
                                               "median": med, "ratios": ratios, "runs": runs}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
