"""Outside ``atomic``, a stage with more queries than the pool can give connections at
once sends the surplus in pipelines instead of queueing for connections one by one.

The pool here has two connections; a stage has six queries that each sleep in the
server. Queueing, they run in three waves of one round trip each; pipelined, the two
queries sent first hold the connections, and the four others go as two pipelines of two,
sent as those come back: two waves. Round trips are made long by the latency proxy, and
measured both by the wall clock and by the server's own start times of the queries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from django.db import utils as django_db_utils
from django.db.models import Prefetch, prefetch_related_objects
from django.test.utils import override_settings

import async_prefetch
from async_prefetch.execution import (
    PooledPipelineExecutor,
    PoolExecutor,
    UnderLoadExecutor,
    executor_for,
    new_limiter,
)
from async_prefetch.runtime import bridge
from tests.cache_snapshot import assert_same_prefetch
from tests.factories import seed_bookstore
from tests.pipelines import batch_sizes
from tests.run_state import settle_pool, sleepers
from tests.server_time import slow
from tests.servers import PgBouncer, Unavailable, pgbouncer_databases
from tests.servers import default_through_proxy as proxied_default
from tests.testapp.models import Book, Review

RTT = 0.15  # seconds added by the proxy per round trip
SLEEP = 0.05  # seconds each query of the stage spends in the server
TWO_CONNECTIONS = {"POOL": {"MIN_SIZE": 2, "MAX_SIZE": 2}}


def stage(seconds: float = SLEEP, count: int = 6) -> list[Prefetch[Any]]:
    """``count`` sibling lookups, each one query sleeping ``seconds`` in the server."""
    return [
        Prefetch("reviews", queryset=slow(Review.objects.order_by("pk"), seconds), to_attr=f"r{i}")
        for i in range(count)
    ]


def _books(alias: str = "default") -> list[Book]:
    return list(Book.objects.using(alias).order_by("pk"))


@pytest.fixture
def pipelines_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every pipeline sent on a pooled connection."""
    return batch_sizes(monkeypatch, PooledPipelineExecutor, "send")


@pytest.fixture
def through_proxy(transactional_db: None) -> Iterator[None]:
    """The ``default`` alias through a proxy adding :data:`RTT` per round trip."""
    seed_bookstore()
    with proxied_default(RTT):
        yield


def _timed_stage(
    lookups: list[Prefetch[Any]], sent: list[int]
) -> tuple[float, timedelta, list[Book]]:
    """The wall time of a prefetch of ``lookups`` (a root query, then the stage), the
    server's spread of the stage's start times, and the books (after a first call, not
    counted in ``sent``, has opened the pool's connections)."""
    async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups)
    del sent[:]
    started = time.perf_counter()
    books = async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups)
    elapsed = time.perf_counter() - started
    starts = [
        review.started_at
        for i in range(len(lookups))
        for book in books
        for review in getattr(book, f"r{i}")
    ]
    return elapsed, max(starts) - min(starts), books


def test_a_stage_beyond_the_pool_takes_fewer_waves(
    through_proxy: None, pipelines_sent: list[int]
) -> None:
    lookups = stage()
    with override_settings(ASYNC_PREFETCH={**TWO_CONNECTIONS, "PIPELINE": False}):
        queued, queued_spread, _ = _timed_stage(lookups, pipelines_sent)
    assert pipelines_sent == []
    with override_settings(ASYNC_PREFETCH=TWO_CONNECTIONS):
        pipelined, pipelined_spread, books = _timed_stage(lookups, pipelines_sent)
    # Two queries alone on the two connections, then the four others in two pipelines.
    assert pipelines_sent == [2, 2]
    # Queueing: the root, then three waves (the proxy never delivers early).
    assert queued >= 4 * RTT + 3 * SLEEP
    # Pipelined: the root, then two waves, the second pipeline's queries back to back.
    assert pipelined < 3.6 * RTT + 3 * SLEEP, f"{pipelined:.3f}s vs queued {queued:.3f}s"
    # In the server: the last query started two round trips after the first queueing,
    # one pipelined.
    assert queued_spread >= timedelta(seconds=2 * RTT + 2 * SLEEP)
    assert pipelined_spread < timedelta(seconds=1.6 * RTT + 2 * SLEEP)
    expected = _books()
    prefetch_related_objects(expected, *lookups)
    assert_same_prefetch(_untimed(expected), _untimed(books), lookups)


