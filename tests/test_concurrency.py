"""Concurrency is measured with the server's own clock, not assumed.

Every prefetch query here carries ``pg_sleep`` in an uncorrelated sub-select (run once
per query) and selects ``statement_timestamp()``: the server's start time of that
query. Siblings must start together; a child must start after its parent finished.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.db.models import Prefetch, QuerySet

import async_prefetch
from async_prefetch.runtime import bridge
from tests.factories import seed_bookstore
from tests.server_time import SLEEP, slow, start_of
from tests.testapp.models import Author, Book, Location, Page, Review


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_five_sleeping_siblings_run_at_once() -> None:
    await sync_seed()
    lookups = [
        Prefetch("reviews", queryset=slow(Review.objects.all()), to_attr=f"reviews_{i}")
        for i in range(5)
    ]
    started = time.perf_counter()
    books = await async_prefetch.aprefetch(Book.objects.order_by("pk"), *lookups)
    elapsed = time.perf_counter() - started

    assert elapsed < 3 * SLEEP, f"5 x {SLEEP}s siblings took {elapsed:.2f}s"
    starts = [start_of([r for b in books for r in getattr(b, f"reviews_{i}")]) for i in range(5)]
    spread = max(starts) - min(starts)
    assert spread < timedelta(seconds=SLEEP / 2), f"siblings started {spread} apart"


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_child_starts_after_its_parent_and_not_after_siblings() -> None:
    await sync_seed()
    books: list[Any] = await async_prefetch.aprefetch(
        Book.objects.order_by("pk"),
        Prefetch("authors", queryset=slow(Author.objects.all()), to_attr="slow_authors"),
        Prefetch("slow_authors__location", queryset=slow(Location.objects.all())),
        Prefetch("reviews", queryset=slow(Review.objects.all(), 2 * SLEEP), to_attr="slow_reviews"),
    )
    authors = [a for b in books for a in b.slow_authors]
    locations = [a.location for a in authors if a.location is not None]
    reviews = [r for b in books for r in b.slow_reviews]
    parent, child, sibling = start_of(authors), start_of(locations), start_of(reviews)

    assert child - parent >= timedelta(seconds=SLEEP), "the child waited for its parent"
    # The child does not wait for the slower sibling (no level-wide barrier).
    assert child < sibling + timedelta(seconds=2 * SLEEP)
    assert abs(sibling - parent) < timedelta(seconds=SLEEP / 2)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_caches_gain_keys_in_lookup_order_and_a_later_siblings_child_does_not_wait() -> None:
    """The first lookup's query is slow, the second's fast: each book's prefetch cache still
    gains its keys in lookup order, as Django's does one lookup after another (code can see
    the order), while the fast sibling's child starts long before the slow one is in."""
    await sync_seed()
    books: list[Any] = await async_prefetch.aprefetch(
        Book.objects.order_by("pk"),
        Prefetch("pages", queryset=slow(Page.objects.all())),
        Prefetch("authors", queryset=slow(Author.objects.all(), 0)),
        Prefetch("authors__location", queryset=slow(Location.objects.all(), 0)),
    )
    assert books
    assert {tuple(book._prefetched_objects_cache) for book in books} == {("pages", "authors")}
    pages = [p for b in books for p in b.pages.all()]
    locations = [a.location for b in books for a in b.authors.all() if a.location is not None]
    assert start_of(locations) < start_of(pages) + timedelta(seconds=SLEEP / 2)


@pytest.mark.django_db(transaction=True)
def test_sync_api_is_concurrent_too() -> None:
    seed_bookstore()
    lookups = [
        Prefetch("pages", queryset=slow(Page.objects.all()), to_attr=f"p{i}") for i in range(4)
    ]
    started = time.perf_counter()
    books = async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups)
    elapsed = time.perf_counter() - started
    assert books
    assert elapsed < 2.5 * SLEEP, f"4 x {SLEEP}s siblings took {elapsed:.2f}s"


async def sync_seed() -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(seed_bookstore)()


@pytest.mark.django_db(transaction=True)
def test_each_fetch_starts_before_the_next_sibling_is_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compiling is CPU work on the event loop: a level's fetch task starts (it takes a
    connection and sends its query as soon as the limiter and the pool let it) before
    the next sibling's query is built and compiled, not after every sibling is."""
    from async_prefetch.execution import pool as executor
    from async_prefetch.relations.base import RelationQuery
    from async_prefetch.runtime import scheduler
    from async_prefetch.sql import compiler

    seed_bookstore()
    events: list[str] = []
    compile_queryset, fetch = compiler.compile_queryset, executor.PoolExecutor.fetch
    compile_relation = RelationQuery.compile

    def logged_compile(queryset: QuerySet[Any]) -> Any:
        events.append(f"compile {queryset.model.__name__}")
        return compile_queryset(queryset)

    def logged_relation(relation: RelationQuery) -> Any:  # compiled, or a kept statement
        events.append(f"compile {relation.queryset.model.__name__}")
        return compile_relation(relation)

    async def logged_fetch(self: Any, query: Any, consume: Any) -> None:
        events.append(f"fetch {query.model.__name__}")
        await fetch(self, query, consume)

    monkeypatch.setattr(scheduler, "compile_queryset", logged_compile)  # the root query
    monkeypatch.setattr(RelationQuery, "compile", logged_relation)  # each level's
    monkeypatch.setattr(executor.PoolExecutor, "fetch", logged_fetch)
    async_prefetch.prefetch(Book.objects.order_by("pk"), "pages", "reviews", "editions")
    assert events == [
        f"{step} {model}"
        for model in ("Book", "Page", "Review", "Edition")
        for step in ("compile", "fetch")
    ]


@pytest.mark.django_db(transaction=True)
def test_max_concurrency_holds_for_a_querysets_own_lookups() -> None:
    """A ``Prefetch`` queryset's own ``prefetch_related()`` runs in the same call, under
    the same ``MAX_CONCURRENCY``: never more queries in the server at once (by the
    server's start times of queries that each sleep ``SLEEP``)."""
    from django.test import override_settings

    seed_bookstore()
    inner = [Prefetch("book", queryset=slow(Book.objects.all()), to_attr=f"b{i}") for i in range(3)]
    lookups = [
        Prefetch("pages", queryset=slow(Page.objects.prefetch_related(*inner)), to_attr="slow"),
        *(
            Prefetch("reviews", queryset=slow(Review.objects.all()), to_attr=f"r{i}")
            for i in range(2)
        ),
    ]
    # Connections enough for every query: only the limit may hold them back.
    with override_settings(ASYNC_PREFETCH={"MAX_CONCURRENCY": 2, "POOL": {"MIN_SIZE": 6}}):
        bridge.run_sync(async_prefetch.aclose)
        books: list[Any] = async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups)
    pages = [page for book in books for page in book.slow]
    starts = sorted(
        [start_of(pages)]
        + [start_of([getattr(page, f"b{i}") for page in pages]) for i in range(3)]
        + [start_of([r for book in books for r in getattr(book, f"r{i}")]) for i in range(2)]
    )
    running_at_once = max(
        sum(start <= other < start + timedelta(seconds=0.8 * SLEEP) for other in starts)
        for start in starts
    )
    assert running_at_once <= 2, starts
