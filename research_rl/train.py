"""Entry point: ``python -m research_rl.train experiment=NAME [key=value ...]`` (Hydra; sweeps with ``-m``, each run
with its own output directory and Ray namespace, summarised by ``research_rl.sweep``).

The config is composed, converted to the typed ``Config`` and validated, then
``research_rl.config.preflight.check_train`` checks what the run uses (placement, the local CPUs, installed backends,
data files, the model directory, the retriever): a bad value or a missing file fails here, naming its key, before
the trainer is imported and before Ray or any actor starts. Then the run directory (``check_run_dir``): a run whose
saved ``config.yaml`` differs in anything but the run-control keys is refused with the differing keys listed
(``trainer.resume=force`` continues it anyway; ``trainer.output_dir=NEW_DIR`` starts another), and a finished run
prints "already finished at step N" and exits 0.

``trainer.output_dir`` defaults to ``outputs/<experiment_name>/<date>/<time>``, a fresh directory per run as in
Hydra's own default; name an existing directory to continue (or extend) its run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from research_rl.config.compose import CONF_DIR, exit_on_bad_overrides
from research_rl.config.preflight import check_run_dir, check_train
from research_rl.config.schema import ConfigError, load_config
from research_rl.data import DataError


def format_summary(s: dict) -> str:
    """The run's summary as printed at its end, from ``summary.json``'s object: steps and training time; the mean
    reward, format-correct rate and searches per trajectory of the first and last quarter of the steps (of the
    first and last 3 steps when ``reward_change`` is absent), with the reward's change, its standard error over
    trajectories and 95% interval (``research_rl.driver.curve``); validation before and after GRPO; where the
    run's files are."""
    from research_rl.driver.curve import describe

    lines = ["", "=" * 72, "research-rl run finished", "=" * 72]
    lines.append(f"steps:                 {s.get('steps')}  ({s.get('train_minutes')} min of GRPO training)")
    if s.get("history/reward_mean"):
        change = s.get("reward_change")
        k = change["quarter_steps"] if change else min(3, len(s["history/reward_mean"]))

        def first_last(key: str) -> str:
            h = s[f"history/{key}"]
            return f"{sum(h[:k]) / k:.3f} -> {sum(h[-k:]) / k:.3f}"

        if change:
            n = len(s["history/reward_mean"])
            lines.append(f"(first quarter: steps 1-{k}, {change['first']['trajectories']} trajectories; last quarter: "
                         f"steps {n - k + 1}-{n}, {change['last']['trajectories']} trajectories)")
            lines.append(f"mean reward:           {change['first']['mean']:.3f} -> {change['last']['mean']:.3f}   "
                         f"{describe(change)}")
            first, last = change["first"]["format_ok"], change["last"]["format_ok"]
            lines.append(f"format-correct rate:   {first:.3f} -> {last:.3f}")
        else:
            lines.append(f"(means of the first {k} and the last {k} steps)")
            lines.append(f"mean reward:           {first_last('reward_mean')}")
            lines.append(f"format-correct rate:   {first_last('format_ok')}")
        lines.append(f"searches / trajectory: {first_last('searches_per_traj')}")
    for label, key in (("validation before GRPO", "val_before"), ("validation after GRPO", "val_last")):
        v = s.get(key)
        if v:
            lines.append(f"{label + ':':<22} EM {v['val/em']:.3f}  F1 {v['val/f1']:.3f}  "
                         f"searches/question {v['val/searches_per_question']:.2f}")
    run = s.get("run_dir")
    lines.append(f"metrics (JSONL):       {run}/metrics.jsonl")
    if s.get("logger", "tensorboard") == "tensorboard":
        lines.append(f"TensorBoard logs:      {run}/tensorboard   (tensorboard --logdir {run}/tensorboard)")
    else:
        lines.append("dashboard:             Weights & Biases (trainer.logger=wandb)")
    lines += [f"rollouts per step:     {run}/rollouts/",
              f"checkpoint (HF):       {s.get('checkpoint')}/model"]
    if s.get("best"):
        b = s["best"]
        lines.append(f"best checkpoint:       {b['path']}/model   ({b['metric']} {b['value']:.3f} at step {b['step']})")
    lines += [f"summary:               {run}/summary.json", "=" * 72]
    return "\n".join(lines)


def per_run(dcfg: DictConfig) -> bool:
    """In a Hydra multirun (``-m``), give this run its own ``trainer.output_dir`` (the sweep's job directory, or
    ``<trainer.output_dir>/<job number>`` when the sweep sets it) and Ray namespace (``<ray.namespace>-<sweep>-<job
    number>``). Returns whether this is a multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return False
    given = any(o.split("=", 1)[0].lstrip("+") == "trainer.output_dir" for o in hc.overrides.task)
    dcfg.trainer.output_dir = (f"{dcfg.trainer.output_dir}/{hc.job.num}" if given else hc.runtime.output_dir)
    dcfg.ray.namespace = f"{dcfg.ray.namespace}-{Path(hc.sweep.dir).name}-{hc.job.num}"
    return True


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> dict:
    multirun = per_run(dcfg)
    try:
        cfg = load_config(dcfg)
        notes = check_train(cfg)
        finished = check_run_dir(cfg)
    except (ConfigError, FileNotFoundError, DataError) as e:
        if multirun:
            raise  # the sweep records this run as failed and goes on with the next one
        sys.exit(str(e))
    if finished:
        print(finished)
        return json.loads((Path(cfg.trainer.output_dir) / "summary.json").read_text())
    from research_rl.driver.metrics import plain_output, tee_output

    plain_output()  # before Ray starts: its workers inherit the setting

    with tee_output(Path(cfg.trainer.output_dir) / "train.log"):  # the run's console output, kept with the run
        for note in notes:
            print(note)
        from research_rl.driver.trainer import GRPOTrainer

        trainer = GRPOTrainer(cfg)
        try:
            trainer.setup()
            summary = trainer.run()
        except DataError as e:  # a malformed training file, read by setup before Ray starts
            if multirun:
                raise
            sys.exit(str(e))
        finally:
            trainer.cleanup()
        print(format_summary(summary))
    return summary


if __name__ == "__main__":
    exit_on_bad_overrides()  # an unknown key fails with "did you mean", before Hydra composes
    main()
