"""Training schedules side by side: ``trainer.schedule=sync`` against ``one_step_off`` and ``async``, the debug
experiment on CPU with the rollout worker and the learner on separate cores, and a projection of the same
comparison for the 7B recipe on 64 GPUs (docs/rollout.md, "Training schedules", records the figures and the
commands).

Each run is ``python -m research_rl.train experiment=debug_cpu`` in a subprocess, disaggregated on CPU: a custom Ray
resource ``fake_gpu`` (2 per node, declared by ``research_rl.driver.trainer.start_ray``) stands in for GPUs, the
learner holds one and the rollout worker the other, each with one torch thread, so on an idle 2-core machine each
role can have a core of its own (Ray does not pin cores: the OS schedules the processes, with whatever else runs).
Validation and periodic checkpoints are off (``validation.every=0``, ``trainer.save_every=0``; the trainer's last
checkpoint, after the last step, is not timed). Every run starts from one warmed-up policy: the
debug supervised warm-up (``research_rl.rollout.warmup`` via ``bench/rollout.py``'s ``warm_up``, 150 steps, ~3 min)
is run once into ``--warm-model`` (shared with ``bench/rollout.py`` and ``bench/compare_trl.py``) and each run sets
``warmup.enabled=false``, so the warm-up is outside every timed figure. ``--quick`` (a check that the script runs):
1 pair of 3 steps × 2 prompts × group 2, a 256-token budget, and the plain debug model when no warm model exists.

Runs are paired: pair ``i`` runs sync, one_step_off and async back to back with ``trainer.seed = --seed + i`` (the
same prompts and sampling seeds within a pair), in the order sync, one_step_off, async for even pairs and reversed
for odd ones, so that drift in the machine's load hits every schedule alike.

Figures per run, from ``RUN_DIR/metrics.jsonl`` over the steps after the first ``--skip`` (default 1, the warm-in
step: first calls, first sync):

- ``step_s``: the median of ``timing/step`` (``step_s_mean`` the mean); ``wall_s``: their sum;
- ``tokens_per_s``: Σ ``rollout/generated_tokens`` ÷ ``wall_s`` (every token the rollout workers generated in those
  steps, dropped stale trajectories included);
- ``rollout_idle``: 1 − Σ ``timing/rollout_busy`` ÷ (``wall_s`` × rollout workers);
- ``learner_idle``: 1 − Σ (``timing/logprobs`` + ``timing/update`` + ``timing/sync``) ÷ ``wall_s``;
- ``reward_mean`` (mean over steps of ``rollout/reward_mean``) and its standard error over steps,
  ``staleness_mean``, ``dropped_stale`` (summed);
- ``phases``: the medians of ``timing/rollout`` (R, the driver's wait for the batch), ``timing/logprobs`` +
  ``timing/update`` (L), ``timing/sync`` (S), ``timing/rollout_wait`` (W, the wait for the engines to finish
  before the sync; 0 under sync) and the rest of the step (O: reward, advantages, logging).

``speedup_vs_sync[schedule]``: per pair, sync's ``step_s`` ÷ the schedule's; the median over pairs, with every
pair's value and the min–max spread beside it. ``reward_delta_vs_sync``: the schedule's ``reward_mean`` − sync's,
per pair, and whether the mean delta is within two standard errors (``goals``).

``simulation`` (also ``--simulate-only``, which runs nothing): ``step_times`` is the model, ``project_7b`` applies
it to the 7B recipe (``conf/experiment/research_qwen2.5_7b_instruct.yaml``: batch, group size, lengths, GPUs) with
the throughput assumptions in ``ASSUMPTIONS_7B`` (each sourced or labelled), and ``cpu_check`` feeds it the phase
times measured in the sync runs here and sets its projection beside the measured speed-ups; ``with_own_phases``
feeds it each overlapping schedule's own phase times instead (the rollout workers' busy seconds per step as R), which
shows how much of a gap is the roles slowing each other down when they run at once. A second table prints the
phases per schedule (``phases`` and the busy seconds per step). ``--reanalyze OLD.json`` recomputes every figure
from the run directories a previous result names.

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/schedule.py \\
        --steps 10 --pairs 2 --json schedule.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULES = ("sync", "one_step_off", "async")
RECIPE_7B = ROOT / "conf/experiment/research_qwen2.5_7b_instruct.yaml"
DISAGGREGATED_CPU = ["placement.mode=disaggregated", "placement.gpus_per_node=2", "placement.gpu_resource=fake_gpu",
                     "learner.num_gpus_per_worker=1", "rollout.num_gpus_per_worker=1", "learner.torch_threads=1",
                     "rollout.torch_threads=1"]
GOALS = {"one_step_off": 1.4, "async": 1.6}  # on CPU, step throughput over sync's at equal reward

# ---------------------------------------------------------------------------------------------------- the model
# Inputs of the 7B projection. "source" says where each figure comes from; "assumption" marks the ones no document
# or measurement of this project states.
ASSUMPTIONS_7B = {
    "params": (7.62e9, "Qwen2.5-7B parameters (docs/rollout.md, weight sync at 7B)"),
    "prompt_tokens": (300, "docs/reproducing.md, expected time per step (assumption there)"),
    "generated_tokens_mean": (1000, "docs/reproducing.md (assumption there): mean generated tokens per trajectory"),
    "decode_steps_longest": (5000, "docs/reproducing.md gives 3,000-8,000 sequential decode steps for the longest "
                                   "trajectory of a step; the midpoint, assumption"),
    "result_tokens": (1400, "docs/reproducing.md: 2 searches x 5 passages x ~140 tokens (assumption there)"),
    "learner_flop_per_token_per_param": (10, "docs/reproducing.md: 2N reference forward + 6N update + 2N "
                                             "recomputation under gradient checkpointing"),
    "peak_flops_per_gpu": (989e12, "H800 dense bf16 peak, docs/reproducing.md"),
    "mfu": (0.30, "docs/reproducing.md (assumption there; 15% doubles the learner time)"),
    "decode_step_base_s": (0.007, "docs/reproducing.md: one decode step reads the 15.2 GB of bf16 weights, >= 4.5 ms "
                                  "at 3.35 TB/s, ~7 ms with overheads (assumption there)"),
    "decode_step_per_seq_s": (6e-5, "assumption: per sequence in the batch, its KV cache (28 layers x 4 KV heads x "
                                    "128 x 2 x 2 B = 57 KB/token at ~1,500 tokens of context = 86 MB, 0.026 ms at "
                                    "3.35 TB/s) plus 2N FLOP at 50% of peak (0.03 ms)"),
    "sync_colocated_s": (1.3, "docs/rollout.md, weight sync at 7B: ipc with 512 MiB buckets"),
    "sync_disaggregated_s": (1.5, "docs/rollout.md, weight sync at 7B: collective, 32 + 32 GPUs (1-1.5 s)"),
    "handover_colocated_s": (1.0, "assumption: colocated only, per step: optimizer offload + reload "
                                  "(learner.offload=optimizer, ~1 GB per GPU each way) and the engine's wake-up"),
    "driver_s": (2.0, "docs/reproducing.md: 'a few seconds for rewards, advantages and logging' (assumption)"),
    "max_staleness": (1, "trainer.max_staleness default: a trajectory is dropped when the policy moved on by more "
                         "than 1 version between its start and its update"),
    "min_learner_gpus": (16, "assumption: fewest learner GPUs that hold 7B FSDP2 state with the optimizer offloaded"),
}
ROLLOUT_GPU_SPLITS = (16, 24, 32, 40, 48)  # rollout GPUs out of 64 in disaggregated mode; the learner has the rest


def step_times(R_sync: float, L_sync: float, S_sync: float, R_split: float, L_split: float, S_split: float,
               R_async: float | None = None, drain: float | None = None, driver: float = 0.0,
               handover: float = 0.0) -> dict:
    """Seconds per GRPO step of each schedule, and the speed-ups over sync (sync's seconds ÷ the schedule's).

    - sync (one after the other, today's loop): ``R_sync + L_sync + S_sync + driver + handover``, with the phases
      as timed in the synchronous layout (colocated for the 7B recipe: every GPU rolls out, then every GPU trains;
      ``handover`` = what colocation costs per step, e.g. offload and reload);
    - one_step_off (the rollout of step t+1 overlaps the training of step t, on separate GPUs): ``max(R_split,
      driver + L_split) + S_split``;
    - async (workers generate continuously; the learner takes a batch when ready): ``max(R_async, driver +
      L_split) + drain``, ``R_async`` the rollout time of one batch when generation never waits for a step
      boundary (default ``R_split``), ``drain`` the pause for the weight sync between requests (default
      ``S_split``).

    All inputs in seconds per step, >= 0. The driver's reward/advantage/logging work is put on the learner's
    path (it sits between the batch and the update). Returns ``{"step_s": {schedule: s}, "speedup_vs_sync":
    {one_step_off: x, async: y}}``. Raises ValueError on a negative input or a zero sync step."""
    R_async = R_split if R_async is None else R_async
    drain = S_split if drain is None else drain
    inputs = (R_sync, L_sync, S_sync, R_split, L_split, S_split, R_async, drain, driver, handover)
    if any(x < 0 or math.isnan(x) for x in inputs):
        raise ValueError(f"phase times must be >= 0, got {inputs}")
    step = {"sync": R_sync + L_sync + S_sync + driver + handover,
            "one_step_off": max(R_split, driver + L_split) + S_split,
            "async": max(R_async, driver + L_split) + drain}
    if step["sync"] <= 0:
        raise ValueError("the sync step takes no time: nothing to compare")
    return {"step_s": step, "speedup_vs_sync": {k: step["sync"] / step[k] if step[k] > 0 else math.inf
                                                for k in ("one_step_off", "async")}}


def recipe_7b(path: Path = RECIPE_7B) -> dict:
    """The 7B recipe's shape: trajectories per step (prompts × group size), response budget, prompt limit, GPUs."""
    import yaml

    c = yaml.safe_load(path.read_text())
    return {"prompts_per_step": c["trainer"]["prompts_per_step"], "group_size": c["rollout"]["group_size"],
            "trajectories": c["trainer"]["prompts_per_step"] * c["rollout"]["group_size"],
            "max_response_len": c["rollout"]["max_response_len"], "max_prompt_len": c["data"]["max_prompt_len"],
            "gpus": c["placement"]["nnodes"] * c["placement"]["gpus_per_node"], "placement": c["placement"]["mode"],
            "source": str(path.relative_to(ROOT))}


def project_7b(recipe: dict, a: dict | None = None, splits=ROLLOUT_GPU_SPLITS) -> dict:
    """The schedules' seconds per step for the 7B recipe on ``recipe["gpus"]`` GPUs.

    Phase model (``a`` = ``ASSUMPTIONS_7B`` values; T trajectories per step, n GPUs):

    - learner: ``L(n) = T × seq × k × N / (n × peak × MFU)``, seq = prompt + generated + result tokens;
    - one decode step of an engine with b sequences: ``t(b) = base + b × per_seq``; batch-synchronous rollout (sync,
      one_step_off: the batch waits for its longest trajectory) ``R(n) = decode_steps_longest × t(T/n)``;
      streaming rollout (async: a finished sequence's slot takes the next prompt, so a step costs its tokens, not
      its tail) ``R_async(n) = generated_tokens_mean × t(T/n) / (1 − d)``, ``d`` the share of generated tokens in
      trajectories dropped as stale (the straggler tail async pays for; solved with the step time, ``R_async``);
    - sync: all n GPUs colocated, ``R(n) + L(n) + sync_colocated + handover_colocated + driver``;
      one_step_off and async: r rollout GPUs and n − r learner GPUs, ``sync_disaggregated`` per step.

    Returns the inputs, the phase times per split, and per schedule the 32/32 split and the best split."""
    a = {k: v[0] for k, v in ASSUMPTIONS_7B.items()} if a is None else a
    T, n = recipe["trajectories"], recipe["gpus"]
    seq = a["prompt_tokens"] + a["generated_tokens_mean"] + a["result_tokens"]
    flop = T * seq * a["learner_flop_per_token_per_param"] * a["params"]

    def L(gpus):
        return flop / (gpus * a["peak_flops_per_gpu"] * a["mfu"])

    def t(b):
        return a["decode_step_base_s"] + b * a["decode_step_per_seq_s"]

    def R(gpus):
        return a["decode_steps_longest"] * t(T / gpus)

    def R_async(gpus):
        """Streaming rollout and its dropped share, solved together: generated lengths exponential with mean
        ``generated_tokens_mean`` (assumption), a trajectory of ``x`` tokens takes ``x × t(b)`` seconds, and one that
        spans more than ``max_staleness + 1`` steps is dropped; its tokens were spent for nothing, so a step needs
        ``mean × t(b) / (1 − d)`` seconds of generation, ``d`` the dropped share of tokens, ``(1 + c) e^-c`` for the
        cut ``c = x* / mean``. Fixed point over the step time."""
        mu, tb = a["generated_tokens_mean"], t(T / gpus)
        step, d = mu * tb, 0.0
        for _ in range(100):
            step = max(mu * tb / (1 - d), driver_plus_L(n - gpus)) + a["sync_disaggregated_s"]
            c = (a["max_staleness"] + 1) * step / tb / mu
            d = min(0.99, (1 + c) * math.exp(-c))
        return mu * tb / (1 - d), d

    def driver_plus_L(gpus):
        return a["driver_s"] + L(gpus)

    sync_phases = {"R": R(n), "L": L(n), "S": a["sync_colocated_s"], "handover": a["handover_colocated_s"],
                   "driver": a["driver_s"]}
    rows = []
    for r in splits:
        if n - r < a["min_learner_gpus"] or r <= 0:
            continue
        r_async, dropped = R_async(r)
        res = step_times(R(n), L(n), a["sync_colocated_s"], R(r), L(n - r), a["sync_disaggregated_s"],
                         R_async=r_async, drain=a["sync_disaggregated_s"], driver=a["driver_s"],
                         handover=a["handover_colocated_s"])
        rows.append({"rollout_gpus": r, "learner_gpus": n - r, "R": R(r), "R_async": r_async,
                     "async_dropped_token_share": dropped, "L": L(n - r),
                     "S": a["sync_disaggregated_s"], **res})
    half = next((row for row in rows if row["rollout_gpus"] == n // 2), None)
    best = {k: max(rows, key=lambda row: row["speedup_vs_sync"][k]) for k in ("one_step_off", "async")}
    return {"recipe": recipe, "sequence_tokens": seq, "learner_flop_per_step": flop, "sync_phases": sync_phases,
            "splits": rows,
            "speedup_vs_sync_half_split": half["speedup_vs_sync"] if half else None,
            "speedup_vs_sync_best_split": {k: {"speedup": best[k]["speedup_vs_sync"][k],
                                               "rollout_gpus": best[k]["rollout_gpus"],
                                               "learner_gpus": best[k]["learner_gpus"]} for k in best}}


def cpu_check(phases: dict, dropped_fraction: float, measured: dict) -> dict:
    """The model fed the phase medians measured in the CPU sync runs (R, L, S, O; W is 0 there; the CPU runs are
    disaggregated already, so the same phases serve every schedule) and the async runs' dropped fraction, beside
    the measured speed-ups. On CPU the engine decodes each request to its longest member, so no tail is saved:
    ``R_async = R / (1 − dropped)``, the dropped trajectories' generation spent again."""
    res = step_times(phases["R"], phases["L"], phases["S"], phases["R"], phases["L"], phases["S"],
                     R_async=phases["R"] / (1 - dropped_fraction), driver=phases["O"])
    return {"inputs": {**{k: phases[k] for k in ("R", "L", "S", "O")}, "dropped_fraction": dropped_fraction},
            "projected": res, "measured_speedup_vs_sync": measured}


# ---------------------------------------------------------------------------------------------------- metrics
def read_steps(run_dir: Path) -> list[dict]:
    """The per-step rows of ``run_dir/metrics.jsonl`` (those with ``timing/step``), rows of the same step merged."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).update(row)
    return [r for s, r in sorted(by_step.items()) if s >= 1 and "timing/step" in r]


def run_figures(rows: list[dict], skip: int = 1, rollout_workers: int = 1) -> dict:
    """The figures of one run (module docstring) over ``rows[skip:]``. Raises ValueError when no step is left."""
    rows = rows[skip:]
    if not rows:
        raise ValueError(f"no step left after skipping {skip}")
    g = lambda r, k: float(r.get(k, 0.0))  # noqa: E731
    wall = sum(g(r, "timing/step") for r in rows)
    busy_learner = sum(g(r, "timing/logprobs") + g(r, "timing/update") + g(r, "timing/sync") for r in rows)
    missing = sorted({k for r in rows for k in ("timing/rollout_busy", "rollout/generated_tokens") if k not in r})
    rewards = [g(r, "rollout/reward_mean") for r in rows]
    phases = {"R": statistics.median(g(r, "timing/rollout") for r in rows),
              "L": statistics.median(g(r, "timing/logprobs") + g(r, "timing/update") for r in rows),
              "S": statistics.median(g(r, "timing/sync") for r in rows),
              "W": statistics.median(g(r, "timing/rollout_wait") for r in rows)}
    phases["O"] = max(0.0, statistics.median(g(r, "timing/step") for r in rows) - phases["R"] - phases["L"]
                      - phases["S"] - phases["W"])
    out = {"steps": len(rows), "first_step": rows[0]["step"], "wall_s": wall,
           "step_s": statistics.median(g(r, "timing/step") for r in rows),
           "step_s_mean": wall / len(rows),
           "tokens_per_s": (sum(g(r, "rollout/generated_tokens") for r in rows) / wall
                            if "rollout/generated_tokens" not in missing else None),
           "rollout_idle": (1 - sum(g(r, "timing/rollout_busy") for r in rows) / (wall * rollout_workers)
                            if "timing/rollout_busy" not in missing else None),
           "learner_idle": 1 - busy_learner / wall,
           "reward_mean": statistics.fmean(rewards),
           "reward_sem": statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else 0.0,
           "staleness_mean": statistics.fmean(g(r, "rollout/staleness_mean") for r in rows),
           "dropped_stale": sum(g(r, "rollout/dropped_stale") for r in rows),
           "learner_busy_per_step": busy_learner / len(rows),
           "rollout_busy_per_step": (sum(g(r, "timing/rollout_busy") for r in rows) / len(rows)
                                     if "timing/rollout_busy" not in missing else None),
           "phases": phases, "missing_keys": missing}
    return out


# ---------------------------------------------------------------------------------------------------- runs
def ensure_warm_model(args) -> Path | None:
    """The shared debug warm-up model (built once, ~3 min on 2 cores); None in ``--quick`` when it is missing."""
    warm = Path(args.warm_model)
    if (warm / "config.json").is_file():
        return warm
    if args.quick:
        return None
    sys.path.insert(0, str(ROOT / "bench"))
    from rollout import warm_up

    from research_rl.retrieval.retriever import Retriever

    print(f"building the warm-up model in {warm} (150 supervised steps)", flush=True)
    warm.parent.mkdir(parents=True, exist_ok=True)
    warm_up(args.model, warm, Retriever(args.index, top_k=3, threads=1),
            argparse.Namespace(top_k=3, template="instruct", warmup_steps=150))
    return warm


def train_command(args, schedule: str, seed: int, model: str, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "research_rl.train", "experiment=debug_cpu", f"model.path={model}",
            "warmup.enabled=false", f"trainer.schedule={schedule}", f"trainer.max_staleness={args.max_staleness}",
            f"trainer.async_groups_per_request={args.groups_per_request}", f"trainer.total_steps={args.steps}",
            f"trainer.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
            f"rollout.max_response_len={args.max_response_len}", f"learner.micro_batch_size={args.micro_batch_size}",
            "validation.every=0", "validation.before_training=false", "trainer.save_every=0",
            "trainer.save_hf_model=false", "trainer.max_minutes=null", f"trainer.seed={seed}",
            f"retriever.index_dir={args.index}", f"trainer.output_dir={out_dir}", *DISAGGREGATED_CPU]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_one(args, schedule: str, pair: int, model: str, out_root: Path) -> dict:
    seed = args.seed + pair
    out_dir = out_root / f"pair{pair}_{schedule}"
    cmd = train_command(args, schedule, seed, model, out_dir)
    env = {**os.environ}
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"), ("OMP_WAIT_POLICY", "PASSIVE"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("OPENAI_API_KEY", "unused")):
        env.setdefault(var, value)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    before, t0 = uptime(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=args.run_timeout)
    process_s = time.perf_counter() - t0
    (out_root / f"pair{pair}_{schedule}.log").write_text(proc.stdout + "\n---- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{schedule} (pair {pair}) failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").is_file() else {}
    figures = run_figures(read_steps(out_dir), args.skip, args.rollout_workers)
    return {"schedule": schedule, "pair": pair, "seed": seed, "command": " ".join(cmd), "run_dir": str(out_dir),
            "process_s": process_s, "uptime_before": before, "uptime_after": uptime(),
            "train_minutes": summary.get("train_minutes"), "summary_steps": summary.get("steps"), **figures}


# ---------------------------------------------------------------------------------------------------- report
def aggregate(runs: list[dict]) -> dict:
    """Per schedule the medians over its runs; per pair the speed-ups and reward deltas against sync."""
    per = {}
    for s in SCHEDULES:
        rs = [r for r in runs if r["schedule"] == s]
        if not rs:
            continue
        med = lambda k: (statistics.median(r[k] for r in rs) if all(r[k] is not None for r in rs)  # noqa: E731
                         else None)
        per[s] = {k: med(k) for k in ("step_s", "step_s_mean", "tokens_per_s", "rollout_idle", "learner_idle",
                                      "reward_mean", "staleness_mean", "dropped_stale", "learner_busy_per_step",
                                      "rollout_busy_per_step")}
        per[s]["phases"] = {k: statistics.median(r["phases"][k] for r in rs) for k in ("R", "L", "S", "W", "O")}
        per[s]["runs"] = len(rs)
    pairs = sorted({r["pair"] for r in runs})
    by = {(r["pair"], r["schedule"]): r for r in runs}
    speed, spread, per_pair, reward = {}, {}, {}, {}
    for s in ("one_step_off", "async"):
        xs = [by[p, "sync"]["step_s"] / by[p, s]["step_s"] for p in pairs if (p, "sync") in by and (p, s) in by]
        ds = [by[p, s]["reward_mean"] - by[p, "sync"]["reward_mean"] for p in pairs
              if (p, "sync") in by and (p, s) in by]
        sems = [math.hypot(by[p, s]["reward_sem"], by[p, "sync"]["reward_sem"]) for p in pairs
                if (p, "sync") in by and (p, s) in by]
        if not xs:
            continue
        speed[s], spread[s], per_pair[s] = statistics.median(xs), [min(xs), max(xs)], xs
        sem = math.sqrt(sum(e * e for e in sems)) / len(sems)
        reward[s] = {"per_pair": ds, "mean": statistics.fmean(ds), "sem": sem,
                     "within_2_sem": abs(statistics.fmean(ds)) <= 2 * sem}
    goals = {f"{s}_{GOALS[s]}x_sync": speed[s] >= GOALS[s] and reward[s]["within_2_sem"] for s in speed}
    return {"per_schedule": per, "speedup_vs_sync": speed, "speedup_vs_sync_spread": spread,
            "speedup_vs_sync_per_pair": per_pair, "reward_delta_vs_sync": reward, "goals": goals}


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(agg: dict) -> None:
    print("\n| schedule | s/step | generated tokens/s | rollout idle | learner idle | reward mean | staleness | "
          "dropped | speed-up vs sync (pairs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for s, m in agg["per_schedule"].items():
        sp = "1.00" if s == "sync" else (f"{agg['speedup_vs_sync'][s]:.2f} (" + ", ".join(
            f"{x:.2f}" for x in agg["speedup_vs_sync_per_pair"][s]) + ")" if s in agg["speedup_vs_sync"] else "-")
        print(f"| {s} | {m['step_s']:.2f} | {_f(m['tokens_per_s'], '.0f')} | {_f(m['rollout_idle'])} | "
              f"{_f(m['learner_idle'])} | {m['reward_mean']:.3f} | {_f(m['staleness_mean'])} | "
              f"{_f(m['dropped_stale'], '.0f')} | {sp} |")
    print("\nWhere the time goes (medians over runs, seconds per step): R = wait for the batch, L = logprobs + "
          "update, S = sync, W = wait for the engines before the sync, O = the rest; busy = each role's working "
          "seconds per step")
    print("| schedule | R | L | S | W | O | learner busy | rollout busy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s, m in agg["per_schedule"].items():
        ph = m["phases"]
        print(f"| {s} | {ph['R']:.2f} | {ph['L']:.2f} | {ph['S']:.2f} | {ph['W']:.2f} | {ph['O']:.2f} | "
              f"{m['learner_busy_per_step']:.2f} | {_f(m['rollout_busy_per_step'])} |")
    for s, d in agg["reward_delta_vs_sync"].items():
        print(f"reward {s} − sync: {d['mean']:+.3f} ± {d['sem']:.3f} (per pair "
              + ", ".join(f"{x:+.3f}" for x in d["per_pair"]) + f"); within 2 s.e.: {d['within_2_sem']}")


def print_simulation(sim: dict) -> None:
    p = sim["project_7b"]
    rec = p["recipe"]
    print(f"\n7B projection ({rec['source']}): {rec['trajectories']} trajectories per step "
          f"({rec['prompts_per_step']} prompts × {rec['group_size']}), budget {rec['max_response_len']}, "
          f"{rec['gpus']} GPUs; sequence {p['sequence_tokens']} tokens")
    for k, (v, src) in ASSUMPTIONS_7B.items():
        print(f"  {k} = {v:g}  ({src})")
    sp = p["sync_phases"]
    print(f"  sync, colocated on {rec['gpus']}: R {sp['R']:.1f} s + L {sp['L']:.1f} s + S {sp['S']:.1f} s + "
          f"handover {sp['handover']:.1f} s + driver {sp['driver']:.1f} s")
    print("| rollout GPUs | learner GPUs | R s | R_async s | async dropped tokens | L s | S s | sync s/step | "
          "one_step_off s/step | "
          "async s/step | one_step_off × | async × |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in p["splits"]:
        st, x = r["step_s"], r["speedup_vs_sync"]
        print(f"| {r['rollout_gpus']} | {r['learner_gpus']} | {r['R']:.1f} | {r['R_async']:.1f} | "
              f"{r['async_dropped_token_share']:.3f} | {r['L']:.1f} | "
              f"{r['S']:.1f} | {st['sync']:.1f} | {st['one_step_off']:.1f} | {st['async']:.1f} | "
              f"{x['one_step_off']:.2f} | {x['async']:.2f} |")
    c = sim.get("cpu_check")
    if c:
        i, pr = c["inputs"], c["projected"]
        print(f"\nCPU check: measured sync phases R {i['R']:.2f} s, L {i['L']:.2f} s, S {i['S']:.2f} s, "
              f"O {i['O']:.2f} s, dropped fraction {i['dropped_fraction']:.3f}")
        for s in ("one_step_off", "async"):
            m = c["measured_speedup_vs_sync"].get(s)
            print(f"  {s}: projected {pr['step_s'][s]:.2f} s/step, {pr['speedup_vs_sync'][s]:.2f}× sync; "
                  f"measured {_f(m)}×")
        for s, o in c.get("with_own_phases", {}).items():
            print(f"  {s} with its own phases (rollout busy {o['R_busy']:.2f} s = {o['R_busy_over_sync_R']:.2f}× "
                  f"sync's R, L {o['L']:.2f} s = {o['L_over_sync_L']:.2f}× sync's L, S {o['S']:.2f}, O {o['O']:.2f}): "
                  f"{o['step_s']:.2f} s/step, {o['speedup_vs_sync']:.2f}× sync")


def simulation(runs: list[dict] | None, agg: dict | None) -> dict:
    sim = {"model": step_times.__doc__.split("\n\n")[1].strip(), "assumptions_7b": {
        k: {"value": v, "source": s} for k, (v, s) in ASSUMPTIONS_7B.items()}, "project_7b": project_7b(recipe_7b())}
    if agg and "sync" in agg["per_schedule"]:
        # the share of async trajectories dropped as stale: dropped ÷ (dropped + the ones trained on)
        a_runs = [r for r in runs if r["schedule"] == "async"]
        dropped = sum(r["dropped_stale"] for r in a_runs)
        trained = sum(r["steps"] * r["trajectories"] for r in a_runs)
        frac = dropped / (dropped + trained) if dropped + trained else 0.0
        sim["cpu_check"] = cpu_check(agg["per_schedule"]["sync"]["phases"], frac, agg["speedup_vs_sync"])
        # the same model fed each overlapping schedule's own phases (the rollout workers' busy seconds per step as
        # R, its own L, S, O): what the overlap gives once the slow-down of running both roles at once is counted
        ps, own = agg["per_schedule"], {}
        for k in ("one_step_off", "async"):
            if k in ps and ps[k]["rollout_busy_per_step"] is not None:
                m, base = ps[k]["phases"], ps["sync"]["phases"]
                r = step_times(base["R"], base["L"], base["S"], ps[k]["rollout_busy_per_step"], m["L"], m["S"],
                               driver=m["O"])
                own[k] = {"R_busy": ps[k]["rollout_busy_per_step"], "L": m["L"], "S": m["S"], "O": m["O"],
                          "step_s": r["step_s"][k], "speedup_vs_sync": r["speedup_vs_sync"][k],
                          "L_over_sync_L": m["L"] / base["L"] if base["L"] else None,
                          "R_busy_over_sync_R": ps[k]["rollout_busy_per_step"] / base["R"] if base["R"] else None}
        sim["cpu_check"]["with_own_phases"] = own
    return sim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", required=True, help="write the runs, the figures and the simulation here")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 pair, 2 prompts × 2, 256-token budget")
    p.add_argument("--steps", type=int, default=12, help="GRPO steps per run (the first --skip are not counted)")
    p.add_argument("--pairs", type=int, default=2, help="pairs of (sync, one_step_off, async) runs")
    p.add_argument("--skip", type=int, default=1, help="warm-in steps left out of every figure")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated subset")
    p.add_argument("--prompts", type=int, default=4, help="trainer.prompts_per_step (debug_cpu's)")
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--max-response-len", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=10)
    p.add_argument("--max-staleness", type=int, default=1, help="trainer.max_staleness (async)")
    p.add_argument("--groups-per-request", type=int, default=1, help="trainer.async_groups_per_request")
    p.add_argument("--rollout-workers", type=int, default=1, help="rollout.num_workers of debug_cpu")
    p.add_argument("--seed", type=int, default=42, help="pair i runs with trainer.seed = seed + i")
    p.add_argument("--model", default=str(ROOT / "artifacts/debug_model"), help="debug model (warm-up start)")
    p.add_argument("--warm-model", default=str(ROOT / "artifacts/bench_warm_model"), help="shared warm-up model")
    p.add_argument("--index", default=str(ROOT / "artifacts/bm25_index"), help="BM25 index")
    p.add_argument("--out", default=None, help="run directories (default: a fresh directory under outputs/)")
    p.add_argument("--run-timeout", type=float, default=900, help="seconds per training run")
    p.add_argument("--simulate-only", action="store_true", help="print and write the 7B projection, run nothing")
    p.add_argument("--reanalyze", default=None, metavar="JSON",
                   help="recompute every figure from the run directories a previous --json names, run nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.pairs, args.prompts, args.group_size = 3, 1, 2, 2
        args.max_response_len, args.micro_batch_size = 256, 4
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "arguments": sys.argv[1:] if argv is None else argv,
              "commit": head, "uptime_before": uptime()}
    runs: list[dict] = []
    agg = uptime_after = None
    if args.reanalyze:
        old = json.loads(Path(args.reanalyze).read_text())
        for k in ("date", "arguments", "uptime_before", "setting"):
            result[k] = old.get(k)
        result["reanalyzed"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        for r in old["runs"]:
            fig = run_figures(read_steps(Path(r["run_dir"])), old["setting"]["skip"], args.rollout_workers)
            runs.append({**{k: r[k] for k in r if k not in fig}, **fig})
        agg = aggregate(runs)
        result.update(agg)
        print_table(agg)
        uptime_after = old.get("uptime_after")
    elif not args.simulate_only:
        schedules = [s for s in args.schedules.split(",") if s]
        bad = set(schedules) - set(SCHEDULES)
        if bad:
            p.error(f"--schedules: unknown {sorted(bad)}")
        if args.steps <= args.skip:
            p.error("--steps must exceed --skip")
        warm = ensure_warm_model(args)
        model = str(warm or args.model)
        out_root = Path(args.out or ROOT / "outputs/bench_schedule" / time.strftime("%Y%m%d-%H%M%S")).resolve()
        out_root.mkdir(parents=True, exist_ok=True)
        result["setting"] = {"model": model, "warm_model": warm is not None, "steps": args.steps, "skip": args.skip,
                             "prompts": args.prompts, "group_size": args.group_size,
                             "max_response_len": args.max_response_len, "max_staleness": args.max_staleness,
                             "groups_per_request": args.groups_per_request, "placement": DISAGGREGATED_CPU}
        for pair in range(args.pairs):
            order = schedules if pair % 2 == 0 else schedules[::-1]
            for s in order:
                print(f"[{time.strftime('%H:%M:%S')}] pair {pair} {s} (load {os.getloadavg()[0]:.2f})", flush=True)
                run = run_one(args, s, pair, model, out_root)
                run["trajectories"] = args.prompts * args.group_size
                runs.append(run)
                print(f"  {run['step_s']:.2f} s/step over {run['steps']} steps, reward {run['reward_mean']:.3f}, "
                      f"process {run['process_s']:.0f} s", flush=True)
                Path(args.json).write_text(json.dumps({**result, "runs": runs}, indent=2))  # partial results
        agg = aggregate(runs)
        result.update(agg)
        print_table(agg)
    result["runs"] = runs
    result["simulation"] = simulation(runs, agg)
    result["uptime_after"] = uptime_after if args.reanalyze else uptime()
    print_simulation(result["simulation"])
    print(f"\nuptime before: {result['uptime_before']}\nuptime after:  {result['uptime_after']}")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
