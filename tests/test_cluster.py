"""A two-node Ray cluster on one machine (``ray start`` head + ``ray start --address`` worker), with a custom
resource ``fake_gpu`` standing in for the worker's GPUs: the debug experiment is submitted as a real Ray job
(``launch/submit.sh`` and ``python -m research_rl.submit``), must succeed and write its metrics, and every role
must land where the placement config says (GPU roles on the GPU node, the retriever on the CPU-only head)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{BIN}:{env['PATH']}"  # the job's `python` is this interpreter, as on a cluster's nodes
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def two_nodes():
    """Head: 2 CPUs, no GPUs, dashboard (job server). Worker: 4 CPUs and 2 ``fake_gpu``. Stopped with SIGTERM to
    the ``ray start --block`` processes (``ray stop`` would also stop other clusters on this machine)."""
    tmp = Path(tempfile.mkdtemp(prefix="rrc"))  # short: Ray's socket paths live under it
    # each node its own temporary directory, as on separate machines: two nodes sharing one would unpack a job's
    # working directory into the same runtime_resources folder at once, and a job could start on a half-written copy
    tmp_worker = Path(tempfile.mkdtemp(prefix="rrw"))
    gcs, dash = free_port(), free_port()
    common = ["--disable-usage-stats", "--block", "--temp-dir", str(tmp)]

    def own_ports() -> list[str]:  # not Ray's fixed defaults, which another cluster on this machine may hold
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={free_port()}", *own_ports(), *common],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait(lambda: _dashboard_up(address), 240, "the head's job server")
        procs.append(subprocess.Popen([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=4",
                                       '--resources={"fake_gpu": 2}', *own_ports(), *common[:-1], str(tmp_worker)],
                                      env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: _node_count(gcs) == 2, 240, "the worker node")
        _wait_for_job_agent(address)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp_worker, ignore_errors=True)


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up within {timeout} s")


def _dashboard_up(address: str) -> bool:
    import requests

    try:
        return requests.get(f"{address}/api/version", timeout=2).ok
    except requests.RequestException:
        return False


def _wait_for_job_agent(address: str) -> None:
    """The head's job agent starts after its dashboard; `ray job submit` fails until it is up."""
    from ray.job_submission import JobSubmissionClient

    from research_rl.submit import submit_with_retry

    client = JobSubmissionClient(address)
    job = submit_with_retry(client, 300, entrypoint="true")
    _wait(lambda: client.get_job_status(job).is_terminal(), 120, "a probe job")


def _node_count(gcs_port: int) -> int:
    out = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs_port}"], env=_env(),
                         capture_output=True, text=True).stdout
    return len(re.findall(r"^\s*1 node_", out, flags=re.M))


def _small_run(run_dir: Path, model: Path, index: Path) -> list[str]:
    return ["trainer.total_steps=1", "warmup.steps=2", "validation.every=0", "trainer.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_response_len=96", "placement.gpus_per_node=2",
            "placement.gpu_resource=fake_gpu", f"model.path={model}", f"retriever.index_dir={index}",
            f"trainer.output_dir={run_dir}"]


def _check_run(run_dir: Path, expected_gpu_roles: dict[str, float]) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 1 and "actor/loss" in r for r in rows), rows[-1]
    report = json.loads((run_dir / "placement.json").read_text())
    gpu_nodes = {nid for nid, n in report["nodes"].items() if n["resources"].get("fake_gpu")}
    cpu_nodes = set(report["nodes"]) - gpu_nodes
    assert len(gpu_nodes) == 1 and len(cpu_nodes) == 1, report["nodes"]
    for role, share in expected_gpu_roles.items():
        workers = report["roles"][role]
        assert {w["node_id"] for w in workers} == gpu_nodes, (role, workers)
        assert all(w["resources"].get("fake_gpu") == share for w in workers), (role, workers)
    assert {w["node_id"] for w in report["roles"]["retriever"]} == cpu_nodes  # placement.retriever_nodes=cpu_only
    return report


def test_submit_sh_runs_the_debug_experiment_colocated_on_two_nodes(two_nodes, debug_model_dir, bm25_index,
                                                                    tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch/submit.sh"), "debug_cpu", *_small_run(run_dir, debug_model_dir, bm25_index),
           "learner.num_workers=2", "rollout.num_workers=2", "learner.num_gpus_per_worker=1",
           "rollout.num_gpus_per_worker=1"]
    out = subprocess.run(cmd, env={**_env(), "RAY_ADDRESS": two_nodes, "PYTHON": sys.executable}, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = re.search(r"job id: (\S+)", out.stdout).group(1)
    assert f"Job '{job_id}' succeeded" in out.stdout + out.stderr
    _check_run(run_dir, {"learner": 0.5, "rollout": 0.5})  # each fake GPU shared by a rank and an engine


def test_python_submit_disaggregated_with_a_separate_reference(two_nodes, debug_model_dir, bm25_index, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "research_rl.submit", "debug_cpu", *_small_run(run_dir, debug_model_dir, bm25_index),
           "placement.mode=disaggregated", "learner.num_gpus_per_worker=1", "rollout.num_gpus_per_worker=0.5",
           "reference.placement=separate", "reference.num_gpus_per_worker=0.5", "--address", two_nodes]
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"job research-rl-debug_cpu-\S+: SUCCEEDED", out.stdout), out.stdout[-2000:]
    _check_run(run_dir, {"learner": 1.0, "rollout": 0.5, "reference": 0.5})


def test_a_job_that_fails_is_reported_as_failed(two_nodes, tmp_path):
    """A path that does not exist on the cluster: the job fails, and the submitter exits 1 saying so."""
    cmd = [sys.executable, "-m", "research_rl.submit", "debug_cpu", f"model.path={tmp_path}/no_model",
           f"trainer.output_dir={tmp_path}/run", "--address", two_nodes]
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert re.search(r"job research-rl-debug_cpu-\S+: FAILED", out.stdout), out.stdout[-2000:]
    assert "is not a model directory" in out.stdout
