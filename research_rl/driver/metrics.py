"""Training logs people can read: console lines, ``metrics.jsonl`` (one JSON object per step) and a dashboard.

The dashboard is TensorBoard (``RUN_DIR/tensorboard``) by default, or Weights & Biases with ``trainer.logger=wandb``.
wandb is an optional extra (``pip install -e '.[wandb]'``), imported only when chosen. The W&B run id is kept in
``RUN_DIR/wandb_run_id`` so that a resumed training run keeps logging to the same W&B run. ``metrics.jsonl`` is
written either way (``research_rl.plot`` reads it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

CONSOLE_KEYS = ("rollout/reward_mean", "rollout/format_ok", "rollout/searches_per_traj", "rollout/response_len",
                "actor/kl", "actor/entropy", "actor/grad_norm", "timing/step")
BACKENDS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError("trainer.logger=wandb needs the wandb package, an optional extra: "
                          "pip install -e '.[wandb]' (or use trainer.logger=tensorboard)") from e
    return wandb


class MetricsLogger:
    """Writes each step's metrics to ``RUN_DIR/metrics.jsonl`` and the chosen dashboard.

    Args:
        run_dir: the run directory (created if missing).
        backend: ``tensorboard`` (``RUN_DIR/tensorboard``) or ``wandb``.
        project: W&B project (wandb only).
        name: W&B run name (wandb only).
        config: the resolved config as a plain dict, recorded with the W&B run (wandb only).
    Raises:
        ValueError: unknown backend.
        ImportError: ``wandb`` chosen but not installed (the message names the extra to install).
    """

    def __init__(self, run_dir: str | Path, backend: str = "tensorboard", project: str = "research-rl",
                 name: str | None = None, config: dict | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown metrics backend {backend!r}; expected one of {list(BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        if backend == "wandb":
            wandb = _import_wandb()
            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            self._wandb = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config,
                                     dir=str(self.run_dir))
            id_file.write_text(run_id + "\n")
        else:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None and step >= 0:  # W&B steps must not decrease: warm-up rows (step -1) stay local
            self._wandb.log(scalars, step=step)
        if console:
            shown = [f"{k.split('/')[-1]}={metrics[k]:.3g}" for k in CONSOLE_KEYS if k in metrics]
            shown += [f"{k}={v:.3g}" for k, v in metrics.items() if k.startswith("val/") and k.count("/") == 1]
            tqdm.write(f"step {step:>4} | " + " ".join(shown))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    try:
        return float(v) if not isinstance(v, (str, bool, int)) else v
    except (TypeError, ValueError):
        return str(v)


def drop_rows_after(path: str | Path, step: int) -> None:
    """Remove the ``metrics.jsonl`` rows of steps after ``step`` (and a last line cut short by a kill): an
    interrupted run logged them after its last checkpoint, and the resumed run trains those steps again (so each
    step keeps one row). A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return

    def row_step(line: str) -> int | None:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if (s := row_step(line)) is not None and s <= step]
    if len(keep) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
        print(f"metrics.jsonl: dropped {len(lines) - len(keep)} rows logged after step {step} by the interrupted "
              "run (those steps are trained again)")
