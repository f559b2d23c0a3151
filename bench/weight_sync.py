"""Weight sync benchmark: seconds, bytes on the wire and transient memory of one learner → engine sync, per transport,
between real Ray actors on CPU (docs/benchmarks.md records the figures and the commands).

Rows, one per transport (``research_rl.driver.weight_sync``; each on fresh actors, one transport at a time):

- ``ipc`` (``placement.mode=colocated``): learner rank 0 packs each bucket into one of two ``/dev/shm`` slots, the
  engine loads it in place (the CPU stand-in for CUDA IPC: the same sender/receiver code);
- ``collective`` (``disaggregated``): learner rank 0 broadcasts each packed bucket over a gloo group with the engine
  (NCCL on GPU);
- ``object_store`` (``colocated``, requested explicitly): each packed bucket through the Ray object store;
- ``legacy_object_store``: the path before these transports, rebuilt here as it was: learner rank 0 gathers fp32
  buckets of ``learner.weight_sync_bucket_mb`` MiB (``Learner.weight_buckets``), ``ray.put`` s each bucket dict of
  fp32 CPU tensors, and the engine ``ray.get`` s each and copies it into its model (``HFEngine.load_weights``).
  Bench-only subclasses of ``LearnerWorker`` and ``RolloutWorker`` (below) expose those two calls.

Setting: one learner rank (FSDP2 on gloo, fp32 master weights, as on GPU) and one HF engine holding bf16 weights on
CPU (``rollout.hf_dtype=bfloat16``), so the new transports send bf16, the legacy one fp32. Each actor has
``num_cpus=1`` in a 2-CPU Ray cluster (one torch thread each: Ray sets it from ``num_cpus``). Models are built from
a config with random weights and saved (safetensors) to a temporary directory, with the debug tokenizer
(``research_rl.debug_model``): ``debug`` is ``debug_cpu``'s model (``DebugModelConfig`` defaults), ``qwen2.5-0.5b``
Qwen2.5-0.5B's shape (``research_rl.learner.memory.KNOWN_SHAPES``: vocab 151,936, hidden 896, MLP 4,864, 24 layers,
14 heads, 2 KV heads, tied embeddings); the tokenizer's vocabulary is smaller than that model's, which no sync
step reads (nothing is generated; the probe's ids are < 4,096).

Figures per row:

- ``seconds``: the median over ``--repeats`` syncs after one warm-up sync; for the new transports the driver's
  ``sync/seconds`` (plan, plan check, transfer, close), for the legacy one the same span around its two calls. The
  collective group is formed once, before the warm-up (``setup_seconds``, not in ``seconds``).
- ``bytes``: bytes on the wire to the engine, from the sync's own metrics (``sync/bytes``; legacy: the fp32 bytes
  of the buckets the engine received, as the old sync reported them); ``params``: elements in a full sync (tied
  embeddings once). A bucket's bytes include the alignment of each tensor to 16 bytes
  (``research_rl.sync.buckets.ALIGN``), which travels too: ``padding_bytes`` = bytes − params × the wire dtype's
  size (0 at both presets, whose bf16 tensors are all multiples of 16 bytes); ``plan_bytes`` is the plan's total, which ``bytes`` must equal.
- ``put_seconds`` (legacy only): the learner's part, gathering and putting every bucket, before the engine reads.
- ``peak_rss_bytes``: a background thread samples the resident set (``/proc/<pid>/statm``) of the learner and the
  engine process (their ``where()`` pids) every ~5 ms during each sync; per sync, the peak of the sum minus the sum
  just before it; the row gives the largest over all syncs (warm-up included: a sync's first pass maps pages, e.g.
  the object store's, that later syncs reuse; ``peak_rss_bytes_timed`` is the largest over the timed syncs alone).
  RSS, not ``VmHWM``: the high-water mark cannot be reset between syncs. Shared pages (the ``/dev/shm`` slots, the
  object store's mapping) count once in each process that touches them, and the object store's own process (the
  raylet's plasma store) is not sampled.
- ``probe_mean_abs_diff``: before the last timed sync the engine's weights are zeroed (a sync that moved nothing
  would leave them so); after it, the mean |engine − learner| log-prob per token of a probe sequence (bf16 engine
  against the fp32 learner), ``probe_mean_abs_diff_zeroed`` the same before that sync.

``--quick`` (a check that the script runs, as tests/test_bench.py does): 2 timed syncs, and every row over one
learner/engine pair, so a row's memory figures depend on the rows before it.

``speedup_vs_legacy``: legacy seconds / the row's seconds. The goal checked at the 0.5B shape: ipc and collective
each ≥ 3× faster than legacy, and bytes = params × 2 (bf16 on the wire).

    RAY_AUTH_MODE=disabled python bench/weight_sync.py --preset qwen2.5-0.5b --repeats 5 --json ws_05b.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRANSPORTS = (  # (row name, sync.transport requested, placement.mode)
    ("legacy_object_store", None, "colocated"),
    ("object_store", "object_store", "colocated"),
    ("ipc", "ipc", "colocated"),
    ("collective", "collective", "disaggregated"),
)
PROBE_TEXT = "Who directed Ed Wood? <search> Ed Wood director </search> <result> Tim Burton </result>"


# ---------------------------------------------------------------------------------------------------- models
def build_models(preset: str, out: Path) -> Path:
    """The model directory of ``preset`` under ``out`` (debug tokenizer beside it; module docstring)."""
    import torch

    from research_rl.config.schema import DebugModelConfig
    from research_rl.debug_model import build_debug_model

    debug = out / "debug_model"
    build_debug_model(str(debug), str(ROOT / "data/corpus/corpus.jsonl"),
                      [str(ROOT / "data/musique/train.jsonl"), str(ROOT / "data/hotpotqa/train.jsonl")],
                      DebugModelConfig())
    if preset == "debug":
        return debug
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from research_rl.learner.memory import KNOWN_SHAPES

    s = KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"]
    config = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         tie_word_embeddings=s.tied, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    path = out / preset
    model.save_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(debug)
    tokenizer.save_pretrained(str(path))
    GenerationConfig.from_pretrained(debug).save_pretrained(str(path))  # the EOS ids RolloutWorker reads
    del model
    return path


# ---------------------------------------------------------------------------------------------------- memory
class RssSampler:
    """Samples the summed resident set of ``pids`` every ``interval_s`` seconds in a thread, between ``start()`` and
    ``stop()``; ``stop()`` returns (peak sum − sum at start, {pid: peak − start}) in bytes."""

    def __init__(self, pids: list[int], interval_s: float = 0.005):
        self.pids, self.interval_s = pids, interval_s
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> dict[int, int]:
        out = {}
        for pid in self.pids:
            with open(f"/proc/{pid}/statm") as f:
                out[pid] = int(f.read().split()[1]) * self._page
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._rss()
            self._peak_sum = max(self._peak_sum, sum(now.values()))
            for pid, v in now.items():
                self._peak[pid] = max(self._peak[pid], v)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._base = self._rss()
        self._peak, self._peak_sum = dict(self._base), sum(self._base.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> tuple[int, dict[int, int]]:
        self._stop.set()
        self._thread.join()
        now = self._rss()  # a sync shorter than one interval still gets a sample after it
        self._peak_sum = max(self._peak_sum, sum(now.values()))
        for pid, v in now.items():
            self._peak[pid] = max(self._peak[pid], v)
        return self._peak_sum - sum(self._base.values()), {p: self._peak[p] - self._base[p] for p in self.pids}


# ---------------------------------------------------------------------------------------------------- actors
def bench_actors():
    """``@ray.remote`` subclasses of the two role shells with the legacy sync's calls (bench only)."""
    import ray
    import torch

    from research_rl.roles.learner_worker import LearnerWorker
    from research_rl.roles.rollout_worker import RolloutWorker

    @ray.remote
    class BenchLearner(LearnerWorker.__ray_actor_class__):
        def legacy_buckets(self, bucket_mb: int) -> list:
            """The old ``LearnerWorker.weight_buckets``: each fp32 bucket dict put in the object store as soon as
            it is gathered; the ObjectRefs (rank 0)."""
            return [ray.put(b) for b in self.learner.weight_buckets(bucket_mb)]

    @ray.remote
    class BenchEngine(RolloutWorker.__ray_actor_class__):
        def legacy_load(self, refs: list, policy_version: int) -> dict:
            """The old ``RolloutWorker.load_weights``: ``ray.get`` each bucket, one at a time, and copy it in."""
            names, nbytes = set(), 0
            for ref in refs:
                bucket = ray.get(ref)
                nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
                names.update(bucket)
                self.engine.load_weights(bucket)
                del bucket
            missing = self.engine.parameter_names() - names
            if missing:
                raise RuntimeError(f"legacy sync left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}")
            self.policy_version = policy_version
            return {"bytes": nbytes, "tensors": len(names)}

        @torch.no_grad()
        def zero_weights(self) -> None:
            for p in self.engine.model.parameters():
                p.zero_()

    return BenchLearner, BenchEngine


