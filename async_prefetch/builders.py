"""Query builders: one per relation kind, each returning an *unevaluated* queryset.

Django's ``get_prefetch_querysets()`` evaluates the queryset for forward one-to-one,
reverse one-to-one and reverse foreign keys (to set each related object's cache back
to its parent). The builders here build the same filtered queryset without running
it and return the reverse-cache write as ``link_back``, which the hydrating task calls
once the rows are instances. Relation kinds without a native builder (generic
relations, third-party descriptors) are marked ``delegated``: the engine runs Django's
own ``get_prefetch_querysets()`` for them on a worker thread.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connections
from django.db.models import Field, ForeignKey, IntegerField, Model, Q, QuerySet
from django.db.models.expressions import Col, ColPairs
from django.db.models.fields import AutoFieldMixin, related_descriptors
from django.db.models.fields.mixins import FieldCacheMixin
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ForwardOneToOneDescriptor,
    ManyToManyDescriptor,
    ReverseManyToOneDescriptor,
    ReverseOneToOneDescriptor,
)
from django.db.models.fields.tuple_lookups import TupleIn

from .hydrator import PLAIN_DESCRIPTORS
from .lookups import AnyOf, any_instead_of_in, plain_values

KeyFunc = Callable[[Model], Hashable]

# Integer fields' get_db_prep_value: Field's, or AutoField's (PostgreSQL keeps the value).
_INTEGER_DB_PREP = (Field.get_db_prep_value, AutoFieldMixin.get_db_prep_value)

# Django's own filter for reverse relations (sliced querysets become a ROW_NUMBER()
# window); private, but identical in every supported Django line.
_filter_prefetch_queryset: Callable[[Any, str, list[Model]], Any] = (
    related_descriptors._filter_prefetch_queryset  # type: ignore[attr-defined]
)


@dataclass(eq=False)
class RelationQuery:
    """What ``get_prefetch_querysets()`` returns, with the queryset left unevaluated.

    ``link_back(related_objects)`` writes the related objects' caches back to their
    parents, what Django's builders do while evaluating the queryset, and returns each
    object's ``rel_obj_attr`` key (in order) for the level to group them by. Because they
    evaluate it, the queryset's own ``prefetch_related()`` lookups run *before* those
    writes there, so the engine runs ``additional_lookups`` (already removed from the
    queryset) before ``link_back`` when ``link_back`` is set, and after otherwise.
    """

    queryset: QuerySet[Any]
    rel_obj_attr: KeyFunc
    instance_attr: KeyFunc
    single: bool
    cache_name: str
    is_descriptor: bool
    link_back: Callable[[list[Model]], list[Hashable]] | None = None
    additional_lookups: list[Any] = field(default_factory=list)


def _only_queryset(querysets: Sequence[QuerySet[Any]] | None) -> QuerySet[Any] | None:
    if querysets and len(querysets) != 1:
        raise ValueError(
            "querysets argument of get_prefetch_querysets() should have a length of 1."
        )
    return querysets[0] if querysets else None


def _descriptor_queryset(
    descriptor: Any, instances: list[Model], querysets: Sequence[QuerySet[Any]] | None
) -> QuerySet[Any]:
    """The ``Prefetch`` queryset (with the first instance as routing hint) or the
    descriptor's default one, as Django's one-to-one and forward builders pick it."""
    queryset = _only_queryset(querysets)
    if queryset is None:
        return descriptor.get_queryset(instance=instances[0])  # type: ignore[no-any-return]
    queryset._add_hints(instance=instances[0])  # type: ignore[attr-defined]
    return queryset


def _linker(
    field: Any, rel_obj_attr: KeyFunc, instances_dict: dict[Any, Model], *, keep_cached: bool
) -> Callable[[list[Model]], list[Hashable]]:
    """``link_back``: cache each related object's parent on ``field``, as Django's
    evaluating builders do (the reverse FK one leaves already-cached values alone), and
    return the objects' keys. Each key is read once, here: the grouping that follows
    in Django reads the same key again."""
    kind = type(field)
    if (
        kind.is_cached is not FieldCacheMixin.is_cached
        or kind.set_cached_value is not FieldCacheMixin.set_cached_value
    ):

        def link_back_via_field(related: list[Model]) -> list[Hashable]:
            keys = []
            for rel_obj in related:
                key = rel_obj_attr(rel_obj)
                keys.append(key)
                if not (keep_cached and field.is_cached(rel_obj)):
                    field.set_cached_value(rel_obj, instances_dict[key])
            return keys

        return link_back_via_field
    cache_name = field.cache_name

    def link_back(related: list[Model]) -> list[Hashable]:
        # FieldCacheMixin's is_cached() and set_cached_value(), inlined.
        keys = key_values(rel_obj_attr, related)
        for rel_obj, key in zip(related, keys, strict=True):
            fields_cache = rel_obj._state.fields_cache
            if not (keep_cached and cache_name in fields_cache):
                fields_cache[cache_name] = instances_dict[key]
        return keys

    return link_back


def _match_keys(
    related_model: type[Model],
    related_fields: Sequence[Any],
    parent_model: type[Model],
    parent_fields: Sequence[Any],
    django_keys: tuple[KeyFunc, KeyFunc],
) -> tuple[KeyFunc, KeyFunc]:
    """``(rel_obj_attr, instance_attr)``: Django's key functions, or when both sides are
    one plainly stored field, functions returning that value itself (no tuple, no
    descriptor call) for instances of exactly those models. Either both or neither."""
    related_key = _scalar_key(related_model, related_fields, django_keys[0])
    parent_key = _scalar_key(parent_model, parent_fields, django_keys[1])
    if related_key is None or parent_key is None:
        return django_keys
    return related_key, parent_key


def _scalar_key(
    model: type[Model], fields: Sequence[Any], django_key: KeyFunc, *, ints_only: bool = False
) -> KeyFunc | None:
    """What ``ForeignObject.get_instance_value_for_fields`` reads, as a scalar, or ``None``
    when that is not one plainly stored field of ``model``."""
    if len(fields) != 1:
        return None
    field = fields[0]
    if field.primary_key and model._meta.pk is not field:
        return None  # Django reads instance.pk (a parent link under inheritance)
    if type(getattr(model, field.attname, None)) not in PLAIN_DESCRIPTORS:
        return None
    return ValueKey(model, field.attname, django_key, ints_only=ints_only)


class ValueKey:
    """A match key: ``getattr(obj, attname)`` for instances of exactly ``model`` (with
    ``ints_only``: when that is an ``int``), else the single value of Django's tuple key.
    Reading an unloaded field loads it, as Django's key does. :meth:`many` reads a whole
    list at C speed."""

    __slots__ = ("_django_key", "_ints_only", "_model", "_read")

    def __init__(
        self, model: type[Model], attname: str, django_key: KeyFunc, *, ints_only: bool
    ) -> None:
        self._model = model
        self._read = operator.attrgetter(attname)
        self._django_key = django_key
        self._ints_only = ints_only

    def __call__(self, obj: Any) -> Hashable:
        if type(obj) is self._model:
            value: Hashable = self._read(obj)
            if not self._ints_only or type(value) is int:
                return value
        django_value: Hashable = self._django_key(obj)[0]  # type: ignore[index]
        return django_value

    def many(self, objs: Sequence[Any]) -> list[Hashable]:
        """``[self(obj) for obj in objs]``."""
        if set(map(type, objs)) <= {self._model}:
            values: list[Hashable] = list(map(self._read, objs))
            if not self._ints_only or set(map(type, values)) <= {int}:
                return values
            django_key = self._django_key
            return [
                value if type(value) is int else django_key(obj)[0]  # type: ignore[index]
                for obj, value in zip(objs, values, strict=True)
            ]
        return list(map(self, objs))


def key_values(key: KeyFunc, objs: Sequence[Any]) -> list[Hashable]:
    """``[key(obj) for obj in objs]``: in one pass for a :class:`ValueKey`."""
    if type(key) is ValueKey:
        return key.many(objs)
    return list(map(key, objs))


def _forward(
    descriptor: ForwardManyToOneDescriptor[Any],
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
) -> RelationQuery:
    """Forward foreign key and forward one-to-one (``book.publisher``, ``profile.book``)."""
    fk = descriptor.field
    queryset = _descriptor_queryset(descriptor, instances, querysets)
    rel_obj_attr = fk.get_foreign_related_value
    instance_attr = fk.get_local_related_value
    instances_dict = {instance_attr(inst): inst for inst in instances}
    query: Any = queryset.query
    related_fields = [query.resolve_ref(f.name).target for f in fk.foreign_related_fields]
    table = queryset.model._meta.db_table
    if len(related_fields) == 1:
        # Django's one-column TupleIn is ``(col) IN ((%s), (%s), ...)``.
        column = Col(table, related_fields[0])
        queryset = queryset.filter(AnyOf(column, [key for (key,) in instances_dict]))
    else:
        columns = ColPairs(table, related_fields, related_fields, fk)
        queryset = queryset.filter(TupleIn(columns, list(instances_dict)))
    queryset.query.clear_ordering()
    link_back = None
    if not fk.remote_field.multiple:  # one-to-one: the related object knows its parent
        link_back = _linker(fk.remote_field, rel_obj_attr, instances_dict, keep_cached=False)
    return RelationQuery(
        queryset, rel_obj_attr, instance_attr, True, fk.cache_name, False, link_back
    )


def _reverse_one_to_one(
    descriptor: ReverseOneToOneDescriptor[Any, Any],
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
) -> RelationQuery:
    """Reverse one-to-one (``book.profile``, ``book.ebook`` under multi-table inheritance)."""
    related = descriptor.related
    queryset = _descriptor_queryset(descriptor, instances, querysets)
    rel_obj_attr = related.field.get_local_related_value
    instance_attr = related.field.get_foreign_related_value
    instances_dict = {instance_attr(inst): inst for inst in instances}
    queryset = queryset.filter(**{f"{related.field.name}__in": instances})
    any_instead_of_in(queryset.query)
    queryset.query.clear_ordering()
    link_back = _linker(related.field, rel_obj_attr, instances_dict, keep_cached=False)
    return RelationQuery(
        queryset, rel_obj_attr, instance_attr, True, related.cache_name, False, link_back
    )


def _filter_by_parents(
    queryset: Any, path: str, targets: Sequence[Any], instances: list[Model]
) -> Any:
    """Django's ``_filter_prefetch_queryset(queryset, path, instances)``, filtering on
    the parents' key values (``path__target__in``: a plain ``In`` on the same column)
    rather than on the parents (a ``RelatedIn`` that reads each key back out of each
    instance and prepares it twice: 46 against 19 ms for 20,000 parents), then sent as
    ``= ANY``. ``targets`` are the parent fields the relation's column refers to.

    Sliced querysets (a ``ROW_NUMBER()`` window), multi-column keys, parents that are not
    instances of the relation's model (a mixed list) and parents without a primary key keep
    Django's own filter, which raises its error for the last two before any query (even
    when the relation's key is another field).
    """
    target = targets[0] if len(targets) == 1 else None
    if (
        target is None
        or queryset.query.is_sliced
        or not _all_instances_of(target.model, instances)
        or not all(instance._is_pk_set() for instance in instances)  # type: ignore[attr-defined]
    ):
        return _filter_prefetch_queryset(queryset, path, instances)
    values = list(map(operator.attrgetter(target.attname), instances))
    lookup = f"{path}__{target.name}__in"
    if len(values) > 1 and plain_values(values):
        # Django's filter for the first value only (its joins, lookup and column),
        # then all the values prepared at once: Django's filter resolves and
        # prepares each value through several calls (about 0.8 us per value).
        probe = queryset.query.clone()
        probe.add_q(Q(**{lookup: values[:1]}), reuse_all=True)
        if any_instead_of_in(probe, values):
            queryset.query = probe
            return queryset
    # As Django's filter: reuse every join already in the query.
    queryset.query.add_q(Q(**{lookup: values}), reuse_all=True)
    any_instead_of_in(queryset.query)
    return queryset


def _all_instances_of(model: type[Model], instances: list[Model]) -> bool:
    """True when every instance is a ``model`` (or a subclass of it): their key values
    are then the values of ``model``'s fields, which Django's filter would check."""
    return all(issubclass(kind, model) for kind in set(map(type, instances)))


def _manager_queryset(
    manager: Any, instances: list[Model], querysets: Sequence[QuerySet[Any]] | None
) -> Any:
    """The queryset a to-many related manager's ``get_prefetch_querysets()`` starts from:
    the ``Prefetch`` queryset or the default one, hinted with the first parent and
    bound to its database."""
    queryset: Any = _only_queryset(querysets)
    if queryset is None:
        # The related manager subclasses the default manager: its parent's
        # get_queryset() is the unfiltered default queryset.
        queryset = super(type(manager), manager).get_queryset()
    queryset._add_hints(instance=instances[0])
    return queryset.using(queryset._db or manager._db)


def _reverse_many_to_one(
    manager: Any, instances: list[Model], querysets: Sequence[QuerySet[Any]] | None
) -> RelationQuery:
    """Reverse foreign key (``book.pages``), through the related model's default manager."""
    fk = manager.field
    queryset = _manager_queryset(manager, instances, querysets)
    rel_obj_attr, instance_attr = _match_keys(
        queryset.model,
        fk.local_related_fields,
        type(instances[0]),
        fk.foreign_related_fields,
        (fk.get_local_related_value, fk.get_foreign_related_value),
    )
    instances_dict = {instance_attr(inst): inst for inst in instances}
    queryset = _filter_by_parents(queryset, fk.name, fk.foreign_related_fields, instances)
    link_back = _linker(fk, rel_obj_attr, instances_dict, keep_cached=True)
    return RelationQuery(
        queryset,
        rel_obj_attr,
        instance_attr,
        single=False,
        cache_name=fk.remote_field.cache_name,
        is_descriptor=False,
        link_back=link_back,
    )


