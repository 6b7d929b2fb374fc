"""The planner: prefetch lookups become a graph of levels keyed by prefetch path.

Each level is one step of one lookup (``authors`` then ``authors__location``), shared
by every lookup that walks the same path, exactly as Django's ``done_queries`` shares
them. A level depends on its parent level only: siblings run at the same time and a
child starts as soon as its own parent is hydrated. Levels that read or write the same
attribute name are additionally ordered as Django's serial loop orders them, so a
lookup sees the caches an earlier lookup filled (for example ``authors`` and
``pages__book__authors``).

Bad lookups raise Django's exceptions with Django's messages. Errors in a lookup's
first step are found while the plan is built, and raised before any query unless a
lookup Django runs before it could fail first in the data (then those run first, as
in Django, and the first error in Django's order wins).
Errors that depend on the data are raised when the step runs, as in Django: Django
never checks a step that has no objects (``publisher__bogus`` on books without
publishers is no error there), and a ``Prefetch`` queryset for a path planned earlier
is an error only once that path has actually been fetched.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from django.core.exceptions import FieldDoesNotExist
from django.db.models import Model, Prefetch
from django.db.models.constants import LOOKUP_SEP
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ManyToManyDescriptor,
    ReverseManyToOneDescriptor,
    ReverseOneToOneDescriptor,
)
from django.db.models.query import normalize_prefetch_lookups
from django.db.models.query_utils import DeferredAttribute

Order = tuple[int, ...]


def cannot_find(attr: str, model_name: str, prefetch_through: str) -> AttributeError:
    """Django's error for a lookup step that names no attribute."""
    return AttributeError(
        f"Cannot find '{attr}' on {model_name} object, '{prefetch_through}' is an invalid "
        "parameter to prefetch_related()"
    )


def not_prefetchable(prefetch_through: str) -> ValueError:
    """Django's error for a lookup whose last step is not a relation."""
    return ValueError(
        f"'{prefetch_through}' does not resolve to an item that supports prefetching - this "
        "is an invalid parameter to prefetch_related()."
    )


def already_seen(prefetch_to: str) -> ValueError:
    """Django's error for a ``Prefetch`` queryset given for a path already prefetched."""
    return ValueError(
        f"'{prefetch_to}' lookup was already seen with a different queryset. You may need "
        "to adjust the ordering of your lookups."
    )


def to_attr_conflict(to_attr: str, model: type[Model]) -> ValueError:
    """Django's error for a ``to_attr`` that names a model field."""
    return ValueError(f"to_attr={to_attr} conflicts with a field on the {model.__name__} model.")


@dataclass(eq=False)
class Level:
    """One step of the graph: fetch (or walk) ``through_attr`` on the parent's objects."""

    key: str  # the prefetch path up to and including this step (Django's prefetch_to)
    through_attr: str
    to_attr: str
    as_attr: bool
    depth: int
    lookup: Prefetch[Any]  # the first lookup to reach this step: its querysets apply
    order: tuple[Order, int]  # position in Django's serial processing order
    parent: Level | None
    model: type[Model] | None = None  # what this step yields, when statically known
    certain: bool = False  # can raise no error: relations all the way, known models
    # Not a relation of a known model (a property, cached_property, attribute): running
    # it may read any cache, so it keeps its place in Django's order both ways.
    opaque: bool = True
    terminal_for: list[Prefetch[Any]] = field(default_factory=list)
    children: list[Level] = field(default_factory=list)
    started: bool = False
    done: bool = False
    fetched: bool = False  # ran a query (Django records it in ``done_queries``)
    # The first later lookup that gave this path a queryset of its own, by order.
    requeried_by: Order | None = None
    result: list[Any] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        """True when this is the last step of the lookup that owns it."""
        return self.depth == self.lookup.prefetch_through.count(LOOKUP_SEP)

    def querysets(self) -> list[Any] | None:
        """The queryset list Django passes to ``get_prefetch_querysets()`` for this step."""
        querysets = self.lookup.get_current_querysets(self.depth)
        return list(querysets) if querysets is not None else None


