"""Django's per-level decision: fetch, serve from a memo, walk on, or stop.

For each level the scheduler starts, :func:`decide` does what one step of Django's
``prefetch_related_objects`` loop does before its query: ``get_prefetcher()`` on the first
object, ``is_fetched`` per object, Django's errors, and for the objects to fetch the
level's queries (one per chunk of parent keys), built by the relation kinds and compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db.models import Model
from django.db.models.fields.mixins import FieldCacheMixin
from django.db.models.fields.related_descriptors import ForwardManyToOneDescriptor
from django.db.models.query import get_prefetcher

from ..access.modes import PrefetchMode, default_mode, mode_of
from ..hydration.caches import accept_caches, check_to_attr, traverse
from ..planning.errors import cannot_find, not_prefetchable
from ..planning.plan import Level
from ..relations import RelationQuery
from ..relations.chunks import relation_queries
from ..sql.compiler import CompiledQuery
from .memo_level import MemoLevel, memo_level
from .session import Session
from .trace import StepTrace


@dataclass(eq=False)
class Part:
    """One query of a level: all of its parents, or one chunk of a long key list."""

    relation: RelationQuery
    compiled: CompiledQuery
    related: list[Model] | None = None  # its instances, once handed to the linking task
    step: StepTrace | None = None
    linked: bool = False  # its reverse caches written as its rows were built (RowLink)


@dataclass(eq=False)
class Fetch:
    """A level's queries in flight: the objects they fetch for and how to match results.

    No parts: the level is delegated to Django's own builder on a worker thread.
    """

    level: Level
    instances: list[Model]
    parts: list[Part]
    prefetcher: Any = None
    step: StepTrace | None = None  # delegated levels' trace step (parts have their own)


def decide(
    session: Session,
    level: Level,
    obj_list: list[Any],
    rejections: list[tuple[tuple[int, ...], str]],
) -> Fetch | MemoLevel | list[Any] | None:
    """One step of Django's ``prefetch_related_objects`` loop for ``level``, decided:
    fetch (a :class:`Fetch` to run, or a ``MemoLevel`` to serve from a memo), walk (the
    next objects) or stop (``None``). Raises Django's errors where Django raises them;
    an "already seen" rejection Django would reach later is appended to ``rejections``.
    It may read the database (a property, a deferred key): call it where that may block."""
    # A run's roots were given their caches when it started; the other levels' objects
    # were reached since.
    if not obj_list or (level.parent is not None and not accept_caches(obj_list)):
        return None
    first_obj = obj_list[0]
    prefetcher, descriptor, attr_found, is_fetched = get_prefetcher(
        first_obj, level.through_attr, level.to_attr
    )
    if not attr_found:
        raise cannot_find(
            level.through_attr, first_obj.__class__.__name__, level.lookup.prefetch_through
        )
    if level.terminal_for and prefetcher is None:
        raise not_prefetchable(level.terminal_for[0].prefetch_through)
    if prefetcher is not None:
        obj_to_fetch = _not_fetched(obj_list, is_fetched)
        if obj_to_fetch:
            if len(obj_to_fetch) < len(obj_list):  # the others' caches are relied on
                session.journal.rely_on(obj_list)
            if level.requeried_by is not None:
                # Django would fetch this path, then reject the later queryset
                # when it reaches that lookup: the first such lookup wins.
                rejections.append((level.requeried_by, level.key))
            if level.as_attr:
                # Django checks this after the query; the outcome is the same.
                check_to_attr(type(obj_to_fetch[0]), level.to_attr)
            if session.memos:
                served = memo_level(session.memos, level, descriptor, prefetcher, obj_to_fetch)
                if served is not None:
                    return served
            relations = relation_queries(
                descriptor,
                prefetcher,
                obj_to_fetch,
                level.querysets(),
                session.config.chunk_size,
                reuse_statement=True,
            )
            parent_mode = mode_of(obj_to_fetch[0]) or (
                session.root_mode if level.parent is None else None
            )
            if parent_mode is not None:
                pass_mode_on(parent_mode, level.to_attr, relations)
            parts = [Part(rel, rel.compile()) for rel in relations]
            return Fetch(level, obj_to_fetch, parts, prefetcher)
    # Already fetched (select_related, an earlier lookup) or not a relation at all
    # (a property): walk on through the attribute's values.
    session.journal.rely_on(obj_list)
    return traverse(obj_list, level.through_attr)


def pass_mode_on(parent_mode: PrefetchMode, name: str, relations: list[RelationQuery]) -> None:
    """Give the instances each relation query builds the mode of path ``name`` below
    ``parent_mode``, unless its queryset chose a mode of its own (a ``Prefetch``
    queryset's ``fetch_mode()``; Django 6.1 hands the parents' mode down otherwise)."""
    child = parent_mode.child(name)
    for relation in relations:
        queryset: Any = relation.queryset
        current = queryset.__dict__.get("_fetch_mode")
        if default_mode(current) or current is parent_mode:
            queryset._fetch_mode = child


def _not_fetched(obj_list: list[Any], is_fetched: Any) -> list[Any]:
    """The objects for which Django's ``is_fetched`` is false, in order. A forward
    relation's ``is_cached`` (not overridden) is read from each fields cache directly,
    without a Python call per object."""
    if getattr(is_fetched, "__func__", None) is ForwardManyToOneDescriptor.is_cached:
        field = is_fetched.__self__.field
        if type(field).is_cached is FieldCacheMixin.is_cached:
            name = field.cache_name
            return [obj for obj in obj_list if name not in obj._state.fields_cache]
    fetched: Callable[[Any], bool] = is_fetched
    return [obj for obj in obj_list if not fetched(obj)]
