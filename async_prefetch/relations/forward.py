"""Forward foreign key and forward one-to-one (``book.publisher``, ``profile.book``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.expressions import Col, ColPairs
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
)
from django.db.models.fields.tuple_lookups import TupleIn

from ..sql import statements as kept
from ..sql.any_of import AnyOf, plain_values
from ..sql.compiler import compile_queryset
from .base import (
    RelationQuery,
    ValueKey,
    descriptor_queryset,
    key_values,
    linker,
    match_keys,
    only_queryset,
)
from .parents import plain_manager_class


def build(
    descriptor: ForwardManyToOneDescriptor[Any],
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
    *,
    reuse_statement: bool = False,
) -> RelationQuery:
    """Forward foreign key and forward one-to-one (``book.publisher``, ``profile.book``).

    With ``reuse_statement``, a single-column relation from the related model's plain
    base manager may come with its kept statement (:mod:`..sql.statements`), its
    queryset then left unfiltered."""
    fk = descriptor.field
    queryset = descriptor_queryset(descriptor, instances, querysets)
    # Django's keys are tuples of the key fields' values; one plain field on each side
    # is matched on its value itself (the same equality), read at C speed.
    rel_obj_attr, instance_attr = match_keys(
        queryset.model,
        fk.foreign_related_fields,
        type(instances[0]),
        fk.local_related_fields,
        (fk.get_foreign_related_value, fk.get_local_related_value),
    )
    instances_dict: dict[Any, Model] = dict(
        zip(key_values(instance_attr, instances), instances, strict=True)
    )
    query: Any = queryset.query
    related_fields = [query.resolve_ref(f.name).target for f in fk.foreign_related_fields]
    table = queryset.model._meta.db_table
    key: kept.Key | None = None
    statement: kept.Statement | None = None
    if len(related_fields) == 1:
        # Django's one-column TupleIn is ``(col) IN ((%s), (%s), ...)``.
        column = Col(table, related_fields[0])
        values = (
            list(instances_dict)
            if type(instance_attr) is ValueKey
            else [key for (key,) in instances_dict]
        )
        if reuse_statement:
            key, statement = _kept_statement(descriptor, fk, querysets, queryset, column, values)
        if statement is None:
            queryset = _filtered(queryset, column, values)
    else:
        columns = ColPairs(table, related_fields, related_fields, fk)
        queryset = queryset.filter(TupleIn(columns, list(instances_dict)))
        queryset.query.clear_ordering()
    link_back = None
    if not fk.remote_field.multiple:  # one-to-one: the related object knows its parent
        link_back = linker(fk.remote_field, rel_obj_attr, instances_dict, keep_cached=False)
    return RelationQuery(
        queryset,
        rel_obj_attr,
        instance_attr,
        True,
        fk.cache_name,
        False,
        link_back,
        statement_key=key,
        statement=statement,
    )


def _filtered(queryset: Any, column: Col, values: list[Any]) -> Any:
    """Django's filter on the related keys (as ``= ANY``), without ordering."""
    queryset = queryset.filter(AnyOf(column, values))
    queryset.query.clear_ordering()
    return queryset


def _kept_statement(
    descriptor: Any,
    fk: Any,
    querysets: Sequence[QuerySet[Any]] | None,
    queryset: Any,
    column: Col,
    values: list[Any],
) -> tuple[kept.Key | None, kept.Statement | None]:
    """As :func:`.parents.kept_statement` for a forward relation: kept when the queryset
    is the descriptor's own from a plain base manager (no ``Prefetch`` queryset)."""
    if only_queryset(querysets) is not None or not plain_descriptor_queryset(descriptor):
        return None, None
    if not values or not plain_values(values):
        return None, None
    key = ("forward", fk, queryset.model, queryset.db)
    statement = kept.statements.find(
        key, values, lambda: compile_queryset(_filtered(queryset._chain(), column, values))
    )
    return key, statement


def plain_descriptor_queryset(descriptor: Any) -> bool:
    """Whether ``descriptor.get_queryset()`` is Django's, on a base manager and queryset
    class that do not override how the queryset is made: its SQL filtered on keys then
    depends only on the relation and the database."""
    descriptor_class: Any = type(descriptor)
    manager_class: Any = type(descriptor.field.remote_field.model._base_manager)
    return _plain_forward(descriptor_class, manager_class)


@functools.cache
def _plain_forward(descriptor_class: Any, manager_class: Any) -> bool:
    get_queryset = descriptor_class.get_queryset
    return get_queryset is ForwardManyToOneDescriptor.get_queryset and plain_manager_class(
        manager_class, own=True
    )
