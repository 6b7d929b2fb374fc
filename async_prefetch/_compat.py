"""Differences between the supported Django lines (5.2 LTS and 6.x), in one place."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import django
from django.db.models import Model, QuerySet
from django.db.models import query as django_query

#: Django 6.1 added fetch modes (``QuerySet.fetch_mode()``, ``_state.peers``).
HAS_FETCH_MODES: bool = hasattr(QuerySet, "fetch_mode")

#: Django 6.1 filters related managers' querysets in place (``_avoid_cloning()``).
RELATED_FILTERS_IN_PLACE: bool = hasattr(QuerySet, "_avoid_cloning")

#: Django 6.1 passes ``lookup.queryset._chain()`` to ``_apply_rel_filters`` at the leaf.
CHAIN_LEAF_QUERYSET: bool = django.VERSION >= (6, 1)

_POPULATORS_TAKE_FETCH_MODE = (
    "fetch_mode" in inspect.signature(django_query.get_related_populators).parameters
)


def queryset_fetch_mode(queryset: QuerySet[Any]) -> Any:
    """The queryset's fetch mode on 6.1+, ``None`` before."""
    return getattr(queryset, "_fetch_mode", None)


def from_db_for(model: type[Model], fetch_mode: Any) -> Callable[..., Model]:
    """``model.from_db`` with the fetch mode bound, as ``ModelIterable`` calls it."""
    if HAS_FETCH_MODES:
        get_from_db: Callable[..., Callable[..., Model]] = django_query._get_from_db  # type: ignore[attr-defined]
        return get_from_db(model, fetch_mode)
    return model.from_db


def related_populators(klass_info: Any, select: Any, db: str, fetch_mode: Any) -> list[Any]:
    """``get_related_populators`` for select_related, on either signature."""
    get_populators: Callable[..., list[Any]] = django_query.get_related_populators
    if _POPULATORS_TAKE_FETCH_MODE:
        return get_populators(klass_info, select, db, fetch_mode)
    return get_populators(klass_info, select, db)


def tracks_peers(fetch_mode: Any) -> bool:
    """True when instances of one result must know their peers (FETCH_PEERS)."""
    return bool(getattr(fetch_mode, "track_peers", False))


def related_manager_queryset(manager: Any) -> QuerySet[Any]:
    """``manager.get_queryset()`` for a related manager whose instance is not prefetched yet.

    Django 6.1 applies the relation's filters to a fresh queryset in place; before 6.1
    each filter cloned the query (the bulk of prefetch time for many small relations).
    Here the fresh queryset is filtered in place on every version, with ``_chain()``
    behaving as 6.1's does while cloning is disabled: the filter stays deferred, as
    Django defers it, until someone uses the queryset's query.
    """
    if RELATED_FILTERS_IN_PLACE:
        return manager.get_queryset()  # type: ignore[no-any-return]
    queryset: Any = super(type(manager), manager).get_queryset()

    def chain_in_place() -> Any:
        if queryset._sticky_filter:
            queryset.query.filter_is_sticky = True
            queryset._sticky_filter = False
        return queryset

    queryset._chain = chain_in_place
    try:
        filtered: QuerySet[Any] = manager._apply_rel_filters(queryset)
    finally:
        del queryset._chain
    return filtered
