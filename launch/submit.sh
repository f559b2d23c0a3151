#!/usr/bin/env bash
# Submit an experiment to a Ray cluster with `ray job submit` and follow its logs; exits 0 only if the job succeeded.
# Usage: RAY_ADDRESS=http://HEAD_IP:8265 launch/submit.sh EXPERIMENT [hydra overrides...] [-- extra ray job submit flags]
#   e.g. launch/submit.sh research_qwen2.5_7b_instruct trainer.output_dir=/shared/runs/r7b
# The config is validated here first (a bad override fails before anything is submitted). The job runs
#   python -m research_rl.train experiment=EXPERIMENT ray.address=auto [overrides...]
# with this repository as its working directory (minus .venv, outputs, artifacts, ...), the HF_*/WANDB_*/NCCL_*
# variables set here, and relative output paths made absolute (RESEARCH_RL_STORAGE, else this repository): see
# `python -m research_rl.submit --help`, the same in Python. No hyperparameters live here.
set -euo pipefail
cd "$(dirname "$0")/.."
exp="${1:?usage: launch/submit.sh EXPERIMENT [overrides...] [-- ray job submit flags]}"; shift
overrides=(); ray_flags=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; ray_flags=("$@"); break; fi
  overrides+=("$1"); shift
done
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://HEAD_IP:8265}"
py="${PYTHON:-.venv/bin/python}"; [ -x "$py" ] || py=python3
ray_bin="$(command -v ray || echo .venv/bin/ray)"
spec="$("$py" -m research_rl.submit --print "$exp" ${overrides[@]+"${overrides[@]}"})"
job_id="$(sed -n 1p <<<"$spec")"; runtime_env="$(sed -n 2p <<<"$spec")"; entrypoint="$(sed -n 3p <<<"$spec")"
eval "entry=($entrypoint)"  # the shell-quoted entrypoint back into words (ray job submit quotes each one)
echo "job id: $job_id"
exec "$ray_bin" job submit --address "$RAY_ADDRESS" --submission-id "$job_id" --runtime-env-json "$runtime_env" \
  ${ray_flags[@]+"${ray_flags[@]}"} -- "${entry[@]}"