class Plan:
    """The graph of levels for one prefetch run; grows when auto lookups are found."""

    def __init__(self, first_instance: Any) -> None:
        self.first_instance = first_instance
        self.levels: dict[str, Level] = {}
        self.roots: list[Level] = []

    def add_lookups(
        self, lookups: Sequence[Prefetch[Any]], order: Order, parent: Level | None = None
    ) -> list[Level]:
        """Add normalised lookups in Django's processing order; return the new levels.

        ``order`` positions the first lookup; lookup ``i`` gets ``order + (i,)``.
        Raises Django's exceptions for lookups that are invalid on the models.
        """
        created: list[Level] = []
        for index, lookup in enumerate(lookups):
            created.extend(self._add_lookup(lookup, (*order, index), parent))
        return created

    def _add_lookup(self, lookup: Prefetch[Any], order: Order, start: Level | None) -> list[Level]:
        seen = self.levels.get(lookup.prefetch_to)
        if seen is not None and not self._owns(lookup, order, start, seen):
            if lookup.queryset is not None:
                # Django raises only if the path was actually fetched (its
                # ``done_queries``): an empty or already-cached level is no error.
                _requeried(seen, order)
                if seen.fetched:
                    raise already_seen(lookup.prefetch_to)
            return []
        through_attrs = lookup.prefetch_through.split(LOOKUP_SEP)
        created: list[Level] = []
        parent: Level | None = None
        for depth, through_attr in enumerate(through_attrs):
            key = lookup.get_current_prefetch_to(depth)
            level = self.levels.get(key)
            if level is None:
                if start is not None and depth <= start.depth:
                    raise AssertionError(f"auto lookup {key!r} does not extend {start.key!r}")
                if parent is None:
                    self._check_first_step(lookup, through_attr)
                level = Level(
                    key=key,
                    parent=parent,
                    **self._step(lookup, order, depth, through_attr, parent),
                )
                self.levels[key] = level
                if parent is None:
                    self.roots.append(level)
                else:
                    parent.children.append(level)
                created.append(level)
            elif self._owns(lookup, order, start, level):
                self._take_over(level, lookup, order, depth, through_attr)
            parent = level
        assert parent is not None
        parent.terminal_for.append(lookup)
        return created

    def _step(
        self,
        lookup: Prefetch[Any],
        order: Order,
        depth: int,
        through_attr: str,
        parent: Level | None,
    ) -> dict[str, Any]:
        """What a level is when ``lookup`` is the first to reach it at ``depth``."""
        to_attr, as_attr_value = lookup.get_current_to_attr(depth)
        parent_model = type(self.first_instance) if parent is None else parent.model
        descriptor = getattr(parent_model, through_attr, None)
        model = related_model_of(descriptor)
        return {
            "through_attr": through_attr,
            "to_attr": to_attr,
            "as_attr": bool(as_attr_value),
            "depth": depth,
            "lookup": lookup,
            "order": (order, depth),
            "model": model,
            "opaque": parent_model is None or not _is_relation(descriptor),
            "certain": (parent is None or parent.certain)
            and model is not None
            and not (as_attr_value and _has_field(parent_model, to_attr)),
        }

    @staticmethod
    def _owns(lookup: Prefetch[Any], order: Order, start: Level | None, level: Level) -> bool:
        """True when an auto lookup (a queryset's own ``prefetch_related()``, found once
        ``start`` was fetched) reaches ``level`` before the lookup that planned it.

        Django pushes a queryset's own lookups on top of its stack of lookups: they run
        right after the current one, before the remaining explicit ones, and so own the
        levels they share with those (their attributes and querysets apply there).
        """
        return (
            start is not None
            and level.depth > start.depth
            and not level.started
            and order < level.order[0]
        )

    def _take_over(
        self, level: Level, lookup: Prefetch[Any], order: Order, depth: int, through_attr: str
    ) -> None:
        """Make ``lookup`` the owner of ``level``, which a later lookup planned."""
        displaced = level.lookup
        if displaced.prefetch_to == level.key and displaced.queryset is not None:
            # Django reaches the displaced lookup's own queryset after this path was done.
            _requeried(level, level.order[0])
        if displaced in level.terminal_for:  # Django skips a lookup whose path is done
            level.terminal_for.remove(displaced)
        for name, value in self._step(lookup, order, depth, through_attr, level.parent).items():
            setattr(level, name, value)

    def _check_first_step(self, lookup: Prefetch[Any], through_attr: str) -> None:
        """Raise Django's error for a first step that is invalid on the first instance.

        Django always reaches the first step (the instances are not empty), so these
        errors are certain before any query. Deeper steps depend on the data (an empty
        level is never checked), so they are checked when they run, as Django does.
        """
        first = self.first_instance
        descriptor = getattr(type(first), through_attr, None)
        if descriptor is None and not hasattr(first, through_attr):
            raise cannot_find(through_attr, type(first).__name__, lookup.prefetch_through)
        if LOOKUP_SEP not in lookup.prefetch_through and isinstance(descriptor, DeferredAttribute):
            raise not_prefetchable(lookup.prefetch_through)

    def may_raise(self) -> bool:
        """True when running the planned lookups could raise one of Django's errors."""
        return any(
            not level.certain or level.requeried_by is not None for level in self.levels.values()
        )

    def blockers(self, level: Level) -> list[Level]:
        """Unfinished levels Django would run before ``level`` that it must wait for.

        A relation reads and fills only its own cache, so two relations conflict only
        on the same name. An opaque step (a property) may read any cache: it waits for
        every earlier level, and every later level waits for it.
        """
        return [
            other
            for other in self.levels.values()
            if other is not level
            and not other.done
            and other.order < level.order
            and (level.opaque or other.opaque or other.to_attr == level.to_attr)
        ]