def _many_to_many(
    manager: Any, instances: list[Model], querysets: Sequence[QuerySet[Any]] | None
) -> RelationQuery:
    """Many-to-many, both directions: ``ManyRelatedManager.get_prefetch_querysets()``
    (which does not evaluate), with the parents filtered on their key values, as one
    ``= ANY`` array."""
    queryset = _manager_queryset(manager, instances, querysets)
    fk = manager.through._meta.get_field(manager.source_field_name)
    queryset = _filter_by_parents(
        queryset, manager.query_field_name, fk.foreign_related_fields, instances
    )
    # The join table's column naming each row's parent, selected as Django selects it.
    connection = connections[queryset.db]
    quote = connection.ops.quote_name
    join_table = quote(fk.model._meta.db_table)
    queryset = queryset.extra(
        select={
            f"_prefetch_related_val_{f.attname}": f"{join_table}.{quote(f.column)}"
            for f in fk.local_related_fields
        }
    )

    # Django's match keys: each side's values through get_db_prep_value.
    def related_key(result: Model) -> Hashable:
        return tuple(
            f.get_db_prep_value(getattr(result, f"_prefetch_related_val_{f.attname}"), connection)
            for f in fk.local_related_fields
        )

    def parent_key(instance: Model) -> Hashable:
        return tuple(
            f.get_db_prep_value(getattr(instance, f.attname), connection)
            for f in fk.foreign_related_fields
        )

    rel_obj_attr, instance_attr = _integer_keys(
        fk, queryset, type(instances[0]), (related_key, parent_key)
    )
    return RelationQuery(
        queryset,
        rel_obj_attr,
        instance_attr,
        single=False,
        cache_name=manager.prefetch_cache_name,
        is_descriptor=False,
    )


