"""The pipeline executors: a stage's queries in one round trip on one connection.

Inside ``atomic`` the engine sends each stage on the caller's own connection in psycopg's
pipeline mode (the transaction's rows seen, one round trip per stage); ``round_trips=1``
does the same on one pooled connection. Round trips are measured through the latency
proxy; results are compared with Django's own prefetching.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import connection, connections, transaction
from django.db import utils as django_db_utils
from django.db.models import Prefetch, prefetch_related_objects
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.config import WRONG_TYPE, read_config
from async_prefetch.devtools.latency_proxy import LatencyProxyProcess
from async_prefetch.execution import CallerConnectionExecutor, CallerPipelineExecutor
from async_prefetch.gather import agather
from async_prefetch.runtime import bridge
from tests.cache_snapshot import assert_same_prefetch
from tests.factories import seed_bookstore
from tests.pipelines import batch_sizes
from tests.run_state import pool_ready
from tests.servers import default_through_proxy as proxied_default
from tests.testapp.models import Author, Book, Page, Review

RTT = 0.08  # seconds: far above this machine's noise, so the bounds are robust

SIBLINGS: tuple[Any, ...] = (
    "pages",
    "authors",
    "tags",
    "publisher",
    Prefetch("reviews", queryset=Review.objects.order_by("pk"), to_attr="all_reviews"),
)


def _books() -> list[Book]:
    return list(Book.objects.order_by("pk"))


def _timed(func: Any) -> float:
    """Seconds ``func()`` takes, the cyclic collector off meanwhile: a full collection of
    a test process's heap (late in a suite, on a slow CI machine) can take several of these
    tests' round trips, which is not what they count."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        func()
        return time.perf_counter() - started
    finally:
        gc.enable()


@pytest.fixture
def pipelines_seen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the caller's connection sends."""
    return batch_sizes(monkeypatch, CallerPipelineExecutor, "_send")


# -- inside atomic: same results, a stage per pipeline -------------------------------------


@pytest.mark.django_db
def test_atomic_siblings_match_django_in_one_pipeline(pipelines_seen: list[int]) -> None:
    seed_bookstore()
    expected = _books()
    prefetch_related_objects(expected, *SIBLINGS, "authors__location__country")
    got = _books()
    with CaptureQueriesContext(connection) as queries:
        async_prefetch.prefetch_related_objects(got, *SIBLINGS, "authors__location__country")
    assert_same_prefetch(expected, got, [*SIBLINGS, "authors__location__country"])
    # Every query is in the caller's query log; the stages went as one pipeline each.
    assert len(queries) == 7
    assert pipelines_seen == [5, 1, 1]


@pytest.mark.django_db(transaction=True)
def test_atomic_async_api_sees_uncommitted_rows(pipelines_seen: list[int]) -> None:
    seed_bookstore()
    with transaction.atomic():
        book = Book.objects.order_by("pk").first()
        assert book is not None
        Page.objects.create(book=book, number=99)
        got = async_to_sync(async_prefetch.aprefetch)(Book.objects.order_by("pk"), *SIBLINGS)
        expected = _books()
        prefetch_related_objects(expected, *SIBLINGS)
        assert_same_prefetch(expected, got, SIBLINGS)
        assert 99 in [page.number for page in got[0].pages.all()]
        transaction.set_rollback(True)
    assert pipelines_seen == [1, 5]  # the root query, then the five siblings


@pytest.mark.django_db
def test_execute_wrappers_see_every_query() -> None:
    seed_bookstore()
    seen: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        assert context["connection"] is connections["default"]
        return execute(sql, params, many, context)

    books = _books()
    with connection.execute_wrapper(wrapper):
        async_prefetch.prefetch_related_objects(books, *SIBLINGS)
    assert len(seen) == 5
    assert all(sql.startswith("SELECT") for sql in seen)


