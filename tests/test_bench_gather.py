"""``python -m async_prefetch.devtools.bench.gather --quick`` end to end.

The bench configures its own Django settings, so it runs in a subprocess, on this test
session's PostgreSQL through ``DATABASE_URL`` (as ``tests/test_bench.py`` does). The bench
checks every side's result against Django's and exits non-zero on a difference.
"""

from __future__ import annotations

import re
from pathlib import Path

from async_prefetch.devtools.bench.gather import (
    ATOMIC_SIDES,
    ATOMIC_WORKLOADS,
    GATHER_SIDES,
    single_query_fetch_available,
)
from tests.bench_process import run_module


def _row(markdown: str, prefix: str) -> list[str]:
    (line,) = [line for line in markdown.splitlines() if line.startswith(prefix)]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_quick_gather_bench_completes_with_results_equal_to_djangos(tmp_path: Path) -> None:
    out = tmp_path / "gather.md"
    run_module("async_prefetch.devtools.bench.gather", "--quick", "--out", str(out))

    report = out.read_text()
    measured = [
        s for s in GATHER_SIDES if s != "single_query_fetch" or single_query_fetch_available()
    ]
    gather = _row(report, "| 0 |")
    assert len(gather) == 1 + len(measured) + 4
    assert all(float(cell) > 0 for cell in gather[1 : 1 + len(measured)])
    assert re.fullmatch(r"\d+\.\d\dx", gather[-4])  # agather / floor
    assert re.fullmatch(r"\d+\.\d\dx", gather[-3])  # agather / floor_queries
    for name in ATOMIC_WORKLOADS:
        atomic = _row(report, f"| {name} | 0 |")
        assert all(float(cell) > 0 for cell in atomic[2 : 2 + len(ATOMIC_SIDES)])
    assert "## Targets (issue 16)" in report


def test_overhead_measures_every_side_and_part() -> None:
    """``devtools.bench.overhead``: one row per RTT with a time for every side and part
    (the engine's and ``PoolQuerySet``'s results are checked against Django's inside)."""
    from async_prefetch.devtools.bench.overhead import PARTS, WHOLE

    done = run_module(
        "async_prefetch.devtools.bench.overhead", "--rtts", "0", "--rounds", "1", "--calls", "3"
    )
    row = _row(done.stdout, "| 0 |")
    assert len(row) == 1 + len(WHOLE) + len(PARTS) + 1
    assert all(float(cell) > 0 for cell in row[1:-1])
    assert re.fullmatch(r"\d+\.\d\dx", row[-1])