def _integer_keys(
    fk: Any, rel_qs: Any, parent_model: type[Model], keys: tuple[KeyFunc, KeyFunc]
) -> tuple[KeyFunc, KeyFunc]:
    """Many-to-many match keys without ``get_db_prep_value`` per object, when exact.

    Django's keys run each side's value through ``get_db_prep_value`` so that both sides
    compare equal. For a relation to one integer column with Django's own integer
    preparation, that maps an ``int`` to itself: these keys return such a value as is
    (the raw ``_prefetch_related_val_*`` column on the related side) and anything else
    through Django's key. Otherwise ``keys`` (Django's) are returned unchanged.
    """
    rel_obj_attr, instance_attr = keys
    if len(fk.local_related_fields) != 1:
        return keys
    local, target = fk.local_related_fields[0], fk.foreign_related_fields[0]
    if not (
        type(local).get_db_prep_value is ForeignKey.get_db_prep_value
        and isinstance(target, IntegerField)
        and type(target).get_prep_value is IntegerField.get_prep_value
        and type(target).get_db_prep_value in _INTEGER_DB_PREP
    ):
        return keys
    parent_key = _scalar_key(parent_model, [target], instance_attr, ints_only=True)
    if parent_key is None:
        return keys
    related_name = f"_prefetch_related_val_{local.attname}"
    return ValueKey(rel_qs.model, related_name, rel_obj_attr, ints_only=True), parent_key


