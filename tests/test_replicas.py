"""Read replicas: ``ASYNC_PREFETCH["REPLICAS"]`` against real streaming replicas.

Two standbys of the test primary (``pg_basebackup -R``, :mod:`tests.servers`) serve as
``replica_a`` and ``replica_b``. Each logs every statement, so the tests count the queries
each server ran; results are compared with Django's on the primary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.db.models import Prefetch, prefetch_related_objects
from django.test.utils import CaptureQueriesContext
from pytest_django.fixtures import Settings

import async_prefetch
from async_prefetch.devtools.embedded import get_server
from async_prefetch.execution import executor_for, new_limiter
from async_prefetch.execution.replicas import CHECK_INTERVAL, LAG_SQL, forget_replicas
from tests.cache_snapshot import assert_same_prefetch
from tests.conftest import Bookstore
from tests.servers import Replica, Unavailable, extra_databases, primary_lsn, start_replicas
from tests.testapp.models import Author, Book, Tag

pytestmark = pytest.mark.django_db(transaction=True)

NAMES = ["replica_a", "replica_b"]


def lookups() -> list[Any]:
    """Five relations, fresh for each call. Authors and tags are ordered by key: a replica
    is another server, whose plan may return an unordered relation's rows in another
    order than the primary's (Django's side reads the primary)."""
    return [
        Prefetch("authors", queryset=Author.objects.order_by("pk")),
        "pages",
        Prefetch("tags", queryset=Tag.objects.order_by("pk")),
        "reviews",
        "publisher",
    ]


TABLES = '"testapp_'  # what every query of the tests' models names


@pytest.fixture(scope="module")
def replicas(django_db_setup: None) -> Iterator[dict[str, Replica]]:
    """Two streaming replicas of the test primary, as ``DATABASES`` aliases."""
    try:
        started = start_replicas(get_server(), NAMES)
    except Unavailable as exc:
        pytest.skip(f"no streaming replica of the test primary: {exc}")
    try:
        entries = {r.name: {"HOST": str(r.directory), "PORT": "5432"} for r in started}
        with extra_databases(entries):
            yield {r.name: r for r in started}
    finally:
        for replica in started:
            replica.remove()


@pytest.fixture
def spread(
    replicas: dict[str, Replica], settings: Settings, bookstore: Bookstore
) -> Iterator[None]:
    """The bookstore on both replicas, and the engine reading ``default`` from them."""
    settings.ASYNC_PREFETCH = {"REPLICAS": {"default": NAMES}}
    for replica in replicas.values():
        if not replica.running:
            replica.start()
    catch_up(replicas)
    forget_replicas()
    yield
    forget_replicas()


def catch_up(replicas: dict[str, Replica], *names: str) -> None:
    lsn = primary_lsn(get_server())
    for name in names or NAMES:
        replicas[name].wait_for_replay(lsn)


def commit_now() -> None:
    """A transaction with a transaction id, committed on the primary (no row changes)."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT txid_current()")


def marks(replicas: dict[str, Replica]) -> dict[str, int]:
    return {name: replica.log_mark() for name, replica in replicas.items()}


def counts(replicas: dict[str, Replica], since: dict[str, int]) -> dict[str, int]:
    """Queries on the test models each replica ran since ``since``."""
    return {name: len(r.statements(since[name], TABLES)) for name, r in replicas.items()}


def django_books() -> list[Book]:
    books = list(Book.objects.order_by("pk"))
    prefetch_related_objects(books, *lookups())
    return books


def django_query_count() -> int:
    with CaptureQueriesContext(connections["default"]) as ctx:
        django_books()
    return len(ctx.captured_queries)


@pytest.mark.anyio
async def test_one_call_spreads_over_the_replicas(
    replicas: dict[str, Replica], spread: None
) -> None:
    expected = await sync_to_async(django_books)()
    queries = await sync_to_async(django_query_count)()
    before = marks(replicas)
    got = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups())
    ran = counts(replicas, before)
    assert_same_prefetch(expected, got, lookups())
    # Every query (root and five levels) ran on a replica, none on the primary...
    assert sum(ran.values()) == queries == 1 + len(lookups()), ran
    # ...and the five concurrent levels were spread over both.
    assert min(ran.values()) >= 2, ran


