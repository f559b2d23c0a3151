"""Every benchmark script in bench/ starts and parses its arguments (``--help``) without its heavy dependencies:
compare_trl.py must not need TRL for that, run_all.py must not need any benchmark to have run. The benchmarks
themselves are run by ``bench/run_all.py`` (docs/benchmarks.md), not by the test suite: they take minutes. Two run
here at their smallest settings, for the invariants their figures rest on: the weight-sync benchmark (real Ray
actors, debug model: bytes on the wire per parameter per transport, the engine back on the learner's policy) and
the GPU check's CPU smoke mode (with Ray, Hydra, vLLM and pyserini made unimportable, as on the bare GPU machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


@pytest.mark.unit
def test_run_all_knows_every_benchmark():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    gpu_only = {s[:-3] for s in SCRIPTS if s.startswith("gpu_check")}  # run on a GPU machine, not by make bench
    assert set(run_all.NAMES) == {s[:-3] for s in SCRIPTS} - {"run_all"} - gpu_only
    assert set(run_all.QUICK) == set(run_all.NAMES)


@pytest.mark.unit
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--json" in out.stdout or script == "run_all.py", f"bench/{script} has no --json output"


@pytest.mark.ray
def test_weight_sync_bench_rows_hold_the_wire_invariants(tmp_path):
    out = tmp_path / "ws.json"
    run = subprocess.run([sys.executable, "bench/weight_sync.py", "--preset", "debug", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["transport"]: r for r in result["rows"]}
    assert result["preset"] == "debug"
    assert set(rows) == {"legacy_object_store", "object_store", "ipc", "collective"}
    params = rows["legacy_object_store"]["params"]
    assert params > 0 and all(r["params"] == params for r in rows.values())
    legacy = rows["legacy_object_store"]
    assert legacy["wire_dtype"] == "float32" and legacy["bytes"] == params * 4  # fp32 tensors, no layout padding
    for name in ("object_store", "ipc", "collective"):
        r = rows[name]
        assert r["wire_dtype"] == "bfloat16"
        # bf16 on the wire: exactly params × 2 (every bf16 tensor of the debug model fills the 16-byte alignment of
        # a bucket), exactly the plan's bucket bytes
        assert r["bytes"] == r["plan_bytes"] == params * 2
        assert result["speedup_vs_legacy"][name] == pytest.approx(legacy["seconds"] / r["seconds"])
    for r in rows.values():
        assert r["seconds"] > 0 and len(r["seconds_all"]) == 2 and r["peak_rss_bytes"] >= 0
        # zeroed engine weights (uniform log-probs) are far from the learner's policy (0.23 per token for the seeded
        # debug model); after the sync the bf16 engine is back on it, within bf16 rounding
        assert r["probe_mean_abs_diff_zeroed"] > 0.1 > 0.01 > r["probe_mean_abs_diff"]
    assert set(result["goals"]) >= {"ipc_3x_faster_than_legacy", "collective_3x_faster_than_legacy",
                                    "bytes_eq_params_x2_plus_alignment"}
    assert result["goals"]["bytes_eq_params_x2_plus_alignment"] is True


BLOCK_IMPORTS = """
import sys

