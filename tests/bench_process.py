"""Running a bench command end to end in a subprocess on this session's PostgreSQL.

The benches configure their own Django settings, so they cannot run in the test
process; they reach this session's server through ``DATABASE_URL`` (their tables live in
the server's own database, not in pytest-django's test database).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from async_prefetch.devtools.embedded import ENV_SOURCE, get_server

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` on this session's server; asserts it exits 0 (its
    output in the failure message)."""
    env = dict(os.environ)
    env["DATABASE_URL"] = get_server().url()
    env.pop(ENV_SOURCE, None)  # a forced embedded source would ignore DATABASE_URL
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; the bench configures its own
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done