@pytest.mark.django_db
def test_pipeline_false_runs_one_query_at_a_time(settings: Any, monkeypatch: Any) -> None:
    settings.ASYNC_PREFETCH = {"PIPELINE": False}
    seed_bookstore()
    used: list[str] = []
    original = CallerConnectionExecutor.fetch

    async def fetch(self: Any, query: Any, consume: Any) -> None:
        used.append("caller")
        await original(self, query, consume)

    monkeypatch.setattr(CallerConnectionExecutor, "fetch", fetch)
    expected = _books()
    prefetch_related_objects(expected, *SIBLINGS)
    got = _books()
    async_prefetch.prefetch_related_objects(got, *SIBLINGS)
    assert_same_prefetch(expected, got, SIBLINGS)
    assert used == ["caller"] * 5


# -- errors: Django's exception, no partial caches, the transaction as Django leaves it --------


FAILING = Prefetch("reviews", queryset=Review.objects.extra(where=["no_such_column = 1"]))


def _no_caches(books: list[Book]) -> bool:
    """No half-filled caches: nothing prefetched, no related object cached."""
    return not any(
        getattr(book, "_prefetched_objects_cache", {}) or book._state.fields_cache for book in books
    )


def _transaction_state() -> tuple[Any, ...]:
    return (
        connection.needs_rollback,
        connection.errors_occurred,
        connection.connection.info.transaction_status,
    )


def _fail_inside_atomic(prefetch: Any) -> tuple[type[BaseException], tuple[Any, ...], Any]:
    """Run ``prefetch`` (which fails) in a savepoint, catching its error inside it as
    user code may; returns the error's class, the connection's state right after, and
    what the next query raises."""
    with transaction.atomic():
        with pytest.raises(django_db_utils.Error) as caught:
            prefetch()
        state = _transaction_state()
        with pytest.raises(django_db_utils.Error) as next_query:
            Book.objects.count()
        transaction.set_rollback(True)
    connection.errors_occurred = False  # as Django resets it on a clean rollback
    return caught.type, state, (next_query.type, str(next_query.value).split("\n")[0])


@pytest.mark.django_db
def test_failure_matches_django_and_leaves_no_caches() -> None:
    seed_bookstore()
    lookups = ("pages", "authors", FAILING)
    django_books = _books()
    django_outcome = _fail_inside_atomic(lambda: prefetch_related_objects(django_books, *lookups))
    engine_books = _books()
    engine_outcome = _fail_inside_atomic(
        lambda: async_prefetch.prefetch_related_objects(engine_books, *lookups)
    )
    assert engine_outcome == django_outcome
    assert django_outcome[0] is django_db_utils.ProgrammingError
    assert _no_caches(engine_books)


@pytest.mark.django_db
def test_failure_in_a_later_stage_undoes_the_earlier_ones() -> None:
    seed_bookstore()
    books = _books()
    lookups = ("pages", Prefetch("authors__location", queryset=FAILING.queryset))
    with pytest.raises(django_db_utils.ProgrammingError) as caught, transaction.atomic():
        async_prefetch.prefetch_related_objects(books, *lookups)
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedColumn)
    assert _no_caches(books)


# -- round trips through the latency proxy ----------------------------------------------------


@pytest.fixture
def default_through_proxy(transactional_db: None) -> Iterator[LatencyProxyProcess]:
    """The ``default`` alias (the caller's own connection, and the pool) through a proxy
    adding :data:`RTT` per round trip; restored afterwards."""
    seed_bookstore()
    with proxied_default(RTT) as proxy:
        yield proxy


def test_five_siblings_inside_atomic_cost_one_round_trip(
    default_through_proxy: LatencyProxyProcess, pipelines_seen: list[int]
) -> None:
    # The proxy never delivers early: five queries one at a time take at least 5 RTT.
    with transaction.atomic():
        books = _books()
        Book.objects.count()  # the transaction is open (BEGIN sent)
        elapsed = _timed(lambda: async_prefetch.prefetch_related_objects(books, *SIBLINGS))
        assert pipelines_seen == [5]
        assert elapsed < 3.5 * RTT, f"5 siblings took {elapsed / RTT:.2f} round trips"
        assert all("all_reviews" in book.__dict__ for book in books)

        async def both() -> Any:
            return await agather(
                Book.objects.prefetch_related(*SIBLINGS), Author.objects.prefetch_related("books")
            )

        del pipelines_seen[:]
        elapsed = _timed(lambda: async_to_sync(both)())
        # Two stages (the roots, then six prefetches), not eight queries one by one.
        assert pipelines_seen == [2, 6]
        assert elapsed < 5.5 * RTT, f"agather took {elapsed / RTT:.2f} round trips"
        transaction.set_rollback(True)


