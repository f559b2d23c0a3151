"""Every benchmark script in bench/ starts and parses its arguments (``--help``) without its heavy dependencies:
compare_trl.py must not need TRL for that, run_all.py must not need any benchmark to have run. The benchmarks
themselves are run by ``bench/run_all.py`` (docs/benchmarks.md), not by the test suite: they take minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


def test_run_all_knows_every_benchmark():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    gpu_only = {s[:-3] for s in SCRIPTS if s.startswith("gpu_check")}  # run on a GPU machine, not by make bench
    assert set(run_all.NAMES) == {s[:-3] for s in SCRIPTS} - {"run_all"} - gpu_only
    assert set(run_all.QUICK) == set(run_all.NAMES)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--json" in out.stdout or script == "run_all.py", f"bench/{script} has no --json output"
