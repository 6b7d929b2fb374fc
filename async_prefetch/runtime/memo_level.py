"""Levels served from a memo (:class:`.memo.Memo`).

A run consults the memo of a level's target
model when the level is a forward foreign key or forward one-to-one to that model's
primary key, or a many-to-many relation to it, and has no ``Prefetch`` queryset of its
own: keys the memo holds are not fetched again, the missing ones are fetched by primary
key (levels of one scheduling round that target the same memo share one query), and the
parents' caches are filled with the memo's instances. Reverse relations are not served:
their rows cannot be found by the target's key.

This module holds the synchronous half of a memo level: planning it
(:func:`memo_level`), the queries it needs (:func:`batch_query`) and the values it gives
each parent (:meth:`MemoLevel.values`). The scheduler runs the queries and fills the
caches (through the journal).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connections
from django.db.backends.base.operations import BaseDatabaseOperations
from django.db.models import Field, ForeignKey, IntegerField, Model
from django.db.models.expressions import RawSQL
from django.db.models.fields import AutoFieldMixin
from django.db.models.fields.mixins import FieldCacheMixin
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ForwardOneToOneDescriptor,
    ManyToManyDescriptor,
)

from ..planning.plan import Level
from ..relations import RelationQuery, build_relation_query, kind_of
from ..relations.base import field_values, take_additional_lookups
from ..sql.any_of import any_instead_of_in
from ..sql.compiler import CompiledQuery, compile_queryset
from .memo import Memo
from .trace import StepTrace

__all__ = ["MemoBatch", "MemoLevel", "batch_query", "memo_level"]

# Integer fields' get_db_prep_value: Field's, or AutoField's.
_INTEGER_DB_PREP = (Field.get_db_prep_value, AutoFieldMixin.get_db_prep_value)


@dataclass(eq=False)
class MemoBatch:
    """One query for instances of one memo: the missing keys of the levels waiting for
    it, or the whole table (``keys is None``)."""

    memo: Memo
    alias: str
    keys: list[Hashable] | None
    #: The memo queryset's own ``prefetch_related()`` lookups, run on what it fetches.
    additional_lookups: list[Any] = field(default_factory=list)
    waiters: list[MemoLevel] = field(default_factory=list)
    step: StepTrace | None = None


@dataclass(eq=False)
class MemoLevel:
    """A level served from a memo: its parents, what each needs, what has been found.

    ``needed`` is, per parent, the target's key (forward; ``None`` for none) or, for a
    many-to-many level, the parent's match key, whose target keys ``targets`` holds once
    the join rows are in (``pairs`` is their query).
    """

    level: Level
    memo: Memo
    alias: str
    instances: list[Model]
    relation: RelationQuery
    needed: list[Hashable]
    pairs: CompiledQuery | None = None
    targets: dict[Hashable, list[Hashable]] | None = None
    #: The many-to-many source column's key, as Django matches it (``get_db_prep_value``);
    #: ``None`` where that is the value itself.
    source_key: Any = None
    #: Forward one-to-one: the target's cache of its parent (Django's link-back).
    link_back: str | None = None
    found: dict[Hashable, Model] = field(default_factory=dict)
    missing: set[Hashable] = field(default_factory=set)
    resolved: bool = False
    waiting: int = 0
    hits: int = 0
    step: StepTrace | None = None

    def wanted(self) -> set[Hashable]:
        """The target keys this level needs."""
        if self.targets is None:
            return {key for key in self.needed if key is not None}
        return {pk for pks in self.targets.values() for pk in pks}

    def resolve(self) -> None:
        """Take what the memo holds; the rest is ``missing`` (nothing, for a loaded
        ``all=True`` memo: a key it lacks has no row). Again later: only the keys still
        missing are looked up."""
        wanted = self.missing if self.resolved else self.wanted()
        self.resolved = True
        held = self.memo.get_many(wanted)
        self.found.update(held)
        self.hits += len(held)
        self.missing = set() if self.memo.loaded else wanted - held.keys()

    def receive(self, fetched: dict[Hashable, Model]) -> None:
        """Take the fetched instances this level was waiting for."""
        for key in self.missing:
            instance = fetched.get(key)
            if instance is not None:
                self.found[key] = instance

    def read_pairs(self, rows: Sequence[Sequence[Any]]) -> None:
        """Group the join rows ``(source column, target pk)`` by parent match key."""
        targets: dict[Hashable, list[Hashable]] = {}
        source_key = self.source_key
        if source_key is None:
            for source, pk in rows:
                if (pks := targets.get(source)) is None:
                    targets[source] = [pk]
                else:
                    pks.append(pk)
        else:
            for source, pk in rows:
                targets.setdefault(source_key(source), []).append(pk)
        self.targets = targets

    def values(self) -> tuple[list[Any], list[Model]]:
        """Per parent, its related instance (or ``None``) or list of instances; and the
        distinct instances linked, in order of first use (the level's objects)."""
        found = self.found
        if self.targets is None:
            # One instance per key: the distinct instances are those of the distinct keys.
            values: list[Any] = list(map(found.get, self.needed))
            first_use = [found[key] for key in dict.fromkeys(self.needed) if key in found]
            return values, first_use
        values = []
        append = values.append
        targets_of = self.targets.get
        take = found.__getitem__
        for key in self.needed:
            pks = targets_of(key)
            if pks is None:
                append([])
                continue
            try:
                append(list(map(take, pks)))
            except KeyError:  # a row gone since the join rows were read
                append([found[pk] for pk in pks if pk in found])
        # The distinct instances in order of first use (one instance per key in a memo).
        used = dict.fromkeys(pk for key in self.needed for pk in targets_of(key, ()))
        linked = {id(found[pk]): found[pk] for pk in used if pk in found}
        return values, list(linked.values())


def memo_level(
    memos: dict[type[Model], Memo],
    level: Level,
    descriptor: Any,
    prefetcher: Any,
    parents: list[Model],
) -> MemoLevel | None:
    """The level as served from a memo, or ``None`` when no memo serves it: no memo of
    its target model, a ``Prefetch`` queryset, a reverse relation, a foreign key to
    another field than the primary key, or anything else Django's path must handle."""
    if level.querysets() is not None:
        return None
    kind = kind_of(descriptor)
    if kind is None or kind.build is None:
        return None
    model = kind.related_model(descriptor)
    memo = memos.get(model) if model is not None else None
    if memo is None:
        return None
    if type(descriptor) in (ForwardManyToOneDescriptor, ForwardOneToOneDescriptor):
        return _forward_level(memo, level, descriptor, prefetcher, parents)
    if type(descriptor) is ManyToManyDescriptor:
        return _many_to_many_level(memo, level, descriptor, prefetcher, parents)
    return None


def _forward_level(
    memo: Memo, level: Level, descriptor: Any, prefetcher: Any, parents: list[Model]
) -> MemoLevel | None:
    fk = descriptor.field
    if (
        len(fk.foreign_related_fields) != 1
        or fk.foreign_related_fields[0] is not memo.model._meta.pk
    ):
        return None
    link_back = None
    if not fk.remote_field.multiple:
        remote = fk.remote_field
        if type(remote).set_cached_value is not FieldCacheMixin.set_cached_value:
            return None
        link_back = remote.cache_name
    # Only its kind (cache name, database, own lookups) is used: built for the first
    # parent, which is what Django routes and hints the query with.
    relation = build_relation_query(descriptor, prefetcher, parents[:1], None)
    if relation is None or relation.additional_lookups:
        return None
    alias = relation.queryset.db
    if not memo.serves(alias):
        return None
    needed = field_values(type(parents[0]), fk.local_related_fields[0].attname, parents)
    return MemoLevel(level, memo, alias, parents, relation, needed, link_back=link_back)


def _many_to_many_level(
    memo: Memo, level: Level, descriptor: Any, manager: Any, parents: list[Model]
) -> MemoLevel | None:
    source = manager.through._meta.get_field(manager.source_field_name)
    if len(source.local_related_fields) != 1:
        return None
    relation = build_relation_query(descriptor, manager, parents, None)
    if relation is None or relation.additional_lookups:
        return None
    queryset: Any = relation.queryset
    alias = queryset.db
    if not memo.serves(alias):
        return None
    # Django's own prefetch query (the target's default manager, its filter on the
    # parents, its ordering), selecting only each row's parent column and target key;
    # ties (and an unordered target) in the join rows' order.
    connection = connections[alias]
    quote = connection.ops.quote_name
    local, target = source.local_related_fields[0], source.foreign_related_fields[0]
    through = manager.through._meta
    row_order = RawSQL(f"{quote(through.db_table)}.{quote(through.pk.column)}", ()).asc()
    query = queryset.query
    ordering = list(query.order_by) if query.order_by else []
    if not ordering and query.default_ordering:
        ordering = list(queryset.model._meta.ordering)
    pairs = queryset.order_by(*ordering, row_order).values_list(
        f"_prefetch_related_val_{local.attname}", "pk"
    )
    values = list(map(operator.attrgetter(target.attname), parents))
    source_key: Callable[[Any], Hashable] | None = None
    if _keeps_ints(local, target, connection) and all(type(value) is int for value in values):
        needed: list[Hashable] = values
    else:
        needed = [target.get_db_prep_value(value, connection) for value in values]

        def source_key(value: Any) -> Hashable:
            key: Hashable = local.get_db_prep_value(value, connection)
            return key

    return MemoLevel(
        level,
        memo,
        alias,
        parents,
        relation,
        needed,
        pairs=compile_queryset(pairs),
        source_key=source_key,
    )


def _keeps_ints(local: Any, target: Any, connection: Any) -> bool:
    """Whether Django's many-to-many match keys (``get_db_prep_value`` of the join
    column ``local`` and of the parents' ``target`` field) map an ``int`` to itself:
    Django's own integer preparation, and a backend that keeps an auto key's value.
    The join rows' source column is then matched as read, when it is an ``int``."""
    return (
        type(local).get_db_prep_value is ForeignKey.get_db_prep_value
        and isinstance(target, IntegerField)
        and type(target).get_prep_value is IntegerField.get_prep_value
        and type(target).get_db_prep_value in _INTEGER_DB_PREP
        and type(connection.ops).validate_autopk_value
        is BaseDatabaseOperations.validate_autopk_value
    )


def batch_query(
    memo: Memo, alias: str, keys: list[Hashable] | None
) -> tuple[CompiledQuery, list[Any]]:
    """The query for ``keys`` of ``memo`` (all of its rows when ``None``), and the
    memo queryset's own ``prefetch_related()`` lookups (taken off the query)."""
    queryset: Any = memo.fetch_queryset(alias)
    if keys is not None:
        queryset = queryset.filter(pk__in=keys)
        any_instead_of_in(queryset.query)
        queryset.query.clear_ordering()
    else:
        queryset = queryset._chain()
    lookups = take_additional_lookups(queryset)
    return compile_queryset(queryset), lookups
