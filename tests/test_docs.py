"""The user documentation (README.md and docs/*.md) checked against the repository.

- Every relative link points to a file that exists, and every ``#anchor`` to a heading of its page (GitHub's slugs).
- Every ``python -m MODULE`` names a module that ``importlib.util.find_spec`` finds.
- Every command in a shell code block that carries config overrides (``a.b=value``) composes and validates with
  ``research_rl.config.compose.compose_config`` exactly as written: the line's own ``experiment=NAME`` (or the experiment
  argument of ``launch/local.sh`` / ``launch/submit.sh``), else ``experiment=debug_cpu``, plus all its overrides.
  A Hydra sweep value (``algo.kl_coef=0,0.001``) is composed once per value. ``hydra.*`` keys and flags (``-m``,
  ``--cfg``) are not config keys and are skipped. Code blocks labelled ``text`` are transcripts (commands shown
  with the error they print) and are not composed; blocks labelled python, yaml, json or toml hold no commands.
- Every config key written in inline code (``trainer.resume=auto``, ``retriever.timeout_s``) exists in the typed
  schema (``research_rl.config.schema.Config``). Inline values may be placeholders (``eval.files=[PATH,...]``), so only the
  key is checked there.

- Every file a doc names inside a checkpoint (a line about ``checkpoints/``) is in the layout that
  research_rl/driver/checkpoint.py documents and writes (``checkpoint_names``).
- Every entry point (a top-level ``research_rl`` module with a ``__main__`` block) is named in the README as
  ``python -m research_rl.NAME``.
- The demo's figures in the README agree with the experiment ``make demo`` runs (``demo_problems``): the step
  budget and the time budget it stops on, the number of validation questions and the validated steps.

The self-tests at the end feed each checker a known-bad input, so a checker that stopped checking fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from research_rl.config.compose import compose_config
from research_rl.config.schema import Config, ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
PYTHON_M = re.compile(r"\bpython(?:3(?:\.\d+)?)?\s+-m\s+([A-Za-z_][\w.]*)")
OVERRIDE = re.compile(r"^[+~]?([A-Za-z_][\w-]*(?:\.[\w-]+)+)=(.*)$")
LAUNCH = re.compile(r"(?:^|/)launch/(?:local|submit)\.sh$")
NOT_COMMANDS = {"text", "python", "py", "yaml", "yml", "json", "toml", "mermaid", "diff", "ini"}
FILE_SUFFIX = re.compile(r"\.(py|md|ya?ml|jsonl?|sh|txt|csv|png|pt|npy|faiss|safetensors|log|zip|gz)$")


# ---------------------------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class Doc:
    path: Path
    prose: list[tuple[int, str]]  # (line number, text) outside fenced code blocks
    blocks: list[tuple[str, list[tuple[int, str]]]]  # (info string, lines) of each fenced block
    text: str


def parse(path: Path, text: str | None = None) -> Doc:
    text = path.read_text(encoding="utf-8") if text is None else text
    prose, blocks = [], []
    fence, info, lines = None, "", []
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, info, lines = m.group(1), m.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((info, lines))
            fence = None
        elif fence is not None:
            lines.append((n, line))
        else:
            prose.append((n, line))
    return Doc(path, prose, blocks, text)


def slug(heading: str) -> str:
    """GitHub's heading anchor: link text kept, lower-cased, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in doc.prose:
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(doc: Doc) -> list[tuple[int, str]]:
    out = []
    for n, line in doc.prose:
        bare = CODE_SPAN.sub("", line)
        out += [(n, m.group(1)) for m in LINK.finditer(bare)]
        m = LINK_DEF.match(bare)
        if m:
            out.append((n, m.group(1)))
    return out


