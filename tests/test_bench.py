"""Every benchmark script in bench/ starts and parses its arguments (``--help``) without its heavy dependencies:
compare_trl.py must not need TRL for that, run_all.py must not need any benchmark to have run. The benchmarks
themselves are run by ``bench/run_all.py`` (docs/benchmarks.md), not by the test suite: they take minutes. Two run
here at their smallest settings, for the invariants their figures rest on: the weight-sync benchmark (real Ray
actors, debug model: bytes on the wire per parameter per transport, the engine back on the learner's policy) and
the GPU check's CPU smoke mode (with Ray, Hydra, vLLM and pyserini made unimportable, as on the bare GPU machine)."""

from __future__ import annotations

import json
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