class _Absent:
    # what the bare GPU machine lacks: importing any of it fails there, so it fails here too
    NAMES = {"ray", "hydra", "omegaconf", "vllm", "pyserini"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")
        return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.unit
def test_gpu_check_smoke_runs_with_torch_and_transformers_only(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_IMPORTS)  # also imported by the spawned receiver process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] is True and result["smoke"] is True and result["errors"] == {}
    ipc = result["ipc"]
    assert ipc["bit_equal"] is True and ipc["tensors_checked"] == ipc["tensors"] and not ipc["mismatched"]
    assert ipc["buckets"] > 2 and len(ipc["seconds_all"]) == 2  # several buckets: both slots, reused
    assert ipc["params"] * 2 <= ipc["bytes"] < ipc["params"] * 2 + 16 * ipc["tensors"]  # the 16-byte alignment
    for key in ("probe", "probe_sharpened", "probe_after_step"):
        p = result[key]
        assert p["tokens"] == result["seqs"] * (result["seq_len"] - 1)
        assert 0 < p["mean_abs_diff"] <= p["max_abs_diff"] and p["within_probe_tolerance"] is True
    # the sync after the step carried the learner's (sharpened) weights: the engine's logits stayed sharpened
    assert result["probe_after_step"]["engine_logit_std"] == pytest.approx(
        result["probe_sharpened"]["engine_logit_std"], rel=0.05)
    assert result["probe_sharpened"]["engine_logit_std"] > 2 * result["probe"]["engine_logit_std"]
    step = result["fsdp2_step"]
    assert step["ok"] is True and step["backend"] == "gloo" and step["max_param_change"] > 0


def _schedule_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import schedule
    finally:
        sys.path.pop(0)
    return schedule


@pytest.mark.unit
def test_schedule_model_overlap_arithmetic():
    st = _schedule_module().step_times
    # R = L, nothing else: overlapping rollout and training halves the step
    r = st(1.0, 1.0, 0.0, 1.0, 1.0, 0.0)
    assert r["step_s"] == {"sync": 2.0, "one_step_off": 1.0, "async": 1.0}
    assert r["speedup_vs_sync"]["one_step_off"] == pytest.approx(2.0)
    # no learner time: nothing to hide the rollout behind
    assert st(3.0, 0.0, 0.0, 3.0, 0.0, 0.0)["speedup_vs_sync"]["one_step_off"] == pytest.approx(1.0)
    # the sync and the driver's work stay on the critical path; the overlap hides the shorter of R and L
    r = st(4.0, 2.0, 1.0, 4.0, 2.0, 1.0, driver=1.0)
    assert r["step_s"]["sync"] == pytest.approx(8.0) and r["step_s"]["one_step_off"] == pytest.approx(5.0)
    # async: a streaming rollout shorter than the learner's path leaves the learner's path plus the drain
    r = st(4.0, 2.0, 1.0, 4.0, 2.0, 1.0, R_async=1.5, drain=0.5)
    assert r["step_s"]["async"] == pytest.approx(2.5) and r["speedup_vs_sync"]["async"] == pytest.approx(7.0 / 2.5)
    with pytest.raises(ValueError):
        st(1.0, -1.0, 0.0, 1.0, 1.0, 0.0)


@pytest.mark.unit
def test_schedule_7b_projection_from_the_recipe():
    sch = _schedule_module()
    rec = sch.recipe_7b()
    assert rec["trajectories"] == 256 * 5 and rec["gpus"] == 64 and rec["max_response_len"] == 8192
    a = {k: v for k, (v, _) in sch.ASSUMPTIONS_7B.items()}
    p = sch.project_7b(rec)
    # learner: 1,280 × 2,700 tokens × 10 N FLOP on 64 GPUs at 30% of 989 TFLOP/s ≈ 13.9 s (docs/reproducing.md)
    assert p["sync_phases"]["L"] == pytest.approx(1280 * 2700 * 10 * 7.62e9 / (64 * 989e12 * 0.3))
    # rollout: the longest trajectory's decode steps at 20 sequences per engine
    assert p["sync_phases"]["R"] == pytest.approx(5000 * (0.007 + 20 * 6e-5))
    half = next(r for r in p["splits"] if r["rollout_gpus"] == 32)
    assert half["L"] == pytest.approx(2 * p["sync_phases"]["L"])
    # the async fixed point: the dropped share is the exponential tail's token share beyond the staleness cut
    tb = 0.007 + 40 * 6e-5
    c = (a["max_staleness"] + 1) * half["step_s"]["async"] / tb / a["generated_tokens_mean"]
    assert half["async_dropped_token_share"] == pytest.approx((1 + c) * math.exp(-c), rel=1e-3)
    assert half["R_async"] == pytest.approx(1000 * tb / (1 - half["async_dropped_token_share"]))
    assert all(r["learner_gpus"] >= a["min_learner_gpus"] for r in p["splits"])
    best = p["speedup_vs_sync_best_split"]["async"]
    assert best["speedup"] == max(r["speedup_vs_sync"]["async"] for r in p["splits"])


@pytest.mark.unit
def test_schedule_figures_from_metrics_jsonl(tmp_path):
    sch = _schedule_module()
    rows = [{"step": 0, "warmup/nll": 1.0}]
    for s in range(1, 5):
        rows.append({"step": s, "timing/step": 10.0 if s == 1 else 2.0, "timing/rollout": 1.0,
                     "timing/logprobs": 0.25, "timing/update": 0.5, "timing/sync": 0.25,
                     "timing/rollout_busy": 1.5, "rollout/generated_tokens": 100, "rollout/reward_mean": 0.1 * s,
                     "rollout/staleness_mean": 0.5, "rollout/dropped_stale": 1})
    rows.append({"step": 4, "val/em": 0.0})  # a later row of the same step is merged into it
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = sch.read_steps(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[-1]["val/em"] == 0.0
    f = sch.run_figures(steps, skip=1, rollout_workers=1)
    assert f["steps"] == 3 and f["first_step"] == 2 and f["wall_s"] == pytest.approx(6.0)
    assert f["step_s"] == pytest.approx(2.0) and f["tokens_per_s"] == pytest.approx(50.0)
    assert f["rollout_idle"] == pytest.approx(1 - 4.5 / 6.0) and f["learner_idle"] == pytest.approx(0.5)
    assert f["reward_mean"] == pytest.approx(0.3) and f["dropped_stale"] == 3 and f["missing_keys"] == []
    assert f["phases"] == pytest.approx({"R": 1.0, "L": 0.75, "S": 0.25, "W": 0.0, "O": 0.0})
    with pytest.raises(ValueError):
        sch.run_figures(steps, skip=4)
    # pairs: sync's s/step ÷ the schedule's, per pair
    runs = [{**f, "schedule": "sync", "pair": 0}, {**f, "schedule": "one_step_off", "pair": 0, "step_s": 1.0},
            {**f, "schedule": "async", "pair": 0, "step_s": 0.8}]
    agg = sch.aggregate(runs)
    assert agg["speedup_vs_sync"] == pytest.approx({"one_step_off": 2.0, "async": 2.5})
    assert agg["goals"] == {"one_step_off_1.4x_sync": True, "async_1.6x_sync": True}  # equal rewards
