"""Read a training run's rollouts on a terminal.

    python -m research_rl.inspect RUN_DIR --step N|latest [--num 3] [--dataset NAME] [--show-results]

Prints the first `--num` rollouts of `RUN_DIR/rollouts/step_NNNNNN.jsonl` (the rows the trainer's `_dump_rollouts`
writes, in group order: a question's rollouts are consecutive): question, gold answers, the extracted answer, the
reward and its reason (the format check that failed, "over length", or the answer's F1), the searches, and the
response. Each `<result>...</result>` block is folded to one line, `<result> [5 passages, 3,412 chars folded]
</result>`, unless `--show-results`; the observations `nothing to search` and `search failed` are shown as they are.
Passages are counted as the blank-line-separated parts of the block (how the agent loop joins them), so a passage
that itself holds a blank line counts twice. A `<result>` the model wrote itself is folded like an inserted one.

`--dataset NAME` keeps the rows of one dataset (the question file's folder name, e.g. `hotpotqa`). Rollout rows
carry no dataset, so their question ids are looked up in the question files of the run's config, read from its
newest checkpoint (`checkpoints/step_*/trainer_state.json`); paths are taken relative to the current directory,
then to the repository root.

Colours come from `rich` when it is installed and the output is a terminal; otherwise plain text.
Exit status 1, with a message on stderr, for a missing run directory or step (the available steps are listed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TextIO

from research_rl.rollout.agent_loop import EMPTY_QUERY_OBSERVATION, SEARCH_FAILED_OBSERVATION
from research_rl.data import DataError, iter_jsonl
from research_rl.algo.reward import exact_match, f1_score

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = ("step", "question_id", "question", "golden_answers", "response", "reward", "reason", "answer",
              "searches", "queries", "finish_reason", "response_len", "result_tokens")
_STEP_FILE = re.compile(r"^step_(\d+)\.jsonl$")
_RESULT_OPEN, _RESULT_CLOSE = "<result>", "</result>"


class InspectError(Exception):
    """A problem the user can fix (missing run directory or step, nothing to show); the message says what."""


# ---------------------------------------------------------------------------------------------- reading
def available_steps(run_dir: Path) -> list[int]:
    """Steps that have a `rollouts/step_*.jsonl` file, ascending ([] when there is no rollouts folder)."""
    folder = Path(run_dir) / "rollouts"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)) and p.is_file())


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 5, 8, 9] -> "1-3, 5, 8-9"."""
    parts: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        parts.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(parts)


