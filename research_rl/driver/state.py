"""The run state of a GRPO training run: what a checkpoint saves besides the learners' sharded state, and what
``summary.json`` reports.

``RunState`` holds the step and policy version, the best checkpoint so far (``validation.best_metric``, higher is
better, ties keep the earlier one), the validations before training and the last one (with its step), the per-step
history the summary prints (``reward_mean``, ``format_ok``, ``searches_per_traj``), each step's reward moments over
its trajectories (``research_rl.driver.curve``: the first-vs-last-quarter change and its standard error), the
warm-up's duration and final NLL, the GRPO training time, and, as of the last checkpoint, the data cursor
(``PromptStream.state_dict``) and the Python / NumPy / torch RNG states.

``trainer_state.json`` (``to_json``) keeps the top-level keys earlier checkpoints had (``step``,
``policy_version``, ``data_cursor``, ``rng``, ``train_seconds``, ``config``) and stores the rest as fields of their
own; ``from_json`` also reads the earlier layout, whose validation, best and history entries sat in a ``summary``
dict (``val_step``, ``best``, ``history/<key>``, ...).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from research_rl.driver.curve import quarter_change, step_moments

HISTORY_KEYS = ("reward_mean", "format_ok", "searches_per_traj")  # rollout/<key>, one value per step
STATE_VERSION = 2  # trainer_state.json layout; 1 (no "version" key) kept validation, best and history in "summary"


@dataclass
class Best:
    """The best validation so far: ``metric`` (``validation.best_metric``) had ``value`` at ``step``; the
    checkpoint is at ``path`` (``RUN_DIR/checkpoints/best``)."""

    metric: str
    step: int
    value: float
    path: str


def capture_rng() -> dict[str, list[int] | int]:
    """The Python, NumPy and torch (CPU) RNG states as JSON values (Python's state list ends with its position;
    NumPy's position is ``numpy_pos``)."""
    numpy_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": numpy_state[1].tolist(), "numpy_pos": int(numpy_state[2]),
            "torch": torch.get_rng_state().tolist()}


def restore_rng(rng: dict[str, list[int] | int]) -> None:
    """Set the Python, NumPy and torch RNGs to states from ``capture_rng``. States saved before ``numpy_pos`` was
    recorded are restored at position 624, where ``np.random.seed`` leaves it (the driver draws nothing from NumPy)."""
    random.setstate((3, tuple(rng["python"]), None))
    pos = rng["numpy_pos"] if "numpy_pos" in rng else 624
    np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), pos, 0, 0.0))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


