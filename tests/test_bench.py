"""``python -m async_prefetch bench --quick`` end to end.

The bench configures its own Django settings, so it runs in a subprocess. It reuses this test
session's PostgreSQL through ``DATABASE_URL`` (its tables live in the server's own database,
not in pytest-django's test database) instead of starting another server.
"""

from __future__ import annotations

import json
import pstats
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from async_prefetch.devtools.bench import stream
from async_prefetch.devtools.bench.runner import PROFILER_PER_THREAD, SIDES
from async_prefetch.devtools.bench.workloads import NAMES
from tests.bench_process import run_module


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m async_prefetch bench --quick *args`` on this session's server; must exit 0."""
    return run_module("async_prefetch", "bench", "--quick", *args)


def test_quick_bench_writes_reports_and_results_match(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = run_bench("--workloads", *NAMES, "--out", str(out))

    report = json.loads((out / "results.json").read_text())
    assert report["ok"] is True
    results = report["results"]
    assert [(r["workload"], r["rtt_ms"]) for r in results] == [
        (name, rtt) for name in NAMES for rtt in (0.0, 1.0, 5.0)
    ]
    for result in results:
        assert result["error"] is None
        assert result["roots"] > 0
        assert result["django_queries"] > 1
        assert result["engine_queries"] > 1
        assert set(result["median_ms"]) == set(SIDES), result.get("floor_note")
        assert all(len(samples) == 2 for samples in result["samples_ms"].values())
        assert set(result["gc_median_ms"]) == set(SIDES)
        assert all(
            0 <= collected <= total
            for side in SIDES
            for collected, total in zip(
                result["gc_samples_ms"][side], result["samples_ms"][side], strict=True
            )
        )
    memory = {(m["workload"], m["side"]) for m in report["memory"]}
    assert memory == {(name, side) for name in NAMES for side in ("django_sync", "engine")}

    # The biggest workload allocates enough to trigger the collector during its runs.
    assert any(r["gc_median_ms"]["engine"] > 0 for r in results if r["workload"] == "big-batch")

    markdown = (out / "results.md").read_text()
    assert "| workload | RTT ms |" in markdown
    assert "## Peak memory" in markdown
    assert "FAILURES" not in markdown
    assert (out / "speedup.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "| fanout-100 | 0 |" in done.stdout  # the table is printed too


def test_profile_covers_the_engine_on_this_python(tmp_path: Path) -> None:
    """``--profile`` works on every supported Python (from 3.12, cProfile allows one
    profiler per process) and its saved stats include the engine's own functions."""
    out = tmp_path / "profile"
    done = run_bench("--profile", "fanout-100", "--runs", "2", "--out", str(out))
    labels = ["engine", "caller"] if PROFILER_PER_THREAD else ["all"]
    paths = [out / f"profile-fanout-100-{label}.prof" for label in labels]
    assert all(path.exists() for path in paths), sorted(p.name for p in out.iterdir())
    functions = pstats.Stats(str(paths[0])).stats  # type: ignore[attr-defined]
    library = [f for f, _, name in functions if name == "run_prefetch" and "/async_prefetch/" in f]
    assert library, "the engine's run_prefetch is not in the profile"
    assert "/devtools/" not in library[0]
    assert "engine runs on" in done.stdout


def test_quick_stream_checks_every_side_and_measures_their_memory(tmp_path: Path) -> None:
    """The ``stream`` workload: every side streams every book, each run's ids checked equal
    to Django's iterator's; one peak-memory child per side."""
    out = tmp_path / "stream"
    done = run_bench("--workloads", "stream", "--rtts", "1", "--books", "600", "--out", str(out))

    report = json.loads((out / "results.json").read_text())
    assert report["ok"] is True
    [result] = report["results"]
    assert (result["workload"], result["kind"], result["rtt_ms"]) == ("stream", "stream", 1.0)
    assert result["error"] is None
    assert result["roots"] == 600
    # Chunks of 250: the root query and 4 prefetch queries for each of 3 chunks; the
    # engine's prefetch queries, the same 12 (its root rows come from its own cursor).
    assert result["django_queries"] == 1 + 3 * 4
    assert result["engine_queries"] == 3 * 4
    assert list(result["median_ms"]) == list(stream.SIDES)
    assert all(len(samples) == 2 for samples in result["samples_ms"].values())
    memory = {m["side"]: m for m in report["memory"]}
    assert list(memory) == list(stream.SIDES)
    assert all(m["roots"] == 600 and m["peak_kib"] >= m["baseline_kib"] for m in memory.values())

    markdown = (out / "results.md").read_text()
    assert "## Stream" in markdown
    assert "## Peak memory" not in markdown  # no prefetch workload ran
    assert "| workload | RTT ms |" not in markdown
    assert "FAILURES" not in markdown
    assert "| 1 | 2 | 600 |" in done.stdout


def _book(pk: int, categories: list[int], translator: int | None = 7) -> Any:
    def related(id_: int) -> SimpleNamespace:
        return SimpleNamespace(pk=id_)

    manager = SimpleNamespace(all=lambda: [related(c) for c in categories])
    return SimpleNamespace(
        pk=pk,
        author=related(5),
        translator=None if translator is None else related(translator),
        publisher=related(3),
        categories=manager,
    )


def test_stream_digest_tells_the_first_differing_chunk() -> None:
    """The check between sides: category order does not count (django-memoized-prefetch
    caches a set), a missing category or translator does, and is placed in its chunk."""
    books = [_book(pk, [pk % 5, pk % 7 + 10]) for pk in range(10)]
    reference = stream.consume(books, chunk_size=4)
    assert reference.books == 10
    assert len(reference.chunk_hashes) == 3

    reordered = [_book(pk, [pk % 7 + 10, pk % 5]) for pk in range(10)]
    assert reference.difference(stream.consume(reordered, 4), 4) is None

    lost_category = [*books[:5], _book(5, [0]), *books[6:]]
    assert reference.difference(stream.consume(lost_category, 4), 4) == (
        "books 4..7 (in stream order) differ"
    )
    lost_translator = [*books[:9], _book(9, [4, 12], translator=None)]
    assert reference.difference(stream.consume(lost_translator, 4), 4) == (
        "books 8..9 (in stream order) differ"
    )
    assert reference.difference(stream.consume(books[:8], 4), 4) == (
        f"8 books (id sum {stream.consume(books[:8], 4).id_sum}), expected 10 ({reference.id_sum})"
    )
