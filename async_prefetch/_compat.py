"""Differences between the supported Django lines (5.2 LTS and 6.x), in one place."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any

import django
from django.db.models import Model, QuerySet
from django.db.models import query as django_query
from django.db.models.fields import related_descriptors
from django.db.models.sql.compiler import SQLCompiler

#: Django 6.1 added fetch modes (``QuerySet.fetch_mode()``, ``_state.peers``).
HAS_FETCH_MODES: bool = hasattr(QuerySet, "fetch_mode")

#: Django 6.1 filters related managers' querysets in place (``_avoid_cloning()``).
RELATED_FILTERS_IN_PLACE: bool = hasattr(QuerySet, "_avoid_cloning")

#: Django 6.1 passes ``lookup.queryset._chain()`` to ``_apply_rel_filters`` at the leaf.
CHAIN_LEAF_QUERYSET: bool = django.VERSION >= (6, 1)

#: Django 6.1's many-to-many managers read a prefetched result from the instance's
#: multi-table ancestors too (``get_prefetch_cache()`` walks the cached parent links).
ANCESTOR_PREFETCH_CACHES: bool = hasattr(related_descriptors, "_traverse_ancestors")

_POPULATORS_TAKE_FETCH_MODE = (
    "fetch_mode" in inspect.signature(django_query.get_related_populators).parameters
)


def filter_prefetch_queryset(queryset: Any, field_name: str, instances: list[Model]) -> Any:
    """Django's own filter of a reverse relation's prefetch queryset by its parents
    (a sliced queryset becomes a ``ROW_NUMBER()`` window); private, the same in every
    supported line."""
    return related_descriptors._filter_prefetch_queryset(queryset, field_name, instances)  # type: ignore[attr-defined]


def queryset_fetch_mode(queryset: QuerySet[Any]) -> Any:
    """The queryset's fetch mode on 6.1+, ``None`` before."""
    return getattr(queryset, "_fetch_mode", None)


def from_db_for(model: type[Model], fetch_mode: Any) -> Callable[..., Model]:
    """``model.from_db`` with the fetch mode bound, as ``ModelIterable`` calls it."""
    if HAS_FETCH_MODES:
        get_from_db: Callable[..., Callable[..., Model]] = django_query._get_from_db  # type: ignore[attr-defined]
        return get_from_db(model, fetch_mode)
    if fetch_mode is None:
        return model.from_db
    from_db = model.from_db

    def from_db_with_mode(db: str, field_names: list[str], values: Any) -> Model:
        obj = from_db(db, field_names, values)
        obj._state.fetch_mode = fetch_mode  # 5.2: async_prefetch's
        return obj

    return from_db_with_mode


def rows_converter(compiler: Any) -> Callable[[Iterable[Any]], Iterable[Any]]:
    """A function of one batch of raw rows equal to
    ``compiler.results_iter(results=(batch,))``, which looks the converters up again on
    every call: here once, when ``results_iter`` is Django's own (the same in every
    supported line); else that method, per batch."""
    if type(compiler).results_iter is not SQLCompiler.results_iter:
        return lambda batch: compiler.results_iter(results=(batch,))
    fields = [s[0] for s in compiler.select[0 : compiler.col_count]]
    converters = compiler.get_converters(fields)
    composite = compiler.has_composite_fields(fields)
    if not converters and not composite:
        return _same_rows

    def convert(batch: Iterable[Any]) -> Iterable[Any]:
        rows = batch
        if converters:
            rows = compiler.apply_converters(rows, converters)
        if composite:
            rows = compiler.composite_fields_to_tuples(rows, fields)
        return rows

    return convert


def _same_rows(batch: Iterable[Any]) -> Iterable[Any]:
    return batch


def related_populators(klass_info: Any, select: Any, db: str, fetch_mode: Any) -> list[Any]:
    """``get_related_populators`` for select_related, on either signature."""
    get_populators: Callable[..., list[Any]] = django_query.get_related_populators
    if _POPULATORS_TAKE_FETCH_MODE:
        return get_populators(klass_info, select, db, fetch_mode)
    return get_populators(klass_info, select, db)


def tracks_peers(fetch_mode: Any) -> bool:
    """True when instances of one result must know their peers (FETCH_PEERS)."""
    return bool(getattr(fetch_mode, "track_peers", False))


#: Django's related manager factories, by module: each makes a class
#: ``<name>(superclass, AltersData)`` whose methods are compiled once, in the factory.
_RELATED_MANAGER_FACTORIES: dict[str, tuple[tuple[str, str], ...]] = {
    "django.db.models.fields.related_descriptors": (
        ("create_reverse_many_to_one_manager", "RelatedManager"),
        ("create_forward_many_to_many_manager", "ManyRelatedManager"),
    ),
    "django.contrib.contenttypes.fields": (
        ("create_generic_related_manager", "GenericRelatedObjectManager"),
    ),
}


