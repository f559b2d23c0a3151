"""Training logs people can read: console lines, ``metrics.jsonl`` (one JSON object per step), a dashboard, the
run's log file and progress that reads well in a terminal and in a file alike.

The dashboard is TensorBoard (``RUN_DIR/tensorboard``) by default, or Weights & Biases with ``trainer.logger=wandb``.
wandb is an optional extra (``pip install -e '.[wandb]'``), imported only when chosen. The W&B run id is kept in
``RUN_DIR/wandb_run_id`` so that a resumed training run keeps logging to the same W&B run. ``metrics.jsonl`` is
written either way (``research_rl.plot`` reads it). Warm-up rows are ``step`` -1 in ``metrics.jsonl`` (GRPO's axis
starts at 0) with their own ``warmup/step``, which is their step axis in TensorBoard; W&B, whose step never
decreases, gets GRPO steps only.

``tee_output`` copies everything the process prints (its own lines, Ray's worker lines, warnings, tracebacks) into
``RUN_DIR/train.log`` or ``evaluate.log``, without the progress bar's redraws. ``progress`` is a tqdm bar on a
terminal and, when the output is a file or a pipe (``ray job logs``, a redirected ``make demo``), a plain line at most
every ``PLAIN_PROGRESS_S`` seconds instead (tqdm's ``disable=None`` turns the bar off there); ``plain_output`` turns
the Hugging Face libraries' bars off there too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
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

    def log(self, step: int, metrics: dict[str, float], console: bool = True, axis_step: int | None = None) -> None:
        """One ``metrics.jsonl`` row at ``step`` and the dashboard's scalars; ``axis_step`` (the warm-up's own step)
        replaces ``step`` on the TensorBoard axis; ``console``: a ``step N | ...`` line too."""
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step if axis_step is None else axis_step)
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


# ------------------------------------------------------------------------------------------------ log file, progress

PLAIN_PROGRESS_S = 30.0  # seconds between plain progress lines when the output is not a terminal


class _Tee:
    """A text stream writing to ``stream`` and to ``file``; the file gets no carriage-return redraws (a progress
    bar's updates), only whole lines."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        if "\r" not in text:
            self.file.write(text)
            self.file.flush()
        return n

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the terminal's
        return getattr(self.stream, name)


@contextmanager
def tee_output(path: str | Path):
    """Copy stdout and stderr (and the logging handlers writing to them) into ``path`` (appended: a resumed run
    continues its log) while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr
    with path.open("a", encoding="utf-8") as f:
        sys.stdout, sys.stderr = _Tee(sys.stdout, f), _Tee(sys.stderr, f)
        loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]
        handlers = {h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)
                    and getattr(h, "stream", None) in saved}
        for h in handlers:
            h.setStream(sys.stdout if h.stream is saved[0] else sys.stderr)
        try:
            yield path
        finally:
            for h in handlers:
                h.setStream(saved[0] if h.stream is sys.stdout else saved[1])
            sys.stdout, sys.stderr = saved


class PlainProgress:
    """Progress as plain lines, ``desc: n/total unit (p%), elapsed, ~left [postfix]``, at most every ``every_s``
    seconds and when it completes: what a file or a pipe should get instead of a bar. Same calls as the tqdm bar
    (``update``, ``set_postfix``, ``close``)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = PLAIN_PROGRESS_S):
        self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
        self.start, self.start_n, self.last = time.monotonic(), initial, time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            print(self.line(now), flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = self.n - self.start_n
        left = f", ~{elapsed / done * (self.total - self.n) / 60:.1f} min left" if done and self.n < self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed / 60:.1f} min{left}"
                + (f" [{self.postfix}]" if self.postfix else ""))

    def close(self) -> None:
        pass


def plain_output() -> bool:
    """Whether the output is a file or a pipe rather than a terminal. Then the Hugging Face libraries' own bars
    ("Loading weights", downloads) are turned off with their setting, ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (unless it is
    set), in this process and the Ray workers it starts, which inherit the environment."""
    plain = not sys.stderr.isatty()
    if plain:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return plain


def progress(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar when stderr is a terminal, else a ``PlainProgress`` (tqdm's ``disable=None`` is off there)."""
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None)
    if not bar.disable:
        return bar
    return PlainProgress(total, desc, unit, initial)