def build_relation_query(
    descriptor: Any,
    prefetcher: Any,
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
) -> RelationQuery | None:
    """Build the unevaluated prefetch query for ``instances``, or ``None`` to delegate.

    ``descriptor`` is the class attribute and ``prefetcher`` the object with
    ``get_prefetch_querysets()``, as returned by Django's ``get_prefetcher()``.
    Exact type checks keep subclasses (``GenericRelation``'s descriptor, third-party
    descriptors) on Django's own implementation.
    """
    kind = type(descriptor)
    if kind is ForwardManyToOneDescriptor or kind is ForwardOneToOneDescriptor:
        query = _forward(descriptor, instances, querysets)
    elif kind is ReverseOneToOneDescriptor:
        query = _reverse_one_to_one(descriptor, instances, querysets)
    elif kind is ReverseManyToOneDescriptor:
        query = _reverse_many_to_one(prefetcher, instances, querysets)
    elif kind is ManyToManyDescriptor:
        query = _many_to_many(prefetcher, instances, querysets)
    else:
        return None
    query.additional_lookups = take_additional_lookups(query.queryset)
    return query


def take_additional_lookups(rel_qs: Any) -> list[Any]:
    """Copy the ``prefetch_related()`` lookups off ``rel_qs`` and clear them, as Django does."""
    lookups = [copy.copy(lookup) for lookup in getattr(rel_qs, "_prefetch_related_lookups", ())]
    if lookups:
        rel_qs._prefetch_related_lookups = ()
    return lookups
