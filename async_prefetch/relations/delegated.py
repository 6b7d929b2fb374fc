"""Relation kinds without a builder of their own (generic relations, third-party
descriptors): Django's ``get_prefetch_querysets()``, which may run the query itself, on
a thread that may query."""

from __future__ import annotations

from typing import Any

from django.db.models import Model

from .base import RelationQuery, take_additional_lookups


def django_prefetch_querysets(
    prefetcher: Any, instances: list[Model], querysets: list[Any] | None
) -> tuple[RelationQuery, list[Model]]:
    """Django's own builder and query, for relation kinds without a native builder."""
    rel_qs, rel_obj_attr, instance_attr, single, cache_name, is_descriptor = (
        prefetcher.get_prefetch_querysets(instances, querysets)
    )
    additional = take_additional_lookups(rel_qs)
    relation = RelationQuery(
        rel_qs,
        rel_obj_attr,
        instance_attr,
        single,
        cache_name,
        is_descriptor,
        additional_lookups=additional,
    )
    return relation, list(rel_qs)