def resolve_step(run_dir: Path, step: int | str) -> Path:
    """The rollouts file of `step` (an int, or "latest" for the newest).

    Raises InspectError: no such run directory, no rollouts in it, or no file for that step (names the steps there).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"run directory {run_dir} not found")
    steps = available_steps(run_dir)
    if not steps:
        raise InspectError(f"{run_dir} has no rollouts/step_*.jsonl: is it a training run's output directory "
                           f"(trainer.output_dir)? Rollouts are written after each GRPO step")
    if step == "latest":
        step = steps[-1]
    path = run_dir / "rollouts" / f"step_{step:06d}.jsonl"
    if step not in steps or not path.is_file():
        raise InspectError(f"no rollouts for step {step} in {run_dir / 'rollouts'}; available steps: {_ranges(steps)}")
    return path


def load_rollouts(path: Path) -> list[dict]:
    """The rows of a rollouts file. Raises DataError (`FILE:LINE: ...`) for a row that is not JSON or lacks a
    field `_dump_rollouts` writes."""
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [k for k in ROW_FIELDS if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: rollout row lacks {', '.join(missing)} (expected the fields "
                            f"{', '.join(ROW_FIELDS)})")
        rows.append(row)
    return rows


def _latest_config(run_dir: Path) -> dict | None:
    for state in sorted(Path(run_dir).glob("checkpoints/step_*/trainer_state.json"), reverse=True):
        try:
            return json.loads(state.read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def dataset_question_ids(run_dir: Path, dataset: str) -> set[str]:
    """Question ids of `dataset` among the run's question files (config `data.train_files` + `data.val_files`).

    Raises InspectError: no readable config in the run's checkpoints, or no question file of that dataset.
    """
    config = _latest_config(run_dir)
    if config is None:
        raise InspectError(f"--dataset needs the run's config, read from {run_dir}/checkpoints/step_*/"
                           f"trainer_state.json, and there is none (rollout rows do not name their dataset)")
    data = config.get("data") or {}
    files = [Path(f) for f in (data.get("train_files") or []) + (data.get("val_files") or [])]
    names = sorted({f.parent.name for f in files})
    chosen = [f for f in files if f.parent.name == dataset]
    if not chosen:
        raise InspectError(f"dataset {dataset!r} is not among the run's question files; its datasets: "
                           f"{', '.join(names) or '(none)'}")
    ids: set[str] = set()
    for f in chosen:
        path = f if f.is_file() or f.is_absolute() else ROOT / f
        if not path.is_file():
            raise InspectError(f"question file {f} of dataset {dataset!r} not found (looked in the current directory "
                               f"and in {ROOT})")
        ids.update(str(row.get("id")) for _, row in iter_jsonl(path))
    return ids


# ---------------------------------------------------------------------------------------------- rendering
def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def fold_results(response: str) -> str:
    """`response` with each `<result>...</result>` block folded to `<result> [k passages, m chars folded] </result>`.

    m counts the block's characters between the newlines the agent loop puts after `<result>` and before
    `</result>`. The special observations stay as they are. A block cut off by the length budget (no `</result>`)
    is folded to `<result> [..., cut off by the length budget]`.
    """
    out: list[str] = []
    pos = 0
    while (start := response.find(_RESULT_OPEN, pos)) != -1:
        body_start = start + len(_RESULT_OPEN)
        end = response.find(_RESULT_CLOSE, body_start)
        body = response[body_start:] if end == -1 else response[body_start:end]
        out.append(response[pos:start])
        inner = body.strip("\n")
        if inner.strip() in (EMPTY_QUERY_OBSERVATION, SEARCH_FAILED_OBSERVATION):
            folded = f"{_RESULT_OPEN} {inner.strip()} "
        else:
            passages = [p for p in inner.split("\n\n") if p.strip()]
            folded = f"{_RESULT_OPEN} [{_count(len(passages), 'passage')}, {len(inner):,} chars folded"
            folded += "; cut off by the length budget]" if end == -1 else "] "
        out.append(folded)
        if end == -1:
            pos = len(response)
            break
        out.append(_RESULT_CLOSE)
        pos = end + len(_RESULT_CLOSE)
    out.append(response[pos:])
    return "".join(out)


def render_rollout(row: dict, index: int, total: int, show_results: bool = False) -> str:
    """One rollout as terminal text: a header line, labelled fields, then the response."""
    golds = list(row["golden_answers"])
    answer = row["answer"]
    if answer is None:
        answer_line = "(none extracted)"
        scores = ""
    else:
        answer_line = answer
        scores = f"  (F1 {f1_score(answer, golds):.2f}, EM {exact_match(answer, golds):.0f})"
    queries = row["queries"] or []
    searches = str(row["searches"]) + (": " + "  ".join(json.dumps(q, ensure_ascii=False) for q in queries)
                                       if queries else "")
    response = row["response"] if show_results else fold_results(row["response"])
    lines = [
        f"━━ rollout {index} of {total} ━━ step {row['step']} ━━ question {row['question_id']}",
        f"question  {row['question']}",
        f"gold      {' | '.join(golds)}",
        f"answer    {answer_line}",
        f"reward    {float(row['reward']):.3f}  {row['reason']}{scores}",
        f"searches  {searches}",
        f"finish    {row['finish_reason']}, {_count(int(row['response_len']), 'generated token')} + "
        f"{_count(int(row['result_tokens']), 'result token')}",
        "response",
        response,
    ]
    return "\n".join(lines)


_STYLES = [  # (pattern, rich style) for terminal output
    (re.compile(r"^━━ .*$", re.M), "bold"),
    (re.compile(r"^(question|gold|answer|reward|searches|finish|response)\b", re.M), "bold blue"),
    (re.compile(r"</?(think|search|answer)>"), "bold cyan"),
    (re.compile(r"</?result>"), "bold magenta"),
    (re.compile(r"\[[\d,]+ passages?, [\d,]+ chars folded[^\]]*\]"), "dim"),
    (re.compile(r"\\boxed\{[^\n]*?\}"), "bold green"),
]


def emit(blocks: list[str], out: TextIO) -> None:
    """Write the blocks separated by blank lines: through rich with colours when it is installed and `out` is a
    terminal, plain text otherwise."""
    if out.isatty():
        try:
            from rich.console import Console
            from rich.text import Text
        except ImportError:
            Console = None
        if Console is not None:
            console = Console(file=out, highlight=False, soft_wrap=True)
            for i, block in enumerate(blocks):
                text = Text(block)
                for pattern, style in _STYLES:
                    text.highlight_regex(pattern, style)
                console.print(text)
                if i < len(blocks) - 1:
                    console.print()
            return
    out.write("\n\n".join(blocks) + "\n")
    out.flush()


# ---------------------------------------------------------------------------------------------- command line
def _int_arg(value: str, minimum: int, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} (>= {minimum}), got {n}")
    return n


def _step_arg(value: str) -> int | str:
    return value if value == "latest" else _int_arg(value, 0, "a step number or 'latest'")


def _num_arg(value: str) -> int:
    return _int_arg(value, 1, "a positive number of rollouts")


def inspect_run(run_dir: Path, step: int | str, num: int = 3, dataset: str | None = None,
                show_results: bool = False) -> list[str]:
    """The text blocks `main` prints: a summary line, then one block per rollout shown.

    Raises InspectError (see `resolve_step`, `dataset_question_ids`) and DataError (a malformed rollouts file).
    """
    path = resolve_step(run_dir, step)
    rows = load_rollouts(path)
    if not rows:
        raise InspectError(f"{path} holds no rollouts (trainer.rollouts_to_log=0?)")
    what = f"{len(rows)} rollouts"
    if dataset is not None:
        if all("dataset" in r for r in rows):
            keep = [r for r in rows if r["dataset"] == dataset]
        else:
            ids = dataset_question_ids(run_dir, dataset)
            keep = [r for r in rows if str(r["question_id"]) in ids]
        if not keep:
            raise InspectError(f"none of the {len(rows)} rollouts of {path} is from dataset {dataset!r}")
        what = f"{len(keep)} of {len(rows)} rollouts from {dataset}"
        rows = keep
    shown = rows[:num]
    mean = sum(float(r["reward"]) for r in rows) / len(rows)
    header = f"{path}: {what}, mean reward {mean:.3f}; showing {len(shown)}"
    return [header] + [render_rollout(r, i, len(rows), show_results) for i, r in enumerate(shown, 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research_rl.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run's output directory")
    parser.add_argument("--step", type=_step_arg, required=True, help="a step number, or 'latest'")
    parser.add_argument("--num", type=_num_arg, default=3, help="rollouts to show (default 3)")
    parser.add_argument("--dataset", default=None, help="only rollouts of this dataset, e.g. hotpotqa")
    parser.add_argument("--show-results", action="store_true", help="print <result> blocks in full")
    args = parser.parse_args(argv)
    try:
        blocks = inspect_run(args.run_dir, args.step, args.num, args.dataset, args.show_results)
    except (InspectError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    emit(blocks, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