def start_roles(model_dir: Path):
    from research_rl.config.schema import AlgoConfig, LearnerConfig, RolloutConfig
    from research_rl.retrieval.client import RetrieverClient
    from research_rl.roles.group import WorkerGroup

    learner_cls, engine_cls = bench_actors()
    learners = WorkerGroup.start("learner", learner_cls, [{"num_cpus": 1}], lambda r: (
        LearnerConfig(), AlgoConfig(), r, 1, "float32", False))
    learners.init_process_group()
    learners.call("load_policy", str(model_dir))
    retriever = RetrieverClient(url="http://127.0.0.1:9")  # never called: nothing is generated
    engines = WorkerGroup.start("rollout", engine_cls, [{"num_cpus": 1}], lambda r: (
        RolloutConfig(hf_dtype="bfloat16"), str(model_dir), retriever, 3, "bfloat16", 256))
    engines.call("ready")
    return learners, engines


def probe_diff(learners, engines, sequence: list[int]) -> float:
    learner_lp = learners.first("probe_log_probs", sequence)
    return float((engines.call("probe_log_probs", sequence)[0] - learner_lp).abs().mean())


# ---------------------------------------------------------------------------------------------------- one row
def measure(name: str, requested: str | None, placement: str, learners, engines, sequence: list[int],
            args) -> dict:
    """One row (module docstring) over the given learner and engine groups."""
    from research_rl.driver.weight_sync import WeightSync

    pids = [learners.first("where")["pid"], engines.call("where")[0]["pid"]]
    t0 = time.perf_counter()
    if requested is None:
        def sync(version: int) -> dict:
            t = time.perf_counter()
            refs = learners.first("legacy_buckets", args.bucket_mb)
            put = time.perf_counter() - t
            stats = engines.call("legacy_load", refs, version)[0]
            n, refs = len(refs), None
            return {"sync/bytes": float(stats["bytes"]), "sync/buckets": float(n), "sync/tensors": stats["tensors"],
                    "sync/seconds": time.perf_counter() - t, "put_seconds": put}
        dtype = "float32"
    else:
        route = WeightSync(learners, engines, requested, placement, args.bucket_mb)
        if route.route.transport != requested:
            raise RuntimeError(f"asked for {requested}, the sync chose {route.route.transport}")
        sync, dtype = route.sync, route.route.dtype
    setup_s = time.perf_counter() - t0
    plan = learners.call_rank(0, "sync_plan", dtype, args.bucket_mb)
    params = sum(b.numel for b in plan)
    seconds, rss, per_pid, metrics, zeroed = [], [], [], [], None
    for i in range(1 + args.repeats):  # sync 0: the warm-up
        if i == args.repeats:
            engines.call("zero_weights")
            zeroed = probe_diff(learners, engines, sequence)
        sampler = RssSampler(pids)
        sampler.start()
        m = sync(i + 1)
        peak, by_pid = sampler.stop()
        rss.append(peak)
        per_pid.append(by_pid)
        metrics.append(m)
        if i > 0:
            seconds.append(m["sync/seconds"])
        print(f"  {name} sync {i}{' (warm-up)' if i == 0 else ''}: {m['sync/seconds']:.3f} s, "
              f"{m['sync/bytes'] / 2**20:.1f} MiB, peak RSS +{peak / 2**20:.0f} MiB", flush=True)
    after = probe_diff(learners, engines, sequence)
    worst = max(range(len(rss)), key=rss.__getitem__)
    last = metrics[-1]
    itemsize = 4 if dtype == "float32" else 2
    return {"transport": name, "placement": placement, "wire_dtype": dtype, "seconds": statistics.median(seconds),
            "seconds_all": seconds, "setup_seconds": setup_s, "bytes": last["sync/bytes"], "params": params,
            "bytes_per_param": last["sync/bytes"] / params,
            "plan_bytes": sum(b.nbytes for b in plan) if requested else params * itemsize,
            "padding_bytes": last["sync/bytes"] - params * itemsize, "buckets": last["sync/buckets"],
            "tensors": last["sync/tensors"], "peak_rss_bytes": max(rss), "peak_rss_bytes_warmup": rss[0],
            "peak_rss_bytes_timed": max(rss[1:]), "learner_peak_rss_bytes": per_pid[worst][pids[0]],
            "engine_peak_rss_bytes": per_pid[worst][pids[1]], "probe_mean_abs_diff": after,
            "probe_mean_abs_diff_zeroed": zeroed,
            **({"put_seconds": statistics.median(m["put_seconds"] for m in metrics[1:])} if requested is None else {})}


