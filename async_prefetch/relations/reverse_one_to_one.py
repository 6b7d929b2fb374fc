"""Reverse one-to-one (``book.profile``, ``book.ebook`` under multi-table inheritance)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.fields.related_descriptors import (
    ReverseOneToOneDescriptor,
)

from ..sql.any_of import any_instead_of_in
from .base import RelationQuery, descriptor_queryset, linker


def build(
    descriptor: ReverseOneToOneDescriptor[Any, Any],
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
) -> RelationQuery:
    """Reverse one-to-one (``book.profile``, ``book.ebook`` under multi-table inheritance)."""
    related = descriptor.related
    queryset = descriptor_queryset(descriptor, instances, querysets)
    rel_obj_attr = related.field.get_local_related_value
    instance_attr = related.field.get_foreign_related_value
    instances_dict = {instance_attr(inst): inst for inst in instances}
    queryset = queryset.filter(**{f"{related.field.name}__in": instances})
    any_instead_of_in(queryset.query)
    queryset.query.clear_ordering()
    link_back = linker(related.field, rel_obj_attr, instances_dict, keep_cached=False)
    return RelationQuery(
        queryset, rel_obj_attr, instance_attr, True, related.cache_name, False, link_back
    )