def _nested_code(code: CodeType, name: str) -> CodeType | None:
    """The only code object named ``name`` defined directly in ``code``, if exactly one."""
    found = [c for c in code.co_consts if isinstance(c, CodeType) and c.co_name == name]
    return found[0] if len(found) == 1 else None


@functools.cache
def _factory_methods(module_name: str) -> frozenset[tuple[CodeType, CodeType]]:
    """``(get_queryset, _apply_rel_filters)`` code pairs of the classes the related
    manager factories of ``module_name`` make; empty for any other module.

    Only called with the module of an existing class, so the module is loaded: this
    never imports ``django.contrib.contenttypes`` (whose models need the app).
    """
    module = sys.modules.get(module_name)
    pairs = set()
    for factory_name, class_name in _RELATED_MANAGER_FACTORIES.get(module_name, ()):
        factory = getattr(module, factory_name, None)
        body = _nested_code(factory.__code__, class_name) if inspect.isfunction(factory) else None
        if body is None:
            continue
        get_queryset = _nested_code(body, "get_queryset")
        apply_rel_filters = _nested_code(body, "_apply_rel_filters")
        if get_queryset is not None and apply_rel_filters is not None:
            pairs.add((get_queryset, apply_rel_filters))
    return frozenset(pairs)


def is_djangos_related_manager(manager: object) -> bool:
    """True when ``manager``'s class is one Django's related manager factories made
    (reverse foreign key, many-to-many, generic relation), not a subclass or a
    third-party manager: its ``get_queryset()`` is the default manager's queryset
    (``super(type(manager), manager).get_queryset()``) passed to its own
    ``_apply_rel_filters()``.
    """
    cls = type(manager)
    namespace = vars(cls)
    try:
        code = (namespace["get_queryset"].__code__, namespace["_apply_rel_filters"].__code__)
    except (KeyError, AttributeError):
        return False
    return code in _factory_methods(cls.__module__)


def related_manager_queryset(manager: Any) -> QuerySet[Any]:
    """A fresh ``manager.get_queryset()`` for a related manager: never a queryset a
    prefetch cache may already hold (another call may have filled it since this one
    decided to fetch; that queryset is not this call's to reuse; a multi-table
    ancestor's, :func:`ancestor_prefetched`, is the caller's to ask for).

    Django 6.1 applies the relation's filters to a fresh queryset in place; before 6.1
    each filter cloned the query (the bulk of prefetch time for many small relations).
    Here the fresh queryset of one of Django's own related managers is filtered in
    place on every version, with ``_chain()`` behaving as 6.1's does while cloning is
    disabled: the filter stays deferred, as Django defers it, until someone uses the
    queryset's query. Any other manager (a subclass, django-taggit's, modelcluster's)
    builds its queryset itself: ``manager.get_queryset()``.
    """
    if not is_djangos_related_manager(manager):
        return manager.get_queryset()  # type: ignore[no-any-return]
    queryset: Any = super(type(manager), manager).get_queryset()
    if RELATED_FILTERS_IN_PLACE:  # what get_queryset() does without a prefetched result
        return manager._apply_rel_filters(queryset)  # type: ignore[no-any-return]

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


def inherits_prefetch_caches(manager: Any) -> bool:
    """Whether ``manager`` (Django 6.1's many-to-many, of a multi-table child) may
    return a prefetched queryset of its instance's ancestors."""
    return (
        ANCESTOR_PREFETCH_CACHES
        and is_djangos_related_manager(manager)
        and hasattr(manager, "get_prefetch_cache")
        and bool(manager.instance._meta.parents)
    )


def ancestor_prefetched(manager: Any) -> QuerySet[Any] | None:
    """The prefetched queryset Django 6.1's many-to-many ``manager.get_queryset()``
    returns from a multi-table ancestor of its instance (``get_prefetch_cache()`` walks
    the cached parent links), when the instance's own cache has none; ``None`` when
    :func:`inherits_prefetch_caches` is false or no ancestor holds one."""
    if not inherits_prefetch_caches(manager):
        return None
    own = getattr(manager.instance, "_prefetched_objects_cache", None)
    if own is not None and prefetch_cache_name(manager) in own:
        return None
    return manager.get_prefetch_cache()  # type: ignore[no-any-return]


def prefetch_cache_name(manager: Any) -> str:
    """The key of ``_prefetched_objects_cache`` that Django's related ``manager`` (reverse
    foreign key, many-to-many, generic relation) reads its prefetched result from."""
    name = getattr(manager, "prefetch_cache_name", None)  # many-to-many, generic relations
    if name is not None:
        return str(name)
    return str(manager.field.remote_field.cache_name)  # reverse foreign key
