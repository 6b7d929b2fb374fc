"""Reverse foreign key (``book.pages``): builder, match keys and cached-queryset deriver."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.exceptions import FieldError
from django.db.models import Model, QuerySet

from ..hydration.queryset_template import ParentParts, QuerysetsFactory, queryset_factory
from .base import RelationQuery, key_values, linker, match_keys, row_link
from .parents import filter_by_parents, kept_statement, manager_queryset


def build(
    manager: Any,
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
    *,
    reuse_statement: bool = False,
) -> RelationQuery:
    """Reverse foreign key (``book.pages``), through the related model's default manager."""
    fk = manager.field
    queryset = manager_queryset(manager, instances, querysets)
    rel_obj_attr, instance_attr = match_keys(
        queryset.model,
        fk.local_related_fields,
        type(instances[0]),
        fk.foreign_related_fields,
        (fk.get_local_related_value, fk.get_foreign_related_value),
    )
    instances_dict = dict(zip(key_values(instance_attr, instances), instances, strict=True))
    targets = fk.foreign_related_fields
    key, statement = (
        kept_statement(
            "reverse_many_to_one", fk, manager, querysets, queryset, fk.name, targets, instances
        )
        if reuse_statement
        else (None, None)
    )
    if statement is None:
        queryset = filter_by_parents(queryset, fk.name, targets, instances)
    link_back = linker(fk, rel_obj_attr, instances_dict, keep_cached=True)
    return RelationQuery(
        queryset,
        rel_obj_attr,
        instance_attr,
        single=False,
        cache_name=fk.remote_field.cache_name,
        is_descriptor=False,
        link_back=link_back,
        row_link=row_link(fk, rel_obj_attr, instances_dict),
        statement_key=key,
        statement=statement,
    )


def derive_cached_querysets(
    descriptor: Any, manager: Any, template: QuerySet[Any], parent_class: type[Model]
) -> QuerysetsFactory | None:
    """Reverse foreign key: ``RelatedManager._apply_rel_filters`` with the parent swapped.
    A null key (Django returns ``.none()``) takes Django's path. The key is loaded: the
    level matched rows on it."""
    field = descriptor.field
    try:
        target_attname = field.target_field.attname
    except FieldError:  # multi-column relation
        return None
    parts = ParentParts((target_attname,), ((field.name, -1),), known_field=field)
    return queryset_factory(template, parent_class, parts)
