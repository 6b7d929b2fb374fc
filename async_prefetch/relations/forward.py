"""Forward foreign key and forward one-to-one (``book.publisher``, ``profile.book``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.expressions import Col, ColPairs
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
)
from django.db.models.fields.tuple_lookups import TupleIn

from ..sql.any_of import AnyOf
from .base import (
    RelationQuery,
    ValueKey,
    descriptor_queryset,
    key_values,
    linker,
    match_keys,
)


def build(
    descriptor: ForwardManyToOneDescriptor[Any],
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
) -> RelationQuery:
    """Forward foreign key and forward one-to-one (``book.publisher``, ``profile.book``)."""
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
    if len(related_fields) == 1:
        # Django's one-column TupleIn is ``(col) IN ((%s), (%s), ...)``.
        column = Col(table, related_fields[0])
        values = (
            list(instances_dict)
            if type(instance_attr) is ValueKey
            else [key for (key,) in instances_dict]
        )
        queryset = queryset.filter(AnyOf(column, values))
    else:
        columns = ColPairs(table, related_fields, related_fields, fk)
        queryset = queryset.filter(TupleIn(columns, list(instances_dict)))
    queryset.query.clear_ordering()
    link_back = None
    if not fk.remote_field.multiple:  # one-to-one: the related object knows its parent
        link_back = linker(fk.remote_field, rel_obj_attr, instances_dict, keep_cached=False)
    return RelationQuery(
        queryset, rel_obj_attr, instance_attr, True, fk.cache_name, False, link_back
    )
