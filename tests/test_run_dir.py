"""A run directory holds one run: its resolved config is saved, continuing it with another config is refused before
Ray starts (naming each differing key), run-control keys may change, ``trainer.resume=force`` goes on anyway, and a
finished run is reported as such. The checkpoints here are real checkpoint directories (``checkpoint.begin`` /
``commit``, with a manifest), holding a stand-in learner state."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from research_rl.config.compose import compose_config
from research_rl.config.preflight import CONFIG_FILE, check_run_dir, write_run_config
from research_rl.config.schema import ConfigError
from research_rl.driver import checkpoint as ckpt

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def cfg_for(run_dir: Path, *overrides: str):
    return compose_config(["experiment=debug_cpu", f"trainer.output_dir={run_dir}", *overrides])


def fake_run(run_dir: Path, step: int, finished: bool, *overrides: str) -> None:
    """A run of ``overrides`` that saved its config and a checkpoint at ``step`` (and, ``finished``, its summary)."""
    write_run_config(cfg_for(run_dir, *overrides), run_dir)
    tmp = ckpt.begin(run_dir, step)
    (tmp / ckpt.SHARDED).mkdir()
    (tmp / ckpt.SHARDED / "learner.json").write_text("{}")
    ckpt.commit(tmp, {"step": step}, keep_last=2)
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"steps": step}))


def test_default_output_dir_is_fresh_per_run_like_hydra():
    cfg = compose_config(["experiment=debug_cpu"])
    parts = Path(cfg.trainer.output_dir).parts
    assert parts[:2] == ("outputs", "debug_cpu") and len(parts) == 4  # outputs/EXP/DATE/TIME
    assert parts[2].count("-") == 2 and parts[3].count("-") == 2


def test_the_saved_config_is_resolved_with_absolute_paths(tmp_path):
    path = write_run_config(cfg_for(tmp_path, "learner.lr=3e-4"), tmp_path)
    text = path.read_text()
    assert path == tmp_path / CONFIG_FILE and "lr: 0.0003" in text and "${" not in text
    assert f"corpus_path: {ROOT / 'data/corpus/corpus.jsonl'}" in text


def test_a_changed_hyperparameter_is_refused_naming_each_key(tmp_path):
    fake_run(tmp_path, 2, False)
    with pytest.raises(ConfigError) as e:
        check_run_dir(cfg_for(tmp_path, "learner.lr=1e-3", "rollout.group_size=4"))
    msg = str(e.value)
    assert "2 key(s) differ" in msg and "learner.lr: 0.0005 -> 0.001" in msg and "rollout.group_size: 5 -> 4" in msg
    assert "trainer.output_dir=NEW_DIR" in msg and "trainer.resume=force" in msg
    assert check_run_dir(cfg_for(tmp_path, "learner.lr=1e-3", "rollout.group_size=4", "trainer.resume=force")) is None


def test_run_control_keys_may_change(tmp_path):
    fake_run(tmp_path, 2, False)
    assert check_run_dir(cfg_for(tmp_path, "trainer.total_steps=80", "trainer.save_every=1", "validation.every=0",
                                 "retriever.url=http://127.0.0.1:1", "ray.num_cpus=8", "eval.limit=3")) is None


def test_a_finished_run_says_so_unless_it_is_extended(tmp_path):
    fake_run(tmp_path, 4, True)
    assert check_run_dir(cfg_for(tmp_path)).startswith(f"{tmp_path}: already finished at step 4")
    assert check_run_dir(cfg_for(tmp_path, "trainer.total_steps=60")) is None  # more steps: continue


def test_a_summary_older_than_the_newest_checkpoint_is_not_finished(tmp_path):
    fake_run(tmp_path, 4, True)
    fake_run(tmp_path, 6, False)  # extended, then killed after step 6: summary.json still says 4
    assert check_run_dir(cfg_for(tmp_path)) is None


def test_no_checkpoint_or_no_saved_config_means_nothing_to_compare(tmp_path):
    write_run_config(cfg_for(tmp_path), tmp_path)
    assert check_run_dir(cfg_for(tmp_path, "learner.lr=1e-3")) is None  # nothing to continue: a new run
    assert check_run_dir(cfg_for(tmp_path / "fresh", "learner.lr=1e-3")) is None


def test_the_train_entry_point_refuses_and_reports_before_ray(tmp_path, debug_model_dir, bm25_index):
    run = tmp_path / "run"
    base = ["experiment=debug_cpu", f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
            f"trainer.output_dir={run}", "trainer.total_steps=1", "validation.every=0"]
    cfg = compose_config(base)
    write_run_config(cfg, run)
    fake_run(run, 1, True, *base[1:])

    def train(*extra):
        return subprocess.run([sys.executable, "-m", "research_rl.train", *base, *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=180)

    changed = train("learner.lr=1e-3")
    assert changed.returncode == 1 and "learner.lr: 0.0005 -> 0.001" in changed.stderr, changed.stderr[-2000:]
    assert "Started a local Ray instance" not in changed.stdout + changed.stderr
    same = train()
    assert same.returncode == 0 and f"{run}: already finished at step 1" in same.stdout, same.stderr[-2000:]
    assert "Started a local Ray instance" not in same.stdout + same.stderr
