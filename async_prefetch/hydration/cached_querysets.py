"""The querysets a to-many prefetch leaves in ``_prefetched_objects_cache``, built in bulk.

For every parent, Django's ``prefetch_one_level`` calls ``getattr(parent, name)`` (a
related manager) and its ``get_queryset()``: a fresh queryset whose relation filter is
deferred until someone reads its query. With many parents that is most of the CPU a
prefetch costs (a manager, a router call and a connection look-up per parent).

:func:`queryset_maker` builds the first parent's queryset exactly that way as a
template, then makes every parent's from it, substituting the parent where it appears:
the routing hint, the deferred filter, the known related object and (Django 6.1) the
fetch mode, with an unfiltered query that is built only when first used
(:mod:`.unfiltered_query`). The substitution is checked against a second parent's
queryset built by Django: for a plain default manager's related manager once per
template shape and manager class in a process, for any other manager on every call. If
anything differs (a custom manager, another Django version), every parent goes through
Django's own path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db.models import Model, QuerySet

from .. import _compat
from ..relations import kind_of
from ..relations.parents import plain_manager_class
from .queryset_template import QuerysetsFactory
from .unfiltered_query import UnfilteredQuery

if TYPE_CHECKING:
    from ..runtime.journal import Journal

QuerysetsMaker = Callable[[list[Model], list[Any]], list[QuerySet[Any]]]


def queryset_maker(parents: list[Model], name: str, journal: Journal) -> QuerysetsMaker:
    """A function returning, for ``parents`` (whose prefetch cache for ``name`` is not
    filled yet) and their result caches, what ``getattr(parent, name).get_queryset()``
    returns with that result cache set and its prefetching done: fast when that is
    exact. The parents are taken in order, as Django does (a deferred key loads then).
    A queryset that is not the call's own (Django 6.1: a multi-table ancestor's
    prefetched one) is changed through ``journal``."""

    def django_queryset(parent: Model, result: Any) -> QuerySet[Any]:
        manager = getattr(parent, name)
        inherited = _compat.ancestor_prefetched(manager)
        if inherited is not None:  # changed as Django changes it, undone on failure
            journal.set_attribute(inherited, "_result_cache", result)
            journal.set_attribute(inherited, "_prefetch_done", True)
            return inherited
        queryset: Any = _compat.related_manager_queryset(manager)
        queryset._result_cache = result
        queryset._prefetch_done = True
        return queryset  # type: ignore[no-any-return]

    def django_querysets(parents: list[Model], results: list[Any]) -> list[QuerySet[Any]]:
        return list(map(django_queryset, parents, results))

    if len(parents) < 2:
        return django_querysets
    first, second = parents[0], parents[1]
    parent_class = type(first)
    descriptor = getattr(parent_class, name, None)
    kind = kind_of(descriptor)
    if type(second) is not parent_class or kind is None or kind.derive_cached_querysets is None:
        return django_querysets
    manager = getattr(first, name)
    if _compat.inherits_prefetch_caches(manager):
        return django_querysets  # a parent's queryset may be an ancestor's (Django 6.1)
    template = _compat.related_manager_queryset(manager)
    new_querysets = kind.derive_cached_querysets(descriptor, manager, template, parent_class)
    if new_querysets is None:
        return django_querysets
    if not _derivation_holds(new_querysets, type(manager), second, django_queryset):
        return django_querysets

    def make(parents: list[Model], results: list[Any]) -> list[QuerySet[Any]]:
        return new_querysets(parents, results, django_queryset)

    return make


#: What the check found for each generated function (a template's shape, see
#: :func:`~.queryset_template.queryset_factory`) and related manager class, for the
#: related managers of plain default managers only.
_checked: weakref.WeakKeyDictionary[QuerysetsFactory, dict[type, bool]] = (
    weakref.WeakKeyDictionary()
)


def _derivation_holds(
    new_querysets: QuerysetsFactory,
    manager_class: type,
    parent: Model,
    django_queryset: Callable[[Model, Any], QuerySet[Any]],
) -> bool:
    """Whether ``new_querysets`` makes for ``parent`` what Django's manager makes; when it
    does not, or ``parent``'s key is ``None``, every parent takes Django's path.

    For the related manager of a plain default manager (its ``get_queryset()`` and
    queryset class Django's: :func:`~..relations.parents.plain_manager_class`), whose
    queryset takes nothing from the parent but what ``new_querysets`` substitutes, the
    answer holds for every parent and is kept for the function (made once per template
    shape) and that manager class. Any other manager may take more from the parent (a
    routing hint, a database): it is checked on every call.
    """
    plain = plain_manager_class(manager_class)
    known = _checked.get(new_querysets) if plain else None
    if known is not None and manager_class in known:
        return known[manager_class]
    probe: list[Any] = []
    derived = new_querysets([parent], [probe], _no_queryset)[0]
    if derived is None:
        return False
    holds = _equivalent(derived, django_queryset(parent, probe))
    if plain:
        _checked.setdefault(new_querysets, {})[manager_class] = holds
    return holds


def forget_checks() -> None:
    """Forget every check :func:`_derivation_holds` made (tests that change what it
    compares)."""
    _checked.clear()


def _no_queryset(parent: Model, result: Any) -> None:
    return None


def _equivalent(derived: QuerySet[Any], made: QuerySet[Any]) -> bool:
    """True when ``derived`` holds what Django's ``made`` holds (queries compared by state)."""
    if type(derived) is not type(made):
        return False
    ours, theirs = derived.__dict__, made.__dict__
    if list(ours) != list(theirs):
        return False
    for key, value in ours.items():
        other = theirs[key]
        if key == "_query":
            if isinstance(value, UnfilteredQuery):
                value = value.materialise()
            if type(value) is not type(other) or vars(value) != vars(other):
                return False
        elif value != other:
            return False
    return True
