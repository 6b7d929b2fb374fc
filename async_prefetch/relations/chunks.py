"""A level's queries: one, or one per chunk of at most ``CHUNK_SIZE`` parent keys."""

from __future__ import annotations

from typing import Any

from django.db.models import Model

from . import RelationQuery, build_relation_query
from .base import key_values


def relation_queries(
    descriptor: Any,
    prefetcher: Any,
    parents: list[Model],
    querysets: list[Any] | None,
    chunk_size: int | None,
    *,
    reuse_statement: bool = False,
) -> list[RelationQuery]:
    """The level's queries: one, one per chunk of at most ``chunk_size`` parent keys,
    or none when the relation kind is delegated to Django.

    Parents are grouped by their match key first, so each related row is fetched by
    exactly one chunk (one instance per row, as Django's single query gives). Levels
    whose queryset has its own ``prefetch_related()`` lookups are not split.
    ``reuse_statement``: see :func:`~async_prefetch.relations.build_relation_query`.
    """
    if chunk_size is None or len(parents) <= chunk_size:
        relation = build_relation_query(
            descriptor, prefetcher, parents, querysets, reuse_statement=reuse_statement
        )
        return [] if relation is None else [relation]
    # Key functions and lookups do not depend on the parents: learn them from one.
    probe = build_relation_query(descriptor, prefetcher, parents[:1], querysets)
    if probe is None:
        return []
    groups: dict[Any, list[Model]] = {}
    for key, parent in zip(key_values(probe.instance_attr, parents), parents, strict=True):
        groups.setdefault(key, []).append(parent)
    chunks = [parents]
    if len(groups) > chunk_size and not probe.additional_lookups:
        grouped = list(groups.values())
        chunks = [
            [parent for group in grouped[start : start + chunk_size] for parent in group]
            for start in range(0, len(grouped), chunk_size)
        ]
    relations = []
    for chunk in chunks:
        relation = build_relation_query(
            descriptor, prefetcher, chunk, querysets, reuse_statement=reuse_statement
        )
        assert relation is not None  # the probe's relation kind
        relations.append(relation)
    if querysets:  # Django hints the Prefetch queryset with the first parent
        querysets[0]._add_hints(instance=parents[0])
    return relations
