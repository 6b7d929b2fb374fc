"""``UnfilteredQuery``: the query of a cached queryset, built only when something uses it.

The prefetched querysets must be indistinguishable from Django's once anything looks at
their query (filtering, compiling, cloning, pickling, copying), and must not carry
``Query.__init__``'s containers before that.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from django.db import connection
from django.db.models import Prefetch, Q, prefetch_related_objects
from django.db.models.sql import Query
from django.db.models.sql.where import WhereNode

import async_prefetch
from async_prefetch.hydration.unfiltered_query import UnfilteredQuery
from tests.conftest import Bookstore
from tests.testapp.models import Book, Page


def sql_of(query: Query) -> str:
    sql, params = query.get_compiler(connection=connection).as_sql()
    return str(sql % params)


def test_holds_only_model_and_scalars_until_used() -> None:
    query = UnfilteredQuery(Page)
    assert vars(query) == {"model": Page, "alias_cols": True}
    assert isinstance(query, Query)


def test_first_use_makes_it_a_plain_query_equal_to_querys() -> None:
    query = UnfilteredQuery(Page, alias_cols=False)
    assert isinstance(query.where, WhereNode)  # any missing attribute materialises
    assert type(query) is Query
    expected = Query(Page, alias_cols=False)
    assert vars(query).keys() == vars(expected).keys()
    assert all(
        type(getattr(query, key)) is type(value) and getattr(query, key) == value
        for key, value in vars(expected).items()
        if key != "where"
    )
    assert sql_of(query) == sql_of(expected)


def test_attributes_assigned_before_first_use_are_kept() -> None:
    query = UnfilteredQuery(Page)
    where = WhereNode()
    query.where = where  # assignment, not a read: nothing materialised yet
    query.filter_is_sticky = True
    assert type(query) is UnfilteredQuery
    query.materialise()
    assert query.where is where
    assert query.filter_is_sticky is True
    assert type(query) is Query


def test_containers_are_not_shared_between_queries() -> None:
    first, second = UnfilteredQuery(Page), UnfilteredQuery(Page)
    first.add_q(Q(number__gt=1))
    assert "WHERE" in sql_of(first)
    assert "WHERE" not in sql_of(second)
    assert first.where is not second.where
    assert first.alias_map is not second.alias_map


def test_missing_attributes_still_raise() -> None:
    query = UnfilteredQuery(Page)
    with pytest.raises(AttributeError):
        query.no_such_attribute  # noqa: B018
    assert not hasattr(query, "no_such_attribute")


@pytest.mark.parametrize(
    "copier",
    [
        pytest.param(lambda query: query.clone(), id="clone"),
        pytest.param(lambda query: query.chain(), id="chain"),
        pytest.param(copy.copy, id="copy"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda query: pickle.loads(pickle.dumps(query)), id="pickle"),
    ],
)
def test_copies_are_plain_queries(copier: Any) -> None:
    query = UnfilteredQuery(Page)
    duplicate = copier(query)
    assert type(duplicate) is Query
    assert type(query) is Query
    assert sql_of(duplicate) == sql_of(Query(Page))


@pytest.mark.parametrize(
    "copier",
    [
        pytest.param(lambda query: query.clone(), id="clone"),
        pytest.param(lambda query: query.chain(), id="chain"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda query: pickle.loads(pickle.dumps(query)), id="pickle"),
    ],
)
def test_deep_copies_are_independent(copier: Any) -> None:
    """As for ``Query``: filtering the copy leaves the original alone (``copy.copy`` is
    shallow for both, so it is not here)."""
    query = UnfilteredQuery(Page)
    duplicate = copier(query)
    duplicate.add_q(Q(number__gt=1))
    assert "WHERE" in sql_of(duplicate)
    assert "WHERE" not in sql_of(query)


@pytest.mark.django_db(transaction=True)
def test_cached_querysets_hold_unfiltered_queries(bookstore: Bookstore) -> None:
    """Every derived cached queryset defers its query; using it gives Django's query."""
    expected = list(Book.objects.order_by("pk"))
    prefetch_related_objects(expected, "pages", "authors")
    got = list(Book.objects.order_by("pk"))
    async_prefetch.prefetch_related_objects(got, "pages", "authors")
    for name in ("pages", "authors"):
        for theirs, ours in zip(expected, got, strict=True):
            cached: Any = ours._prefetched_objects_cache[name]  # type: ignore[attr-defined]
            assert type(cached._query) is UnfilteredQuery
            assert "where" not in vars(cached._query)
            django: Any = theirs._prefetched_objects_cache[name]  # type: ignore[attr-defined]
            assert type(django._query) is Query
            # Using the query applies the deferred relation filter, as Django's does.
            assert type(cached.query) is Query
            assert sql_of(cached.query) == sql_of(django.query)


@pytest.mark.django_db(transaction=True)
def test_leaf_querysets_are_djangos(bookstore: Bookstore) -> None:
    """A leaf ``Prefetch(queryset=...)`` goes through ``_apply_rel_filters`` as in Django."""
    books = list(Book.objects.order_by("pk"))
    async_prefetch.prefetch_related_objects(
        books, Prefetch("pages", queryset=Page.objects.filter(number__gte=1))
    )
    cached: Any = books[0]._prefetched_objects_cache["pages"]  # type: ignore[attr-defined]
    assert type(cached._query) is Query


def test_getstate_is_a_plain_querys() -> None:
    """Serialisers that call ``__getstate__`` directly get a whole query's state."""
    state = UnfilteredQuery(Page).__getstate__()
    assert state.keys() == vars(Query(Page)).keys()
