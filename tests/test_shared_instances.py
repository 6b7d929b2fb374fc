"""Calls that share instances never undo each other's work.

Two calls on the same instances are natural in async code (``asyncio.gather`` of two
prefetches) and in threads that share cached objects. A failed or cancelled call puts back
only its own writes that are still in place, and never removes a cache dict another call
may be filling.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import DataError
from django.db.models import Prefetch
from django.db.models.expressions import RawSQL

import async_prefetch
from tests.factories import seed_bookstore
from tests.server_time import FAILING, SLEEPING, slow
from tests.testapp.models import Author, Book, Review

pytestmark = pytest.mark.django_db(transaction=True)

# Succeeds after 0.5 s: still in flight when FAILING's call rolls back.
SLOW_AUTHORS = Prefetch(
    "authors", queryset=Author.objects.extra(where=["EXISTS (SELECT 1 FROM pg_sleep(0.5))"])
)


def books() -> list[Any]:
    return list(Book.objects.order_by("pk"))


def cached(objs: list[Any], name: str) -> int:
    return sum(name in getattr(obj, "_prefetched_objects_cache", {}) for obj in objs)


@pytest.mark.anyio
async def test_a_failing_call_keeps_what_a_concurrent_call_wrote() -> None:
    await sync_to_async(seed_bookstore)()
    objs = await sync_to_async(books)()
    results = await asyncio.gather(
        async_prefetch.aprefetch_related_objects(objs, "pages", FAILING),
        async_prefetch.aprefetch_related_objects(objs, "authors", "tags"),
        return_exceptions=True,
    )
    assert isinstance(results[0], DataError)
    assert results[1] is None
    assert cached(objs, "authors") == cached(objs, "tags") == len(objs)
    assert cached(objs, "pages") == 0  # the failed call's own writes are gone


@pytest.mark.anyio
async def test_a_call_in_flight_survives_the_rollback_of_another() -> None:
    """The failing call gave the instances their prefetch cache dicts; the slow call
    writes into them after that call rolled back (it used to find them deleted)."""
    await sync_to_async(seed_bookstore)()
    objs = await sync_to_async(books)()
    results = await asyncio.gather(
        async_prefetch.aprefetch_related_objects(objs, FAILING),
        async_prefetch.aprefetch_related_objects(objs, SLOW_AUTHORS),
        return_exceptions=True,
    )
    assert isinstance(results[0], DataError)
    assert results[1] is None
    assert cached(objs, "authors") == len(objs)


@pytest.mark.anyio
async def test_cancelling_a_call_keeps_what_a_finished_call_wrote() -> None:
    await sync_to_async(seed_bookstore)()
    objs = await sync_to_async(books)()
    sleeping = asyncio.ensure_future(async_prefetch.aprefetch_related_objects(objs, SLEEPING))
    for _ in range(300):  # until the sleeping call has given the instances their caches
        await asyncio.sleep(0.01)
        if all(hasattr(obj, "_prefetched_objects_cache") for obj in objs):
            break
    else:
        pytest.fail("the sleeping call never started")
    await async_prefetch.aprefetch_related_objects(objs, "authors", "pages")
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping
    assert cached(objs, "authors") == cached(objs, "pages") == len(objs)


def test_threads_sharing_instances() -> None:
    """Eight threads prefetch different relations onto one list, every fourth fails."""
    seed_bookstore(n_books=40)
    objs = books()
    plans: list[tuple[Any, ...]] = [
        ("pages",),
        ("authors",),
        ("tags",),
        ("comments", FAILING),
        ("editions",),
        ("reviews",),
        ("taggings",),
        ("authors__location", FAILING),
    ]
    errors: list[BaseException | None] = [None] * len(plans)
    barrier = threading.Barrier(len(plans))

    def work(index: int) -> None:
        barrier.wait()
        try:
            async_prefetch.prefetch_related_objects(objs, *plans[index])
        except BaseException as exc:
            errors[index] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [type(e).__name__ for e in errors] == [
        "NoneType" if FAILING not in plan else "DataError" for plan in plans
    ]
    for name in ("pages", "tags", "editions", "reviews", "taggings"):
        assert cached(objs, name) == len(objs), name
    # "authors" came from a successful call; a failing call's walk through it wrote nothing.
    assert cached(objs, "authors") == len(objs)
    assert cached(objs, "comments") == 0
    assert not any(hasattr(obj, "boom_reviews") for obj in objs)


@pytest.mark.anyio
async def test_a_relation_another_call_relied_on_survives_its_writers_failure() -> None:
    """The failing call fetches "authors" first; the second call finds them fetched, walks
    on and returns relying on them. The failing call's rollback must leave them."""
    await sync_to_async(seed_bookstore)()
    objs = await sync_to_async(books)()
    failing = asyncio.ensure_future(
        async_prefetch.aprefetch_related_objects(objs, "authors", FAILING)
    )
    for _ in range(300):  # until the failing call has filled "authors"
        await asyncio.sleep(0.01)
        if cached(objs, "authors") == len(objs):
            break
    else:
        pytest.fail("the failing call never filled authors: the race was not set up")
    await async_prefetch.aprefetch_related_objects(objs, "authors__location")
    with pytest.raises(DataError):
        await failing
    assert cached(objs, "authors") == len(objs)


@pytest.mark.anyio
async def test_a_relation_fetched_twice_keeps_the_successful_calls_querysets(
    settings: Any,
) -> None:
    """Both calls fetch "authors" (each decided before the other had written them). The
    failing call writes first; the successful one writes last and must make querysets of
    its own, not take the failing call's out of the prefetch cache (Django 6.1's
    ``manager.get_queryset()`` returns the prefetched one): the failed call's rollback
    then leaves the successful call's querysets in place."""
    await sync_to_async(seed_bookstore)()
    objs = await sync_to_async(books)()
    fails_late = Prefetch(
        "reviews",
        queryset=Review.objects.annotate(
            boom=RawSQL("(SELECT 1 / (random() * 0)::int FROM pg_sleep(0.6))", ())
        ),
        to_attr="late_boom",
    )
    # One query at a time per call: the succeeding call's "authors" (decided at once, not
    # fetched yet) waits behind its slow first lookup and is written after the other's.
    settings.ASYNC_PREFETCH = {"MAX_CONCURRENCY": 1}
    succeeding = asyncio.ensure_future(
        async_prefetch.aprefetch_related_objects(
            objs, Prefetch("reviews", queryset=slow(Review.objects.all()), to_attr="x"), "authors"
        )
    )
    await asyncio.sleep(0.05)
    failing = asyncio.ensure_future(
        async_prefetch.aprefetch_related_objects(objs, "authors", fails_late)
    )
    await succeeding
    mine = [obj._prefetched_objects_cache["authors"] for obj in objs]
    with pytest.raises(DataError):
        await failing
    kept = [getattr(obj, "_prefetched_objects_cache", {}).get("authors") for obj in objs]
    assert all(a is b for a, b in zip(mine, kept, strict=True))
