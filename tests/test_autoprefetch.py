"""Auto-prefetch: a relation reached on one instance is fetched for all its peers.

Differential: the same rows with ``autoprefetch`` and a loop touching a path, against
Django's explicit ``prefetch_related`` of that path: the same caches (fetch modes and
peers aside) and the same number of queries; never more queries than without it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ObjectDoesNotExist, SynchronousOnlyOperation
from django.db import connection, transaction
from django.db.models import Manager, Model
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch import _compat
from async_prefetch.access.auto import autoprefetch
from async_prefetch.access.modes import LazyLoadInAsyncContext, PrefetchMode, mode_of
from tests.cache_snapshot import assert_same_prefetch
from tests.differential import warm_content_types
from tests.testapp.models import Author, Book, Comment, Page

pytestmark = pytest.mark.django_db(transaction=True)


def touch(objs: list[Any], path: str) -> None:
    """Read ``path`` from every object as a template would: to-one attributes, and the
    plain ``.all()`` of to-many managers."""
    steps = path.split("__")

    def walk(obj: Any, rest: list[str]) -> None:
        if obj is None or not rest:
            return
        try:
            value = getattr(obj, rest[0])
        except ObjectDoesNotExist:  # a reverse one-to-one without a row
            return
        if isinstance(value, Manager):
            for item in value.all():
                walk(item, rest[1:])
        else:
            walk(value, rest[1:])

    for obj in objs:
        walk(obj, steps)


def queries(func: Callable[[], Any]) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as ctx:
        result = func()
    return result, len(ctx.captured_queries)


PATHS: list[tuple[type[Model], str]] = [
    (Book, "publisher"),  # forward foreign key (nullable, UUID pk)
    (Book, "profile"),  # reverse one-to-one (half the books have none)
    (Book, "pages"),  # reverse foreign key
    (Book, "authors"),  # many-to-many
    (Book, "tags"),  # many-to-many through a model, to_field
    (Book, "editions"),  # reverse foreign key to a non-pk field
    (Book, "comments"),  # generic relation
    (Book, "authors__location"),  # chains: fetched instances are peers too
    (Book, "authors__location__country"),
    (Book, "reviews__author__location"),
    (Author, "mentor__mentor"),
    (Author, "books__pages"),
    (Comment, "content_object"),  # generic foreign key (two content types)
]


@pytest.mark.parametrize(("model", "path"), PATHS, ids=[f"{m.__name__}-{p}" for m, p in PATHS])
def test_same_caches_and_queries_as_prefetch_related(
    bookstore: Any, model: type[Model], path: str
) -> None:
    queryset = model._default_manager.order_by("pk")
    warm_content_types()
    expected, django_queries = queries(lambda: list(queryset.prefetch_related(path)))
    warm_content_types()
    got = list(autoprefetch(queryset))
    _, auto_queries = queries(lambda: touch(got, path))
    assert auto_queries == django_queries - 1  # Django's count includes the root query
    assert_same_prefetch(expected, got, [path], modes=False)
    _, again = queries(lambda: touch(got, path))
    assert again == 0


def test_never_more_queries_than_without(bookstore: Any) -> None:
    """One instance: one query, as without auto-prefetch; peers already loaded are not
    fetched again; a null foreign key costs nothing."""
    book = autoprefetch(Book.objects.filter(publisher__isnull=False)).first()
    assert book is not None
    _, count = queries(lambda: book.publisher)
    assert count == 1
    books = list(autoprefetch(Book.objects.order_by("pk")))
    assert books[0].publisher_id is None
    _, count = queries(lambda: books[0].publisher)
    assert count == 0
    _, count = queries(lambda: [b.publisher for b in books[:2]])
    assert count == 1
    _, count = queries(lambda: [b.publisher for b in books])
    assert count == 0


def test_peers_are_weak(bookstore: Any) -> None:
    """Dropped peers are not fetched for (and are not kept alive by their peers)."""
    books = list(autoprefetch(Book.objects.order_by("pk")))
    kept = books[-2:]
    del books
    gc.collect()
    with CaptureQueriesContext(connection) as ctx:
        for book in kept:
            list(book.pages.all())
    assert len(ctx.captured_queries) == 1
    assert str(min(b.pk for b in kept)) in ctx.captured_queries[0]["sql"]


def test_derived_querysets_are_not_lazy_loads(bookstore: Any) -> None:
    """``filter()``, ``count()``, ``order_by()`` on a related manager are new queries for
    one instance, as in Django; only the plain ``.all()`` evaluation auto-prefetches."""
    books = list(autoprefetch(Book.objects.order_by("pk")))
    _, count = queries(lambda: [list(b.pages.filter(number__gt=1)) for b in books])
    assert count == len(books)
    _, count = queries(lambda: [b.pages.count() for b in books])
    assert count == len(books)
    _, count = queries(lambda: [list(b.pages.all()) for b in books])
    assert count == 1


def test_block_and_iterator_chunks(bookstore: Any) -> None:
    """``with autoprefetch():`` covers every queryset evaluated inside; ``iterator()``
    chunks are peer groups: one query per relation per chunk."""
    with autoprefetch():
        books = list(Book.objects.order_by("pk"))
    _, count = queries(lambda: [b.publisher for b in books])
    assert count == 1
    outside = list(Book.objects.order_by("pk"))
    assert mode_of(outside[0]) is None
    n = len(books)
    chunk = 2
    with CaptureQueriesContext(connection) as ctx:
        for book in autoprefetch(Book.objects.order_by("pk")).iterator(chunk_size=chunk):
            list(book.pages.all())
    page_queries = [q for q in ctx.captured_queries if "testapp_page" in q["sql"]]
    assert len(page_queries) == -(-n // chunk)


def test_chosen_modes_are_kept(bookstore: Any) -> None:
    """A queryset with a mode of its own keeps it (Django 6.1's fetch modes)."""
    if not _compat.HAS_FETCH_MODES:
        pytest.skip("Django 6.1's fetch modes")
    from django.db.models.fetch_modes import FETCH_PEERS

    with autoprefetch():
        books = list(Book.objects.order_by("pk").fetch_mode(FETCH_PEERS))
    assert books[0]._state.fetch_mode is FETCH_PEERS


def test_agrees_with_djangos_fetch_peers(bookstore: Any) -> None:
    """On Django 6.1, to-one auto-prefetch is ``FETCH_PEERS``: same caches, same queries."""
    if not _compat.HAS_FETCH_MODES:
        pytest.skip("Django 6.1's fetch modes")
    from django.db.models.fetch_modes import FETCH_PEERS

    for model, path in ((Book, "publisher"), (Book, "profile"), (Author, "mentor__mentor")):
        queryset = model._default_manager.order_by("pk")
        expected = list(queryset.fetch_mode(FETCH_PEERS))
        _, django_queries = queries(lambda e=expected, p=path: touch(e, p))  # type: ignore[misc]
        got = list(autoprefetch(queryset))
        _, auto_queries = queries(lambda g=got, p=path: touch(g, p))  # type: ignore[misc]
        assert auto_queries == django_queries
        assert_same_prefetch(expected, got, [], modes=False)
    # Beyond Django: the to-many step of a chain is fetched for all peers too.
    expected = list(Book.objects.order_by("pk").fetch_mode(FETCH_PEERS))
    _, django_queries = queries(lambda: touch(expected, "authors__location"))
    got = list(autoprefetch(Book.objects.order_by("pk")))
    _, auto_queries = queries(lambda: touch(got, "authors__location"))
    assert auto_queries == 2 < django_queries


def test_with_install_and_atomic(bookstore: Any, installed: None) -> None:
    """Under ``install()`` and inside ``atomic`` (the caller's connection sees its own
    uncommitted rows)."""
    with transaction.atomic():
        book = Book.objects.order_by("pk").first()
        assert book is not None
        Page.objects.create(book=book, number=99, text="uncommitted")
        books = list(autoprefetch(Book.objects.order_by("pk")))
        _, count = queries(lambda: [list(b.pages.all()) for b in books])
        assert count == 1
        assert 99 in [p.number for p in books[0].pages.all()]
        transaction.set_rollback(True)


def test_engine_results_auto_prefetch_in_a_block(bookstore: Any) -> None:
    """What ``prefetch()`` returns inside a block auto-prefetches, its related instances too."""
    with autoprefetch():
        books = async_prefetch.prefetch(Book.objects.order_by("pk"), "authors")
    mode = mode_of(books[0])
    assert isinstance(mode, PrefetchMode)
    assert mode.auto
    authors = [a for b in books for a in b.authors.all()]
    _, count = queries(lambda: [a.location for a in authors])
    assert count == 1


@pytest.mark.anyio
async def test_lazy_access_in_an_event_loop_names_the_lookup(bookstore: Any) -> None:
    """A lazy access in an event loop raises an error naming the lookup and the call site."""
    books = await async_prefetch.aprefetch(Book.objects.order_by("pk"), "authors")
    author = next(a for b in books for a in b.authors.all())
    with pytest.raises(LazyLoadInAsyncContext) as excinfo:
        author.location  # noqa: B018
    message = str(excinfo.value)
    assert '"authors__location"' in message
    assert "test_autoprefetch.py:" in message
    assert isinstance(excinfo.value, SynchronousOnlyOperation)
    with pytest.raises(LazyLoadInAsyncContext, match='"pages"'):
        list(books[0].pages.all())
    # In a thread (sync_to_async), the same access loads as Django would.
    location = await sync_to_async(lambda: author.location)()
    expected = await Author.objects.select_related("location").aget(pk=author.pk)
    assert location == expected.location


@pytest.mark.anyio
async def test_auto_in_async_code(bookstore: Any) -> None:
    """Auto-prefetch in async code: the access is refused in the loop with the lookup,
    and works in a thread, for all peers at once."""
    books = await async_prefetch.aprefetch(autoprefetch(Book.objects.order_by("pk")))
    with pytest.raises(LazyLoadInAsyncContext, match='"publisher"'):
        books[1].publisher  # noqa: B018

    def read() -> int:
        with CaptureQueriesContext(connection) as ctx:
            [b.publisher for b in books]
        return len(ctx.captured_queries)

    assert await sync_to_async(read)() == 1


def test_pickled_instances_keep_the_behaviour(bookstore: Any) -> None:
    import pickle

    books = list(autoprefetch(Book.objects.order_by("pk")))
    copy = pickle.loads(pickle.dumps(books[1]))
    mode = mode_of(copy)
    assert isinstance(mode, PrefetchMode)
    assert mode.auto
    # Its peers are not pickled: a lazy load fetches the relation for the copy alone.
    with CaptureQueriesContext(connection) as ctx:
        pages = list(copy.pages.all())
    assert len(ctx.captured_queries) == 1
    assert [p.pk for p in pages] == [p.pk for p in books[1].pages.all()]
    assert pages
    # No peers to fetch with: Django's own query, whose instances take on the mode.
    assert all(isinstance(mode_of(page), PrefetchMode) for page in pages)


def test_threads_share_nothing_but_caches(bookstore: Any) -> None:
    """Two threads touching peers of one result: each relation fetched, caches whole."""
    books = list(autoprefetch(Book.objects.order_by("pk")))

    async def both() -> None:
        await asyncio.gather(
            sync_to_async(touch, thread_sensitive=False)(books, "pages"),
            sync_to_async(touch, thread_sensitive=False)(books, "authors"),
        )

    asyncio.run(both())
    expected = list(Book.objects.order_by("pk").prefetch_related("pages", "authors"))
    assert_same_prefetch(expected, books, ["pages", "authors"], modes=False)


def test_project_wide_setting(bookstore: Any) -> None:
    """``ASYNC_PREFETCH["AUTO"]``: every queryset's instances auto-prefetch, and the
    setting is followed when it changes."""
    from django.test import override_settings

    with override_settings(ASYNC_PREFETCH={"AUTO": True}):
        books = list(Book.objects.order_by("pk"))
        _, count = queries(lambda: [list(b.pages.all()) for b in books])
        assert count == 1
    books = list(Book.objects.order_by("pk"))
    _, count = queries(lambda: [list(b.pages.all()) for b in books])
    assert count == len(books)


def test_engine_streams_chunks_are_peer_groups(bookstore: Any) -> None:
    """``iterator(autoprefetch(qs), ...)``: each chunk's books are peers, not the stream's."""
    n = Book.objects.count()
    chunk = 2
    peer_counts = []
    with CaptureQueriesContext(connection) as ctx:
        for book in async_prefetch.iterator(
            autoprefetch(Book.objects.order_by("pk")), "authors", chunk_size=chunk
        ):
            peer_counts.append(len(book._state.peers))
            book.publisher  # noqa: B018
    # Each book's peers are its chunk's books: not every book the stream built so far.
    assert peer_counts == [min(chunk, n - i // chunk * chunk) for i in range(n)]
    publisher_queries = [q for q in ctx.captured_queries if "testapp_publisher" in q["sql"]]
    assert 0 < len(publisher_queries) <= -(-n // chunk)