def test_begin_rides_in_the_transactions_first_pipeline(
    default_through_proxy: LatencyProxyProcess, pipelines_seen: list[int], tmp_path: Path
) -> None:
    # The call's root query is the transaction's first statement: psycopg would send
    # BEGIN and wait for it (a round trip of its own) before queueing the query.
    trace = tmp_path / "libpq.trace"
    with transaction.atomic():
        raw = connection.connection
        with trace.open("w") as out:
            raw.pgconn.trace(out.fileno())
            raw.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                async_prefetch.prefetch(Book.objects.order_by("pk"), *SIBLINGS)
            finally:
                raw.pgconn.untrace()
        assert pipelines_seen == [1, 5]
        # BEGIN with the root query, then the five siblings.
        assert _round_trips(trace.read_text()) == 2
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert not raw.autocommit
        assert connection.in_atomic_block
        assert not connection.needs_rollback
        book = Book.objects.order_by("pk").first()
        assert book is not None
        with transaction.atomic():  # a savepoint in the transaction the engine began
            Page.objects.create(book=book, number=98)
        Page.objects.create(book=book, number=99)
        transaction.set_rollback(True)
    assert not Page.objects.filter(number__in=[98, 99]).exists()
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _round_trips(trace: str) -> int:
    """How many times the client waited for the server in a libpq trace (timestamps
    suppressed): client messages (``F``) followed by a server message (``B``)."""
    directions = [line.split("\t", 1)[0] for line in trace.splitlines() if "\t" in line]
    return sum(1 for sent, got in itertools.pairwise(directions) if (sent, got) == ("F", "B"))


def test_round_trips_1_on_the_pool(
    default_through_proxy: LatencyProxyProcess, settings: Any
) -> None:
    # One idle connection: without the pipeline, five siblings would queue for it.
    settings.ASYNC_PREFETCH = {"POOL": {"MIN_SIZE": 1, "MAX_SIZE": 1}}

    async def gathered() -> Any:
        return await agather(Book.objects.order_by("pk").prefetch_related(*SIBLINGS), round_trips=1)

    async_to_sync(gathered)()  # the pool opened
    before = bridge.run_sync(pool_ready)  # its one connection idle, none being opened
    found: list[Any] = []
    with CaptureQueriesContext(connection) as queries:
        elapsed = _timed(lambda: found.extend(async_to_sync(gathered)()))
    (books,) = found
    assert len(queries) == 6  # every query in the caller's log
    # Two stages; six queries queueing for the one connection would take 6 RTT.
    after = bridge.run_sync(pool_ready)
    assert elapsed < 4.5 * RTT, (
        f"round_trips=1 took {elapsed / RTT:.2f} round trips; pool before {before}, after {after}"
    )
    expected = _books()
    prefetch_related_objects(expected, *SIBLINGS)
    assert_same_prefetch(expected, books, SIBLINGS)


def test_round_trips_must_be_1() -> None:
    with pytest.raises(ValueError, match="round_trips must be 1 or None"):
        async_to_sync(agather)(Book.objects.all(), round_trips=2)


def test_pipeline_setting_is_checked(settings: Any) -> None:
    for value, expected in (("atomic", "atomic"), (True, "always"), (False, "never")):
        settings.ASYNC_PREFETCH = {"PIPELINE": value}
        config, errors = read_config()
        assert config is not None
        assert config.pipeline == expected
        assert not errors
    settings.ASYNC_PREFETCH = {"PIPELINE": "yes", "CONSISTENT": 1}
    config, errors = read_config()
    assert config is None
    assert [(e.id, e.msg) for e in errors] == [
        (WRONG_TYPE, "ASYNC_PREFETCH['PIPELINE'] must be True, False or 'atomic', not str 'yes'."),
        (WRONG_TYPE, "ASYNC_PREFETCH['CONSISTENT'] must be True or False, not int 1."),
    ]
