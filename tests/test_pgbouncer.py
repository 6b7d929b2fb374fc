"""The engine through a real PgBouncer in transaction pooling mode (docker-compose.yml's
setup, reproduced with the ``pgbouncer`` binary by :func:`tests.servers.start_pgbouncer`).

Two aliases reach the test database through it: ``bouncer`` with
``DISABLE_SERVER_SIDE_CURSORS`` (Django's advice for transaction pooling) and
``bouncer_cursors`` without. Results are compared with Django's through the same alias;
PgBouncer's own statistics show that the engine's queries went through it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anyio
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import connections, transaction
from django.db.models import Prefetch, prefetch_related_objects

import async_prefetch
from async_prefetch.devtools.embedded import get_server
from async_prefetch.execution.pools import connection_kwargs
from async_prefetch.streaming import aiterator, iterator
from tests.cache_snapshot import assert_same_prefetch
from tests.conftest import Bookstore
from tests.server_time import slow
from tests.servers import PgBouncer, Unavailable, pgbouncer_databases
from tests.testapp.models import Book, Page

pytestmark = pytest.mark.django_db(
    transaction=True, databases=["default", "bouncer", "bouncer_cursors"]
)

LOOKUPS = ["authors__location", "pages", "tags", "reviews", "publisher", "comments"]
ALIASES = ["bouncer", "bouncer_cursors"]
#: PgBouncer's server connections per database: fewer than the engine's pool opens.
POOL_SIZE = 3


@pytest.fixture(scope="module")
def bouncer(django_db_setup: None) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling) in front of the test primary, as two aliases."""
    entries = {
        "bouncer": {"DISABLE_SERVER_SIDE_CURSORS": True},
        "bouncer_cursors": {"DISABLE_SERVER_SIDE_CURSORS": False},
    }
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(pgbouncer_databases(POOL_SIZE, entries))
        except Unavailable as exc:
            pytest.skip(f"no PgBouncer: {exc}")
        yield server


def queries_through(server: PgBouncer) -> int:
    """Queries PgBouncer has passed to the test database so far (``SHOW STATS``)."""
    dbname = connections["default"].settings_dict["NAME"]
    with psycopg.connect(server.info("pgbouncer").url(), autocommit=True) as admin:
        cursor = admin.execute("SHOW STATS")
        columns = [column.name for column in cursor.description or ()]
        for row in cursor.fetchall():
            stats = dict(zip(columns, row, strict=True))
            if stats["database"] == dbname:
                count: Decimal = stats["total_query_count"]
                return int(count)
    return 0


def books_on(alias: str) -> list[Book]:
    return list(Book.objects.using(alias).order_by("pk"))


def django_books(alias: str) -> list[Book]:
    books = books_on(alias)
    prefetch_related_objects(books, *LOOKUPS)
    return books


@pytest.mark.anyio
async def test_aprefetch_through_pgbouncer(bouncer: PgBouncer, bookstore: Bookstore) -> None:
    expected = await sync_to_async(django_books)("bouncer")
    before = queries_through(bouncer)
    got = await async_prefetch.aprefetch(Book.objects.using("bouncer").order_by("pk"), *LOOKUPS)
    assert_same_prefetch(expected, got, LOOKUPS)
    assert queries_through(bouncer) - before >= 1 + len(LOOKUPS)


def test_prefetch_through_pgbouncer(bouncer: PgBouncer, bookstore: Bookstore) -> None:
    expected = django_books("bouncer")
    before = queries_through(bouncer)
    got = async_prefetch.prefetch(Book.objects.using("bouncer").order_by("pk"), *LOOKUPS)
    assert_same_prefetch(expected, got, LOOKUPS)
    assert queries_through(bouncer) - before >= 1 + len(LOOKUPS)


def test_many_concurrent_calls_through_pgbouncer(bouncer: PgBouncer, bookstore: Bookstore) -> None:
    """Many more client connections (the engine's pool, up to 10) than PgBouncer's
    server connections (``POOL_SIZE``): each query may run on another server connection."""
    expected = django_books("bouncer")

    async def calls() -> list[list[Book]]:
        results: list[list[Book]] = []

        async def one() -> None:
            queryset = Book.objects.using("bouncer").order_by("pk")
            results.append(await async_prefetch.aprefetch(queryset, *LOOKUPS))

        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
        return results

    for got in anyio.run(calls):
        assert_same_prefetch(expected, got, LOOKUPS)
    # As Django's, the engine's connections prepare no statements (transaction pooling
    # would send an execution to a server connection that lacks the statement).
    assert connection_kwargs("bouncer")["prepare_threshold"] is None


def django_chunks(alias: str, chunk_size: int) -> list[Book]:
    """Django's ``iterator(chunk_size)`` with the lookups (in a transaction: a server-side
    cursor of Django's outside one is ``WITH HOLD``, which transaction pooling breaks)."""
    with transaction.atomic(using=alias):
        queryset = Book.objects.using(alias).order_by("pk").prefetch_related(*LOOKUPS)
        return list(queryset.iterator(chunk_size=chunk_size))


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.anyio
async def test_aiterator_through_pgbouncer(
    bouncer: PgBouncer, bookstore: Bookstore, alias: str
) -> None:
    expected = await sync_to_async(django_chunks)(alias, 2)
    before = queries_through(bouncer)
    got = [
        book
        async for book in aiterator(
            Book.objects.using(alias).order_by("pk"), *LOOKUPS, chunk_size=2, read_ahead=2
        )
    ]
    assert_same_prefetch(expected, got, LOOKUPS)
    assert queries_through(bouncer) - before >= 1 + len(LOOKUPS)


@pytest.mark.parametrize("alias", ALIASES)
def test_iterator_through_pgbouncer(bouncer: PgBouncer, bookstore: Bookstore, alias: str) -> None:
    expected = django_chunks(alias, 3)
    got = list(iterator(Book.objects.using(alias).order_by("pk"), *LOOKUPS, chunk_size=3))
    assert_same_prefetch(expected, got, LOOKUPS)


def running_sleeps() -> list[Any]:
    """Queries sleeping in the test primary right now (any client)."""
    dbname = connections["default"].settings_dict["NAME"]
    with psycopg.connect(get_server().url(), dbname=dbname, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%%pg_sleep%%' AND pid <> pg_backend_pid()"
        ).fetchall()


@pytest.mark.anyio
async def test_a_cancelled_call_stops_its_query_in_the_server(
    bouncer: PgBouncer, bookstore: Bookstore
) -> None:
    """PgBouncer forwards the engine's cancel requests to the server connection."""
    books = await sync_to_async(books_on)("bouncer")
    sleeping = Prefetch("pages", queryset=slow(Page.objects.all(), 60))
    started = time.monotonic()
    with anyio.move_on_after(1.0) as scope:
        await async_prefetch.aprefetch_related_objects(books, sleeping)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 30  # not the query's 60 s
    assert running_sleeps() == []
    # The connection went back to the pool in a usable state.
    got = await async_prefetch.aprefetch(Book.objects.using("bouncer").order_by("pk"), "pages")
    assert [len(book.pages.all()) for book in got] == [
        len(book.pages.all()) for book in await sync_to_async(django_books)("bouncer")
    ]
