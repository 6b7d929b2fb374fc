"""Streams: chunks with Django's caches, read-ahead proven with server time, early exits
that leave nothing behind, and ``install()`` routing Django's own iterators here."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import Prefetch
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.runtime import bridge
from tests.cache_snapshot import assert_same_prefetch
from tests.factories import seed_bookstore
from tests.run_state import busy_engine_connections, settle_pool, sleepers
from tests.server_time import SLEEPING, slow
from tests.testapp.models import Author, Book, Page

pytestmark = pytest.mark.django_db(transaction=True)

LOOKUPS = ("authors__location", "pages", "publisher", "tags")


def django_chunks(chunk_size: int, lookups: tuple[Any, ...] = LOOKUPS) -> list[Any]:
    queryset = Book.objects.order_by("pk").prefetch_related(*lookups)
    return list(queryset.iterator(chunk_size=chunk_size))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 100])
def test_sync_chunks_have_djangos_caches(chunk_size: int) -> None:
    seed_bookstore(n_books=11)
    expected = django_chunks(chunk_size)
    got = list(
        async_prefetch.iterator(Book.objects.order_by("pk"), *LOOKUPS, chunk_size=chunk_size)
    )
    assert_same_prefetch(expected, got, LOOKUPS)


@pytest.mark.anyio
@pytest.mark.parametrize("read_ahead", [0, 1, 3])
async def test_async_chunks_have_djangos_caches(read_ahead: int) -> None:
    await sync_to_async(seed_bookstore)(n_books=11)
    expected = await sync_to_async(django_chunks)(3)
    got = [
        book
        async for book in async_prefetch.aiterator(
            Book.objects.order_by("pk").prefetch_related("authors__location"),
            "pages",
            "publisher",
            "tags",
            chunk_size=3,
            read_ahead=read_ahead,
        )
    ]
    assert_same_prefetch(expected, got, LOOKUPS)


def test_the_same_queries_as_djangos_iterator() -> None:
    """The root query and every chunk's prefetch queries are reported where Django tooling
    looks, as many as Django's ``iterator(chunk_size=...)`` runs."""
    seed_bookstore(n_books=7)
    with CaptureQueriesContext(connection) as django_queries:
        django_chunks(3)
    with CaptureQueriesContext(connection) as engine_queries:
        list(async_prefetch.iterator(Book.objects.order_by("pk"), *LOOKUPS, chunk_size=3))
    assert len(engine_queries) == len(django_queries)


def test_without_server_side_cursors(settings: Any) -> None:
    """``DISABLE_SERVER_SIDE_CURSORS`` (PgBouncer's transaction pooling): a streamed result."""
    seed_bookstore(n_books=7)
    expected = django_chunks(2)
    connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    try:
        got = list(async_prefetch.iterator(Book.objects.order_by("pk"), *LOOKUPS, chunk_size=2))
    finally:
        connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = False
    assert_same_prefetch(expected, got, LOOKUPS)


def test_prefetches_of_the_next_chunk_run_while_the_loop_works() -> None:
    """The loop body spends ``WORK`` per chunk and each chunk's prefetch ``SLEEP`` in the
    server: chunk k + 1's prefetch starts (server time) before the body has finished
    chunk k, and the whole stream takes about max(WORK, SLEEP) per chunk, not the sum."""
    seed_bookstore(n_books=8)
    work, chunks = 0.3, 4
    lookup = Prefetch("pages", queryset=slow(Page.objects.all()), to_attr="slow_pages")
    body_done: list[datetime] = []
    started = time.perf_counter()
    books: list[Any] = []
    for index, book in enumerate(
        async_prefetch.iterator(Book.objects.order_by("pk"), lookup, chunk_size=2)
    ):
        books.append(book)
        if index % 2 == 1:  # the last book of a chunk: the body works on the chunk
            time.sleep(work)
            body_done.append(datetime.now().astimezone())
    elapsed = time.perf_counter() - started
    starts = [
        min(page.started_at for book in books[k : k + 2] for page in book.slow_pages)
        for k in range(0, 2 * chunks, 2)
    ]
    for k in range(chunks - 1):
        assert starts[k + 1] < body_done[k], f"chunk {k + 1}'s prefetch waited for the body"
    assert elapsed < chunks * (work + 0.3) - 0.3, f"{elapsed:.2f} s: no overlap"


