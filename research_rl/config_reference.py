"""The configuration reference, generated from the typed schema in ``research_rl/config/schema.py``.

``python -m research_rl.config_reference`` writes ``docs/configuration.md``: one table per section (``model``,
``data``, ``retriever``, ...) with every key's type, default and the comment beside it in the schema, under the
section's docstring. ``--check`` exits 1 when the file differs from what the schema gives (a test runs it), so the
reference cannot go stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

from research_rl.config.schema import Config

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from the typed schema in `research_rl/config/schema.py` by `python -m research_rl.config_reference`; a test
fails when it is stale. Every key can be set in an experiment file (`conf/experiment/*.yaml`) or overridden on the
command line (`python -m research_rl.train experiment=debug_cpu retriever.top_k=3`). An unknown key, a value of the
wrong type, a number that is not finite or out of its range, and a failed cross-field check (batch divisibility)
fail when the config is composed. What depends on the machine or the cluster (the GPU placement arithmetic, the CPUs
of a local cluster, installed backends, files) is checked by each entry point's preflight
(`research_rl/config/preflight.py`), still before Ray starts; every error names its key.
"""


def _comments(cls: type) -> dict[str, str]:
    """``{field: the comment at the end of its line}`` from the class source."""
    out: dict[str, str] = {}
    line_field: dict[int, str] = {}
    source = inspect.getsource(cls)
    for i, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and ":" in stripped and name.isidentifier():
            line_field[i] = name
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{' | '.join(_type_name(a) for a in args)} or null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value!r}".replace("'", "") if isinstance(value, (list, str)) else repr(value)


def _section(prefix: str, cls: type, lines: list[str], nested: list[tuple[str, type]]) -> None:
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring when there is none
        lines += [doc, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((f"{prefix}.{f.name}", hints[f.name]))
            lines.append(f"| `{prefix}.{f.name}` | section | | see [`{prefix}.{f.name}`](#{prefix}{f.name}) |")
            continue
        meaning = comments.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{prefix}.{f.name}` | {_type_name(hints[f.name])} | `{_default(f)}` | {meaning} |")
    lines.append("")


def render() -> str:
    """The reference as markdown (deterministic: the schema's field order)."""
    lines = [HEADER]
    hints = typing.get_type_hints(Config)
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
    if top:
        lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        comments = _comments(Config)
        for f in top:
            lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{_default(f)}` | {comments.get(f.name, '')} |")
        lines.append("")
    queue = [(f.name, hints[f.name]) for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    while queue:
        prefix, cls = queue.pop(0)
        lines += [f"## `{prefix}`", ""]
        nested: list[tuple[str, type]] = []
        _section(prefix, cls, lines, nested)
        queue = nested + queue
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research_rl.config_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown file (default {DEFAULT_OUT.name})")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the schema's reference")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale; regenerate it with: python -m research_rl.config_reference", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
