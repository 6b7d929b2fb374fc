"""Kept relation statements (``async_prefetch.sql.statements``) on the cases a reused
statement must get right beyond its SQL, which ``statements.VERIFY`` (tests/conftest.py)
checks on every reuse: the caches built with the kept compiler, against Django's, for
keys of every kind, inheritance, ``to_attr``, chunks, threads and fetch modes; and what a
kept statement holds on to.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
from django.db import connections
from django.db.models import Prefetch, prefetch_related_objects
from pytest_django.fixtures import Settings

import async_prefetch
from async_prefetch import _compat
from async_prefetch.sql import statements
from tests.cache_snapshot import snapshot
from tests.factories import seed_bookstore
from tests.testapp.models import Book, EBook, Publisher, Tag

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("no_kept_statements"),
]


@pytest.fixture
def reuses(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The keys of the kept statements found (reused), in order."""
    found: list[Any] = []
    find = statements.StatementCache.find

    def counted(self: Any, key: Any, values: list[Any], django: Any = None) -> Any:
        statement = find(self, key, values, django)  # Django's compile still verifies it
        if statement is not None:
            found.append(key)
        return statement

    monkeypatch.setattr(statements.StatementCache, "find", counted)
    return found


def _same_as_djangos(ours: list[Any], djangos: list[Any], lookups: tuple[Any, ...]) -> None:
    async_prefetch.prefetch_related_objects(ours, *lookups)
    prefetch_related_objects(djangos, *lookups)
    assert snapshot(ours, lookups) == snapshot(djangos, lookups)


def test_a_kept_statement_holds_no_parent_key_values() -> None:
    """A kept statement holds none of the first call's parent keys (its compiler and its
    query are the row layout only): a whole call's keys, for each of up to 512 kept
    relations, would otherwise stay in memory."""
    seed_bookstore(n_books=8)
    publishers = list(Publisher.objects.order_by("name"))
    keys = [weakref.ref(publisher.pk) for publisher in publishers]  # UUIDs: weak-referable
    async_prefetch.prefetch_related_objects(publishers, "books")
    assert len(statements.statements) == 1
    del publishers
    gc.collect()
    while_kept = [key() is not None for key in keys]
    statements.statements.clear()
    gc.collect()
    assert not any(key() is not None for key in keys)  # nothing else holds them
    assert while_kept == [False] * len(keys), "the kept statement held the first call's keys"


def test_keys_out_of_the_column_range_get_their_own_kept_sql(reuses: list[Any]) -> None:
    """The kept SQL is chosen by the array's cast: keys that fit the integer
    column (``::bigint[]``, the bigint primary key) and a key beyond it (no cast, as
    Django's ``IN`` compares it) each reuse their own statement, with Django's caches."""
    seed_bookstore(n_books=8)
    lookups = ("pages", "authors")
    for outside in (False, True, False, True):
        ours = list(Book.objects.order_by("pk"))
        djangos = list(Book.objects.order_by("pk"))
        if outside:  # an unsaved parent whose key the column cannot hold
            ours.append(Book(pk=2**70, title="far", isbn="far"))
            djangos.append(Book(pk=2**70, title="far", isbn="far"))
        _same_as_djangos(ours, djangos, lookups)
    assert len(statements.statements) == 2
    casts = {len(entry.sql_by_cast) for entry in statements.statements._entries.values()}
    assert casts == {2}
    assert len(reuses) == 4  # the third and the fourth call, both relations


def test_uuid_and_to_field_keys_reuse_with_djangos_caches(reuses: list[Any]) -> None:
    """Keys that are not integers: a UUID primary key (``publisher.books``), a
    ``to_field`` reverse foreign key (``book.editions``, on ``isbn``) and a many-to-many
    whose through model points at ``Tag.name`` (``tag.books``), each called on other
    parents after the first call."""
    seed_bookstore(n_books=12)
    cases: list[tuple[Any, tuple[str, ...]]] = [
        (Publisher.objects.order_by("name"), ("books",)),
        (Book.objects.order_by("pk"), ("editions", "tags")),
        (Tag.objects.order_by("name"), ("books",)),
    ]
    for queryset, lookups in cases:
        pks = list(queryset.values_list("pk", flat=True))
        for part in (pks, pks[1:], pks[:-1]):
            ours = list(queryset.filter(pk__in=part))
            djangos = list(queryset.filter(pk__in=part))
            _same_as_djangos(ours, djangos, lookups)
    assert len(reuses) >= 8


