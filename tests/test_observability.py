"""What a user watches: warm-up metrics on their own TensorBoard step axis, the run's log file, plain progress lines
when the output is not a terminal, third-party INFO silenced, and the plot panels."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from research_rl.driver.metrics import MetricsLogger, PlainProgress, progress, tee_output
from research_rl.plot import plot_run, trailing_mean

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def test_warmup_rows_get_their_own_tensorboard_axis(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path)
    for i in (0, 10, 20):
        logger.log(-1, {"warmup/nll": 3.0 - i / 10, "warmup/step": i}, console=False, axis_step=i)
    logger.log(1, {"rollout/reward_mean": 0.5}, console=False)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("warmup/nll")] == [0, 10, 20]
    assert [e.step for e in acc.Scalars("rollout/reward_mean")] == [1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, -1, -1, 1]  # metrics.jsonl keeps GRPO's axis


def test_plain_progress_lines_when_not_a_terminal(capsys):
    bar = progress(4, "GRPO", "steps")  # pytest's captured stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    bar.every_s = 3600.0  # only the completion line, then
    bar.set_postfix(nll="2.000")
    for _ in range(4):
        bar.update(1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("GRPO: 4/4 steps (100%), ") and out[0].endswith("[nll=2.000]")
    every = PlainProgress(3, "warm-up", "steps", every_s=0.0)
    every.update(1)
    line = capsys.readouterr().out
    assert "warm-up: 1/3 steps (33%)" in line and "min left" in line and "\r" not in line


def test_the_log_file_holds_the_output_without_bar_redraws(tmp_path, capsys):
    import logging

    handler = logging.StreamHandler(sys.stderr)
    log = logging.getLogger("research_rl.test_observability")
    log.addHandler(handler)
    try:
        with tee_output(tmp_path / "train.log"):
            print("step    1 | reward_mean=0.5")
            sys.stderr.write("\rGRPO:  50%|█████     | 1/2")  # a tqdm redraw
            log.warning("retriever slow")
            print("error: something", file=sys.stderr)
    finally:
        log.removeHandler(handler)
    text = (tmp_path / "train.log").read_text()
    assert text == "step    1 | reward_mean=0.5\nretriever slow\nerror: something\n"
    assert "step    1" in capsys.readouterr().out  # the console still gets everything


def test_third_party_info_is_silenced_and_research_rl_info_kept():
    script = (
        "import logging, logging.config\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from research_rl.config.compose import CONF_DIR\n"
        "with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['experiment=debug_cpu'], return_hydra_config=True)\n"
        "logging.config.dictConfig(OmegaConf.to_container(cfg.hydra.job_logging, resolve=True))\n"
        "logging.getLogger('faiss.loader').info('Could not load library with AVX2 support')\n"
        "logging.getLogger('httpx').info('HTTP Request: POST /retrieve')\n"
        "logging.getLogger('research_rl.retrieval.client').info('retriever answered')\n"
        "logging.getLogger('faiss').warning('a real warning')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["INFO research_rl.retrieval.client: retriever answered",
                                        "WARNING faiss: a real warning"]


def test_trailing_mean():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([1.0, 3.0], 1) == [1.0, 3.0]


def test_plot_panels_for_what_the_readme_reports(tmp_path):
    rows = [{"step": -1, "time": 0.0, "warmup/nll": 3.0}]
    for s in range(1, 31):
        rows.append({"step": s, "time": 100.0 + 6 * s, "rollout/reward_mean": 0.1 + s / 100,
                     "rollout/reward_std": 0.05, "rollout/format_ok": 0.5 + s / 100,
                     "rollout/response_len": 300.0, "rollout/searches_per_traj": 1.0, "actor/kl": 0.01,
                     "actor/entropy": 2.0})
        if s % 10 == 0:
            rows.append({"step": s, "time": 101.0 + 6 * s, "val/em": 0.1, "val/f1": 0.2, "val/format_fail": 0.3,
                         "val/musique/em": 0.05, "val/hotpotqa/em": 0.15})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = {p.name for p in plot_run(tmp_path)}
    assert {"reward.png", "format_ok.png", "validation_format_fail.png", "validation_datasets.png",
            "reward_wallclock.png", "overview.png"} <= names
    assert {p.name for p in plot_run(tmp_path, tmp_path / "by_time", x="minutes", smooth=1)} == names
    with pytest.raises(ValueError, match="--smooth"):
        plot_run(tmp_path, smooth=0)
