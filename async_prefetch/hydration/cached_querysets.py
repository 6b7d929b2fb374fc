"""The querysets a to-many prefetch leaves in ``_prefetched_objects_cache``, built in bulk.

For every parent, Django's ``prefetch_one_level`` calls ``getattr(parent, name)`` (a
related manager) and its ``get_queryset()``: a fresh queryset whose relation filter is
deferred until someone reads its query. With many parents that is most of the CPU a
prefetch costs (a manager, a router call and a connection look-up per parent).

:func:`queryset_maker` builds the first parent's queryset exactly that way as a
template, then makes every parent's from it, substituting the parent where it appears:
the routing hint, the deferred filter, the known related object and (Django 6.1) the
fetch mode, with an unfiltered query that is built only when first used
(:mod:`.unfiltered_query`). The substitution is checked once per level
against a second parent's queryset built by Django; if anything differs (a custom
manager, another Django version), every parent goes through Django's own path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.models import Model, QuerySet

from .. import _compat
from ..relations import kind_of
from .unfiltered_query import UnfilteredQuery

QuerysetMaker = Callable[[Model], QuerySet[Any]]


def queryset_maker(parents: list[Model], name: str) -> QuerysetMaker:
    """A function returning ``getattr(parent, name).get_queryset()`` for ``parents``
    whose prefetch cache for ``name`` is not filled yet; fast when that is exact."""

    def django_queryset(parent: Model) -> QuerySet[Any]:
        return _compat.related_manager_queryset(getattr(parent, name))

    if len(parents) < 2:
        return django_queryset
    first, second = parents[0], parents[1]
    parent_class = type(first)
    descriptor = getattr(parent_class, name, None)
    kind = kind_of(descriptor)
    if type(second) is not parent_class or kind is None or kind.derive_cached_querysets is None:
        return django_queryset
    manager = getattr(first, name)
    template = _compat.related_manager_queryset(manager)
    derive = kind.derive_cached_querysets(descriptor, manager, template)
    if derive is None:
        return django_queryset
    derived = derive(second)
    if derived is None or not _equivalent(derived, django_queryset(second)):
        return django_queryset

    def make(parent: Model) -> QuerySet[Any]:
        queryset = derive(parent) if type(parent) is parent_class else None
        return django_queryset(parent) if queryset is None else queryset

    return make


def _equivalent(derived: QuerySet[Any], made: QuerySet[Any]) -> bool:
    """True when ``derived`` holds what Django's ``made`` holds (queries compared by state)."""
    if type(derived) is not type(made):
        return False
    ours, theirs = derived.__dict__, made.__dict__
    if ours.keys() != theirs.keys():
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
