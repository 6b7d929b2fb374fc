"""``python -m async_prefetch bench --quick`` end to end.

The bench configures its own Django settings, so it runs in a subprocess. It reuses this test
session's PostgreSQL through ``DATABASE_URL`` (its tables live in the server's own database,
not in pytest-django's test database) instead of starting another server.
"""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys
from pathlib import Path

from async_prefetch.bench.runner import PROFILER_PER_THREAD, SIDES
from async_prefetch.bench.workloads import NAMES
from async_prefetch.embedded import ENV_SOURCE, get_server

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m async_prefetch bench --quick *args`` on this session's server; must exit 0."""
    env = dict(os.environ)
    env["DATABASE_URL"] = get_server().url()
    env.pop(ENV_SOURCE, None)  # a forced embedded source would ignore DATABASE_URL
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; the bench configures its own
    done = subprocess.run(
        [sys.executable, "-m", "async_prefetch", "bench", "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def test_quick_bench_writes_reports_and_results_match(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = run_bench("--out", str(out))

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
    assert any(
        filename.endswith("async_prefetch/engine.py") and name == "run_prefetch"
        for filename, _, name in functions
    )
    assert "engine runs on" in done.stdout
