"""Memos: related instances of one model, kept across the runs of a session or of calls.

A :class:`Memo` is an identity map (primary key -> instance) with an LRU bound, or with
``all=True`` the whole table, loaded once. A run consults the memo of a level's target
model when the level is a forward foreign key or forward one-to-one to that model's
primary key, or a many-to-many relation to it, and has no ``Prefetch`` queryset of its
own: keys the memo holds are not fetched again, the missing ones are fetched by primary
key (levels of one scheduling round that target the same memo share one query), and the
parents' caches are filled with the memo's instances. Reverse relations are not served:
their rows cannot be found by the target's key.

This module holds the memo itself and the synchronous half of a memo level: planning it
(:func:`memo_level`), the queries it needs (:func:`batch_query`) and the values it gives
each parent (:meth:`MemoLevel.values`). The scheduler runs the queries and fills the
caches (through the journal).
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from django.db import connections
from django.db.backends.base.operations import BaseDatabaseOperations
from django.db.models import Field, ForeignKey, IntegerField, Model, QuerySet
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
from ..relations.base import take_additional_lookups
from ..sql.any_of import any_instead_of_in
from ..sql.compiler import CompiledQuery, compile_queryset
from .trace import StepTrace

__all__ = [
    "Memo",
    "MemoBatch",
    "MemoLevel",
    "MemoSpec",
    "batch_query",
    "memo_level",
    "memos_by_model",
]

# Integer fields' get_db_prep_value: Field's, or AutoField's.
_INTEGER_DB_PREP = (Field.get_db_prep_value, AutoFieldMixin.get_db_prep_value)

MemoSpec: TypeAlias = "Memo | Iterable[Memo] | None"
"""What a call or stream accepts as ``memo=``: one memo, several (one per model) or none."""


class Memo:
    """Instances of ``model`` by primary key, shared by every run that is given the memo.

    ``size`` bounds the instances kept: the least recently used are dropped first (a
    run keeps the instances it is linking until it is done with them, whatever the
    bound). With ``all=True`` the first run that needs the memo loads every row of
    ``queryset`` (default: the model's default manager) in one query; no instance is
    dropped, no further query is made for the model, and a key not loaded (a row added
    later, or one ``queryset`` excludes) is treated as a row that does not exist.

    ``queryset`` is what missing instances are fetched from (``select_related()``,
    ``only()``, its own ``prefetch_related()`` lookups, which run on the instances it
    fetches); by default the model's base manager, as Django's forward relations use.
    Rows it excludes are not found: a foreign key to one is ``None``, as for a dangling
    key in Django, and a many-to-many relation leaves it out.

    A memo serves one database: runs on another database do not consult it. Its
    methods may be called from several threads (each holds an internal lock briefly).
    """

    def __init__(
        self,
        model: type[Model],
        *,
        size: int = 10_000,
        all: bool = False,
        queryset: QuerySet[Any] | None = None,
    ) -> None:
        if not (isinstance(model, type) and issubclass(model, Model)):
            raise TypeError(f"Memo() needs a model class, not {model!r}.")
        if size < 1:
            raise ValueError("A memo's size must be at least 1.")
        if queryset is not None and queryset.model is not model:
            raise ValueError(
                f"A memo of {model.__name__} needs a queryset of {model.__name__}, "
                f"not of {queryset.model.__name__}."
            )
        if queryset is not None and queryset.query.is_sliced:
            raise ValueError("A memo's queryset cannot be sliced: it is filtered by key.")
        self.model = model
        self.size = size
        self.all = all
        self._queryset = queryset
        self._instances: OrderedDict[Hashable, Model] = OrderedDict()
        self._lock = threading.Lock()
        self._loaded = False
        self._alias: str | None = None

    def __repr__(self) -> str:
        bound = "all" if self.all else f"size={self.size}"
        return f"<Memo {self.model.__name__} {bound}: {len(self)} held>"

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, pk: object) -> bool:
        return pk in self._instances

    @property
    def loaded(self) -> bool:
        """True once an ``all=True`` memo holds the whole table."""
        return self._loaded

    def get(self, pk: Hashable) -> Model | None:
        """The instance held for ``pk`` (now the most recently used), or ``None``."""
        return self.get_many([pk]).get(pk)

    def get_many(self, pks: Iterable[Hashable]) -> dict[Hashable, Model]:
        """The instances held for ``pks``, by key; each becomes the most recently used."""
        found: dict[Hashable, Model] = {}
        with self._lock:
            instances = self._instances
            for pk in pks:
                instance = instances.get(pk)
                if instance is not None:
                    found[pk] = instance
                    if not self.all:  # a whole table is never evicted: no recency to keep
                        instances.move_to_end(pk)
        return found

    def add(self, instances: Iterable[Model]) -> None:
        """Hold ``instances`` (replacing any held for the same keys), dropping the least
        recently used beyond ``size`` (unless ``all``)."""
        with self._lock:
            held = self._instances
            for instance in instances:
                held[instance.pk] = instance
                held.move_to_end(instance.pk)
            if not self.all:
                while len(held) > self.size:
                    held.popitem(last=False)

    def load(self, instances: Iterable[Model]) -> None:
        """Hold exactly ``instances``: the whole table of an ``all=True`` memo."""
        with self._lock:
            self._instances = OrderedDict((instance.pk, instance) for instance in instances)
            self._loaded = True

    def clear(self) -> None:
        """Drop every instance and the database binding (an ``all=True`` memo loads again
        on next use)."""
        with self._lock:
            self._instances = OrderedDict()
            self._loaded = False
            self._alias = None  # the next use binds a database again

    def serves(self, alias: str) -> bool:
        """Whether runs on database ``alias`` use this memo (the first one used binds it)."""
        with self._lock:
            if self._alias is None:
                self._alias = alias
            return self._alias == alias

    def fetch_queryset(self, alias: str) -> QuerySet[Any]:
        """The queryset missing instances come from, on ``alias``."""
        if self._queryset is not None:
            return self._queryset.using(alias)
        manager = self.model._default_manager if self.all else self.model._base_manager
        return manager.db_manager(alias).all()


def memos_by_model(memo: Memo | Iterable[Memo] | None) -> dict[type[Model], Memo]:
    """``memo=`` as a mapping: model -> its memo. Raises ``ValueError`` for two memos of
    one model and ``TypeError`` for anything that is not a memo."""
    if memo is None:
        return {}
    memos = [memo] if isinstance(memo, Memo) else list(memo)
    by_model: dict[type[Model], Memo] = {}
    for item in memos:
        if not isinstance(item, Memo):
            raise TypeError(f"memo= takes Memo objects, not {item!r}.")
        if item.model in by_model:
            raise ValueError(f"Two memos of {item.model.__name__}: give one memo per model.")
        by_model[item.model] = item
    return by_model


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
        linked: dict[int, Model] = {}
        values = []
        targets = self.targets
        for key in self.needed:
            related = [found[pk] for pk in targets.get(key, ()) if pk in found]
            for instance in related:
                linked.setdefault(id(instance), instance)
            values.append(related)
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
    needed = list(map(operator.attrgetter(fk.local_related_fields[0].attname), parents))
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
