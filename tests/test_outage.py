"""The engine fails fast while its server is down and recovers as soon as it is back.

A throw-away server of the tests' own is stopped and started again on the same socket;
the pool's timeout is set far above what a fast failure may take.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import anyio
import psycopg
import pytest
from django.db import OperationalError, connections

from async_prefetch.devtools.embedded import RunningServer, find_postgres_bindir, start_server
from async_prefetch.execution import PoolExecutor, new_limiter
from async_prefetch.execution.pools import close_pools, get_pool, pool_stats
from async_prefetch.runtime import bridge
from async_prefetch.sql.compiler import compile_queryset
from tests.testapp.models import Page
from tests.throwaway import engine_alias, page_numbers

ALIAS = "outage"
TIMEOUT = 10.0  # the pool's: a fast failure takes a small fraction of it


class Server:
    """A throw-away server that can be stopped and started again on the same socket."""

    def __init__(self) -> None:
        self.running: RunningServer = start_server("binaries")
        assert self.running.data_dir is not None
        self.directory = self.running.data_dir
        self.data = self.directory / "data"
        bindir = find_postgres_bindir()
        assert bindir is not None
        self.pg_ctl = str(bindir / "pg_ctl")
        owner = self.directory.stat()
        self.run_as: dict[str, Any] = (
            {"user": owner.st_uid, "group": owner.st_gid, "extra_groups": []}
            if os.geteuid() == 0
            else {}
        )
        self.restarted = False

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            [self.pg_ctl, "-D", str(self.data), "-w", *args],
            check=check,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            **self.run_as,
        )

    def stop(self) -> None:
        """Fast shutdown: the server ends every session, as in a restart."""
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        info = self.running.info
        options = f"-k {info.host} -h '' -p {info.port} -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.directory / "restarted.log"), "start")
        self.restarted = True

    def close(self) -> None:
        """Stop the server, whether or not it was restarted, and remove its directory."""
        if self.restarted:  # not start_server()'s process any more
            self._pg_ctl("-m", "immediate", "stop", check=False)
        self.running.stop()

    def url(self) -> str:
        return self.running.info.url()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server whose ``postgres`` database holds page 1 of book 1, and a role ``limited``
    allowed one connection."""
    server = Server()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE testapp_page (id bigint PRIMARY KEY, book_id bigint NOT NULL,"
                " number integer NOT NULL, text text NOT NULL)"
            )
            conn.execute("INSERT INTO testapp_page VALUES (1, 1, 1, '')")
            conn.execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 1")
            conn.execute("GRANT SELECT ON testapp_page TO limited")
        yield server
    finally:
        server.close()


@pytest.fixture
def alias(server: Server, settings: Any) -> Iterator[str]:
    """An alias for the throw-away server (only the engine's pool uses it)."""
    settings.ASYNC_PREFETCH = {"POOL": {"TIMEOUT": TIMEOUT}}
    with engine_alias(ALIAS, server.running.info.django_database(OPTIONS={})) as alias:
        yield alias


def failing_fast(alias: str) -> OperationalError:
    started = time.monotonic()
    with pytest.raises(OperationalError) as raised:
        page_numbers(alias)
    assert time.monotonic() - started < TIMEOUT / 5
    return raised.value


def client_sessions(server: Server) -> int:
    """Client sessions of the server other than this one."""
    with psycopg.connect(server.url(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def settled_sessions(server: Server) -> int:
    """:func:`client_sessions` once it is 0, or after 5 s (a backend exits after its client)."""
    deadline = time.monotonic() + 5
    while (count := client_sessions(server)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def test_restart_between_calls_costs_no_failed_call(alias: str, server: Server) -> None:
    """Idle pooled connections the server closed are replaced, not handed to a query."""
    assert page_numbers(alias) == [1]
    server.stop()
    server.start()
    assert page_numbers(alias) == [1]


def test_server_down_fails_fast_with_the_cause_then_recovers(alias: str, server: Server) -> None:
    assert page_numbers(alias) == [1]
    server.stop()
    try:
        for _ in range(2):  # on the warm pool, then on the next one
            error = failing_fast(alias)
            assert isinstance(error.__cause__, psycopg.OperationalError)
            assert str(error) == str(error.__cause__)
            assert "No such file or directory" in str(error)  # the socket is gone
    finally:
        server.start()
    assert page_numbers(alias) == [1]  # the first call after the restart
    assert client_sessions(server) > 0
    bridge.run_sync(close_pools)  # what aclose() and bridge.shutdown() do
    assert settled_sessions(server) == 0  # retired pools closed too


def test_busy_pool_refused_extra_connections_waits(
    alias: str, server: Server, settings: Any
) -> None:
    """With its only allowed connection checked out, a second query waits for it: the
    server refusing another connection does not mean it cannot be reached."""
    settings.ASYNC_PREFETCH = {"POOL": {"MIN_SIZE": 1, "MAX_SIZE": 2, "TIMEOUT": TIMEOUT}}
    connections[alias].settings_dict["USER"] = "limited"
    compiled = compile_queryset(Page.objects.using(alias).all())
    sleeper = replace(
        compiled,
        sql="SELECT pg_backend_pid(), statement_timestamp(), clock_timestamp() FROM pg_sleep(0.3)",
        params=(),
    )
    finished: list[Any] = []

    async def scenario() -> dict[str, int]:
        # The pool's one allowed connection is open before the queries start: a refused
        # attempt that raced the first one ever made would find no connection at all.
        await (await get_pool(alias)).wait()
        executor = PoolExecutor(alias, new_limiter(2), None)

        async def consume(rows: Any) -> None:
            finished.extend(rows)

        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.fetch, sleeper, consume)
            tg.start_soon(executor.fetch, sleeper, consume)
        return pool_stats()[alias]

    stats = bridge.run_sync(scenario)
    assert stats["connections_errors"] >= 1  # the pool did try to grow, and was refused
    (first_pid, _, first_end), (second_pid, second_start, _) = sorted(finished, key=lambda r: r[1])
    assert first_pid == second_pid
    assert second_start >= first_end  # one after the other, on the one connection
