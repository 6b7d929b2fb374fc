"""The one array parameter holds exactly the values Django's ``IN`` list would hold.

The reverse foreign key builder lets Django build its filter for one parent key and then
prepares all the keys itself, and ``AnyOf`` prepares its values without Django's
per-value expression plumbing (as is, for fields whose preparation returns them
unchanged). Each is compared here with the statement Django compiles for the same
filter: the same SQL but for ``= ANY(%s)``, and the same parameters, type for type, in
the same order (duplicates and ``None`` dropped, as Django's ``IN`` drops them).
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.models import F, Model, QuerySet, Value
from django.db.models.lookups import In

from async_prefetch.relations import build_relation_query
from async_prefetch.relations.parents import filter_by_parents
from async_prefetch.sql.any_of import AnyOf, _plain, any_instead_of_in, plain_values
from async_prefetch.sql.compiler import compile_queryset
from tests.conftest import Bookstore
from tests.testapp.models import Author, Book, EBook, Edition, Page, Publisher, Review, Tag


class KeyWithAttributes(str):
    """A key type whose instances could carry ``resolve_expression``: never "plain"."""


def typed(params: Any) -> list[tuple[type[Any], Any]]:
    return [(type(param), param) for param in params]


def assert_any_matches_in(ours: QuerySet[Any], djangos: QuerySet[Any]) -> None:
    """``ours`` compiles as ``djangos`` with its last ``IN (...)`` list as one array (cast to
    an integer type or not: :func:`test_plans_match_djangos` checks which), or exactly as
    ``djangos`` when that list has one value."""
    engine, django = compile_queryset(ours), compile_queryset(djangos)
    assert engine.sql is not None
    assert django.sql is not None
    in_list = re.search(r" IN \((%s(, )?)+\)", django.sql)
    assert in_list is not None, django.sql
    listed = in_list.group(0).count("%s")
    if listed == 1:
        assert engine.sql == django.sql
        assert typed(engine.params) == typed(django.params)
        return
    array = re.search(r" = ANY\(%s(::(smallint|integer|bigint)\[\])?\)", engine.sql)
    assert array is not None, engine.sql
    assert engine.sql == django.sql.replace(in_list.group(0), array.group(0))
    before = django.sql[: in_list.start()].count("%s")
    assert typed(engine.params[:before]) == typed(django.params[:before])
    assert typed(engine.params[before]) == typed(django.params[before : before + listed])
    assert typed(engine.params[before + 1 :]) == typed(django.params[before + listed :])


def filtered_by_keys(
    model: type[Model], relation: str, keys: list[Any]
) -> tuple[QuerySet[Any], QuerySet[Any]]:
    """``model`` filtered on its foreign key ``relation`` by parents holding ``keys``:
    the reverse foreign key builder's filter, and Django's ``__in`` on the same keys."""
    fk: Any = model._meta.get_field(relation)
    target = fk.foreign_related_fields[0]
    parents = [fk.related_model(**{target.attname: key}) for key in keys]
    for number, parent in enumerate(parents, 1):  # saved, as the filter requires
        if parent.pk is None:
            parent.pk = number
    ours = filter_by_parents(
        model._default_manager.all(), fk.name, fk.foreign_related_fields, parents
    )
    return ours, model._default_manager.filter(**{f"{fk.name}__{target.name}__in": keys})


def last_condition(query: Any) -> Any:
    return query.where.children[-1]


UUIDS = [uuid.UUID(int=7), uuid.UUID(int=3)]


@pytest.mark.parametrize(
    ("model", "relation", "keys"),
    [
        (Page, "book", [3, 1, 3, 2]),  # integer primary key, a duplicate
        (Edition, "book", ["isbn-3", None, "isbn-1"]),  # a parent without the key
        (Page, "book", [1, 2.0, "3", True, Decimal("4")]),  # converted as Django converts
        (Page, "book", [5]),  # one parent: Django's filter as it is
        (Review, "book", [2, 1]),  # the default manager filters too
        (Edition, "book", ["isbn-2", "isbn-1", "isbn-2"]),  # to_field, a string key
        (Book, "publisher", [UUIDS[0], str(UUIDS[1])]),  # UUID key, one as text
        (Page, "book", [KeyWithAttributes("2"), 1]),  # not plain: Django's filter
    ],
)
def test_reverse_foreign_key_array_holds_djangos_values(
    model: type[Model], relation: str, keys: list[Any]
) -> None:
    assert_any_matches_in(*filtered_by_keys(model, relation, keys))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("model", "relation"),
    [
        (Book, "authors"),  # forward, auto-created through model
        (Author, "books"),  # reverse
        (Book, "tags"),  # custom through model
        (Tag, "books"),  # reverse, the through model's key is Tag.name (to_field)
        (EBook, "authors"),  # parents under multi-table inheritance
    ],
)
@pytest.mark.parametrize("querysets", [None, "prefetch"])
def test_many_to_many_matches_djangos_builder(
    bookstore: Bookstore, model: type[Model], relation: str, querysets: str | None
) -> None:
    """The engine's many-to-many query is ``get_prefetch_querysets()``'s with its ``IN``
    list as one array; its match keys agree with Django's on every row."""
    parents = list(model._default_manager.order_by("pk"))
    parents += parents[:1]  # a duplicate parent
    manager: Any = getattr(parents[0], relation)

    def inner() -> list[QuerySet[Any]] | None:
        if querysets is None:
            return None
        return [manager.model._default_manager.filter(pk__gt=0).order_by("-pk")]

    djangos, django_rel_key, django_parent_key, *django_rest = manager.get_prefetch_querysets(
        parents, inner()
    )
    ours = build_relation_query(getattr(model, relation), manager, parents, inner())
    assert ours is not None
    assert_any_matches_in(ours.queryset, djangos)
    assert (ours.single, ours.cache_name, ours.is_descriptor) == tuple(django_rest)
    ours_state, django_state = vars(ours.queryset), vars(djangos)
    assert ours_state["_hints"] == django_state["_hints"]  # routing: the first parent
    assert ours_state["_db"] == django_state["_db"]
    rows = list(ours.queryset)
    assert rows  # the comparison below compares something

    def as_tuple(key: Any) -> tuple[Any, ...]:  # ours may be the scalar of a 1-tuple
        return key if isinstance(key, tuple) else (key,)

    related_keys = [ours.rel_obj_attr(row) for row in rows]
    parent_keys = [ours.instance_attr(parent) for parent in parents]
    assert {type(key) is tuple for key in related_keys + parent_keys} in ({True}, {False})
    assert list(map(as_tuple, related_keys)) == list(map(django_rel_key, rows))
    assert list(map(as_tuple, parent_keys)) == list(map(django_parent_key, parents))


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("number", [2, 1, 2, None]),  # IntegerField: Django adapts each value
        ("id", [2, 1]),  # auto field: prepared values are sent as they are
        ("text", ["b", "a"]),
        ("text", [KeyWithAttributes("b"), "a"]),  # not plain: rendered as Django's IN
    ],
)
def test_any_of_sends_djangos_parameters(field: str, values: list[Any]) -> None:
    djangos = Page.objects.filter(**{f"{field}__in": values})
    ours = Page.objects.filter(**{f"{field}__in": values})
    assert any_instead_of_in(ours.query)
    assert type(last_condition(ours.query)) is AnyOf
    if plain_values(values):
        assert_any_matches_in(ours, djangos)
    else:  # rendered exactly as Django's IN
        assert compile_queryset(ours).sql == compile_queryset(djangos).sql
        assert typed(compile_queryset(ours).params) == typed(compile_queryset(djangos).params)