def check_link(doc_path: Path, target: str) -> str | None:
    """Why a link target is broken, or None (external links are not followed)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
        return None
    path_part, _, anchor = target.partition("#")
    dest = (doc_path.parent / path_part).resolve() if path_part else doc_path
    if not dest.exists():
        return f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(parse(dest)):
        return f"{target}: no heading with anchor #{anchor} in {dest.name}"
    return None


def modules(doc: Doc) -> list[str]:
    return sorted({m.group(1).rstrip(".") for m in PYTHON_M.finditer(doc.text)})


def commands(doc: Doc) -> list[tuple[int, str]]:
    """Logical lines (continuations joined, shell prompt stripped) of the blocks that hold commands."""
    out = []
    for info, lines in doc.blocks:
        if info in NOT_COMMANDS:
            continue
        start, parts = None, []
        for n, line in lines:
            if start is None:
                start = n
            parts.append(line.rstrip().removesuffix("\\"))
            if not line.rstrip().endswith("\\"):
                out.append((start, " ".join(parts).strip().removeprefix("$ ")))
                start, parts = None, []
        if parts:
            out.append((start, " ".join(parts).strip()))
    return out


def split_sweep(value: str) -> list[str]:
    """Hydra's sweep syntax ``a,b,c`` at the top level (commas inside brackets or quotes do not split)."""
    values, depth, quote, current = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    return [*values, current]


