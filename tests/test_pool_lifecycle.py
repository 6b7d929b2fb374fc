"""A pool follows its alias's connection parameters and names its connections.

The tests run on a throw-away server of their own, so that ``pg_stat_activity`` holds
only the connections they make.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connections

from async_prefetch.devtools.embedded import RunningServer, start_server
from async_prefetch.execution.pools import application_name
from tests.throwaway import engine_alias, page_numbers

ALIAS = "lifecycle"
PAGE_TABLE = (
    "CREATE TABLE testapp_page"
    " (id bigint PRIMARY KEY, book_id bigint NOT NULL, number integer NOT NULL, text text NOT NULL)"
)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """A server with databases ``db_a`` and ``db_b``: book 1 has page 1 in db_a, page 2 in db_b."""
    running = start_server("binaries")
    try:
        with psycopg.connect(running.info.url(), autocommit=True) as conn:
            for number, dbname in enumerate(("db_a", "db_b"), start=1):
                conn.execute(f"CREATE DATABASE {dbname}")
                url = dataclasses.replace(running.info, dbname=dbname).url()
                with psycopg.connect(url, autocommit=True) as db:
                    db.execute(PAGE_TABLE)
                    db.execute("INSERT INTO testapp_page VALUES (%s, 1, %s, '')", (number, number))
        yield running
    finally:
        running.stop()


@pytest.fixture
def alias(server: RunningServer) -> Iterator[str]:
    """An alias for ``db_a`` on the throw-away server (only the engine's pool uses it)."""
    with engine_alias(ALIAS, server.info.django_database(NAME="db_a", OPTIONS={})) as alias:
        yield alias


def engine_connections(server: RunningServer) -> list[tuple[str, str]]:
    """``(database, application_name)`` of the server's other client sessions."""
    with psycopg.connect(server.info.url(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, application_name FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " ORDER BY 1, 2"
        ).fetchall()
    return [(str(datname), str(name)) for datname, name in rows]


def databases(sessions: list[tuple[str, str]]) -> list[str]:
    return [datname for datname, _ in sessions]


def settled_connections(server: RunningServer, expected: list[tuple[str, str]]) -> Any:
    """:func:`engine_connections` once it equals ``expected``, or after 5 s: closing is
    asynchronous (a pool closes in the background, a backend exits after its client)."""
    deadline = time.monotonic() + 5
    while (found := engine_connections(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def test_pool_follows_a_change_of_database_and_closes_the_old_pool(
    alias: str, server: RunningServer, settings: Any
) -> None:
    settings.ASYNC_PREFETCH = {"POOL": {"MIN_SIZE": 1, "MAX_SIZE": 1}}
    assert page_numbers(alias) == [1]
    assert databases(engine_connections(server)) == ["db_a"]

    connections[alias].settings_dict["NAME"] = "db_b"  # as the test runner does

    assert page_numbers(alias) == [2]
    (name,) = {name for _, name in engine_connections(server)}
    expected = [("db_b", name)]
    assert settled_connections(server, expected) == expected  # db_a's pool closed


def test_pooled_connections_carry_an_application_name(
    alias: str, server: RunningServer, settings: Any
) -> None:
    settings.ASYNC_PREFETCH = {"POOL": {"MIN_SIZE": 1, "MAX_SIZE": 1}}
    page_numbers(alias)
    assert engine_connections(server) == [("db_a", "async_prefetch")]

    users = "reporting-worker-" + "x" * 60
    connections[alias].settings_dict["OPTIONS"]["application_name"] = users
    page_numbers(alias)
    expected = users[:46] + " [async_prefetch]"
    assert len(expected) == 63
    assert settled_connections(server, [("db_a", expected)]) == [("db_a", expected)]


def test_application_name_fits_in_63_bytes_on_a_character_boundary() -> None:
    assert application_name(None) == application_name("") == "async_prefetch"
    assert application_name("shop") == "shop [async_prefetch]"
    name = application_name("é" * 40)  # two bytes each
    assert name == "é" * 23 + " [async_prefetch]"
    assert len(name.encode()) == 63
    assert len(application_name("€" * 40).encode()) == 62  # three bytes each: 15 fit


def test_destroying_a_test_database_closes_the_pools_on_it(
    alias: str, server: RunningServer, django_db_blocker: Any
) -> None:
    """Without the app installed (as in this suite's settings) and with the engine's
    connections open on it, Django's ``destroy_test_db()`` drops a test database."""
    with psycopg.connect(server.info.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE test_db_a TEMPLATE db_a")
    connections[alias].settings_dict["NAME"] = "test_db_a"  # as create_test_db() does
    assert page_numbers(alias) == [1]
    assert databases(engine_connections(server)) != []

    with django_db_blocker.unblock():  # Django's own connection drops the database
        connections[alias].creation.destroy_test_db("db_a", verbosity=0)

    with psycopg.connect(server.info.url(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'test_db_a'")
        assert row.fetchone() == (0,)
    assert connections[alias].settings_dict["NAME"] == "db_a"
