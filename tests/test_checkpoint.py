"""Checkpoint directories are committed atomically with a manifest written last; incomplete, truncated or corrupt
ones are skipped on resume with a warning that says why."""

import json
import warnings

import pytest

from research_rl.driver import checkpoint as ckpt

pytestmark = pytest.mark.unit


def _fill(tmp):
    """The files of a checkpoint (their contents do not matter here)."""
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    (tmp / "model" / "model.safetensors").write_bytes(b"x" * 16)
    (tmp / "sharded" / "dcp").mkdir(parents=True)
    (tmp / "sharded" / "learner.json").write_text('{"backend": "fsdp2", "world_size": 2}')
    (tmp / "sharded" / "dcp" / "__0_0.distcp").write_bytes(b"y" * 64)
    (tmp / "sharded" / "dcp" / "__1_0.distcp").write_bytes(b"z" * 64)


def _write(run, step, keep_last=5):
    tmp = ckpt.begin(run, step)
    _fill(tmp)
    assert ckpt.latest_valid(run) is None or ckpt.latest_valid(run).name != f"step_{step:06d}"  # invisible until commit
    return ckpt.commit(tmp, {"step": step}, keep_last)


def test_commit_prune_and_latest(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert ckpt.latest_valid(tmp_path).name == "step_000003"


def test_crash_mid_checkpoint_leaves_previous_one(tmp_path):
    _write(tmp_path, 1)
    tmp = ckpt.begin(tmp_path, 2)  # a crash here: shards written, no state, never renamed
    (tmp / "sharded").mkdir()
    (tmp / "sharded" / "learner.json").write_text("{}")
    assert ckpt.latest_valid(tmp_path).name == "step_000001"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # what is done to the newest checkpoint -> the reason the warning must give
    "truncated state": (lambda c: c / ckpt.STATE_FILE, _truncate, "trainer_state.json has"),
    "truncated shard": (lambda c: c / "sharded/dcp/__1_0.distcp", _truncate, "truncated"),
    "corrupt shard": (lambda c: c / "sharded/dcp/__0_0.distcp", _flip_a_byte, "corrupt"),
    "corrupt HF weights": (lambda c: c / "model/model.safetensors", _flip_a_byte, "corrupt"),
    "missing shard": (lambda c: c / "sharded/dcp/__1_0.distcp", lambda p: p.unlink(), "missing"),
    "no manifest": (lambda c: c / ckpt.MANIFEST, lambda p: p.unlink(), "manifest.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_falls_back_with_a_warning(tmp_path, damage):
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    target, act, reason = DAMAGE[damage]
    act(target(newest))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.latest_valid(tmp_path).name == "step_000001"
    messages = [str(w.message) for w in caught]
    assert any("step_000002" in m and reason in m for m in messages), messages
    assert json.loads((tmp_path / "checkpoints/step_000001" / ckpt.STATE_FILE).read_text())["step"] == 1


def test_best_links_a_step_checkpoint_and_survives_its_pruning(tmp_path):
    step1 = _write(tmp_path, 1, keep_last=1)
    best = ckpt.commit_best(ckpt.begin_best(tmp_path, step1))
    assert best == ckpt.best_dir(tmp_path) and ckpt.is_valid(best)
    # hard links: the same files, no second copy of the weights
    assert (best / "model" / "model.safetensors").stat().st_ino == (step1 / "model" / "model.safetensors").stat().st_ino
    _write(tmp_path, 2, keep_last=1)  # prunes step_000001
    assert not step1.exists() and ckpt.is_valid(best)
    assert json.loads((best / ckpt.STATE_FILE).read_text())["step"] == 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002"]  # best is never pruned or resumed
    assert ckpt.latest_valid(tmp_path).name == "step_000002"


def test_best_written_directly_replaces_the_previous_best(tmp_path):
    ckpt.commit_best(ckpt.begin_best(tmp_path, _write(tmp_path, 1)))
    tmp = ckpt.begin_best(tmp_path)  # a step that was not saved: the caller writes the checkpoint itself
    _fill(tmp)
    best = ckpt.commit_best(tmp, {"step": 7})
    assert json.loads((best / ckpt.STATE_FILE).read_text())["step"] == 7
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "step_000001"]  # no leftovers


def test_incomplete_best_is_refused_and_the_old_one_kept(tmp_path):
    ckpt.commit_best(ckpt.begin_best(tmp_path, _write(tmp_path, 1)))
    tmp = ckpt.begin_best(tmp_path)
    (tmp / "model").mkdir()  # no sharded state
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.commit_best(tmp, {"step": 2})
    assert json.loads((ckpt.best_dir(tmp_path) / ckpt.STATE_FILE).read_text())["step"] == 1
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.begin_best(tmp_path, tmp_path / "checkpoints" / "step_000009")


def test_resume_point_by_mode(tmp_path):
    run = tmp_path / "run"
    assert ckpt.resume_point(run, "never") is None and ckpt.resume_point(run, "auto") is None  # a new run
    _write(run, 1)
    _write(run, 2)
    assert ckpt.resume_point(run, "auto").name == "step_000002"
    assert ckpt.resume_point(run, str(run / "checkpoints/step_000001")).name == "step_000001"
    with pytest.raises(FileExistsError, match="already holds checkpoints; pass trainer.resume=auto"):
        ckpt.resume_point(run, "never")
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint directory: no readable manifest.json"):
        ckpt.resume_point(run, str(run / "checkpoints/step_000009"))


def test_resume_auto_with_every_checkpoint_invalid_says_what_was_found_and_what_to_do(tmp_path):
    run = tmp_path / "run"
    _write(run, 1)
    _write(run, 2)
    _truncate(run / "checkpoints/step_000002/sharded/dcp/__1_0.distcp")
    (run / "checkpoints/step_000001" / ckpt.MANIFEST).unlink()
    with warnings.catch_warnings(record=True), pytest.raises(ckpt.NoValidCheckpointError) as e:
        warnings.simplefilter("always")
        ckpt.resume_point(run, "auto")
    msg = str(e.value)
    assert f"trainer.resume=auto found no valid checkpoint in {run / 'checkpoints'}" in msg
    assert "step_000002: sharded/dcp/__1_0.distcp has 54 bytes, the manifest says 64 (truncated)" in msg
    assert "step_000001: no readable manifest.json (the checkpoint was not finished)" in msg
    assert msg.index("step_000002") < msg.index("step_000001")  # newest first, as resume tries them
    assert "trainer.resume=never and a new trainer.output_dir" in msg and "fix or remove the directories" in msg
    assert "pass resume=auto" not in msg
