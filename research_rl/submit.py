"""Submit an experiment to a Ray cluster as a Ray job (the Python equivalent of ``launch/submit.sh``).

    python -m research_rl.submit EXPERIMENT [key=value ...] [--address URL] [--storage DIR] [--env K=V] [--pip SPEC]
                                 [--no-wait]

The config (``experiment=EXPERIMENT`` plus the overrides) is composed and checked here first
(``research_rl.config.preflight.check_submit``: the fields, the cross-field checks, placement, the vLLM settings), so
a bad override fails before anything reaches the cluster; the files are checked by the job itself on the cluster. The job runs ``python -m research_rl.train experiment=EXPERIMENT
ray.address=auto OVERRIDES`` on the head node with a runtime environment: this repository as the working
directory (without ``EXCLUDES``: virtualenvs, outputs, built artifacts), the environment variables in
``ENV_PASSTHROUGH`` that are set here (``HF_HOME``, tokens, NCCL settings) plus ``--env``, and optional ``--pip``
packages (Ray then builds a virtualenv per job: slow; prefer installing on the nodes). No hyperparameter lives here.

Paths are read on the cluster. A relative ``trainer.output_dir`` becomes ``--storage``/that path (default: this
repository's directory), and paths under excluded directories (``artifacts/``) become absolute, so both must be
on storage every node sees (a shared file system) on a multi-node cluster. The job id is printed and the logs are
followed; the exit status is 0 only when the job succeeded. Ctrl-C stops following, not the job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".git", ".venv", "venv*", ".ruff_cache", "outputs", "multirun", "artifacts", "data/full", ".pytest_cache", "**/__pycache__",
            "*.egg-info", "wandb", "*.log"]
ENV_PASSTHROUGH = ("HF_HOME", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "WANDB_API_KEY", "WANDB_MODE",
                   "WANDB_ENTITY", "TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                   "GLOO_SOCKET_IFNAME", "OPENAI_API_KEY")
# config keys holding paths the job reads or writes
PATH_KEYS = ("model.path", "retriever.index_dir", "data.corpus_path", "trainer.output_dir")


@dataclass
class Job:
    """What ``ray job submit`` gets: ``entrypoint`` (a shell command), ``runtime_env`` and ``submission_id``."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    notes: list[str]


def build_job(experiment: str, overrides: list[str], storage: str | None = None, env: list[str] = (),
              pip: list[str] = (), python: str = "python") -> Job:
    """Compose the config and check it alone (``preflight.check_submit``), then the job's entrypoint and runtime
    environment. ``notes`` carries the placement notes (idle GPUs) and where paths point on the cluster.

    Raises:
        research_rl.config.schema.ConfigError: a bad experiment or override (the key is named).
        ValueError: an ``--env`` entry that is not ``KEY=VALUE``.
    """
    from omegaconf import OmegaConf

    from research_rl.config.compose import compose_config
    from research_rl.config.preflight import check_submit
    from research_rl.config.schema import to_dict

    overrides = [o for o in overrides if not o.startswith("ray.address=")]
    cfg = compose_config([f"experiment={experiment}", *overrides, "ray.address=auto"])
    notes = check_submit(cfg)
    flat = OmegaConf.create(to_dict(cfg))
    extra = []
    base = Path(storage).resolve() if storage else ROOT
    for key in PATH_KEYS:
        value = OmegaConf.select(flat, key)
        if not value or Path(value).is_absolute():
            continue
        if key == "trainer.output_dir":
            target = base / value
            notes.append(f"{key}: the run writes to {target} (on the node running the driver; use shared storage "
                         "on a multi-node cluster: --storage DIR)")
        elif Path(value).parts[0] in EXCLUDES:  # not uploaded: a relative path would point into the job's copy
            target = ROOT / value
            notes.append(f"{key}: {value} is not uploaded ({Path(value).parts[0]}/ is excluded); the job reads "
                         f"{target}, which every node must see")
        else:
            continue
        extra.append(f"{key}={target}")
    # a job's output is a log, never a terminal: the Hugging Face libraries' progress bars off (their own setting)
    env_vars = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **{k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}}
    for item in env:
        if "=" not in item:
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        env_vars[k] = v
    runtime_env: dict = {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    entry = [python, "-m", "research_rl.train", f"experiment={experiment}", "ray.address=auto", *overrides, *extra]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Job(f"research-rl-{experiment}-{stamp}-{os.getpid()}", shlex.join(entry), runtime_env, notes)


AGENT_WAIT_S = 120.0  # a freshly started head answers "No available agent to submit job" for a while


def submit_with_retry(client, wait_s: float, **kwargs) -> str:
    """``client.submit_job(**kwargs)``, retried for up to ``wait_s`` seconds while the head's job agent is not up
    yet (a cluster that has just started); any other error is raised at once."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(job: Job, address: str, wait: bool = True) -> str:
    """Submit ``job`` to the cluster at ``address`` (the dashboard's http address); follow its logs when ``wait``.

    Returns the final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``) or ``PENDING``/``RUNNING`` without ``wait``.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = submit_with_retry(client, AGENT_WAIT_S, entrypoint=job.entrypoint, runtime_env=job.runtime_env,
                               submission_id=job.submission_id)
    print(f"submitted job {job_id} to {address}\n"
          f"  logs:   ray job logs --address {address} --follow {job_id}\n"
          f"  status: ray job status --address {address} {job_id}\n"
          f"  stop:   ray job stop --address {address} {job_id}", flush=True)
    if not wait:
        return str(client.get_job_status(job_id))
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running", file=sys.stderr)
        return str(client.get_job_status(job_id))
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can end just before the status does
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if status != JobStatus.SUCCEEDED and info.message else ""))
    return str(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research_rl.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a file in conf/experiment/ (without .yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="the cluster's dashboard address, e.g. http://HEAD_IP:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--storage", default=os.environ.get("RESEARCH_RL_STORAGE"),
                        help="directory every node sees; relative output dirs go under it "
                             "(default: $RESEARCH_RL_STORAGE, else this repository)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable")
    parser.add_argument("--pip", action="append", default=[], metavar="SPEC", help="pip package for the job's env")
    parser.add_argument("--python", default="python", help="the interpreter on the cluster (default: python)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the job id, runtime env (JSON) and entrypoint, one per line, and exit")
    args = parser.parse_args(argv)
    from research_rl.config.schema import ConfigError

    try:
        job = build_job(args.experiment, args.overrides, args.storage, args.env, args.pip, args.python)
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    for note in job.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.print_only:
        print(job.submission_id, json.dumps(job.runtime_env), job.entrypoint, sep="\n")
        return 0
    if not args.address:
        print("no cluster address: set RAY_ADDRESS=http://HEAD_IP:8265 or pass --address", file=sys.stderr)
        return 2
    status = submit(job, args.address, wait=not args.no_wait)
    accepted = ("PENDING", "RUNNING", "SUCCEEDED") if args.no_wait else ("SUCCEEDED",)
    return 0 if status in accepted else 1


if __name__ == "__main__":
    sys.exit(main())