def test_sync_api_reads_from_replicas(replicas: dict[str, Replica], spread: None) -> None:
    expected = django_books()
    before = marks(replicas)
    with CaptureQueriesContext(connections["default"]) as log:
        got = async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups())
    ran = counts(replicas, before)
    assert_same_prefetch(expected, got, lookups())
    assert sum(ran.values()) == 1 + len(lookups()), ran
    assert min(ran.values()) >= 1, ran
    # Reported where Django's queries on the alias the router chose are: its query log.
    assert len(log.captured_queries) == 1 + len(lookups())


@pytest.mark.anyio
async def test_replicas_are_checked_every_few_seconds_not_per_query(
    replicas: dict[str, Replica], spread: None
) -> None:
    before = marks(replicas)
    started = time.monotonic()
    for _ in range(5):
        await async_prefetch.aprefetch(Book.objects.all(), *lookups())
    elapsed = time.monotonic() - started
    checks = {n: len(r.statements(before[n], "pg_is_in_recovery()")) for n, r in replicas.items()}
    ran = counts(replicas, before)
    assert sum(ran.values()) == 5 * (1 + len(lookups())), ran
    # The first use checks each replica; later calls only once CHECK_INTERVAL has passed.
    bound = 1 + int(elapsed / CHECK_INTERVAL) + 1
    assert all(1 <= n <= bound for n in checks.values()), (checks, elapsed)


def test_inside_atomic_every_query_stays_on_the_primary(
    replicas: dict[str, Replica], spread: None
) -> None:
    before = marks(replicas)
    with transaction.atomic():
        Tag.objects.create(name="uncommitted")  # only the primary's transaction sees it
        got = async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups())
        expected = django_books()
        assert Tag.objects.filter(name="uncommitted").exists()
        assert any(t.name == "uncommitted" for t in Tag.objects.all())
    assert_same_prefetch(expected, got, lookups())
    assert counts(replicas, before) == {"replica_a": 0, "replica_b": 0}


