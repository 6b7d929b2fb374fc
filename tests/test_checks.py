"""System checks: a bad ``ASYNC_PREFETCH`` is reported by ``manage.py check``, not raised
from ``AppConfig.ready()``; prepared statements behind PgBouncer get a warning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test.utils import override_settings, override_system_checks

import async_prefetch
from async_prefetch import checks, patching
from async_prefetch.config import load_config
from tests.testapp.models import Book

REPOSITORY = Path(__file__).resolve().parent.parent
TOP_KEYS = (
    "Known keys: 'AUTO', 'CHUNK_SIZE', 'CONSISTENT', 'INSTALL', 'MAX_CONCURRENCY', "
    "'PIPELINE', 'POOL', 'REPLICAS', 'REPLICA_MAX_LAG'."
)
POOL_KEYS = "Known keys: 'CHECK', 'MAX_IDLE', 'MAX_LIFETIME', 'MAX_SIZE', 'MIN_SIZE', 'TIMEOUT'."


@pytest.fixture
def app_installed() -> Iterator[None]:
    """``"async_prefetch"`` in INSTALLED_APPS (its ``ready()`` runs), with the checks
    its ``ready()`` registered as the only ones; the engine uninstalled afterwards."""
    try:
        with (
            override_system_checks([]),
            override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "async_prefetch"]),
        ):
            yield
    finally:
        async_prefetch.uninstall()


def ours(messages: list[CheckMessage]) -> list[tuple[str | None, str, str | None]]:
    return [
        (message.id, message.msg, message.hint)
        for message in messages
        if (message.id or "").startswith("async_prefetch.")
    ]


CASES: list[Any] = [
    pytest.param(
        {"MAX_CONCURENCY": 4},
        [
            (
                "async_prefetch.E002",
                "ASYNC_PREFETCH has unknown keys ['MAX_CONCURENCY'].",
                f"Did you mean 'MAX_CONCURRENCY'? {TOP_KEYS}",
            )
        ],
        id="unknown-key",
    ),
    pytest.param(
        {"pool": {"max_sise": 4, "TIMOUT": 2, "spare": 1}},
        [
            (
                "async_prefetch.E002",
                "ASYNC_PREFETCH['POOL'] has unknown keys ['max_sise', 'TIMOUT', 'spare'].",
                "Did you mean 'MAX_SIZE' instead of 'max_sise'? "
                f"Did you mean 'TIMEOUT' instead of 'TIMOUT'? {POOL_KEYS}",
            )
        ],
        id="unknown-pool-keys",
    ),
    pytest.param(
        {"COLOUR": "blue"},
        [("async_prefetch.E002", "ASYNC_PREFETCH has unknown keys ['COLOUR'].", TOP_KEYS)],
        id="unknown-key-nothing-close",
    ),
    pytest.param(
        ["POOL"],
        [("async_prefetch.E001", "ASYNC_PREFETCH must be a dict, not list.", None)],
        id="not-a-dict",
    ),
    pytest.param(
        {"POOL": None},
        [("async_prefetch.E001", "ASYNC_PREFETCH['POOL'] must be a dict, not NoneType.", None)],
        id="pool-not-a-dict",
    ),
    pytest.param(
        {"install": True, "INSTALL": False},
        [
            (
                "async_prefetch.E003",
                "ASYNC_PREFETCH sets 'INSTALL' more than once: ['install', 'INSTALL'].",
                "Keys are case-insensitive: keep one of them.",
            )
        ],
        id="repeated-key",
    ),
    pytest.param(
        {"POOL": {"MAX_SIZE": "10", "TIMEOUT": True, "CHECK": "no"}},
        [
            (
                "async_prefetch.E004",
                "ASYNC_PREFETCH['POOL']['MAX_SIZE'] must be an integer, not str '10'.",
                None,
            ),
            (
                "async_prefetch.E004",
                "ASYNC_PREFETCH['POOL']['TIMEOUT'] must be a number of seconds, not bool True.",
                None,
            ),
            (
                "async_prefetch.E004",
                "ASYNC_PREFETCH['POOL']['CHECK'] must be True or False, not str 'no'.",
                None,
            ),
        ],
        id="wrong-types",
    ),
    pytest.param(
        {"POOL": {"MIN_SIZE": -1, "MAX_IDLE": 0, "MAX_LIFETIME": float("nan")}},
        [
            (
                "async_prefetch.E005",
                "ASYNC_PREFETCH['POOL']['MIN_SIZE'] must be at least 0, not -1.",
                None,
            ),
            (
                "async_prefetch.E005",
                "ASYNC_PREFETCH['POOL']['MAX_IDLE'] must be more than 0 seconds, not 0.",
                None,
            ),
            (
                "async_prefetch.E005",
                "ASYNC_PREFETCH['POOL']['MAX_LIFETIME'] must be more than 0 seconds, not nan.",
                None,
            ),
        ],
        id="out-of-range",
    ),
    pytest.param(
        {"POOL": {"MIN_SIZE": 5, "MAX_SIZE": 2}},
        [
            (
                "async_prefetch.E005",
                "ASYNC_PREFETCH['POOL'] needs MIN_SIZE <= MAX_SIZE, not MIN_SIZE=5 and MAX_SIZE=2.",
                None,
            )
        ],
        id="min-above-max",
    ),
    pytest.param(
        {"POOL": {"MIN_SIZE": "5", "MAX_SIZE": 2}},
        [
            (
                "async_prefetch.E004",
                "ASYNC_PREFETCH['POOL']['MIN_SIZE'] must be an integer, not str '5'.",
                None,
            )
        ],
        id="no-comparison-with-a-bad-size",
    ),
    pytest.param(
        {"MAX_CONCURRENCY": 0, "CHUNK_SIZE": 0},
        [
            (
                "async_prefetch.E005",
                "ASYNC_PREFETCH['CHUNK_SIZE'] must be at least 1 or None, not 0.",
                None,
            ),
            (
                "async_prefetch.E005",
                "ASYNC_PREFETCH['MAX_CONCURRENCY'] must be at least 1, not 0.",
                None,
            ),
        ],
        id="concurrency-and-chunk-size",
    ),
    pytest.param(
        {"CHUNK_SIZE": 2.5, "MAX_CONCURENCY": 4},
        [
            (
                "async_prefetch.E002",
                "ASYNC_PREFETCH has unknown keys ['MAX_CONCURENCY'].",
                f"Did you mean 'MAX_CONCURRENCY'? {TOP_KEYS}",
            ),
            (
                "async_prefetch.E004",
                "ASYNC_PREFETCH['CHUNK_SIZE'] must be an integer or None, not float 2.5.",
                None,
            ),
        ],
        id="every-problem-at-once",
    ),
    pytest.param(
        {
            "pool": {"min_size": 0, "Max_Size": 3, "TIMEOUT": 2.5, "MAX_LIFETIME": 60},
            "CHUNK_SIZE": None,
            "INSTALL": False,
        },
        [],
        id="valid",
    ),
]


@pytest.mark.parametrize(("setting", "expected"), CASES)
def test_setting_problems(app_installed: None, setting: object, expected: list[Any]) -> None:
    with override_settings(ASYNC_PREFETCH=setting):
        assert ours(run_checks()) == expected


def test_call_command_check_lists_the_error(app_installed: None) -> None:
    with (
        override_settings(ASYNC_PREFETCH={"MAX_CONCURENCY": 4}),
        pytest.raises(SystemCheckError) as raised,
    ):
        call_command("check")
    assert (
        "?: (async_prefetch.E002) ASYNC_PREFETCH has unknown keys ['MAX_CONCURENCY'].\n"
        f"\tHINT: Did you mean 'MAX_CONCURRENCY'? {TOP_KEYS}"
    ) in str(raised.value)


def test_engine_raises_the_check_messages_without_the_app(db: None) -> None:
    """Not installed, the checks do not run: the first use raises what they would report."""
    setting = {"CHUNK_SIZE": 2.5, "MAX_CONCURENCY": 4}
    with override_settings(ASYNC_PREFETCH=setting):
        expected = "\n".join(
            f"({message.id}) {message.msg}" + (f"\n\tHINT: {message.hint}" if message.hint else "")
            for message in checks.check_settings()
        )
        with pytest.raises(ImproperlyConfigured) as raised:
            load_config()
        assert str(raised.value) == expected
        with pytest.raises(ImproperlyConfigured) as raised:
            async_prefetch.prefetch_related_objects([Book(pk=1)], "pages")
        assert str(raised.value) == expected


def test_ready_does_not_install_with_a_bad_setting() -> None:
    with (
        override_settings(ASYNC_PREFETCH={"MAX_CONCURENCY": 4, "INSTALL": True}),
        override_system_checks([]),
        override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "async_prefetch"]),
    ):
        assert not patching.is_installed()
        assert [message.id for message in run_checks()] == ["async_prefetch.E002"]


def test_ready_installs_with_a_valid_setting() -> None:
    try:
        with (
            override_settings(ASYNC_PREFETCH={"INSTALL": True}),
            override_system_checks([]),
            override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "async_prefetch"]),
        ):
            assert patching.is_installed()
            assert run_checks() == []
    finally:
        async_prefetch.uninstall()


def _postgresql(**extra: Any) -> dict[str, Any]:
    return {"ENGINE": "django.db.backends.postgresql", "NAME": "unused", **extra}


PGBOUNCER = {"DISABLE_SERVER_SIDE_CURSORS": True, "OPTIONS": {"prepare_threshold": 5}}
DATABASES = {
    "behind_pgbouncer": _postgresql(**PGBOUNCER),
    "threshold_zero": _postgresql(
        DISABLE_SERVER_SIDE_CURSORS=True, OPTIONS={"prepare_threshold": 0}
    ),
    "direct": _postgresql(OPTIONS={"prepare_threshold": 5}),
    "no_prepared_statements": _postgresql(
        DISABLE_SERVER_SIDE_CURSORS=True, OPTIONS={"prepare_threshold": None}
    ),
    "defaults": _postgresql(DISABLE_SERVER_SIDE_CURSORS=True),
    "sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", **PGBOUNCER},
}


@pytest.fixture
def databases() -> Iterator[None]:
    """:data:`DATABASES` added to the settings (only checks read them: no connection)."""
    with (
        pytest.warns(UserWarning, match="Overriding setting DATABASES"),
        override_settings(DATABASES={**settings.DATABASES, **DATABASES}),
    ):
        yield


def test_prepared_statements_behind_pgbouncer_warn(app_installed: None, databases: None) -> None:
    messages = ours(run_checks())
    assert [message_id for message_id, _, _ in messages] == ["async_prefetch.W001"] * 2
    _, msg, hint = messages[0]
    assert msg == (
        "Database 'behind_pgbouncer' prepares statements (OPTIONS['prepare_threshold'] = 5) "
        "and sets DISABLE_SERVER_SIDE_CURSORS, as is usual behind PgBouncer in transaction "
        "pooling mode; async_prefetch's pooled connections prepare statements too."
    )
    assert hint is not None
    assert "PgBouncer >= 1.22 with max_prepared_statements > 0" in hint
    assert "set OPTIONS['prepare_threshold'] to None" in hint
    assert "add 'async_prefetch.W001' to SILENCED_SYSTEM_CHECKS" in hint
    assert "Database 'threshold_zero' prepares statements" in messages[1][1]
    with override_settings(SILENCED_SYSTEM_CHECKS=["async_prefetch.W001"]):
        call_command("check")  # would raise for an unsilenced error; warnings are filtered
        assert not [m for m in run_checks() if not m.is_silenced()]


def test_bad_setting_at_startup(tmp_path: Path) -> None:
    """``django.setup()`` with a typo in the setting: no traceback, no ``install()``;
    ``manage.py check`` fails listing the error with its hint."""
    (tmp_path / "typo_settings.py").write_text(
        textwrap.dedent(
            """
            SECRET_KEY = "not-secret"
            INSTALLED_APPS = ["django.contrib.contenttypes", "async_prefetch"]
            ASYNC_PREFETCH = {"MAX_CONCURENCY": 4, "INSTALL": True}
            """
        )
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "typo_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPOSITORY)]),
    }
    setup = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); "
            "from async_prefetch import patching; print(patching.is_installed())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (setup.returncode, setup.stdout, setup.stderr) == (0, "False\n", "")
    check = subprocess.run(
        [sys.executable, "-m", "django", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 1
    assert (
        "?: (async_prefetch.E002) ASYNC_PREFETCH has unknown keys ['MAX_CONCURENCY'].\n"
        "\tHINT: Did you mean 'MAX_CONCURRENCY'?"
    ) in check.stderr