def test_read_ahead_is_bounded() -> None:
    """With ``read_ahead=1`` the stream is never more than one chunk ahead of the loop:
    when the loop stops at chunk 1 after a pause, chunk 3's prefetch never ran."""
    seed_bookstore(n_books=8)
    lookup = Prefetch("pages", queryset=Page.objects.all(), to_attr="pages_list")
    with async_prefetch.tracing() as trace:
        stream = async_prefetch.iterator(Book.objects.order_by("pk"), lookup, chunk_size=2)
        for _ in range(2):  # the whole first chunk
            next(stream)
        time.sleep(0.3)  # meanwhile chunk 2 may be prefetched; chunk 3 must not start
        stream.close()
    assert 1 <= [step.key for step in trace.steps].count("pages_list") <= 2


def test_leaving_early_releases_everything() -> None:
    """``break`` (then the generator is collected) with a read-ahead chunk sleeping in the
    server: the query is cancelled, the cursor closed and every connection returned."""
    seed_bookstore(n_books=6)
    # Once the loop has the first chunk, the next chunk's lookups (a query sleeping 5 s)
    # are in flight.
    stream = async_prefetch.iterator(Book.objects.order_by("pk"), SLEEPING, chunk_size=2)

    def body_fails(books: Iterator[Any]) -> None:
        for _book in books:
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        body_fails(stream)
    del stream
    gc.collect()
    assert bridge.run_sync(settle_pool) == 0
    assert sleepers() == 0
    assert not busy_engine_connections()


@pytest.mark.anyio
async def test_cancelling_the_loop_releases_everything() -> None:
    await sync_to_async(seed_bookstore)(n_books=6)

    async def consume() -> None:
        async for _book in async_prefetch.aiterator(
            Book.objects.order_by("pk"), SLEEPING, chunk_size=2
        ):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    started = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - started < 1.0
    assert await bridge.run_async(settle_pool) == 0
    assert await sync_to_async(sleepers)() == 0


@pytest.mark.anyio
async def test_breaking_out_of_async_for_and_closing() -> None:
    await sync_to_async(seed_bookstore)(n_books=6)
    stream = async_prefetch.aiterator(Book.objects.order_by("pk"), "authors", chunk_size=2)
    async for _book in stream:
        break
    await stream.aclose()
    assert await bridge.run_async(settle_pool) == 0
    assert not await sync_to_async(busy_engine_connections)()


#: Lookups whose caches point back at a book only through their querysets' hints.
CYCLIC_ONLY = ("authors", "tags", "publisher")


class Probe:
    """Put on an instance, its weak reference tells when the instance is freed (a weak
    reference to the instance itself would keep the stream from freeing it)."""


def probe(book: Any) -> weakref.ref[Probe]:
    book.probe = Probe()
    return weakref.ref(book.probe)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off: what is freed is freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_chunks_the_loop_let_go_are_freed_at_once(collector_off: None) -> None:
    """A book's to-many caches hold it (their querysets' hints), so a chunk the loop has
    let go waits for a full collection, but for the stream, which frees the books nothing
    else holds when the next chunk is asked for: with the collector off, every book but
    the first of each chunk (the run's plan holds it) and the last (the loop's variable
    holds it then) is gone once the stream has ended."""
    seed_bookstore(n_books=13)
    refs: list[weakref.ref[Probe]] = []
    stream = async_prefetch.iterator(Book.objects.order_by("pk"), *CYCLIC_ONLY, chunk_size=4)
    for book in stream:
        assert "tags" in vars(book)["_prefetched_objects_cache"]
        refs.append(probe(book))
    del book, stream
    alive = [index for index, ref in enumerate(refs) if ref() is not None]
    assert len(refs) == 13
    assert set(alive) <= {0, 3, 4, 7, 8, 11, 12}, alive


def test_instances_the_loop_keeps_keep_their_caches(collector_off: None) -> None:
    """Books the loop keeps, or reaches through something it keeps (a cached queryset, a
    related manager, a weak reference), keep their caches as Django filled them."""
    seed_bookstore(n_books=13)
    expected = django_chunks(4, CYCLIC_ONLY)
    kept: list[Any] = []
    querysets: dict[int, Any] = {}
    managers: dict[int, Any] = {}
    weak: dict[int, weakref.ref[Any]] = {}
    stream = async_prefetch.iterator(Book.objects.order_by("pk"), *CYCLIC_ONLY, chunk_size=4)
    for index, book in enumerate(stream):
        if index % 4 == 1:
            kept.append(book)
        elif index % 4 == 2:
            querysets[index] = book.tags.all()  # the cached queryset itself
        elif index in (0, 4):
            managers[index] = book.authors
        else:
            weak[index] = weakref.ref(book)
    del book, stream
    reached = {index: qs._hints["instance"] for index, qs in querysets.items()}
    reached |= {index: manager.instance for index, manager in managers.items()}
    reached |= {index: ref() for index, ref in weak.items()}
    reached |= {4 * position + 1: book for position, book in enumerate(kept)}
    assert None not in reached.values()
    indexes = sorted(reached)
    assert_same_prefetch([expected[i] for i in indexes], [reached[i] for i in indexes], CYCLIC_ONLY)
    for book in reached.values():
        for queryset in vars(book)["_prefetched_objects_cache"].values():
            assert queryset._hints == {"instance": book}