class ReadFromReplicaB:
    """A router: every read goes to ``replica_b`` (writes to ``default``)."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica_b"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


@pytest.mark.anyio
async def test_the_router_picks_the_alias_first(
    replicas: dict[str, Replica], spread: None, settings: Settings
) -> None:
    expected = await sync_to_async(django_books)()
    settings.DATABASE_ROUTERS = [f"{__name__}.ReadFromReplicaB"]
    before = marks(replicas)
    got = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups())
    # replica_b has no replicas of its own: everything runs there, nothing on replica_a.
    assert counts(replicas, before) == {"replica_a": 0, "replica_b": 1 + len(lookups())}
    assert {book._state.db for book in got} == {"replica_b"}  # as Django's with that router
    assert [(b.pk, [a.pk for a in b.authors.all()]) for b in got] == [
        (b.pk, [a.pk for a in b.authors.all()]) for b in expected
    ]


@pytest.mark.anyio
async def test_a_stopped_replica_is_skipped_with_a_log_line(
    replicas: dict[str, Replica], spread: None, caplog: pytest.LogCaptureFixture
) -> None:
    await async_prefetch.aprefetch(Book.objects.all(), "authors")  # both checked: usable
    expected = await sync_to_async(django_books)()
    replicas["replica_b"].stop()
    before = marks(replicas)
    with caplog.at_level(logging.INFO, logger="async_prefetch"):
        got = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups())
        again = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups())
    assert_same_prefetch(expected, got, lookups())
    assert_same_prefetch(expected, again, lookups())
    assert counts(replicas, {**before, "replica_b": 0})["replica_a"] == 2 * (1 + len(lookups()))
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1, skipped  # once per change, not per query
    assert "'replica_b'" in skipped[0], skipped
    assert "unreachable" in skipped[0], skipped

    replicas["replica_b"].start()
    catch_up(replicas)
    deadline = time.monotonic() + 30 * CHECK_INTERVAL
    while True:  # the next check after CHECK_INTERVAL finds it back
        before = marks(replicas)
        with caplog.at_level(logging.INFO, logger="async_prefetch"):
            await async_prefetch.aprefetch(Book.objects.all(), *lookups())
        if counts(replicas, before)["replica_b"]:
            break
        assert time.monotonic() < deadline, "replica_b not used again after it came back"
        await anyio.sleep(0.2)
    assert any("usable again" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_every_replica_down_reads_from_the_primary(
    replicas: dict[str, Replica], spread: None, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await sync_to_async(django_books)()
    for replica in replicas.values():
        replica.stop()
    with caplog.at_level(logging.WARNING, logger="async_prefetch"):
        got = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups())
    assert_same_prefetch(expected, got, lookups())
    messages = [r.getMessage() for r in caplog.records]
    assert any("no read replica of database 'default' is usable" in m for m in messages)


def replica_lag(replica: Replica, dbname: str) -> float | None:
    with replica.connect(dbname) as conn:
        row = conn.execute(LAG_SQL).fetchone()
    return None if row is None or row[0] is None else float(row[0])


@pytest.mark.anyio
async def test_a_replica_lagging_beyond_the_bound_is_skipped(
    replicas: dict[str, Replica],
    spread: None,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    max_lag = 0.5
    settings.ASYNC_PREFETCH = {"REPLICAS": {"default": NAMES}, "REPLICA_MAX_LAG": max_lag}
    dbname = connections["default"].settings_dict["NAME"]
    lagging = replicas["replica_a"]
    with lagging.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        await sync_to_async(Tag.objects.create)(name="written while replay is paused")
        deadline = time.monotonic() + 30
        while (lag := replica_lag(lagging, dbname)) is None or lag <= 2 * max_lag:
            assert time.monotonic() < deadline, f"replica_a's lag stayed at {lag}"
            await anyio.sleep(0.05)
        expected = await sync_to_async(django_books)()
        # replica_b's lag is the age of its last replayed commit whenever it has received
        # WAL it has not replayed yet (hint bits of the reads above, a checkpoint): a
        # commit just now keeps that age small while it catches up.
        await sync_to_async(commit_now)()
        catch_up(replicas, "replica_b")
        before = marks(replicas)
        with caplog.at_level(logging.WARNING, logger="async_prefetch"):
            got = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups())
        assert_same_prefetch(expected, got, lookups())
        assert counts(replicas, before) == {"replica_a": 0, "replica_b": 1 + len(lookups())}
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert len(skipped) == 1, skipped
        assert "'replica_a'" in skipped[0], skipped
        assert f"REPLICA_MAX_LAG = {max_lag:g} s" in skipped[0], skipped
    finally:
        with lagging.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    # Caught up (nothing received left to replay): lag 0, whatever the last commit's age.
    deadline = time.monotonic() + 30
    while replica_lag(lagging, dbname) != 0.0:
        assert time.monotonic() < deadline, "replica_a did not catch up"
        await anyio.sleep(0.05)


def test_without_a_bound_a_lagging_replica_is_used(
    replicas: dict[str, Replica], spread: None
) -> None:
    lagging = replicas["replica_a"]
    with lagging.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        Tag.objects.create(name="written while replay is paused")
        before = marks(replicas)
        async_prefetch.prefetch(Book.objects.all(), *lookups())
        assert counts(replicas, before)["replica_a"] >= 1
    finally:
        with lagging.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        catch_up(replicas)


def test_replicas_of_a_database_that_is_not_postgresql(
    replicas: dict[str, Replica], settings: Settings
) -> None:
    settings.ASYNC_PREFETCH = {"REPLICAS": {"default": ["replica_a", "sqlite"]}}
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    with (
        extra_databases({"sqlite": sqlite}),
        pytest.raises(ImproperlyConfigured, match="'sqlite'"),
    ):
        executor_for("default", connections["default"], new_limiter(1), caller_connections=False)


def test_replicas_replay_the_primarys_writes(replicas: dict[str, Replica], spread: None) -> None:
    """The fixture's servers are real standbys of the test primary."""
    dbname = connections["default"].settings_dict["NAME"]
    Tag.objects.create(name="streamed")
    catch_up(replicas)
    for replica in replicas.values():
        with replica.connect(dbname) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            assert conn.execute(
                "SELECT count(*) FROM testapp_tag WHERE name = 'streamed'"
            ).fetchone() == (1,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO testapp_tag (name) VALUES ('nope')")
