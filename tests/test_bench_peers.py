"""The peers and load benches end to end, at their smallest (``--quick``, one run).

Both configure their own Django settings, so they run in a subprocess on this session's
PostgreSQL through ``DATABASE_URL``. Skipped without the ``peers`` extra (Tortoise ORM,
SQLAlchemy, asyncpg).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tortoise")
pytest.importorskip("sqlalchemy")
pytest.importorskip("asyncpg")

from async_prefetch.devtools.bench import load, peers
from tests.bench_process import run_module


def test_peers_quick_every_side_reads_djangos_rows(tmp_path: Path) -> None:
    run_module(
        "async_prefetch.devtools.bench.peers",
        *("--quick", "--rtts", "0", "--runs", "1", "--out", str(tmp_path)),
        *("--workloads", "fanout-100", "chain"),
    )
    report = json.loads((tmp_path / "peers.json").read_text())
    assert report["sides"] == list(peers.SIDES)
    results = report["results"]
    assert [(r["workload"], r["rtt_ms"]) for r in results] == [("fanout-100", 0), ("chain", 0)]
    for result in results:
        assert result["error"] is None
        assert result["roots"] > 0
        floor = {"floor"} if result["workload"] in peers.FLOOR_WORKLOADS else set()
        assert set(result["median_ms"]) == set(peers.SIDES) - {"floor"} | floor
        assert all(ms > 0 for ms in result["median_ms"].values())
        # Django's objects, the engine's and the floor's (checked equal to Django's): at
        # least a root, its children and its cached querysets each.
        assert set(result["objects_per_root"]) == set(result["median_ms"])
        assert all(count > 1 for count in result["objects_per_root"].values())
    markdown = (tmp_path / "peers.md").read_text()
    assert "best peer / engine" in markdown
    assert "engine / floor" in markdown
    assert "FAILURES" not in markdown


def test_profile_times_each_sides_fetch_and_read_apart(tmp_path: Path) -> None:
    """``--profile``: Django's, the engine's and Tortoise's fetch and read, each timed."""
    run_module(
        "async_prefetch.devtools.bench.peers",
        *("--quick", "--rtts", "0", "--runs", "2", "--out", str(tmp_path)),
        *("--profile", "chain"),
    )
    summary = (tmp_path / "peers-profile-chain.md").read_text()
    rows = {
        cells[0]: [float(cell) for cell in cells[1:]]
        for line in summary.splitlines()
        if line.startswith("| ")
        and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 4
        and cells[1][:1].isdigit()
    }
    assert set(rows) == {"django_sync", "engine", "tortoise_asyncpg"}
    assert all(fetch > 0 and read > 0 for fetch, read, _ in rows.values())


def test_load_quick_counts_calls_of_every_side(tmp_path: Path) -> None:
    run_module(
        "async_prefetch.devtools.bench.load",
        *("--quick", "--rtts", "0", "--seconds", "0.3", "--rounds", "1", "--out", str(tmp_path)),
        *("--threads", "2", "--callers", "4", "--cap", "2"),
    )
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["errors"] == []
    assert [r["side"] for r in report["results"]] == list(load.SIDES)
    for result in report["results"]:
        assert result["calls"] > 0
        assert result["calls_per_second"][0] > 0
        assert result["p99"] >= result["p50"] > 0


def test_shapes_compare_the_many_to_many_as_a_set_and_report_the_first_difference() -> None:
    django = [(1, ((3, None), (2, 7)), (10, 11))]
    peer = [(1, ((2, 7), (3, None)), (10, 11))]
    assert peers.normalized("chain", django) == peers.normalized("chain", peer)
    assert peers.normalized("fanout-100", django) != peers.normalized("fanout-100", peer)
    other = [(1, ((2, 7), (3, None)), (11, 10))]
    assert "root #0" in peers.difference(
        peers.normalized("chain", django), peers.normalized("chain", other)
    )
    assert "2 roots expected, 1 read" in peers.difference(django * 2, django)