@pytest.mark.anyio
async def test_async_chunks_the_loop_let_go_are_freed_at_once(collector_off: None) -> None:
    await sync_to_async(seed_bookstore)(n_books=9)
    refs: list[weakref.ref[Probe]] = []
    kept: list[Any] = []
    async for book in async_prefetch.aiterator(
        Book.objects.order_by("pk"), *CYCLIC_ONLY, chunk_size=3
    ):
        refs.append(probe(book))
        if len(refs) == 5:
            kept.append(book)
    del book
    alive = [index for index, ref in enumerate(refs) if ref() is not None]
    assert set(alive) <= {0, 2, 3, 4, 5, 6, 8}, alive
    assert 4 in alive
    assert vars(kept[0])["_prefetched_objects_cache"]["tags"]._hints == {"instance": kept[0]}


def test_a_failing_chunk_raises_after_the_chunks_before_it() -> None:
    """The loop gets every complete chunk before the failing one, then Django's error."""
    from django.db import DataError
    from django.db.models.expressions import RawSQL

    seed_bookstore(n_books=8)
    fourth = Book.objects.order_by("pk").values_list("pk", flat=True)[3]
    # Fails in the server for the second chunk's pages only.
    failing = Prefetch(
        "pages",
        queryset=Page.objects.annotate(
            boom=RawSQL("1 / (CASE WHEN book_id > %s THEN 0 ELSE 1 END)", (fourth,))
        ),
        to_attr="checked_pages",
    )
    seen: list[Any] = []

    def consume() -> None:
        seen.extend(async_prefetch.iterator(Book.objects.order_by("pk"), failing, chunk_size=4))

    with pytest.raises(DataError):
        consume()
    assert len(seen) == 4
    assert all(hasattr(book, "checked_pages") for book in seen)
    assert bridge.run_sync(settle_pool) == 0


def test_install_routes_djangos_iterators(installed: None) -> None:
    seed_bookstore(n_books=7)
    async_prefetch.uninstall()
    expected = django_chunks(3)
    async_prefetch.install()
    with async_prefetch.tracing() as trace:
        got = list(Book.objects.order_by("pk").prefetch_related(*LOOKUPS).iterator(chunk_size=3))
    assert_same_prefetch(expected, got, LOOKUPS)
    assert trace.queries >= 3 * len(LOOKUPS)  # every chunk's lookups through the engine
    with pytest.raises(ValueError, match="chunk_size must be provided"):
        Book.objects.prefetch_related("pages").iterator()


@pytest.mark.anyio
async def test_install_routes_djangos_aiterator(installed: None) -> None:
    await sync_to_async(seed_bookstore)(n_books=5)
    with async_prefetch.tracing() as trace:
        got = [
            book
            async for book in Book.objects.order_by("pk")
            .prefetch_related("pages")
            .aiterator(chunk_size=2)
        ]
    assert len(got) == 5
    assert all("pages" in vars(book)["_prefetched_objects_cache"] for book in got)
    assert [step.key for step in trace.steps if step.kind == "query"].count("pages") == 3


def test_inside_atomic_the_callers_connection_is_used() -> None:
    """Inside ``atomic`` the rows come from Django's iterator on the caller's connection
    (its uncommitted rows included) and each chunk is prefetched there."""
    from django.db import transaction

    seed_bookstore(n_books=3)
    with transaction.atomic():
        first = Book.objects.order_by("pk")[0]
        Author.objects.create(name="Uncommitted", email="u@example.com").books.add(first)
        with CaptureQueriesContext(connection) as queries:
            got = list(
                async_prefetch.iterator(Book.objects.order_by("pk"), "authors", chunk_size=2)
            )
        transaction.set_rollback(True)
    assert "Uncommitted" in [a.name for a in got[0].authors.all()]
    assert len(queries) == 3  # the rows, then each chunk's authors


def test_bad_arguments_raise_at_once() -> None:
    with pytest.raises(ValueError, match="Chunk size must be strictly positive"):
        async_prefetch.iterator(Book.objects.all(), chunk_size=0)
    with pytest.raises(ValueError, match="read_ahead"):
        async_prefetch.aiterator(Book.objects.all(), read_ahead=-1)
