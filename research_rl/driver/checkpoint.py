"""Checkpoint directories: written to a temporary directory and renamed only when complete.

Layout of ``RUN_DIR/checkpoints/step_000010/``::

    sharded/             the learner's own sharded state (research_rl.learner.core.Learner.save_checkpoint):
      learner.json         backend, world size (ZeRO stage)
      hf/                  the model's HF config and tokenizer (what export needs besides weights)
      dcp/                 FSDP2: torch.distributed.checkpoint of the sharded model and optimizer state dicts
      state/               DeepSpeed: engine.save_checkpoint (model states, per-rank ZeRO optimizer partitions)
    model/               Hugging Face model + tokenizer (trainer.save_hf_model, default on; what
                         ``AutoModelForCausalLM.from_pretrained``, the evaluator and checkpoints/best/model use)
    trainer_state.json   the run state (research_rl.driver.state.RunState: step, policy version, data cursor, RNG
                         states, validations, best, history) and the resolved config
    manifest.json        every other file with its size and SHA-256; written last

Resuming reads ``sharded/`` (exact model and optimizer state), never ``model/``. A directory only gets its final
name after every file and then the manifest are written, so a crash mid-checkpoint leaves at most a ``.tmp-*``
directory, which is ignored and cleaned up. A checkpoint is valid when its manifest parses and every listed file
is there with its size and checksum (a truncated or corrupted shard or state file fails), and the state file
parses; ``resume=auto`` skips an invalid newest checkpoint with a warning that says why, and fails naming every
checkpoint and why it is invalid when none is valid (``resume_point``).

``RUN_DIR/checkpoints/best/`` is a complete checkpoint of the same layout: the one with the best validation metric
(``validation.best_metric``). It is filled in ``.tmp-best`` (hard links to the step checkpoint's files when that
step was saved anyway, so it costs no space and survives the pruning of ``step_*``; copies where the file system
has no hard links) and then swapped in by two renames (old best aside, new best in, old best deleted): a reader
sees a complete best or, for the instant between the renames, none; never a partial one. It is not a ``step_*``
directory, so pruning and ``resume=auto`` ignore it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
SHARDED = "sharded"  # the learner's sharded state
BEST = "best"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def is_valid_model_dir(path: str | Path) -> bool:
    """An HF model directory with a config and at least one non-empty weights file."""
    path = Path(path)
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return (path / "config.json").is_file() and bool(weights) and all(w.stat().st_size > 0 for w in weights)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: str | Path) -> dict:
    """List every file under ``path`` (but the manifest) with its size and SHA-256 in ``manifest.json``, written
    last and atomically. Files are hashed on a few threads (hashlib releases the GIL). Returns the manifest."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_sha256, files))
    manifest = {"files": {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": d}
                          for p, d in zip(files, digests)}}
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(path / MANIFEST)
    return manifest


def check(path: str | Path, checksums: bool = True) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one.

    Complete: ``manifest.json`` parses; every file it lists exists with the listed size and (with ``checksums``,
    which reads every byte) SHA-256; it lists the state file and the sharded state's ``learner.json``; the state
    file parses with an integer ``step``.
    """
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (the checkpoint was not finished)"
    for required in (STATE_FILE, f"{SHARDED}/learner.json"):
        if required not in files:
            return f"{MANIFEST} does not list {required}"
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != entry["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated)"
        if checksums and _sha256(f) != entry["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (corrupt)"
    try:
        int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} has no step"
    return None


def is_valid(path: str | Path) -> bool:
    """A complete checkpoint (``check`` finds nothing wrong)."""
    return check(path) is None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint; invalid newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        reason = check(path)
        if reason is None:
            return path
        warnings.warn(f"checkpoint {path} is invalid: {reason}; trying the previous one", stacklevel=2)
    return None


class NoValidCheckpointError(FileNotFoundError):
    """``trainer.resume=auto`` found checkpoints, none of them valid (the message lists each and why)."""


def resume_point(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint a run with ``trainer.resume=resume`` continues from, or None to start from step 0.

    ``never``: None, and the run directory must hold no checkpoint. ``auto``: the newest valid checkpoint
    (``latest_valid``), None when there is none. A path: that checkpoint, which must be complete.

    Raises:
        FileExistsError: ``never`` and ``run_dir`` already holds checkpoints.
        NoValidCheckpointError: ``auto`` and every checkpoint is invalid (each is named with its reason).
        FileNotFoundError: the given path is not a complete checkpoint.
    """
    if resume == "never":
        if list_checkpoints(run_dir):
            raise FileExistsError(f"{run_dir} already holds checkpoints; pass trainer.resume=auto to continue that run "
                                  f"or trainer.output_dir=NEW_DIR to start a new one")
        return None
    if resume == "auto":
        found = latest_valid(run_dir)
        if found is None and list_checkpoints(run_dir):
            reasons = "; ".join(f"{p.name}: {check(p)}" for p in reversed(list_checkpoints(run_dir)))
            raise NoValidCheckpointError(
                f"trainer.resume=auto found no valid checkpoint in {Path(run_dir) / 'checkpoints'} ({reasons}). "
                "Start a new run with trainer.resume=never and a new trainer.output_dir, or fix or remove the "
                "directories named above (removing them all starts this run over from step 0)")
        return found
    reason = check(resume)
    if reason is not None:
        raise FileNotFoundError(f"trainer.resume={resume} is not a complete checkpoint directory: {reason}")
    return Path(resume)


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory to write the checkpoint of ``step`` into."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, keep_last: int) -> Path:
    """Write the state file and then the manifest, rename ``tmp`` to its final name, prune to the newest
    ``keep_last``."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    write_manifest(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / BEST


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another device, some network file systems)
        shutil.copy2(src, dst)
    return dst


def begin_best(run_dir: str | Path, source: str | Path | None = None) -> Path:
    """A fresh temporary directory for the next best checkpoint.

    With ``source`` (a complete checkpoint directory) it is filled with hard links to the source's files; without,
    it is empty for the caller to write a checkpoint into (then ``commit_best`` with the state).

    Raises:
        ValueError: ``source`` is not a complete checkpoint.
    """
    tmp = best_dir(run_dir).parent / f".tmp-{BEST}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if source is None:
        tmp.mkdir(parents=True)
    else:
        reason = check(source, checksums=False)
        if reason is not None:
            raise ValueError(f"{source} is not a complete checkpoint ({reason}); cannot make it the best one")
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
    return tmp


def commit_best(tmp: Path, state: dict | None = None) -> Path:
    """Write the state file (when given) and swap ``tmp`` in as ``checkpoints/best``. Returns the best directory.

    Raises:
        ValueError: ``tmp`` does not hold a complete checkpoint (nothing is swapped).
    """
    if state is not None:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        write_manifest(tmp)
    reason = check(tmp, checksums=False)  # the files were just written or linked from a checked checkpoint
    if reason is not None:
        raise ValueError(f"{tmp} is not a complete checkpoint ({reason}); best not updated")
    final = tmp.parent / BEST
    old = tmp.parent / f".old-{BEST}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
