"""A failure or cancellation mid-way leaves no half-filled caches and no checked-out connection."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import DataError, OperationalError
from django.db.models import Prefetch, prefetch_related_objects

import async_prefetch
from async_prefetch import _compat
from async_prefetch.execution import PoolExecutor, new_limiter
from async_prefetch.execution.pools import get_pool
from async_prefetch.runtime import bridge
from async_prefetch.runtime.errors import primary_error
from async_prefetch.runtime.journal import Journal
from async_prefetch.sql.compiler import compile_queryset
from tests.factories import seed_bookstore
from tests.run_state import (
    discarded_connections,
    settle_pool,
    sleepers,
    state_of,
)
from tests.server_time import FAILING, SLEEPING
from tests.testapp.models import Book, Page, Review

FAST = ["pages", "authors__location", "publisher", "tags"]


def fresh_books() -> list[Any]:
    return list(Book.objects.order_by("pk"))


def filled(books: list[Any]) -> int:
    """Relations a run left cached on ``books`` (fields cache and prefetch cache)."""
    return sum(
        len(b._state.fields_cache) + len(getattr(b, "_prefetched_objects_cache", {})) for b in books
    )


@pytest.mark.django_db(transaction=True)
def test_sync_failure_restores_instances_and_pool() -> None:
    seed_bookstore()
    books: list[Any] = list(Book.objects.select_related("publisher").order_by("pk"))
    before = state_of(books)

    with pytest.raises(DataError, match="division by zero"):
        async_prefetch.prefetch_related_objects(books, *FAST, FAILING)

    assert state_of(books) == before
    assert not any(getattr(b, "_prefetched_objects_cache", {}) for b in books)
    assert bridge.run_sync(settle_pool) == 0
    # The instances are still usable: a second run fills them completely.
    async_prefetch.prefetch_related_objects(books, *FAST)
    assert all("pages" in b._prefetched_objects_cache for b in books)


@pytest.mark.django_db(transaction=True)
def test_failure_restores_attributes_and_existing_caches_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Levels that set attributes (``to_attr``) and caches that already held entries are
    put back too; the cache dicts are the same objects afterwards."""
    seed_bookstore()
    books: list[Any] = list(Book.objects.order_by("pk"))
    prefetch_related_objects(books, "tags", "publisher")  # caches with entries already
    caches = [(b._prefetched_objects_cache, b._state.fields_cache) for b in books]
    before = state_of(books)
    as_list = Prefetch("pages", queryset=Page.objects.order_by("pk"), to_attr="pages_list")
    filled_at_rollback: list[bool] = []
    rollback = Journal.rollback

    def checked_rollback(journal: Journal) -> None:
        filled_at_rollback.append(
            all(
                hasattr(b, "pages_list") and "authors" in b._prefetched_objects_cache for b in books
            )
        )
        rollback(journal)

    monkeypatch.setattr(Journal, "rollback", checked_rollback)
    with pytest.raises(DataError, match="division by zero"):
        async_prefetch.prefetch_related_objects(books, as_list, "authors", FAILING)
    assert filled_at_rollback == [True]  # the fast levels were in when the server failed
    assert state_of(books) == before
    assert not any(hasattr(b, "pages_list") for b in books)
    assert all(
        b._prefetched_objects_cache is prefetched and b._state.fields_cache is fields
        for b, (prefetched, fields) in zip(books, caches, strict=True)
    )
    assert bridge.run_sync(settle_pool) == 0


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_async_failure_restores_instances_and_pool() -> None:
    await sync_to_async(seed_bookstore)()
    books: list[Any] = await sync_to_async(fresh_books)()
    before = state_of(books)
    with pytest.raises(DataError):
        await async_prefetch.aprefetch_related_objects(books, *FAST, FAILING)
    assert state_of(books) == before
    assert filled(books) == 0
    assert await bridge.run_async(settle_pool) == 0
    await async_prefetch.aclose()


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_cancellation_restores_instances_cancels_the_query_and_keeps_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """By the time a cancelled caller goes on, its instances are as they were, nothing
    sleeps in the server any more and the connection went back to the pool usable.

    psycopg cancels a query in the server when its task is cancelled and waits for it to
    end; it closes the connection instead if that clean-up is itself cancelled, as anyio's
    cancel scopes would do to every await."""
    await sync_to_async(seed_bookstore)()
    books: list[Any] = await sync_to_async(fresh_books)()
    before = state_of(books)
    discarded = await bridge.run_async(discarded_connections)
    with anyio.move_on_after(0.5) as scope:
        await async_prefetch.aprefetch_related_objects(books, *FAST, SLEEPING)
    assert scope.cancelled_caught
    assert state_of(books) == before
    assert await sync_to_async(sleepers)() == 0
    assert await bridge.run_async(settle_pool) == 0
    assert await bridge.run_async(discarded_connections) == discarded
    assert "closing connection" not in caplog.text
    await async_prefetch.aclose()


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_repeated_cancellation_still_waits_for_the_rollback() -> None:
    """A second ``task.cancel()`` while the engine unwinds must not let the caller go on
    before the instances are restored (anyio's shield alone does not stop it)."""
    await sync_to_async(seed_bookstore)()
    books: list[Any] = await sync_to_async(fresh_books)()
    task = asyncio.ensure_future(async_prefetch.aprefetch_related_objects(books, *FAST, SLEEPING))
    for _ in range(100):  # until the fast siblings have filled their caches
        await asyncio.sleep(0.01)
        if filled(books):
            break
    assert filled(books)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert filled(books) == 0
    assert await bridge.run_async(settle_pool) == 0
    await async_prefetch.aclose()


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_cancelled_fetch_returns_its_connection_while_the_pool_is_busy() -> None:
    """A fetch cancelled while ``putconn()`` waits for the pool's lock (held by a pool
    worker adding a connection, say) still returns its connection: the return is shielded.
    anyio cancels every await of a cancelled task, so an unshielded ``putconn()`` gives up
    at that lock and the connection stays counted as checked out for good."""
    await sync_to_async(seed_bookstore)()
    compiled = await sync_to_async(compile_queryset)(Book.objects.all())

    async def scenario() -> int:
        pool = await get_pool(compiled.alias)
        executor = PoolExecutor(compiled.alias, new_limiter(1), None)
        locked, release = anyio.Event(), anyio.Event()
        returned_after_release: list[bool] = []

        async def hold_pool_lock() -> None:
            async with pool._lock:  # psycopg_pool's own lock, as its workers take it
                locked.set()
                await release.wait()

        async def cancel_then_release(scope: anyio.CancelScope) -> None:
            await locked.wait()
            await anyio.sleep(0.05)  # the fetch now waits for the lock in putconn()
            scope.cancel()
            await anyio.sleep(0.05)
            release.set()

        async with anyio.create_task_group() as tg:

            async def consume(rows: Any) -> None:  # the connection is checked out here
                tg.start_soon(hold_pool_lock)
                await locked.wait()

            with anyio.CancelScope() as fetch_scope:
                tg.start_soon(cancel_then_release, fetch_scope)
                await executor.fetch(compiled, consume)
                # Reached only if putconn() sat out the cancellation at the lock.
                returned_after_release.append(release.is_set())
        assert returned_after_release == [True]
        return await settle_pool()

    assert await bridge.run_async(scenario) == 0
    await async_prefetch.aclose()


