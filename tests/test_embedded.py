"""async_prefetch.devtools.embedded: URL parsing, the session server, and each embedded source."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from hypothesis import given
from hypothesis import strategies as st

from async_prefetch.devtools import embedded
from async_prefetch.devtools.embedded import (
    ServerInfo,
    get_server,
    parse_database_url,
    start_server,
)

REPO = Path(__file__).resolve().parent.parent
# .ci/run installs PostgreSQL if a machine lacks it; pgserver has no wheels for Python >= 3.13.
SOURCES = [
    pytest.param(
        "binaries",
        marks=pytest.mark.skipif(
            embedded.find_postgres_bindir() is None, reason="no initdb/postgres binaries"
        ),
    ),
    pytest.param(
        "pgserver",
        marks=pytest.mark.skipif(
            sys.version_info >= (3, 13) and importlib.util.find_spec("pgserver") is None,
            reason="pgserver is not installable on Python >= 3.13",
        ),
    ),
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://alice:s3cret@db.example.com:6432/shop",
            ServerInfo("DATABASE_URL", "shop", "alice", "s3cret", "db.example.com", 6432),
        ),
        (
            "postgres://postgres:postgres@localhost/postgres",
            ServerInfo("DATABASE_URL", "postgres", "postgres", "postgres", "localhost", None),
        ),
        (
            "postgresql://bob:p%40ss%3Aw%2Frd@[::1]:5433/my%20db",
            ServerInfo("DATABASE_URL", "my db", "bob", "p@ss:w/rd", "::1", 5433),
        ),
        (
            "postgresql:///app?host=/var/run/postgresql",
            ServerInfo("DATABASE_URL", "app", "postgres", "", "/var/run/postgresql", None),
        ),
        (
            "postgresql://carol@%2Ftmp%2FSock/app",
            ServerInfo("DATABASE_URL", "app", "carol", "", "/tmp/Sock", None),
        ),
        (
            "postgresql://x@ignored:1/db?host=%2Fsock&port=5499&user=dave&password=pw&dbname=d2",
            ServerInfo("DATABASE_URL", "d2", "dave", "pw", "/sock", 5499),
        ),
        (
            "postgresql://erin@h/?sslmode=require&application_name=a%2Bb",
            ServerInfo(
                "DATABASE_URL",
                "erin",
                "erin",
                "",
                "h",
                None,
                (("sslmode", "require"), ("application_name", "a+b")),
            ),
        ),
        ("postgresql://", ServerInfo("DATABASE_URL", "postgres", "postgres", "", "", None)),
    ],
)
def test_parse_database_url(url: str, expected: ServerInfo) -> None:
    assert parse_database_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@h/db",
        "sqlite:///x.db",
        "postgresql://u:hunter2@h:notaport/db",
        "postgresql://h/db?port=%C2%B2",
        "localhost:5432",
    ],
)
def test_parse_database_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|port") as error:
        parse_database_url(url)
    assert "hunter2" not in str(error.value)


_hosts = st.one_of(
    st.just(""),
    st.sampled_from(["::1", "fe80::1", "127.0.0.1"]),
    st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,20}[A-Za-z0-9])?", fullmatch=True),
    st.text(min_size=1).map(lambda s: "/" + s),
)
_option_names = st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(
    lambda k: k not in ("host", "port", "user", "password", "dbname")
)


@given(
    dbname=st.text(min_size=1),
    user=st.text(min_size=1),
    password=st.text(),
    host=_hosts,
    port=st.none() | st.integers(1, 65535),
    options=st.dictionaries(_option_names, st.text(), max_size=3),
)
def test_url_round_trips(
    dbname: str, user: str, password: str, host: str, port: int | None, options: dict[str, str]
) -> None:
    info = ServerInfo("x", dbname, user, password, host, port, tuple(options.items()))
    assert parse_database_url(info.url(), source="x") == info


def test_django_database_entry_and_overrides() -> None:
    info = ServerInfo("x", "db", "u", "pw", "/sock", 5432, (("sslmode", "disable"),))
    assert info.django_database() == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "db",
        "USER": "u",
        "PASSWORD": "pw",
        "HOST": "/sock",
        "PORT": "5432",
        "OPTIONS": {"sslmode": "disable"},
    }
    entry = info.django_database(CONN_MAX_AGE=60, OPTIONS={})
    assert entry["CONN_MAX_AGE"] == 60
    assert entry["OPTIONS"] == {}
    assert "pw" not in repr(info)


def test_get_server_is_a_singleton_behind_django_settings() -> None:
    info = get_server()
    assert get_server() is info
    expected = "DATABASE_URL" if os.environ.get("DATABASE_URL") else ("pgserver", "binaries")
    assert info.source in expected
    settings_dict = connection.settings_dict
    assert (settings_dict["HOST"], settings_dict["USER"]) == (info.host, info.user)


@pytest.mark.django_db
def test_session_server_answers_through_django() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1, current_setting('server_version_num')::int")
        one, version = cursor.fetchone()
    assert one == 1
    assert version >= 130000
    assert connection.settings_dict["NAME"] == "test_" + get_server().dbname


@pytest.mark.parametrize("source", SOURCES)
def test_embedded_source_starts_answers_and_cleans_up(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The forced source wins over DATABASE_URL.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@unreachable.invalid/x")
    monkeypatch.setenv(embedded.ENV_SOURCE, source)
    server = start_server()
    try:
        assert server.info.source == source
        assert server.data_dir is not None
        assert server.data_dir.is_dir()
        with psycopg.connect(server.info.url()) as conn:
            row = conn.execute("SELECT 1, current_setting('listen_addresses')").fetchone()
        assert row == (1, "")  # unix socket only
    finally:
        server.stop()
    assert not server.data_dir.exists()
    server.stop()  # idempotent
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.info.url(), connect_timeout=2)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    "exit_code",
    [
        pytest.param("pass", id="atexit"),
        # No atexit (as when mypy's Django plugin loads the settings): the watchdog cleans up.
        pytest.param("os._exit(0)", id="os._exit"),
        pytest.param("os.kill(os.getpid(), signal.SIGKILL)", id="SIGKILL"),
    ],
)
def test_get_server_stops_and_removes_when_the_process_ends(source: str, exit_code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env[embedded.ENV_SOURCE] = source
    code = (
        "import os, signal\n"
        "from async_prefetch.devtools.embedded import get_server\n"
        "print(get_server().host, flush=True)\n" + exit_code
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    socket_dir = Path(result.stdout.strip())
    assert socket_dir.is_absolute(), result.stderr
    deadline = time.monotonic() + 20
    while socket_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not socket_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"host={socket_dir} user=postgres dbname=postgres", connect_timeout=2)


def test_binaries_search_prefers_path_then_highest_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("9.6", "16", "12"):
        bindir = tmp_path / "lib" / version / "bin"
        bindir.mkdir(parents=True)
        for exe in ("initdb", "postgres"):
            (bindir / exe).touch(mode=0o755)
    monkeypatch.setattr(embedded, "DEBIAN_BINDIRS", str(tmp_path / "lib" / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert embedded.find_postgres_bindir() == tmp_path / "lib" / "16" / "bin"
    monkeypatch.setenv("PATH", str(tmp_path / "lib" / "12" / "bin"))
    assert embedded.find_postgres_bindir() == tmp_path / "lib" / "12" / "bin"


def test_no_source_available_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv(embedded.ENV_SOURCE, raising=False)
    for module in ("pgserver", "pgserver.postgres_server"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    monkeypatch.setattr(embedded, "DEBIAN_BINDIRS", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"docker compose up -d.*DATABASE_URL=postgresql://"):
        start_server()


def test_unknown_source_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.ENV_SOURCE, "docker")
    with pytest.raises(ValueError, match="ASYNC_PREFETCH_EMBEDDED='docker'"):
        start_server()


def test_database_url_source_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(embedded.ENV_SOURCE, raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5432/app")
    server = start_server()
    assert server.info == ServerInfo("DATABASE_URL", "app", "u", "p", "db", 5432)
    assert server.data_dir is None
    server.stop()
