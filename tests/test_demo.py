"""``python -m async_prefetch demo`` end to end, on this test session's PostgreSQL.

The demo configures its own Django settings, so it runs in a subprocess, with this session's
server as ``DATABASE_URL`` (its tables live in the server's own database, as the bench's do).
"""

from __future__ import annotations

import math
import re
from itertools import combinations

from async_prefetch.devtools.demo.bookstore import DemoResult
from async_prefetch.devtools.demo.cli import verdict
from tests.bench_process import run_module

BOOKS, PAGE = 30, 10
SMALL = ("--books", str(BOOKS), "--page-size", str(PAGE), "--runs", "1")


def run_demo(*args: str) -> str:
    """``python -m async_prefetch demo *args``; must exit 0 (both results identical)."""
    return run_module("async_prefetch", "demo", *args, timeout=120).stdout


def milliseconds(output: str, label: str) -> tuple[float, int]:
    """The time and query count printed for one side."""
    found = re.search(rf"^  {re.escape(label)}\s+([\d.]+) ms\s+\((\d+) queries", output, re.M)
    assert found is not None, output
    return float(found.group(1)), int(found.group(2))


def section(output: str, heading: str) -> str:
    """The text of the section that starts with ``heading``, up to the next blank line."""
    found = re.search(rf"^{re.escape(heading)}.*?(?=\n\n)", output, re.M | re.S)
    assert found is not None, output
    return found.group(0)


def check_scenarios(output: str, rtt_ms: float) -> None:
    """The sections after the page: each side's queries, each says the objects read are
    Django's; Django's serial queries take a round trip each at least."""
    n_plus_one = section(output, "The N+1:")
    django_ms, django_queries = milliseconds(n_plus_one, "Django, lazy loads")
    _, auto_queries = milliseconds(n_plus_one, "autoprefetch(qs)")
    # The books, then one query per relation and book (per author for its location).
    reported = re.search(
        r"prefetch_report\(\) on Django's loop: 4 N\+1s, (\d+) queries", n_plus_one
    )
    assert reported is not None, n_plus_one
    assert django_queries == 1 + int(reported.group(1)) >= 1 + 3 * PAGE
    flat = " ".join(n_plus_one.split())
    for relation in ("Book.publisher", "Book.authors", "Book.pages"):
        assert f"{relation} ({PAGE})" in flat
    assert "Author.location (" in flat
    assert auto_queries == 5  # the books, publisher, authors, their locations, pages
    assert django_ms >= rtt_ms * django_queries
    assert f"{django_queries - auto_queries} fewer queries" in n_plus_one
    assert re.search(r"both\s+read\s+the\s+same\s+objects\.", n_plus_one), n_plus_one

    gather = section(output, "Several querysets at once:")
    django_ms, django_queries = milliseconds(gather, "gather(), Django's aget()")
    # Five root queries and two prefetches, on every side.
    assert django_queries == milliseconds(gather, "agather(*querysets)")[1] == 7
    assert milliseconds(gather, "gather(), PoolQuerySet")[1] == 7
    assert django_ms >= rtt_ms * django_queries  # Django's: one after another
    assert re.search(r"all\s+3\s+read\s+the\s+same\s+objects\.", gather), gather

    stream = section(output, "Streaming:")
    # Every book of the server's bookstore: BOOKS, unless another test seeded it first.
    found = re.search(r"every book \((\d+)\), (\d+) at a time", stream)
    assert found is not None, stream
    assert int(found.group(2)) == PAGE
    chunks = math.ceil(int(found.group(1)) / PAGE)
    django_ms, django_queries = milliseconds(stream, "Django's aiterator()")
    _, engine_queries = milliseconds(stream, "aiterator(qs, memo=...)")
    # The root query; per chunk: publisher, authors, their locations, tags.
    assert django_queries == 1 + 4 * chunks
    # The root query, the publishers once (the memo); per chunk the three others.
    assert engine_queries == 1 + 1 + 3 * chunks
    assert django_ms >= rtt_ms * django_queries
    assert re.search(r"both\s+read\s+the\s+same\s+objects\.", stream), stream
    assert "THE RESULTS DIFFER" not in output
    assert re.search(r"^Done in [\d.]+ s\.$", output, re.M), output


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
        r"The engine was [\d.]+x (faster|slower) \(medians of 1 runs each\);\s+"
        r"both\s+fetched\s+the\s+same\s+objects\.",
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
    check_scenarios(output, rtt_ms=2.0)
    assert max(len(line) for line in output.splitlines()) <= 80, output


def test_demo_on_loopback_says_so() -> None:
    output = run_demo(*SMALL, "--rtt-ms", "0")
    assert "Network: none, plain loopback" in output
    assert "latency proxy" not in output
    assert re.search(r"both\s+fetched\s+the\s+same\s+objects", output), output
    check_scenarios(output, rtt_ms=0.0)


def result(seconds: float, queries: int = 7) -> DemoResult:
    return DemoResult("side", 1, queries, seconds, [], [])


def test_a_verdict_claims_no_gain_within_noise() -> None:
    """Medians within 15 % of each other are "as fast": no gain is claimed."""
    assert verdict(result(0.100), result(0.050)) == "2.0x faster"
    assert verdict(result(0.100), result(0.095)).startswith("as fast as Django (1.05x)")
    assert "no gain" in verdict(result(0.095), result(0.100))
    assert verdict(result(0.050), result(0.100, queries=5)) == "2.0x slower, 2 fewer queries"
    assert verdict(result(0.100, queries=5), result(0.050)) == "2.0x faster, 2 more queries"
