"""Filling the parents' caches with a level's related instances, as Django's
``prefetch_one_level`` does, and the walk through attributes that need no query.

Every write to an instance goes through the call's journal, so a failed call can put
back exactly its own writes (:mod:`..runtime.journal`).
"""

from __future__ import annotations

from typing import Any

from django.core import exceptions
from django.db.models import Model

from .. import _compat
from ..planning.errors import to_attr_conflict
from ..planning.plan import Level
from ..relations.base import RelationQuery, key_values
from ..runtime.journal import Journal
from .cached_querysets import queryset_maker


def link_back_keys(links: list[tuple[RelationQuery, list[Model]]]) -> list[Any] | None:
    """The reverse caches on the related objects (per query), as Django's builder sets
    them; their ``rel_obj_attr`` keys, which that reads (``None`` when the relation has
    no reverse cache to set).

    Key functions may read deferred fields (one query each, as in Django), so this may
    run on a worker thread; repeating it after a partial run is harmless.
    """
    if links[0][0].link_back is None:
        return None
    keys: list[Any] = []
    for part, objs in links:
        assert part.link_back is not None  # every chunk's comes from one builder
        keys += part.link_back(objs)
    return keys


def fill_caches(
    level: Level,
    instances: list[Model],
    relation: RelationQuery,
    related: list[Model],
    keys: list[Any] | None,
    journal: Journal,
) -> None:
    """Fill caches on ``instances`` as Django's ``prefetch_one_level`` does.

    ``keys`` are ``related``'s ``rel_obj_attr`` keys when ``link_back`` read them.
    """
    rel_obj_cache: dict[Any, list[Model]] = {}
    if keys is None:
        keys = key_values(relation.rel_obj_attr, related)
    for key, rel_obj in zip(keys, related, strict=True):
        rel_obj_cache.setdefault(key, []).append(rel_obj)
    lookup = level.lookup
    to_attr, as_attr = level.to_attr, level.as_attr
    leaf_queryset: Any = lookup.queryset if level.is_leaf else None
    instance_attr = relation.instance_attr
    if not (relation.single or as_attr or leaf_queryset is not None):
        # A to-many relation into the prefetch cache, the common case: its loop alone.
        # It writes no attribute a key reads, so the keys can be read first, at once.
        parent_keys = key_values(instance_attr, instances)
        values = [rel_obj_cache.get(parent_key, []) for parent_key in parent_keys]
        _fill_querysets(instances, to_attr, relation.cache_name, values, journal)
        return
    if relation.single and not (as_attr or relation.is_descriptor):
        # A to-one relation into the fields cache, as common; keys first for the same reason.
        parent_keys = key_values(instance_attr, instances)
        found = [rel_obj_cache.get(parent_key) for parent_key in parent_keys]
        caches: list[Any] = [obj._state.fields_cache for obj in instances]
        firsts = [vals[0] if vals else None for vals in found]
        journal.set_items(instances, caches, relation.cache_name, firsts)
        return
    for obj in instances:  # a key read, then the writes, per parent as in Django
        _write(
            level, relation, leaf_queryset, obj, rel_obj_cache.get(instance_attr(obj), []), journal
        )


def link_back_values(
    instances: list[Model], values: list[Any], link_back: str, journal: Journal
) -> None:
    """A memo level's reverse caches (a forward one-to-one): each parent cached on its
    related instance (``values``, or ``None``) under ``link_back``, as Django's builder
    does while evaluating its query."""
    for obj, value in zip(instances, values, strict=True):
        if value is not None:
            journal.set_item(value, value._state.fields_cache, link_back, obj)


