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

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db.models import Model, Prefetch
from django.db.models.constants import LOOKUP_SEP
from django.db.models.query import normalize_prefetch_lookups
from django.db.models.query_utils import DeferredAttribute

from ..relations import is_relation, related_model_of
from .errors import already_seen, cannot_find, not_prefetchable

Order = tuple[int, ...]


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
    # The first later lookup that gave this path a queryset of its own, by order.
    requeried_by: Order | None = None

    @property
    def is_leaf(self) -> bool:
        """True when this is the last step of the lookup that owns it."""
        return self.depth == self.lookup.prefetch_through.count(LOOKUP_SEP)

    def querysets(self) -> list[Any] | None:
        """The queryset list Django passes to ``get_prefetch_querysets()`` for this step."""
        querysets = self.lookup.get_current_querysets(self.depth)
        return list(querysets) if querysets is not None else None


class Plan:
    """The graph of levels for one prefetch run; grows when auto lookups are found.

    The plan holds no run state: the scheduler passes what it needs of it (the levels
    already started, fetched or done) to :meth:`add_lookups` and :meth:`blockers`.
    """

    def __init__(self, first_instance: Any) -> None:
        self.first_instance = first_instance
        self.levels: dict[str, Level] = {}
        self.roots: list[Level] = []

    def add_lookups(
        self,
        lookups: Sequence[Prefetch[Any]],
        order: Order,
        parent: Level | None = None,
        *,
        started: Collection[Level] = (),
        fetched: Collection[Level] = (),
    ) -> list[Level]:
        """Add normalised lookups in Django's processing order; return the new levels.

        ``order`` positions the first lookup; lookup ``i`` gets ``order + (i,)``.
        ``parent`` is the level whose queryset brought them (auto lookups), ``started``
        and ``fetched`` the levels a run has started and fetched so far. Raises Django's
        exceptions for lookups that are invalid on the models.
        """
        created: list[Level] = []
        for index, lookup in enumerate(lookups):
            created.extend(self._add_lookup(lookup, (*order, index), parent, started, fetched))
        return created

    def _add_lookup(
        self,
        lookup: Prefetch[Any],
        order: Order,
        start: Level | None,
        started: Collection[Level],
        fetched: Collection[Level],
    ) -> list[Level]:
        seen = self.levels.get(lookup.prefetch_to)
        if seen is not None and not _owns(lookup, order, start, seen, started):
            if lookup.queryset is not None:
                # Django raises only if the path was actually fetched (its
                # ``done_queries``): an empty or already-cached level is no error.
                _requeried(seen, order)
                if seen in fetched:
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
            elif _owns(lookup, order, start, level, started):
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
            "opaque": parent_model is None or not is_relation(descriptor),
            "certain": (parent is None or parent.certain)
            and model is not None
            and not (as_attr_value and _has_field(parent_model, to_attr)),
        }

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

    def blockers(self, level: Level, done: Collection[Level]) -> list[Level]:
        """Levels not ``done`` that Django would run before ``level``, which it must wait for.

        A relation reads and fills only its own cache, so two relations conflict only
        on the same name. An opaque step (a property) may read any cache: it waits for
        every earlier level, and every later level waits for it.
        """
        return [
            other
            for other in self.levels.values()
            if other is not level
            and other not in done
            and other.order < level.order
            and (level.opaque or other.opaque or other.to_attr == level.to_attr)
        ]


def _owns(
    lookup: Prefetch[Any],
    order: Order,
    start: Level | None,
    level: Level,
    started: Collection[Level],
) -> bool:
    """True when an auto lookup (a queryset's own ``prefetch_related()``, found once
    ``start`` was fetched) reaches ``level`` before the lookup that planned it.

    Django pushes a queryset's own lookups on top of its stack of lookups: they run
    right after the current one, before the remaining explicit ones, and so own the
    levels they share with those (their attributes and querysets apply there).
    """
    return (
        start is not None
        and level.depth > start.depth
        and level not in started
        and order < level.order[0]
    )


def _requeried(level: Level, order: Order) -> None:
    """Record that the lookup at ``order`` gives ``level``'s path a queryset of its own."""
    if level.requeried_by is None or order < level.requeried_by:
        level.requeried_by = order


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