@pytest.mark.django_db(transaction=True)
def test_failure_keeps_what_django_stored_while_reading() -> None:
    """A walked ``cached_property`` and a deferred field that a key function loads are
    stored in ``__dict__`` by Django itself: data another call may already use, not
    prefetch caches. A failed run keeps them and takes out only its prefetch caches."""
    seed_bookstore()
    books: list[Any] = list(Book.objects.defer("publisher").order_by("pk"))
    with pytest.raises(DataError, match="division by zero"):
        async_prefetch.prefetch_related_objects(
            books, "author_list__location", "publisher", FAILING
        )
    assert all("author_list" in vars(b) and "publisher_id" in vars(b) for b in books)
    assert filled(books) == 0


def test_rollback_of_objects_without_a_writable_dict() -> None:
    """Walks can reach any object, a class too (its ``__dict__`` is a read-only proxy):
    an attribute a run set there is removed again, and a value set on an instance
    afterwards by someone else stays."""

    class Walked:
        pass

    class Other:
        pass

    journal = Journal()
    instance = Other()
    for obj in (Walked, instance):
        journal.set_attribute(obj, "to_attr", [1])
    instance.to_attr = [2]  # type: ignore[attr-defined]  # another call's, since
    journal.rollback()
    assert "to_attr" not in vars(Walked)
    assert vars(instance) == {"to_attr": [2]}


