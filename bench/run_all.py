"""Every benchmark in ``bench/`` at small settings, one report: ``run_all.json`` (machine-readable) and ``run_all.md``.

Runs, each as a subprocess with its own ``--json`` output (their printed tables go to ``OUT/<name>.log``):

- ``retriever``: ``bench/retriever.py --quick`` (HTTP service, Ray actor, Search-R1-style baseline, batch ceiling);
- ``learner``: ``bench/learner.py`` on the debug model, FSDP2 and DeepSpeed (when installed), one rank;
- ``rollout``: ``bench/rollout.py`` with the HF engine, turn_sync against async, against a retrieval service this
  script starts (``python -m retriever_service.serve`` on a free loopback port) and stops;
- ``compare_trl``: ``bench/compare_trl.py`` (research-rl against TRL's GRPOTrainer) with ``.venv-trl/bin/python``,
  only when that venv exists (``make install-trl``); otherwise recorded as skipped;
- ``weight_sync``: ``bench/weight_sync.py`` on the debug model, every transport and the legacy object-store sync;
- ``schedule``: ``bench/schedule.py --quick``, training schedules sync, one_step_off and async on the debug
  experiment (rollout and learner on separate cores), and its 7B projection.

``--full`` drops the quick settings and runs each script at its own defaults (far longer). The report records the
commit (``git rev-parse HEAD`` and whether the tree was dirty), every command line, the machine (CPU model, cores,
RAM, GPU, load average before and after each benchmark) and the versions of torch, ray, transformers and trl.
A benchmark that fails is recorded with its exit status and log tail; the others still run; the exit status is 1
then. Run from the repository root with the project's venv::

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/run_all.py \\
        [--out outputs/bench] [--only retriever,learner,rollout,compare_trl,weight_sync,schedule] [--full]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("retriever", "learner", "rollout", "compare_trl", "weight_sync", "schedule")
TRL_PYTHON = ROOT / ".venv-trl/bin/python"
WARM_MODEL = ROOT / "artifacts/bench_warm_model"  # shared by rollout and compare_trl (built by the first to need it)

QUICK = {
    "retriever": ["--quick", "--wait-idle", "10", "--retries", "0"],  # quick: a disturbed level is noted, not redone
    "learner": ["--preset", "debug", "--seq-len", "512", "--seqs", "8", "--micro-batch-size", "4", "--ranks", "1",
                "--steps", "3", "--warmup", "1"],
    "rollout": ["--engines", "hf", "--latencies-ms", "0,20", "--questions", "4", "--repeats", "1",
                "--max-response-len", "1024"],
    "compare_trl": ["--steps", "4", "--pairs", "2"],
    "weight_sync": ["--preset", "debug", "--repeats", "3"],
    "schedule": ["--quick"],
}


def _version(pkg: str, python: str = sys.executable) -> str | None:
    if python == sys.executable:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    out = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{pkg}'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    versions = {p: _version(p) for p in ("torch", "ray", "transformers", "deepspeed", "pyserini")}
    if TRL_PYTHON.exists():
        versions.update({f"{p} (.venv-trl)": _version(p, str(TRL_PYTHON)) for p in ("trl", "torch", "transformers")})
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def commit() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    return {"commit": head, "dirty": dirty}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the retrieval service exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the retrieval service at {url} was not ready after {timeout_s:.0f} s")


def run_one(name: str, args, out: Path) -> dict:
    json_path = out / f"{name}.json"
    log_path = out / f"{name}.log"
    extra = [] if args.full else QUICK[name]
    python = sys.executable
    server = None
    if name == "compare_trl":
        if not TRL_PYTHON.exists():
            return {"status": "skipped", "reason": f"{TRL_PYTHON.relative_to(ROOT)} not found (make install-trl)"}
        python = str(TRL_PYTHON)
        extra = [*extra, "--warm-model", str(WARM_MODEL), "--index", args.index]
    if name in ("retriever", "schedule"):
        extra = [*extra, "--index", args.index]
    if name == "rollout":
        url = f"http://127.0.0.1:{_free_port()}"
        serve = [sys.executable, "-m", "retriever_service.serve", "--index", args.index, "--port", url.rsplit(":", 1)[1]]
        server = subprocess.Popen(serve, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(out / "serve.log", "w"))
        extra = [*extra, "--url", url, "--warm-model", str(WARM_MODEL)]
    cmd = [python, f"bench/{name}.py", *extra, "--json", str(json_path)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        if server is not None:
            _wait_ready(extra[extra.index("--url") + 1], server, 120)
        with log_path.open("w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    except RuntimeError as e:
        rc, log_path = -1, None
        print(f"  {name}: {e}", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    row = {"status": "ok" if rc == 0 else "failed", "exit_status": rc, "command": " ".join(cmd),
           "seconds": round(time.perf_counter() - t0, 1), "load_average_before": load_before,
           "load_average_after": os.getloadavg()[0], "log": str(log_path) if log_path else None}
    if json_path.is_file():
        row["result"] = json.loads(json_path.read_text())
    if rc != 0 and log_path:
        row["log_tail"] = log_path.read_text()[-2000:]
    return row


# ---------------------------------------------------------------------------------------------------- markdown
def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Benchmarks at {report['commit']['commit'][:12]}{' (dirty tree)' if report['commit']['dirty'] else ''}",
             "", f"{report['date']}; {'full' if report['full'] else 'quick'} settings.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; "
             f"{m['platform']}, Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".", ""]
    lines += ["| benchmark | status | seconds | load average before → after | command |", "|---|---|---:|---|---|"]
    for name, b in report["benchmarks"].items():
        if b["status"] == "skipped":
            lines.append(f"| {name} | skipped: {b['reason']} | | | |")
            continue
        lines.append(f"| {name} | {b['status']} | {b['seconds']:.0f} | {b['load_average_before']:.1f} → "
                     f"{b['load_average_after']:.1f} | `{b['command']}` |")
    b = report["benchmarks"]
    r = b.get("retriever", {}).get("result")
    if r:
        lines += ["", "## Retriever (BM25 top-5)", "", "| system | clients | queries per request | requests/s | queries/s | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['system']} | {row['clients']} | {row['batch']} | {_fmt(row['requests_per_s'], '.0f')} | "
                         f"{_fmt(row['queries_per_s'], '.0f')} | {_fmt(row['p50_ms'], '.1f')} | "
                         f"{_fmt(row['p99_ms'], '.1f')} |")
    r = b.get("learner", {}).get("result")
    if r:
        lines += ["", "## Learner (one GRPO update)", "", "| preset | backend | ranks | seq | s/step | tokens/s per rank |",
                  "|---|---|---:|---:|---:|---:|"]
        for row in r:
            lines.append(f"| {row['preset']} | {row['backend']} | {row['ranks']} | {row['seq_len']} | "
                         f"{row['step_s']:.3f} | {row['tokens_per_s_per_rank']:.0f} |")
    r = b.get("rollout", {}).get("result")
    if r:
        lines += ["", f"## Rollout ({r['trajectories']} trajectories)", "",
                  "| engine | added latency ms | mode | wall s | tokens/s | searches/traj | speedup vs turn_sync |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['engine']} | {row['latency_ms']:.0f} | {row['mode']} | {row['wall_s']:.2f} | "
                         f"{row['tok_s']:.0f} | {row['searches']:.2f} | {row['speedup']:.2f} |")
    r = b.get("compare_trl", {}).get("result")
    if r:
        lines += ["", "## research-rl against TRL GRPOTrainer", "", r["setting"], "",
                  "| system | s/step | generated tokens/s | reward at last step | mean reward | reward, last half "
                  "| searches/traj |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, med in r["median"].items():
            lines.append(f"| {name} | {med['step_s']:.2f} | {med['tokens_per_s']:.0f} | {med['reward_last']:.3f} | "
                         f"{med['reward_mean']:.3f} | {med['reward_late']:.3f} | {med['searches_per_traj']:.2f} |")
        q = r["ratios"]
        lines += ["", f"TRL s/step ÷ research-rl s/step = {q['step_time_trl_over_rrl']:.2f}; research-rl tokens/s ÷ "
                  f"TRL tokens/s = {q['tokens_per_s_rrl_over_trl']:.2f}; reward at last step, research-rl − TRL = "
                  f"{q['reward_last_rrl_minus_trl']:+.3f}; reward over the last half of the steps, research-rl − TRL "
                  f"(mean over pairs) = {q['reward_late_rrl_minus_trl']:+.3f}."]
    r = b.get("weight_sync", {}).get("result")
    if r:
        lines += ["", f"## Weight sync ({r['preset']} model, 1 learner rank → 1 bf16 HF engine)", "",
                  "| transport | wire dtype | s/sync | bytes | params | peak RSS Δ MiB | speedup vs legacy |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['transport']} | {row['wire_dtype']} | {row['seconds']:.3f} | {row['bytes']:.0f} | "
                         f"{row['params']} | {row['peak_rss_bytes'] / 2**20:.0f} | "
                         f"{r['speedup_vs_legacy'].get(row['transport'], 1.0):.2f} |")
    r = b.get("schedule", {}).get("result")
    if r and r.get("per_schedule"):
        lines += ["", "## Training schedules (debug experiment, rollout and learner on separate cores)", "",
                  "| schedule | s/step | generated tokens/s | rollout idle | learner idle | reward mean | "
                  "speedup vs sync |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in r["per_schedule"].items():
            lines.append(f"| {name} | {m['step_s']:.2f} | {_fmt(m['tokens_per_s'], '.0f')} | "
                         f"{_fmt(m['rollout_idle'])} | {_fmt(m['learner_idle'])} | {m['reward_mean']:.3f} | "
                         f"{r['speedup_vs_sync'].get(name, 1.0):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/bench", help="directory for run_all.json, run_all.md and the logs")
    p.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    p.add_argument("--index", default=str(ROOT / "artifacts/bm25_index"), help="BM25 index")
    p.add_argument("--full", action="store_true", help="each benchmark at its own (long) defaults")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(NAMES)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; expected a subset of {','.join(NAMES)}")
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"), ("OMP_WAIT_POLICY", "PASSIVE"),
                       ("OPENAI_API_KEY", "unused"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "OMP_WAIT_POLICY")}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit(), "full": args.full,
              "arguments": sys.argv[1:] if argv is None else argv, "environment": env, "machine": machine(),
              "benchmarks": {}}
    # rollout builds the shared warm-up model when it is missing, so it runs before compare_trl
    for name in [n for n in NAMES if n in names]:
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load average {os.getloadavg()[0]:.1f})", flush=True)
        report["benchmarks"][name] = row = run_one(name, args, out)
        print(f"  {row['status']}" + (f" in {row['seconds']:.0f} s" if "seconds" in row else f": {row['reason']}"),
              flush=True)
        (out / "run_all.json").write_text(json.dumps(report, indent=2, default=str))  # partial results survive
    (out / "run_all.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'run_all.json'} and {out / 'run_all.md'}")
    return 0 if all(b["status"] != "failed" for b in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