def test_prepared_values_replace_the_probe_value_only_for_a_plain_in() -> None:
    query = Page.objects.filter(book__id__in=[1]).query
    assert any_instead_of_in(query, [1, 2, 3])
    assert last_condition(query).rhs == [1, 2, 3]
    # A subquery: left as Django built it, and the caller is told.
    subquery = Page.objects.filter(book__in=Book.objects.filter(pk=F("pk"))).query
    assert not any_instead_of_in(subquery, [1, 2])
    assert type(last_condition(subquery)) is not AnyOf
    # A lookup that was not built for one value.
    two = Page.objects.filter(book__id__in=[1, 2]).query
    assert not any_instead_of_in(two, [1, 2, 3])
    assert type(last_condition(two)) is In


def test_plain_is_decided_per_type() -> None:
    assert _plain([1, "a", uuid.uuid4(), Decimal(1), None, 2.5])
    assert not _plain([1, KeyWithAttributes("a")])
    assert not _plain([1, Value(1)])
    assert not _plain([Publisher()])  # a model instance: Django resolves its pk
    assert _plain([(1, 2)])
    assert not plain_values([(1, 2)])
    assert not plain_values([[1]])


def plan(queryset: QuerySet[Any]) -> list[str]:
    """PostgreSQL's plan for ``queryset``'s statement as the engine compiles it."""
    compiled = compile_queryset(queryset)
    assert compiled.sql is not None
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (VERBOSE, COSTS OFF) {compiled.sql}", compiled.params)
        return [line for (line,) in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("model", "relation", "keys"),
    [
        (Page, "book", [3, 1, 2]),  # small integers: psycopg sends them as int2[]
        (Page, "book", [1, 40_000]),  # int4[]
        (Page, "book", [1, 2**40]),  # a key no integer column holds: not cast
        (Page, "book", [7]),  # one key: Django's IN, planned as "= 7"
        (Edition, "book", ["isbn-2", "isbn-1"]),  # varchar
        (Book, "publisher", UUIDS),
    ],
)
def test_plans_match_djangos(model: type[Model], relation: str, keys: list[Any]) -> None:
    """The array is planned as Django's ``IN`` list is: the same plan, constants included,
    so an unordered queryset's rows come back in the same order."""
    ours, djangos = filtered_by_keys(model, relation, keys)
    assert plan(ours) == plan(djangos)
