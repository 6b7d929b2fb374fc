"""``python -m async_prefetch demo`` end to end, on this test session's PostgreSQL.

The demo configures its own Django settings, so it runs in a subprocess, with this session's
server as ``DATABASE_URL`` (its tables live in the server's own database, as the bench's do).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

from async_prefetch.devtools.embedded import ENV_SOURCE, get_server

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--books", "30", "--page-size", "10", "--runs", "1")


def run_demo(*args: str) -> str:
    """``python -m async_prefetch demo *args``; must exit 0 (both results identical)."""
    env = dict(os.environ)
    env["DATABASE_URL"] = get_server().url()
    env.pop(ENV_SOURCE, None)  # a forced embedded source would ignore DATABASE_URL
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; the demo configures its own
    done = subprocess.run(
        [sys.executable, "-m", "async_prefetch", "demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def milliseconds(output: str, label: str) -> tuple[float, int]:
    """The time and query count printed for one side."""
    found = re.search(rf"{label}\s+([\d.]+) ms\s+\((\d+) queries", output)
    assert found is not None, output
    return float(found.group(1)), int(found.group(2))


def timeline(output: str) -> dict[str, tuple[float, float]]:
    """The engine's query steps from the printed timeline: key -> (start, end) in ms."""
    steps = re.findall(r"^\s+(\S+)\s+\|[ #]+\|\s+([\d.]+) ->\s+([\d.]+) ms\s+query\b", output, re.M)
    return {key: (float(start), float(end)) for key, start, end in steps}


def test_demo_runs_over_a_simulated_round_trip_by_default() -> None:
    """By default every round trip costs 2 ms: Django's seven queries, one after another,
    take at least 14 ms (the proxy never delivers early). The engine's timeline shows
    queries that overlapped, and the output gives both times and their ratio."""
    output = run_demo(*SMALL)
    assert "Network: 2 ms per round trip, simulated by a latency proxy" in output
    django_ms, django_queries = milliseconds(output, "Django prefetch_related")
    _, engine_queries = milliseconds(output, "async_prefetch aprefetch")
    assert django_queries == engine_queries == 7
    assert django_ms >= 2.0 * django_queries
    assert re.search(
        r"The engine was [\d.]+x (faster|slower) \(medians of 1 runs each\); "
        r"both fetched the same objects\.",
        output,
    ), output
    steps = timeline(output)
    assert set(steps) == {
        "(queryset)",
        "authors",
        "tags",
        "pages",
        "good_reviews",
        "publisher",
        "authors__location",
    }
    assert all(end - start >= 1.99 for start, end in steps.values())  # a round trip each
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in combinations(steps.values(), 2)), (
        output
    )  # some queries ran at the same time


def test_demo_on_loopback_says_so() -> None:
    output = run_demo(*SMALL, "--rtt-ms", "0")
    assert "Network: none, plain loopback" in output
    assert "latency proxy" not in output
    assert "both fetched the same objects" in output
