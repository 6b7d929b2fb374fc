"""What every relation kind builds: the unevaluated query, its match keys and link-back.

A kind's builder returns a :class:`RelationQuery`: the queryset Django's
``get_prefetch_querysets()`` would build, left unevaluated, the key functions that match
related rows to parents, and ``link_back``, the reverse-cache writes Django's evaluating
builders make. Key functions read plainly stored fields at C speed (:class:`ValueKey`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.fields.mixins import FieldCacheMixin
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute

from ..hydration.rows import PLAIN_DESCRIPTORS, RowLink
from ..sql.compiler import CompiledQuery, compile_queryset
from ..sql.statements import Key, Statement, statements

KeyFunc = Callable[[Model], Hashable]


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
    #: ``link_back``'s writes as the rows are built (a reverse foreign key matched on
    #: its column): a copy per query goes to the row builder, ``link_back`` does the
    #: rest where that does not apply.
    row_link: RowLink | None = None
    additional_lookups: list[Any] = field(default_factory=list)
    #: Where this relation's compiled statement is kept across calls
    #: (:mod:`async_prefetch.sql.statements`), ``None`` if it is not.
    statement_key: Key | None = None
    #: The kept statement bound to this call's parents: then ``queryset`` is the
    #: unfiltered one (hints, database, fetch mode) and Django's compiler does not run.
    statement: Statement | None = None

    def compile(self) -> CompiledQuery:
        """This relation's query, compiled, or its kept statement; a compile is kept
        under ``statement_key``."""
        if self.statement is not None:
            return self.statement.compiled(self.queryset)
        compiled = compile_queryset(self.queryset)
        if self.statement_key is not None:
            statements.keep(self.statement_key, compiled)
        return compiled


def only_queryset(querysets: Sequence[QuerySet[Any]] | None) -> QuerySet[Any] | None:
    if querysets and len(querysets) != 1:
        raise ValueError(
            "querysets argument of get_prefetch_querysets() should have a length of 1."
        )
    return querysets[0] if querysets else None


def descriptor_queryset(
    descriptor: Any, instances: list[Model], querysets: Sequence[QuerySet[Any]] | None
) -> QuerySet[Any]:
    """The ``Prefetch`` queryset (with the first instance as routing hint) or the
    descriptor's default one, as Django's one-to-one and forward builders pick it."""
    queryset = only_queryset(querysets)
    if queryset is None:
        return descriptor.get_queryset(instance=instances[0])  # type: ignore[no-any-return]
    queryset._add_hints(instance=instances[0])  # type: ignore[attr-defined]
    return queryset


def linker(
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


def row_link(field: Any, rel_obj_attr: KeyFunc, instances_dict: dict[Any, Model]) -> RowLink | None:
    """:func:`linker`'s writes for new instances of ``field``'s model as their rows are
    built, when exact: Django's own field cache methods, and the key the foreign key's
    column itself (a :class:`ValueKey` on that model)."""
    kind = type(field)
    if (
        kind.is_cached is not FieldCacheMixin.is_cached
        or kind.set_cached_value is not FieldCacheMixin.set_cached_value
        or type(rel_obj_attr) is not ValueKey
        or rel_obj_attr.model is not field.model
        or rel_obj_attr.attname != field.attname
    ):
        return None
    return RowLink(field.attname, field.cache_name, instances_dict)


def match_keys(
    related_model: type[Model],
    related_fields: Sequence[Any],
    parent_model: type[Model],
    parent_fields: Sequence[Any],
    django_keys: tuple[KeyFunc, KeyFunc],
) -> tuple[KeyFunc, KeyFunc]:
    """``(rel_obj_attr, instance_attr)``: Django's key functions, or when both sides are
    one plainly stored field, functions returning that value itself (no tuple, no
    descriptor call) for instances of exactly those models. Either both or neither."""
    related_key = scalar_key(related_model, related_fields, django_keys[0])
    parent_key = scalar_key(parent_model, parent_fields, django_keys[1])
    if related_key is None or parent_key is None:
        return django_keys
    return related_key, parent_key


def scalar_key(
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

    __slots__ = ("_attname", "_django_key", "_ints_only", "_model", "_read")

    def __init__(
        self, model: type[Model], attname: str, django_key: KeyFunc, *, ints_only: bool
    ) -> None:
        self._model = model
        self._attname = attname
        self._read = operator.attrgetter(attname)
        self._django_key = django_key
        self._ints_only = ints_only

    @property
    def model(self) -> type[Model]:
        return self._model

    @property
    def attname(self) -> str:
        return self._attname

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
            values: list[Hashable] = model_field_values(self._model, self._attname, objs)
            if not self._ints_only or set(map(type, values)) <= {int}:
                return values
            django_key = self._django_key
            return [
                value if type(value) is int else django_key(obj)[0]  # type: ignore[index]
                for obj, value in zip(objs, values, strict=True)
            ]
        return list(map(self, objs))


def field_values(model: type[Model], attname: str, objs: Sequence[Any]) -> list[Any]:
    """``[getattr(obj, attname) for obj in objs]``; see :func:`model_field_values`."""
    if set(map(type, objs)) <= {model}:
        return model_field_values(model, attname, objs)
    return list(map(operator.attrgetter(attname), objs))


@functools.cache
def _reads_from_dict(model: type[Model], attname: str) -> bool:
    """Whether ``attname`` is a foreign key's column on ``model`` (its value in ``__dict__``)."""
    return type(inspect.getattr_static(model, attname, None)) is ForeignKeyDeferredAttribute


def model_field_values(model: type[Model], attname: str, objs: Sequence[Any]) -> list[Any]:
    """``[getattr(obj, attname) for obj in objs]`` for instances of exactly ``model``.

    A foreign key's column attribute has a data descriptor (Django's
    ``ForeignKeyDeferredAttribute``) whose ``__get__``, a Python call per read, returns
    ``obj.__dict__[attname]`` when the value is loaded: the loaded values are read from
    the instances' ``__dict__`` at C speed (an instance with a loaded foreign key has
    its ``__dict__`` made already: Django's ``__init__`` assigns through that descriptor,
    which writes to it). When one of them is deferred, every value is read through the
    descriptor, in order, loading the deferred ones as Django would.
    """
    if _reads_from_dict(model, attname):
        try:
            return list(map(operator.itemgetter(attname), map(vars, objs)))
        except KeyError:  # deferred: loaded by the descriptor
            pass
    return list(map(operator.attrgetter(attname), objs))


def key_values(key: KeyFunc, objs: Sequence[Any]) -> list[Hashable]:
    """``[key(obj) for obj in objs]``: in one pass for a :class:`ValueKey`."""
    if type(key) is ValueKey:
        return key.many(objs)
    return list(map(key, objs))


def take_additional_lookups(rel_qs: Any) -> list[Any]:
    """Copy the ``prefetch_related()`` lookups off ``rel_qs`` and clear them, as Django does."""
    lookups = [copy.copy(lookup) for lookup in getattr(rel_qs, "_prefetch_related_lookups", ())]
    if lookups:
        rel_qs._prefetch_related_lookups = ()
    return lookups