@dataclass
class RunState:
    """Everything about a run's progress that is not model or optimizer state (module docstring)."""

    step: int = 0
    policy_version: int = 0  # the learner step whose weights the rollout engines hold
    best: Best | None = None
    val_before: dict[str, float] | None = None  # validation.before_training, at step 0
    val_last: dict[str, float] | None = None
    val_step: int | None = None  # the step of the last validation
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    # per step: [trajectories, reward sum, reward sum of squares, format-correct count] (curve.step_moments), or
    # None for a step whose metrics lacked them; empty in states saved before it was kept
    reward_moments: list[list[float] | None] = field(default_factory=list)
    warmup_seconds: float | None = None
    warmup_final_nll: float | None = None
    train_seconds: float = 0.0  # GRPO steps only (setup, warm-up and validation before training excluded)
    data_cursor: dict | None = None  # PromptStream.state_dict() as of the last checkpoint
    rng: dict[str, list[int]] | None = None  # capture_rng() as of the last checkpoint

    # ------------------------------------------------------------------ updates
    def record_step(self, metrics: dict[str, float]) -> None:
        """Append this step's ``rollout/<key>`` of every history key, and its reward moments."""
        for key in HISTORY_KEYS:
            self.history[key].append(metrics[f"rollout/{key}"])
        moments = step_moments(metrics)
        self.reward_moments.append(list(moments) if moments is not None else None)

    def reward_change(self) -> dict | None:
        """``curve.quarter_change`` over the steps so far; None when a step's moments are missing (a run resumed
        from a checkpoint saved before they were kept)."""
        if len(self.reward_moments) != len(self.history["reward_mean"]):
            return None
        return quarter_change([tuple(m) if m is not None else None for m in self.reward_moments])

    def record_validation(self, step: int, val: dict[str, float]) -> None:
        """The validation at ``step`` is the last one."""
        self.val_last, self.val_step = val, step

    def update_best(self, metric: str, val: dict[str, float], step: int, path: str) -> bool:
        """Make ``val[metric]`` at ``step`` the best if it beats the best so far (strictly; higher is better).
        Returns whether it did; the caller then writes the checkpoint to ``path``.

        Raises:
            ValueError: ``metric`` is not among the validation metrics (e.g. a dataset not validated on).
        """
        if metric not in val:
            raise ValueError(f"validation.best_metric={metric} is not a validation metric of this run; available: "
                             f"{sorted(k for k in val if not k.endswith('/n'))}")
        if self.best is not None and val[metric] <= self.best.value:
            return False
        self.best = Best(metric, step, val[metric], path)
        return True

    # ------------------------------------------------------------------ files
    def to_json(self, config: dict) -> dict:
        """The ``trainer_state.json`` object: the fields, ``config`` (the resolved config) and ``version``."""
        return {"version": STATE_VERSION, **dataclasses.asdict(self), "config": config}

    @classmethod
    def from_json(cls, state: dict) -> "RunState":
        """Read a ``trainer_state.json`` object of this layout or of the earlier one (``summary`` dict).

        Raises:
            KeyError: ``step`` is missing (``checkpoint.check`` rejects such a checkpoint first).
        """
        if "version" in state:
            fields = {f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state}
            summary = {}
        else:  # layout 1
            summary = state.get("summary") or {}
            fields = {k: state[k] for k in ("step", "policy_version", "train_seconds", "data_cursor", "rng")
                      if k in state}
            fields.update({k: summary[k] for k in ("val_before", "val_last", "val_step", "warmup_seconds",
                                                   "warmup_final_nll") if k in summary})
            fields["best"] = summary.get("best")
            fields["history"] = {k: list(summary.get(f"history/{k}", [])) for k in HISTORY_KEYS}
        fields["step"] = int(state["step"])
        fields.setdefault("policy_version", fields["step"])
        if isinstance(fields.get("best"), dict):
            fields["best"] = Best(**fields["best"])
        history = fields.get("history") or {}
        fields["history"] = {k: list(history.get(k, [])) for k in HISTORY_KEYS}
        return cls(**fields)

    def summary(self, run_dir: str, logger: str, checkpoint: str | None, dropped_prompts: int) -> dict:
        """The ``summary.json`` object (``research_rl.train.format_summary`` and ``research_rl.sweep`` read it):
        ``val_before``, ``val_last``, ``val_step``, ``best``, ``warmup_seconds``, ``warmup_final_nll`` when set,
        ``history/<key>`` once a step ran, ``reward_change`` (``reward_change()``) when there is one, then ``steps``,
        ``train_minutes``, ``run_dir``, ``logger``, ``checkpoint`` (the newest step checkpoint) and
        ``dropped_prompts``."""
        out: dict = {}
        for key in ("val_before", "val_step", "val_last", "warmup_seconds", "warmup_final_nll"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.best is not None:
            out["best"] = dataclasses.asdict(self.best)
        for key in HISTORY_KEYS:
            if self.history[key]:
                out[f"history/{key}"] = list(self.history[key])
        change = self.reward_change()
        if change is not None:
            out["reward_change"] = change
        out.update({"steps": self.step, "train_minutes": round(self.train_seconds / 60, 2), "run_dir": run_dir,
                    "logger": logger, "checkpoint": checkpoint, "dropped_prompts": dropped_prompts})
        return out