def _untimed(books: list[Book]) -> list[Book]:
    """``books`` with their reviews' server start times dropped (they differ per run)."""
    for book in books:
        for review in (r for i in range(6) for r in getattr(book, f"r{i}")):
            review.__dict__.pop("started_at", None)
    return books


@pytest.mark.django_db(transaction=True)
def test_a_stage_the_pool_can_take_is_not_pipelined(pipelines_sent: list[int]) -> None:
    seed_bookstore()
    with override_settings(ASYNC_PREFETCH={"POOL": {"MIN_SIZE": 6, "MAX_SIZE": 6}}):
        async_prefetch.prefetch(Book.objects.order_by("pk"), *stage(0.05))  # the pool opened
        time.sleep(0.2)
        del pipelines_sent[:]
        books = async_prefetch.prefetch(Book.objects.order_by("pk"), *stage(0))
    assert pipelines_sent == []
    assert all(len(vars(book)["r5"]) == book.reviews.count() for book in books)


@pytest.mark.django_db(transaction=True)
def test_a_failing_pipelined_query_fails_the_call_whole(pipelines_sent: list[int]) -> None:
    seed_bookstore()
    failing = Prefetch("reviews", queryset=Review.objects.extra(where=["no_such_column = 1"]))
    books = _books()
    with override_settings(ASYNC_PREFETCH=TWO_CONNECTIONS):
        async_prefetch.prefetch(Book.objects.all(), *stage(0.05, 2))  # both connections open
        with pytest.raises(django_db_utils.ProgrammingError):
            async_prefetch.prefetch_related_objects(books, *stage(0.05, 5), failing)
    assert pipelines_sent == [2, 2]
    assert not any(
        getattr(book, "_prefetched_objects_cache", {}) or hasattr(book, "r0") for book in books
    )
    assert bridge.run_sync(settle_pool) == 0  # every connection back in the pool


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_call_stops_its_pipelines_in_the_server(pipelines_sent: list[int]) -> None:
    seed_bookstore()
    books = _books()

    async def cancelled() -> bool:
        with anyio.move_on_after(0.5) as scope:
            await async_prefetch.aprefetch_related_objects(books, *stage(5))
        return scope.cancelled_caught

    started = time.perf_counter()
    with override_settings(ASYNC_PREFETCH=TWO_CONNECTIONS):
        assert anyio.run(cancelled)
    assert time.perf_counter() - started < 4  # not the 5 s sleeps, let alone 15 s
    assert pipelines_sent == [2, 2]
    assert sleepers() == 0
    assert bridge.run_sync(settle_pool) == 0


def test_pipeline_false_keeps_one_connection_per_query(settings: Any) -> None:
    limiter = new_limiter(1)
    settings.ASYNC_PREFETCH = {}
    chosen = executor_for("default", None, limiter, caller_connections=False)
    assert isinstance(chosen, UnderLoadExecutor)
    settings.ASYNC_PREFETCH = {"PIPELINE": False}
    chosen = executor_for("default", None, limiter, caller_connections=False)
    assert type(chosen) is PoolExecutor


@pytest.fixture(scope="module")
def bouncer(django_db_setup: None) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling, two server connections) as alias ``bouncer_under_load``."""
    entries = {"bouncer_under_load": {"DISABLE_SERVER_SIDE_CURSORS": True}}
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(pgbouncer_databases(2, entries))
        except Unavailable as exc:
            pytest.skip(f"no PgBouncer: {exc}")
        yield server


@pytest.mark.django_db(transaction=True, databases=["default", "bouncer_under_load"])
def test_pipelined_surplus_through_pgbouncer(bouncer: PgBouncer, pipelines_sent: list[int]) -> None:
    seed_bookstore()
    lookups: list[str | Prefetch[Any]] = [*stage(0.05), "pages", "authors__location"]
    expected = _books("bouncer_under_load")
    prefetch_related_objects(expected, *lookups)
    with override_settings(ASYNC_PREFETCH=TWO_CONNECTIONS):
        for _ in range(2):  # a cold pool, then a warm one
            got = async_prefetch.prefetch(
                Book.objects.using("bouncer_under_load").order_by("pk"), *lookups
            )
            assert_same_prefetch(_untimed(expected), _untimed(got), lookups)
    assert pipelines_sent
