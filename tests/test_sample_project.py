"""``manage.py test`` in a project with the app installed: the engine's pooled connections
do not keep the test runner from dropping the test database, with no user code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from async_prefetch.devtools.embedded import ENV_SOURCE, get_server

PROJECT = Path(__file__).parent / "sample_project"
REPOSITORY = Path(__file__).parent.parent


def manage_py_test() -> str:
    """Run the sample project's tests on this process's server; return their output."""
    env = {
        **os.environ,
        "DATABASE_URL": get_server().url(),
        "DJANGO_SETTINGS_MODULE": "sample_project.settings",
        "PYTHONPATH": str(REPOSITORY),
    }
    env.pop(ENV_SOURCE, None)
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "--noinput"],
        cwd=PROJECT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_database_dropped_after_tests_that_used_the_pool() -> None:
    for _ in range(2):  # a database left behind would make the second run destroy it first
        output = manage_py_test()
        assert "Ran 3 tests" in output
        assert "being accessed by other users" not in output
        assert "already exists" not in output
        assert "Type 'yes'" not in output
    with psycopg.connect(get_server().url()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = 'test_sample_project'"
        ).fetchone()
    assert row == (0,)