def overrides_of(command: str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The experiment a command line names (None: none named) and its config overrides as (key, values)."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # unbalanced quotes in a non-shell line: fall back to white space
        tokens = command.split()
    experiment, found = None, []
    for i, tok in enumerate(tokens):
        submit_module = tok == "research_rl.submit" and i > 0 and tokens[i - 1] == "-m"
        if (LAUNCH.search(tok) or submit_module) and i + 1 < len(tokens) and "=" not in tokens[i + 1] \
                and not tokens[i + 1].startswith("-"):
            experiment = tokens[i + 1]
        if tok.startswith("experiment="):
            experiment = tok.split("=", 1)[1]
            continue
        m = OVERRIDE.match(tok)
        if m and not m.group(1).startswith("hydra."):
            prefix = tok[: len(tok) - len(tok.lstrip("+~"))]
            found.append((prefix + m.group(1), split_sweep(m.group(2))))
    return experiment, found


def check_command(command: str) -> list[str]:
    """Compose a command's overrides (each sweep value once); the errors, [] when it composes."""
    experiment, found = overrides_of(command)
    if not found:
        return []
    base = [f"experiment={experiment or 'debug_cpu'}"]
    if re.search(r"launch/submit\.sh|research_rl\.submit", command):
        base.append("ray.address=auto")  # what the submitter adds: the job joins the cluster
    first = [f"{k}={v[0]}" for k, v in found]
    runs = [first] + [first[:i] + [f"{k}={value}"] + first[i + 1:]
                      for i, (k, values) in enumerate(found) for value in values[1:]]
    errors = []
    for overrides in runs:
        try:
            compose_config(base + overrides)
        except ConfigError as e:
            errors.append(f"{' '.join(base + overrides)} -> {e}")
    return errors


def schema_keys() -> set[str]:
    """Every dotted key of the schema, sections included (``eval``, ``eval.judge``, ``eval.judge.model``)."""
    keys: set[str] = set()

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            key = f"{prefix}{f.name}"
            keys.add(key)
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")

    walk(Config(), "")
    return keys


SCHEMA = schema_keys()
SECTIONS = {k for k in SCHEMA if "." not in k}


def _python_attribute(name: str) -> bool:
    """``ray.init``-style names: a Python module and attribute, not a config key."""
    head, _, rest = name.partition(".")
    try:
        obj = importlib.import_module(head)
        for part in rest.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    return True


def inline_keys(doc: Doc) -> list[tuple[int, str]]:
    """Config keys written in inline code: ``key=value`` tokens, and bare ``section.key`` names."""
    out = []
    for n, line in doc.prose:
        for m in CODE_SPAN.finditer(line):
            span = m.group(2).strip()
            if "*" in span or "<" in span:
                continue
            for tok in span.split():
                o = OVERRIDE.match(tok)
                if o and not o.group(1).startswith("hydra."):
                    out.append((n, o.group(1)))
            if re.fullmatch(r"[A-Za-z_]\w*(?:\.\w+)+", span) and span.split(".")[0] in SECTIONS \
                    and not FILE_SUFFIX.search(span):
                out.append((n, span))
    return out


def check_key(key: str) -> str | None:
    if key in SCHEMA or _python_attribute(key):
        return None
    section = key.split(".")[0]
    near = sorted(k for k in SCHEMA if k.startswith(section + ".")) if section in SECTIONS else sorted(SECTIONS)
    return f"{key} is not a config key; {'keys of ' + section if section in SECTIONS else 'sections'}: {near}"


# ---------------------------------------------------------------------------------------------- the checks
DOCS = [parse(p) for p in DOC_FILES]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


LINK_CASES = [pytest.param(d.path, n, t, id=f"{_rel(d.path)}:{n}->{t}") for d in DOCS for n, t in links(d)]
MODULE_CASES = sorted({m for d in DOCS for m in modules(d)})
COMMAND_CASES = [pytest.param(c, id=f"{_rel(d.path)}:{n}") for d in DOCS for n, c in commands(d) if overrides_of(c)[1]]
KEY_CASES = [pytest.param(k, id=f"{_rel(d.path)}:{n}:{k}") for d in DOCS for n, k in inline_keys(d)]


def test_the_documentation_is_there():
    """The pages the README indexes exist (or are about to), and the parsers find what the pages hold."""
    names = {_rel(d.path) for d in DOCS}
    assert {"README.md", "docs/concepts.md", "docs/reproducing.md", "docs/troubleshooting.md",
            "docs/configuration.md", "docs/retriever.md"} <= names
    readme = DOCS[0]
    assert len(links(readme)) >= 10 and "research_rl.train" in modules(readme)
    assert any("-m experiment=debug_cpu" in c for _, c in commands(readme))  # the sweep example is checked
    assert len(COMMAND_CASES) >= 10 and len(KEY_CASES) >= 20


@pytest.mark.parametrize("doc_path, line, target", LINK_CASES)
def test_relative_links_resolve(doc_path, line, target):
    problem = check_link(doc_path, target)
    assert problem is None, f"{_rel(doc_path)}:{line}: broken link {problem}"


@pytest.mark.parametrize("module", MODULE_CASES)
def test_python_m_modules_exist(module):
    assert importlib.util.find_spec(module) is not None, f"`python -m {module}` in the docs: no such module"


@pytest.mark.parametrize("command", COMMAND_CASES)
def test_command_overrides_compose(command):
    errors = check_command(command)
    assert not errors, "a documented command does not compose:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("key", KEY_CASES)
def test_inline_config_keys_exist(key):
    problem = check_key(key)
    assert problem is None, problem



REFERENCE_SWITCHES = ("reward.kind=research_reference", "algo.loss_agg=reference", "eval.budget_includes_prompt=true",
                      "eval.over_length_prediction=empty", "data.drop_last=true",
                      "rollout.eos_ids_from=generation_config", "rollout.mode=turn_sync")


@pytest.mark.parametrize("switch", REFERENCE_SWITCHES)
def test_the_deviations_list_names_each_switch_to_the_reference(switch):
    """Every config switch that restores the reference implementation's behaviour is listed, with that value, under
    docs/concepts.md's "Deviations from the paper", and composes (the code and the list agree both ways: the
    inline-key test above checks that every key the list names exists)."""
    section = (ROOT / "docs/concepts.md").read_text().split("## Deviations from the paper", 1)[1]
    assert f"`{switch}`" in section, f"{switch} is not in the deviations list"
    key, value = switch.split("=")
    cfg = compose_config(["experiment=debug_cpu", switch])
    section_name, field = key.split(".")
    assert str(getattr(getattr(cfg, section_name), field)).lower() == value

# ---------------------------------------------------------------------------------------------- drift
CHECKPOINT_TOKEN = re.compile(r"`([\w-]+(?:\.(?:pt|pth|bin|json|safetensors|ya?ml|npy)|/))`")  # a file or a folder


def checkpoint_names() -> set[str]:
    """The names inside a checkpoint directory: the layout block of research_rl/driver/checkpoint.py's docstring
    (each line's first word) and the file names the module writes (``STATE_FILE``, ``MANIFEST``, ``SHARDED``)."""
    from research_rl.driver import checkpoint

    doc = checkpoint.__doc__
    layout = doc.split("::", 1)[1].split("\n\n", 2)[1]
    names = {m.group(1) for line in layout.splitlines() if (m := re.match(r"\s*([\w.-]+/?)\s", line))}
    return names | {checkpoint.STATE_FILE, checkpoint.MANIFEST, f"{checkpoint.SHARDED}/", "model/"}


def checkpoint_file_problems(doc: Doc) -> list[str]:
    """File names in ``doc``'s lines about ``checkpoints/...`` (table rows, list items) that a checkpoint does not
    hold: a backticked name with a file suffix or a trailing ``/`` other than the checkpoint paths themselves."""
    known = checkpoint_names()
    problems = []
    for n, line in doc.prose:
        if "checkpoints/step_" not in line:
            continue
        for token in CHECKPOINT_TOKEN.findall(line):
            if token.startswith(("checkpoints", "step_", "best")):
                continue
            if token not in known:
                problems.append(f"{doc.path.name}:{n}: `{token}` is not in a checkpoint (it holds {sorted(known)})")
    return problems


def entry_points() -> list[str]:
    """``research_rl.NAME`` for every top-level module that runs as ``python -m``."""
    return sorted(f"research_rl.{p.stem}" for p in (ROOT / "research_rl").glob("*.py")
                  if "__name__ == \"__main__\"" in p.read_text())


def make_default(variable: str) -> str:
    """The default the Makefile gives ``variable`` (its ``NAME ?= value`` line)."""
    m = re.search(rf"^{variable}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert m, f"the Makefile sets no default for {variable}"
    return m.group(1)


def demo_problems(readme: str, exp: dict) -> list[str]:
    """Where the README's "What the demo shows" disagrees with the demo's experiment (``exp``, its composed config
    as a dict): the steps it ran (at most ``trainer.total_steps``; "all N steps" only when N is that budget, else the
    time budget ``trainer.max_minutes=X`` must be named with its value), its minutes (within the time budget),
    "(of N)" validation questions (``validation.num_questions``), the validated steps (multiples of
    ``validation.every`` up to the steps run) and the warm-up steps named (``warmup.steps``)."""
    section = readme.split("## What the demo shows", 1)[1].split("\n## ", 1)[0]
    t, v = exp["trainer"], exp["validation"]
    problems = []
    ran = re.search(r"(all )?(\d+) steps in ([\d.]+) minutes", section)
    if not ran:
        return ["the demo section states no 'N steps in M minutes'"]
    every_step, steps, minutes = bool(ran.group(1)), int(ran.group(2)), float(ran.group(3))
    if steps > t["total_steps"] or (every_step and steps != t["total_steps"]):
        problems.append(f"{ran.group(0)!r}, but trainer.total_steps={t['total_steps']}")
    budget = t.get("max_minutes")
    if budget is not None:
        if f"trainer.max_minutes={budget:g}" not in section:
            problems.append(f"the demo stops on trainer.max_minutes={budget:g}, which the section does not name")
        if minutes > budget + 1:
            problems.append(f"{ran.group(0)!r} exceeds trainer.max_minutes={budget:g}")
    of = re.search(r"\(of (\d+)\)", section)
    if of and int(of.group(1)) != v["num_questions"]:
        problems.append(f"validation '(of {of.group(1)})', but validation.num_questions={v['num_questions']}")
    at = re.search(r"at steps ([\d, ]+)", section)
    if at:
        for s in (int(x) for x in at.group(1).replace(" ", "").split(",") if x):
            if s > steps or (s % v["every"] and s != steps):
                problems.append(f"validation at step {s}: not a multiple of validation.every={v['every']} up to "
                                f"the {steps} steps run")
    warm = re.search(r"warm-up \| [^|]*?(\d+) steps", section)
    if warm and int(warm.group(1)) != exp["warmup"]["steps"]:
        problems.append(f"warm-up of {warm.group(1)} steps, but warmup.steps={exp['warmup']['steps']}")
    return problems


def test_checkpoint_file_lists_match_the_layout():
    problems = [p for d in DOCS for p in checkpoint_file_problems(d)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", entry_points())
def test_every_entry_point_is_in_the_readme(module):
    assert module in modules(DOCS[0]), f"`python -m {module}` is an entry point the README does not name"


def test_the_demo_figures_match_its_config():
    from research_rl.config.compose import compose_config
    from research_rl.config.schema import to_dict

    exp = to_dict(compose_config([f"experiment={make_default('EXP')}"]))  # what `make demo` runs, composed
    problems = demo_problems((ROOT / "README.md").read_text(), exp)
    assert not problems, "README.md, What the demo shows:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------- self-tests
def test_checkers_catch_what_they_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n## Second part\n\n[ok](#second-part) [bad](#nowhere) [gone](missing.md)\n")
    doc = parse(page)
    found = {t: check_link(page, t) for _, t in links(doc)}
    assert found["#second-part"] is None and found["#nowhere"] and found["missing.md"]
    assert check_link(page, "https://example.org/x") is None

    assert check_command("python -m research_rl.train experiment=debug_cpu rollout.group_sise=4")  # unknown key
    assert check_command("python -m research_rl.train experiment=debug_cpu rollout.group_size=1")  # fails validation
    assert check_command("launch/local.sh no_such_experiment trainer.total_steps=5")  # unknown experiment
    assert check_command("python -m research_rl.submit no_such_experiment trainer.total_steps=5 --address http://h:1")
    assert check_command("python -m research_rl.train -m experiment=debug_cpu rollout.group_size=5,1")  # 2nd value
    assert not check_command("python -m research_rl.train -m experiment=debug_cpu hydra.job.chdir=true algo.kl_coef=0,0.001")
    assert not check_command("python -m research_rl.evaluate experiment=debug_cpu 'eval.datasets=[hotpotqa,musique]'")

    assert check_key("resources.nnodes") and check_key("retriever.timeout") and check_key("learner.no_such_key")
    assert check_key("retriever.timeout_s") is None and check_key("eval.judge.model") is None
    assert check_key("ray.init") is None  # a Ray function, not a key

    assert split_sweep("0,0.001") == ["0", "0.001"] and split_sweep("[a,b]") == ["[a,b]"]

    stale = parse(page, "| `checkpoints/step_NNNNNN/` | `model/`, `optimizer.pt`, `trainer_state.json` |\n")
    assert [p for p in checkpoint_file_problems(stale) if "optimizer.pt" in p] and \
        len(checkpoint_file_problems(stale)) == 1
    assert "research_rl.export" in entry_points() and "research_rl.train" in entry_points()
    exp = {"trainer": {"total_steps": 40, "max_minutes": 3.5}, "validation": {"every": 10, "num_questions": 20},
           "warmup": {"steps": 150}}
    good = ("## What the demo shows\n| warm-up | 63 s (150 steps) |\n| GRPO | 31 steps in 3.5 minutes, stopped by "
            "trainer.max_minutes=3.5 |\n| failing (of 20) | at steps 10, 20, 30, 31 |\n## Next\n")
    assert demo_problems(good, exp) == []
    assert len(demo_problems(good.replace("31 steps", "all 31 steps"), exp)) == 1  # "all" but not the budget
    assert len(demo_problems(good.replace("trainer.max_minutes=3.5 |", "time |"), exp)) == 1  # budget unnamed
    assert len(demo_problems(good.replace("(of 20)", "(of 10)").replace("150 steps", "100 steps"), exp)) == 2
    assert modules(parse(page, "run `python -m research_rl.train`. Then python3 -m retriever_service.serve.")) == \
        ["research_rl.train", "retriever_service.serve"]