def stop_roles(*groups) -> None:
    import ray

    for group in groups:
        for actor in group.actors:
            ray.kill(actor)
    time.sleep(1.0)  # the processes exit and return their memory before the next row


# ---------------------------------------------------------------------------------------------------- main
def table(result: dict) -> str:
    lines = ["| transport | placement | wire dtype | s/sync | bytes | params | bytes/param | peak RSS Δ MiB "
             "(learner + engine) | probe mean abs diff | speedup vs legacy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speed = result["speedup_vs_legacy"].get(r["transport"], 1.0)
        lines.append(f"| {r['transport']} | {r['placement']} | {r['wire_dtype']} | {r['seconds']:.3f} | "
                     f"{r['bytes']:.0f} | {r['params']} | {r['bytes_per_param']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} ({r['learner_peak_rss_bytes'] / 2**20:.0f} + "
                     f"{r['engine_peak_rss_bytes'] / 2**20:.0f}) | {r['probe_mean_abs_diff']:.2e} | {speed:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from research_rl.config.schema import LearnerConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("debug", "qwen2.5-0.5b"), default="debug")
    p.add_argument("--repeats", type=int, default=5, help="timed syncs per transport, after one warm-up")
    p.add_argument("--quick", action="store_true",
                   help="2 timed syncs per transport, every transport over one learner/engine pair (a check that it "
                        "runs; memory figures are then affected by the rows before)")
    p.add_argument("--bucket-mb", type=int, default=LearnerConfig().weight_sync_bucket_mb,
                   help="MiB per bucket (learner.weight_sync_bucket_mb), for every row")
    p.add_argument("--transports", default=",".join(t[0] for t in TRANSPORTS), help="comma-separated subset")
    p.add_argument("--json", help="write the settings and rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    chosen = [t for t in TRANSPORTS if t[0] in args.transports.split(",")]
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    # the actors import research_rl from this checkout, whatever the installed package points at
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    import ray
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        t0 = time.perf_counter()
        model_dir = build_models(args.preset, Path(tmp))
        print(f"built {args.preset} in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
        sequence = AutoTokenizer.from_pretrained(model_dir).encode(PROBE_TEXT)
        ray.init(num_cpus=2, include_dashboard=False)
        rows = []
        try:
            shared = start_roles(model_dir) if args.quick else None
            for name, requested, placement in chosen:
                load = os.getloadavg()[0]
                print(f"{name} ({placement}; load average {load:.1f})", flush=True)
                roles = shared or start_roles(model_dir)
                try:
                    row = measure(name, requested, placement, *roles, sequence, args)
                finally:
                    if shared is None:
                        stop_roles(*roles)
                row["load_average_before"], row["load_average_after"] = load, os.getloadavg()[0]
                rows.append(row)
        finally:
            ray.shutdown()
    by_name = {r["transport"]: r for r in rows}
    legacy = by_name.get("legacy_object_store")
    speedup = {r["transport"]: legacy["seconds"] / r["seconds"] for r in rows
               if legacy and r is not legacy}
    goals = {f"{t}_3x_faster_than_legacy": speedup[t] >= 3.0 for t in ("ipc", "collective") if t in speedup}
    new = [r for r in rows if r is not legacy]
    goals["bytes_eq_params_x2"] = bool(new) and all(r["bytes"] == 2 * r["params"] for r in new)
    goals["bytes_eq_params_x2_plus_alignment"] = bool(new) and all(r["bytes"] == r["plan_bytes"] for r in new)
    result = {"preset": args.preset, "settings": {"repeats": args.repeats, "bucket_mb": args.bucket_mb,
                                                  "cpus": 2, "actor_num_cpus": 1},
              "rows": rows, "speedup_vs_legacy": speedup, "goals": goals}
    print()
    print(table(result))
    print("goals:", ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in goals.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
