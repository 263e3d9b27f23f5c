"""The core benchmarks stay runnable: their --quick modes finish and print every figure.

Speed targets are judged from the full runs (README), never asserted here.
"""

import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def run_quick(module: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick"], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.timeout(300)
def test_indexer_bench_prints_every_figure_with_its_baseline():
    out = run_quick("kvgate.indexer.bench")
    for section in (
        "hashing vs tokenizing",
        "[apply: router events",
        "1-block events",
        "16-block events",
        "[find_matches",
        "ratio naive/index",
        "[memory, tracemalloc]",
        "index+translators",
    ):
        assert section in out, section


@pytest.mark.timeout(300)
def test_router_bench_prints_each_phase_against_the_naive_router():
    out = run_quick("kvgate.router.bench")
    for phase in ("hash", "match", "score", "total", "cpu"):
        assert any(line.startswith(phase) and "x" in line.split()[-1] for line in out.splitlines()), phase
