"""Match keys: the engine's cheaper key functions group rows exactly as Django's do.

``builders`` replaces Django's tuple keys (``get_instance_value_for_fields`` for reverse
foreign keys, ``get_db_prep_value`` per object for many-to-many) with the stored value itself
where that is exact: any single plain column for reverse foreign keys (``editions`` matches on
the ISBN string), integer columns for many-to-many. Elsewhere (a many-to-many whose source
side is a ``to_field`` string) Django's keys stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from django.db.models import Field, ForeignKey, Model
from django.db.models.fields import AutoFieldMixin
from django.db.models.fields.related import ForeignObject

from async_prefetch.hydration.rows import row_builder
from async_prefetch.relations import build_relation_query
from async_prefetch.relations.base import ValueKey, key_values
from async_prefetch.sql.compiler import compile_queryset
from tests.conftest import Bookstore
from tests.testapp.models import Author, Book, BookProfile, EBook, Edition, Tag, Tagging

pytestmark = pytest.mark.django_db(transaction=True)


def relation_for(parents: list[Model], name: str) -> tuple[Any, Any, list[Model]]:
    descriptor = getattr(type(parents[0]), name)
    prefetcher = getattr(parents[0], name)
    relation = build_relation_query(descriptor, prefetcher, parents, None)
    assert relation is not None
    related = row_builder(compile_queryset(relation.queryset))(_rows(relation.queryset))
    django = prefetcher.get_prefetch_querysets(parents, None)
    return relation, django, related


def _rows(queryset: Any) -> list[tuple[Any, ...]]:
    compiler = queryset.query.get_compiler(queryset.db)
    return [row for chunk in compiler.execute_sql() for row in chunk]


@pytest.mark.parametrize(
    ("model", "name", "scalar"),
    [
        (Book, "pages", True),
        (Book, "editions", True),  # to_field isbn: the stored string itself
        (Book, "authors", True),
        (Author, "books", True),
        (Book, "tags", True),  # through Tagging: its book side is an integer key
        (Tag, "books", False),  # through Tagging.tag to Tag.name: prepared strings
    ],
)
def test_keys_group_as_djangos(
    bookstore: Bookstore,
    monkeypatch: pytest.MonkeyPatch,
    model: type[Model],
    name: str,
    scalar: bool,
) -> None:
    parents = list(model._default_manager.order_by("pk"))
    relation, django, related = relation_for(parents, name)
    _, django_rel_key, django_parent_key = django[:3]
    theirs = {django_parent_key(p): p for p in parents}
    django_calls = count_django_key_work(monkeypatch)
    ours = {relation.instance_attr(p): p for p in parents}
    keys = [relation.rel_obj_attr(obj) for obj in related]
    # The batch form reads the same keys.
    assert key_values(relation.rel_obj_attr, related) == keys
    assert key_values(relation.instance_attr, parents) == [
        relation.instance_attr(p) for p in parents
    ]
    # Plain keys never fall back to Django's per-object work; Django's keys always do it.
    assert (django_calls() == 0) is scalar
    monkeypatch.undo()
    assert len(ours) == len(theirs)
    for obj, key in zip(related, keys, strict=True):
        assert isinstance(key, tuple) is not scalar
        assert ours[key] is theirs[django_rel_key(obj)]


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (Author, "location"),  # nullable: one author has none
        (Book, "publisher"),
        (Edition, "book"),  # to_field isbn: the stored string itself
        (Tagging, "tag"),  # to_field name
        (BookProfile, "book"),  # forward one-to-one
    ],
)
def test_forward_keys_group_as_djangos(
    bookstore: Bookstore, monkeypatch: pytest.MonkeyPatch, model: type[Model], name: str
) -> None:
    """A forward relation matches the parents' key value with the related object's, as
    Django's one-value tuples do, without Django's per-object key functions."""
    parents = list(model._default_manager.order_by("pk"))
    descriptor = getattr(model, name)
    relation = build_relation_query(descriptor, descriptor, parents, None)
    assert relation is not None
    related = row_builder(compile_queryset(relation.queryset))(_rows(relation.queryset))
    _, django_rel_key, django_parent_key = descriptor.get_prefetch_querysets(parents, None)[:3]
    django_calls = count_django_key_work(monkeypatch)
    ours = dict(zip(key_values(relation.instance_attr, parents), parents, strict=True))
    keys = key_values(relation.rel_obj_attr, related)
    assert keys == [relation.rel_obj_attr(obj) for obj in related]
    assert django_calls() == 0
    monkeypatch.undo()
    theirs = {django_parent_key(p): p for p in parents}
    assert list(ours) == [key for (key,) in theirs]
    assert sorted(map(str, keys)) == sorted(str(django_rel_key(obj)[0]) for obj in related)
    for obj, key in zip(related, keys, strict=True):
        assert ours[key] is theirs[django_rel_key(obj)]


def count_django_key_work(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count calls of what Django's key functions do per object."""
    calls = [0]

    def counting(cls: type[Any], method: str) -> None:
        original = getattr(cls, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, method, counted)

    counting(ForeignObject, "get_instance_value_for_fields")
    counting(ForeignKey, "get_db_prep_value")
    counting(Field, "get_db_prep_value")
    counting(AutoFieldMixin, "get_db_prep_value")
    return lambda: calls[0]


def test_mixed_parent_classes_use_djangos_key(
    bookstore: Bookstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An e-book among books (a subclass) is keyed by Django's function, a book is not."""
    books = list(Book.objects.order_by("pk"))
    ebook = EBook.objects.get()
    relation, _, _ = relation_for([*books, ebook], "authors")
    django_calls = count_django_key_work(monkeypatch)
    assert relation.instance_attr(books[0]) == books[0].pk
    assert django_calls() == 0
    assert relation.instance_attr(ebook) == ebook.pk
    assert django_calls() > 0
    assert key_values(relation.instance_attr, [*books, ebook]) == [
        *(book.pk for book in books),
        ebook.pk,
    ]


class _Stored:
    """Stands in for a model: ``value`` stored, ``django`` what Django's key reads."""

    def __init__(self, value: Any, django: Any) -> None:
        self.value, self.django = value, django


class _Subclass(_Stored):
    pass


@pytest.mark.parametrize("ints_only", [False, True])
def test_batch_keys_fall_back_per_object_as_single_keys_do(ints_only: bool) -> None:
    """An object of another class (or, for integer keys, a value that is not an ``int``)
    gets Django's key, in the batch form as in the single one."""

    def django_key(obj: Any) -> tuple[Any]:
        return (obj.django,)

    key = ValueKey(cast(Any, _Stored), "value", django_key, ints_only=ints_only)
    objs = [_Stored(1, "a"), _Subclass(2, "b"), _Stored("3", "c"), _Stored(4, "d")]
    expected = [1, "b", "c" if ints_only else "3", 4]
    assert [key(obj) for obj in objs] == expected
    assert key_values(key, objs) == expected
    assert key_values(key, [_Stored(5, "e"), _Stored(6, "f")]) == [5, 6]
    assert key_values(key, [_Stored(7, "g"), _Stored("8", "h")]) == [7, "h" if ints_only else "8"]