def _requeried(level: Level, order: Order) -> None:
    """Record that the lookup at ``order`` gives ``level``'s path a queryset of its own."""
    if level.requeried_by is None or order < level.requeried_by:
        level.requeried_by = order


_RELATION_DESCRIPTORS = (
    ForwardManyToOneDescriptor,
    ReverseOneToOneDescriptor,
    ReverseManyToOneDescriptor,
)


def _generic(name: str) -> type[Any] | None:
    """A class of ``django.contrib.contenttypes.fields``, if that module was imported.

    It is never imported here: its import needs the contenttypes app, and a project
    without it has no generic relation whose descriptor could be an instance of it.
    """
    return getattr(sys.modules.get("django.contrib.contenttypes.fields"), name, None)


def _is_relation(descriptor: Any) -> bool:
    if isinstance(descriptor, _RELATION_DESCRIPTORS):
        return True
    generic_foreign_key = _generic("GenericForeignKey")
    return generic_foreign_key is not None and isinstance(descriptor, generic_foreign_key)


def related_model_of(descriptor: Any) -> type[Model] | None:
    """The model a relation descriptor leads to; ``None`` for anything else (or generic)."""
    target: Any = None
    # ManyToManyDescriptor (and the generic one) subclass ReverseManyToOneDescriptor.
    if isinstance(descriptor, ManyToManyDescriptor):
        rel: Any = descriptor.rel
        target = rel.related_model if descriptor.reverse else rel.model
    elif (generic := _generic("ReverseGenericManyToOneDescriptor")) and isinstance(
        descriptor, generic
    ):
        target = descriptor.field.related_model
    elif isinstance(descriptor, ReverseManyToOneDescriptor):
        target = descriptor.rel.related_model
    elif isinstance(descriptor, ForwardManyToOneDescriptor):
        target = descriptor.field.remote_field.model
    elif isinstance(descriptor, ReverseOneToOneDescriptor):
        target = descriptor.related.related_model
    return cast("type[Model] | None", target)


def _has_field(model: type[Model] | None, name: str) -> bool:
    try:
        return model is not None and bool(model._meta.get_field(name))
    except FieldDoesNotExist:
        return False


def normalize(lookups: Iterable[Any], prefix: str | None = None) -> list[Prefetch[Any]]:
    """Lookups as ``Prefetch`` objects in processing order (Django's normalisation)."""
    normalized: list[Prefetch[Any]] = normalize_prefetch_lookups(
        list(reversed(list(lookups))), prefix
    )
    return list(reversed(normalized))