def test_multi_table_children_reuse_their_parents_statement(reuses: list[Any]) -> None:
    """``Book.pages`` kept for books is reused for ``EBook`` parents (a multi-table
    child: same field, same related model) and for a mixed list of both, with Django's
    caches (the child's key is the parent link's value)."""
    seed_bookstore(n_books=8)
    EBook.objects.create(title="second ebook", isbn="978-e2")
    lookups = ("pages", "authors")
    _same_as_djangos(list(Book.objects.order_by("pk")), list(Book.objects.order_by("pk")), lookups)
    ebooks = list(EBook.objects.order_by("pk"))
    assert len(ebooks) == 2
    _same_as_djangos(ebooks, list(EBook.objects.order_by("pk")), lookups)
    mixed = [*EBook.objects.order_by("pk"), *Book.objects.filter(ebook=None).order_by("pk")]
    mixed_django = [*EBook.objects.order_by("pk"), *Book.objects.filter(ebook=None).order_by("pk")]
    _same_as_djangos(mixed, mixed_django, lookups)
    assert len(statements.statements) == 2
    assert len(reuses) == 4


def test_a_to_attr_prefetch_without_queryset_reuses(reuses: list[Any]) -> None:
    """``Prefetch(name, to_attr=...)`` without a queryset starts from the default
    queryset too: it reuses the statement kept for ``name`` and fills the list attribute
    as Django does."""
    seed_bookstore(n_books=8)
    _same_as_djangos(
        list(Book.objects.order_by("pk")), list(Book.objects.order_by("pk")), ("pages",)
    )
    lookups = (Prefetch("pages", to_attr="page_list"), Prefetch("authors", to_attr="who"))
    _same_as_djangos(list(Book.objects.order_by("pk")), list(Book.objects.order_by("pk")), lookups)
    assert len(reuses) == 1  # pages; authors was first compiled by this call


def test_chunks_reuse_one_statement(settings: Settings, reuses: list[Any]) -> None:
    """With ``CHUNK_SIZE`` each chunk of two or more keys binds its own keys to the
    one kept statement; the caches are Django's single query's (identity included)."""
    settings.ASYNC_PREFETCH = {"CHUNK_SIZE": 3}
    seed_bookstore(n_books=12)
    lookups = ("pages", "tags", "editions")
    for _ in range(2):
        _same_as_djangos(
            list(Book.objects.order_by("pk")), list(Book.objects.order_by("pk")), lookups
        )
    assert len(statements.statements) == 3
    assert len(reuses) >= 9  # the second call: every chunk of every level


def test_threads_reusing_one_statement_get_their_own_rows(reuses: list[Any]) -> None:
    """Several threads bind different parents to the same kept statements at once
    (one compiler shared for their row layout): each gets Django's caches for its own."""
    seed_bookstore(n_books=16)
    lookups = ("pages", "authors", "tags")
    pks = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    async_prefetch.prefetch(Book.objects.order_by("pk"), *lookups)  # keeps them
    parts = [pks[i : i + 5] for i in range(0, 12)]
    barrier = threading.Barrier(len(parts))
    failures: list[BaseException] = []

    def run(part: list[int]) -> None:
        try:
            djangos = list(Book.objects.filter(pk__in=part).order_by("pk"))
            prefetch_related_objects(djangos, *lookups)
            expected = snapshot(djangos, lookups)
            barrier.wait()
            for _ in range(3):
                ours = async_prefetch.prefetch(
                    Book.objects.filter(pk__in=part).order_by("pk"), *lookups
                )
                assert snapshot(ours, lookups) == expected
        except BaseException as error:
            failures.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    assert len(reuses) >= len(parts) * 3 * 3


def test_fetch_modes_on_reused_statements(reuses: list[Any]) -> None:
    """Django 6.1: instances built with a kept compiler take this call's fetch
    mode and peers, not the first call's."""
    if not _compat.HAS_FETCH_MODES:
        pytest.skip("Django 6.1's fetch modes")
    from django.db.models.fetch_modes import FETCH_ONE, FETCH_PEERS, FETCH_RAISE

    seed_bookstore(n_books=8)
    lookups = ("pages", "authors")
    for mode in (FETCH_PEERS, FETCH_RAISE, FETCH_ONE, FETCH_PEERS):
        ours = list(Book.objects.order_by("pk").fetch_mode(mode))
        djangos = list(Book.objects.order_by("pk").fetch_mode(mode))
        _same_as_djangos(ours, djangos, lookups)  # fetch modes and peers compared
    assert len(reuses) == 6