@pytest.mark.django_db(transaction=True)
def test_the_drivers_error_is_the_cause() -> None:
    """As Django's own error wrapper does, the ``django.db`` error carries psycopg's
    (sqlstate and all) as ``__cause__``."""
    seed_bookstore()
    books: list[Any] = list(Book.objects.order_by("pk"))
    with pytest.raises(DataError) as info:
        async_prefetch.prefetch_related_objects(books, "pages", FAILING)
    cause = info.value.__cause__
    assert isinstance(cause, psycopg.errors.DivisionByZero)
    assert cause.sqlstate == "22012"


@pytest.mark.anyio
async def test_other_failures_of_the_group_stay_reachable() -> None:
    """Queries that fail in the same moment: the first error is raised with its own
    cause; the others are named in a note and kept as the group in ``__context__``
    (siblings' cancellations are left out)."""
    first, second = DataError("division by zero"), OperationalError("server closed")
    first.__cause__ = cause = ZeroDivisionError()
    group = BaseExceptionGroup("run", [asyncio.CancelledError(), first, second])
    error = primary_error(group)
    assert error is first
    assert error.__cause__ is cause
    assert error.__notes__ == [
        "async_prefetch: 1 other query of the same call failed too: OperationalError: server closed"
    ]
    assert isinstance(error.__context__, BaseExceptionGroup)
    assert error.__context__.exceptions == (second,)


def test_a_walk_pins_only_the_instances_it_relied_on() -> None:
    """Another call walking through one instance keeps that instance's caches in a failed
    call's rollback, and only that one's."""

    class Obj:
        pass

    relied_on, other = Obj(), Obj()
    failing, walking = Journal(), Journal()
    failing.open()
    walking.open()
    try:
        for obj in (relied_on, other):
            failing.set_attribute(obj, "to_attr", [1])
        walking.rely_on([relied_on])
        failing.rollback()
    finally:
        failing.close()
        walking.close()
    assert vars(relied_on) == {"to_attr": [1]}
    assert vars(other) == {}


@pytest.mark.skipif(
    not _compat.ANCESTOR_PREFETCH_CACHES, reason="Django 6.1's inherited prefetch caches"
)
@pytest.mark.django_db(transaction=True)
def test_failure_restores_an_ancestors_queryset_django_changed() -> None:
    """Django 6.1 fills an e-book's ``authors`` with its book's prefetched queryset,
    changing that queryset's result (another call's). A failed call puts it back."""
    seed_bookstore()
    book = Book.objects.filter(ebook__isnull=False).get()
    prefetch_related_objects([book], "authors")  # an earlier call's cache
    queryset = book._prefetched_objects_cache["authors"]  # type: ignore[attr-defined]
    before = queryset._result_cache
    # Fails after 0.2 s whatever the rows (a one-time filter), after the e-book's authors.
    failing = Prefetch(
        "reviews",
        queryset=Review.objects.extra(
            where=["(SELECT 1 / (random() * 0)::int FROM pg_sleep(0.2)) = 1"]
        ),
        to_attr="boom",
    )
    with async_prefetch.tracing() as trace, pytest.raises(DataError):
        async_prefetch.prefetch_related_objects([book], "ebook__authors", failing)
    ran = [s.key for s in trace.steps if s.finished and s.key.endswith("ebook__authors")]
    assert ran, [s.key for s in trace.steps]  # the level ran before the failure
    assert book._prefetched_objects_cache["authors"] is queryset  # type: ignore[attr-defined]
    assert queryset._result_cache is before
