"""Relations whose related managers are not Django's: django-taggit and django-modelcluster.

Their prefetchers are delegated to their own ``get_prefetch_querysets()``; the querysets
left in ``_prefetched_objects_cache`` must come from their own ``get_queryset()``, as
Django's ``prefetch_one_level`` builds them. Every case is compared with Django's own
``prefetch_related``: same caches (:mod:`tests.cache_snapshot`, including each cached
queryset's SQL) and the same number of queries, through every entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.models import Model, QuerySet
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch import _compat
from tests.cache_snapshot import assert_same_prefetch
from tests.differential import check_async, check_sync, closing, query_log
from tests.testapp.models import Author, Book
from tests.thirdparty.models import Food, Pet, Place, TaggedPlace

pytestmark = pytest.mark.django_db(transaction=True)

# (model, lookup): taggit's generic TaggedItem, a TaggedItemBase through model with a
# foreign key, modelcluster's ClusterTaggableManager and its ParentalKey reverse manager.
CASES = [
    pytest.param(Food, "tags", id="taggit-generic"),
    pytest.param(Pet, "tags", id="taggit-through"),
    pytest.param(Place, "tags", id="modelcluster-tags"),
    pytest.param(Place, "tagged_items", id="modelcluster-parental-key"),
    pytest.param(Place, "tagged_items__tag", id="modelcluster-parental-key-nested"),
]
NAMES = ["apple", "basil", "cumin", "dill"]


@pytest.fixture
def tagged(transactional_db: None) -> None:
    """Three rows of each model tagged with 2, 1 and 0 of :data:`NAMES`, sharing tags."""
    for model in (Food, Pet, Place):
        for index, tags in enumerate([NAMES[:2], NAMES[2:3], []]):
            row = model(name=f"{model.__name__} {index}")
            if model is Place:  # a cluster: tags are written with the row
                row.tags.add(*tags)
                row.save()
            else:
                row.save()
                row.tags.add(*tags)


def source(model: type[Model]) -> Callable[[], list[Any]]:
    """Fresh rows of ``model`` with its content type cached, as for the testapp models."""

    def rows() -> list[Any]:
        ContentType.objects.get_for_model(model)
        return list(model._default_manager.order_by("pk"))

    return rows


def django_prefetch_related(model: type[Model], lookup: str) -> tuple[list[Any], int]:
    """Rows and query count of Django's own ``prefetch_related`` (the engine uninstalled)."""
    ContentType.objects.get_for_model(model)
    with CaptureQueriesContext(connection) as ctx:
        rows = list(model._default_manager.order_by("pk").prefetch_related(lookup))
    return rows, len(ctx.captured_queries)


@pytest.mark.parametrize(("model", "lookup"), CASES)
def test_prefetch_related_objects(tagged: None, model: type[Model], lookup: str) -> None:
    check_sync(source(model), [lookup])


@pytest.mark.anyio
@pytest.mark.parametrize(("model", "lookup"), CASES)
async def test_aprefetch_related_objects(tagged: None, model: type[Model], lookup: str) -> None:
    await check_async(source(model), [lookup])


@pytest.mark.parametrize(("model", "lookup"), CASES)
def test_prefetch_queryset(tagged: None, model: type[Model], lookup: str) -> None:
    expected, django_queries = django_prefetch_related(model, lookup)
    queryset: QuerySet[Any] = model._default_manager.order_by("pk")
    with CaptureQueriesContext(connection) as ctx:
        got = async_prefetch.prefetch(queryset, lookup)
    assert_same_prefetch(expected, got, [lookup])
    assert len(ctx.captured_queries) == django_queries


@pytest.mark.anyio
@pytest.mark.parametrize(("model", "lookup"), CASES)
async def test_aprefetch_queryset(tagged: None, model: type[Model], lookup: str) -> None:
    expected, django_queries = await sync_to_async(
        closing(lambda: django_prefetch_related(model, lookup))
    )()
    queryset: QuerySet[Any] = model._default_manager.order_by("pk")
    async with query_log() as engine_sql:
        got = await async_prefetch.aprefetch(queryset, lookup)
    assert_same_prefetch(expected, got, [lookup])
    assert len(engine_sql) == django_queries


@pytest.mark.parametrize(("model", "lookup"), CASES)
def test_installed_prefetch_related(tagged: None, model: type[Model], lookup: str) -> None:
    expected, django_queries = django_prefetch_related(model, lookup)
    async_prefetch.install()
    try:
        got, engine_queries = django_prefetch_related(model, lookup)
    finally:
        async_prefetch.uninstall()
    assert_same_prefetch(expected, got, [lookup])
    assert engine_queries == django_queries


@pytest.mark.anyio
@pytest.mark.parametrize(("model", "lookup"), CASES)
async def test_installed_async_iteration(tagged: None, model: type[Model], lookup: str) -> None:
    expected, django_queries = await sync_to_async(
        closing(lambda: django_prefetch_related(model, lookup))
    )()
    queryset = model._default_manager.order_by("pk").prefetch_related(lookup)
    async_prefetch.install()
    try:
        async with query_log() as engine_sql:
            got = [row async for row in queryset]
    finally:
        async_prefetch.uninstall()
    assert_same_prefetch(expected, got, [lookup])
    assert len(engine_sql) == django_queries


def test_parental_key_cache_filters_on_its_parent(tagged: None) -> None:
    """A cached ``tagged_items`` queryset is the parent's own: filtering it more stays
    within the parent's rows (the unfiltered manager queryset would return every place's)."""
    first = async_prefetch.prefetch(Place.objects.order_by("pk"), "tagged_items")[0]
    names = set(first.tagged_items.filter(tag__name__in=NAMES).values_list("tag__name", flat=True))
    assert names == set(NAMES[:2])
    assert TaggedPlace.objects.filter(tag__name__in=NAMES).count() == 3


def test_djangos_related_managers_are_recognised(transactional_db: None) -> None:
    """Django's own managers keep the in-place fast path (``related_manager_queryset``)
    on every relation kind, including a custom default manager's (``Review``), and
    no third-party manager or subclass of Django's takes it."""
    book, author = Book(pk=1), Author(pk=1)
    djangos = [book.pages, book.reviews, book.authors, author.books, book.tags, book.comments]
    assert all(map(_compat.is_djangos_related_manager, djangos))
    subclass = type("PagesManager", (type(book.pages),), {})(book)
    others = [Food(pk=1).tags, Pet(pk=1).tags, Place(pk=1).tags, Place(pk=1).tagged_items]
    assert not any(map(_compat.is_djangos_related_manager, [*others, subclass]))
    assert not _compat.is_djangos_related_manager(Book.objects)