def fill_values(
    level: Level,
    instances: list[Model],
    relation: RelationQuery,
    values: list[Any],
    journal: Journal,
) -> None:
    """Fill caches on ``instances`` as :func:`fill_caches` does, with each parent's
    value given: its related instance or ``None`` (a to-one ``relation``), or the list
    of its related instances (a to-many one). A memo level's values, shared instances.
    """
    leaf_queryset: Any = level.lookup.queryset if level.is_leaf else None
    if not (relation.single or level.as_attr or leaf_queryset is not None):
        _fill_querysets(instances, level.to_attr, relation.cache_name, values, journal)
        return
    if relation.single and not (level.as_attr or relation.is_descriptor):
        # A to-one relation into the fields cache, the common case: at once.
        caches: list[Any] = [obj._state.fields_cache for obj in instances]
        journal.set_items(instances, caches, relation.cache_name, values)
        return
    for obj, value in zip(instances, values, strict=True):
        vals = value if not relation.single else [] if value is None else [value]
        _write(level, relation, leaf_queryset, obj, vals, journal)


def _fill_querysets(
    instances: list[Model],
    to_attr: str,
    cache_name: str,
    values: list[list[Model]],
    journal: Journal,
) -> None:
    """Each parent's related manager queryset, its result cache ``values``, into the
    prefetch cache, as Django's ``prefetch_one_level`` leaves it."""
    made_querysets = queryset_maker(instances, to_attr, journal)(instances, values)
    caches = [obj._prefetched_objects_cache for obj in instances]  # type: ignore[attr-defined]
    journal.set_items(instances, caches, cache_name, made_querysets)


def _write(
    level: Level,
    relation: RelationQuery,
    leaf_queryset: Any,
    obj: Model,
    vals: list[Model],
    journal: Journal,
) -> None:
    """One parent's cache write, as in Django's ``prefetch_one_level``."""
    to_attr, cache_name = level.to_attr, relation.cache_name
    if relation.single:
        val = vals[0] if vals else None
        if level.as_attr:
            journal.set_attribute(obj, to_attr, val)
        elif relation.is_descriptor:
            journal.set_attribute(obj, cache_name, val)
        else:
            journal.set_item(obj, obj._state.fields_cache, cache_name, val)
    elif level.as_attr:
        journal.set_attribute(obj, to_attr, vals)
    else:  # a leaf Prefetch queryset, filtered per parent as Django does
        source = leaf_queryset._chain() if _compat.CHAIN_LEAF_QUERYSET else leaf_queryset
        qs: Any = getattr(obj, to_attr)._apply_rel_filters(source)
        qs._result_cache = vals
        qs._prefetch_done = True
        cache = obj._prefetched_objects_cache  # type: ignore[attr-defined]
        journal.set_item(obj, cache, cache_name, qs)


def accept_caches(obj_list: list[Any]) -> bool:
    """Give every object a prefetch cache, as Django's loop does before each step; False
    (the step and its lookup's rest are skipped, quietly, as in Django) as soon as one
    cannot have one (``None``, a dict or tuple of ``values()``, an ``int``)."""
    for obj in obj_list:
        if not hasattr(obj, "_prefetched_objects_cache"):
            try:
                obj._prefetched_objects_cache = {}
            except (AttributeError, TypeError):
                return False
    return True


def check_to_attr(model: type[Model], to_attr: str) -> None:
    """Django's error for a ``to_attr`` that names a field of ``model``."""
    try:
        model._meta.get_field(to_attr)
    except exceptions.FieldDoesNotExist:
        return
    raise to_attr_conflict(to_attr, model)


def traverse(obj_list: list[Any], through_attr: str) -> list[Any]:
    """Django's walk through an attribute that needs no query (lists flattened, None skipped)."""
    new_obj_list: list[Any] = []
    for obj in obj_list:
        if through_attr in getattr(obj, "_prefetched_objects_cache", ()):
            new_obj = list(obj._prefetched_objects_cache.get(through_attr))
        else:
            try:
                new_obj = getattr(obj, through_attr)
            except exceptions.ObjectDoesNotExist:
                continue
        if new_obj is None:
            continue
        if isinstance(new_obj, list):
            new_obj_list.extend(new_obj)
        else:
            new_obj_list.append(new_obj)
    return new_obj_list
