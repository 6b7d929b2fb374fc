"""Filtering a to-many relation's queryset by its parents, shared by the reverse foreign
key and many-to-many kinds: Django's filter, with the parents' key values sent as one
``= ANY`` array."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

from django.db.models import Model, Q, QuerySet
from django.db.models.manager import BaseManager
from django.db.models.query_utils import DeferredAttribute

from .. import _compat
from ..sql import statements as kept
from ..sql.any_of import any_instead_of_in, plain_values
from ..sql.compiler import compile_queryset
from .base import only_queryset


def filter_by_parents(
    queryset: Any, path: str, targets: Sequence[Any], instances: list[Model]
) -> Any:
    """Django's ``_compat.filter_prefetch_queryset(queryset, path, instances)``, filtering on
    the parents' key values (``path__target__in``: a plain ``In`` on the same column)
    rather than on the parents (a ``RelatedIn`` that reads each key back out of each
    instance and prepares it twice: 46 against 19 ms for 20,000 parents), then sent as
    ``= ANY``. ``targets`` are the parent fields the relation's column refers to.

    Sliced querysets (a ``ROW_NUMBER()`` window), multi-column keys, parents that are not
    instances of the relation's model (a mixed list) and parents without a primary key keep
    Django's own filter, which raises its error for the last two before any query (even
    when the relation's key is another field).
    """
    values = _key_values(queryset, targets, instances)
    if values is None:
        return _compat.filter_prefetch_queryset(queryset, path, instances)
    lookup = f"{path}__{targets[0].name}__in"
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


def _key_values(queryset: Any, targets: Sequence[Any], instances: list[Model]) -> list[Any] | None:
    """The parents' values of the one target field :func:`filter_by_parents` filters on,
    or ``None`` where it keeps Django's own filter (see there)."""
    target = targets[0] if len(targets) == 1 else None
    if (
        target is None
        or queryset.query.is_sliced
        or not _all_instances_of(target.model, instances)
        or not _pks_set(instances)
    ):
        return None
    return list(map(operator.attrgetter(target.attname), instances))


def kept_statement(
    kind: str,
    field: Any,
    manager: Any,
    querysets: Sequence[QuerySet[Any]] | None,
    queryset: Any,
    path: str,
    targets: Sequence[Any],
    instances: list[Model],
    finish: Callable[[Any], Any] = lambda queryset: queryset,
) -> tuple[kept.Key | None, kept.Statement | None]:
    """The key under which the relation's compiled statement is kept across calls, and
    the kept statement bound to ``instances``' keys when there is one (see
    :mod:`async_prefetch.sql.statements`); ``(None, None)`` when the query can differ
    from call to call (a ``Prefetch`` queryset, a default manager or queryset class of
    the project's own) or :func:`filter_by_parents` would not send one array.

    ``queryset`` is :func:`manager_queryset`'s; ``finish`` adds what the builder adds
    after :func:`filter_by_parents` (the same on every call). With
    ``statements.VERIFY`` a kept statement is compared with Django's compile.
    """
    if only_queryset(querysets) is not None or not plain_default_queryset(manager):
        return None, None
    values = _key_values(queryset, targets, instances)
    if not values or not plain_values(values):
        return None, None
    key = (kind, field, queryset.model, path, queryset.db)
    statement = kept.statements.find(
        key,
        values,
        lambda: compile_queryset(
            finish(filter_by_parents(queryset._chain(), path, targets, instances))
        ),
    )
    return key, statement


def plain_default_queryset(manager: Any) -> bool:
    """Whether the default queryset a to-many related manager starts from (its default
    manager's ``get_queryset()``, hinted and bound by :func:`manager_queryset`) is
    Django's unfiltered one: neither the manager nor its queryset class overrides how
    it is made."""
    manager_class: Any = type(manager)
    return plain_manager_class(manager_class)


_QUERYSET_MAKING = ("__init__", "_add_hints", "using", "_chain", "_clone", "db")


@functools.cache
def plain_manager_class(manager_class: Any, own: bool = False) -> bool:
    """Whether ``manager_class`` makes Django's unfiltered queryset: ``get_queryset()``
    is ``BaseManager``'s (``own``: ``manager_class`` is the manager itself, whose
    ``all()`` and ``db_manager()`` are used too; else a related manager class, whose
    own ``get_queryset()`` is skipped) and its queryset class makes querysets as
    ``QuerySet`` does."""
    classes = manager_class.__mro__ if own else manager_class.__mro__[1:]
    get_queryset = next(
        (klass.__dict__["get_queryset"] for klass in classes if "get_queryset" in klass.__dict__),
        None,
    )
    queryset_class = getattr(manager_class, "_queryset_class", None)
    return (
        get_queryset is BaseManager.get_queryset
        and (
            not own
            or (
                manager_class.all is BaseManager.all
                and manager_class.db_manager is BaseManager.db_manager
            )
        )
        and isinstance(queryset_class, type)
        and issubclass(queryset_class, QuerySet)
        and all(
            getattr(queryset_class, name) is getattr(QuerySet, name) for name in _QUERYSET_MAKING
        )
    )


def _pks_set(instances: list[Model]) -> bool:
    """``all(instance._is_pk_set() for instance in instances)``: at once when they are
    all one model with Django's ``_is_pk_set`` and a plainly stored integer key."""
    kinds: set[Any] = set(map(type, instances))
    if len(kinds) == 1:
        (kind,) = kinds
        attname = kind._meta.pk.attname
        if (
            kind._is_pk_set is Model._is_pk_set  # type: ignore[attr-defined]
            and kind._get_pk_val is Model._get_pk_val
            and type(kind.__dict__.get(attname)) is DeferredAttribute
            and set(map(type, map(operator.attrgetter(attname), instances))) <= {int}
        ):
            return True  # an int is never None, a tuple or a database default
    return all(instance._is_pk_set() for instance in instances)  # type: ignore[attr-defined]


def _all_instances_of(model: type[Model], instances: list[Model]) -> bool:
    """True when every instance is a ``model`` (or a subclass of it): their key values
    are then the values of ``model``'s fields, which Django's filter would check."""
    return all(issubclass(kind, model) for kind in set(map(type, instances)))


def manager_queryset(
    manager: Any, instances: list[Model], querysets: Sequence[QuerySet[Any]] | None
) -> Any:
    """The queryset a to-many related manager's ``get_prefetch_querysets()`` starts from:
    the ``Prefetch`` queryset or the default one, hinted with the first parent and
    bound to its database."""
    queryset: Any = only_queryset(querysets)
    if queryset is None:
        # The related manager subclasses the default manager: its parent's
        # get_queryset() is the unfiltered default queryset.
        queryset = super(type(manager), manager).get_queryset()
    queryset._add_hints(instance=instances[0])
    return queryset.using(queryset._db or manager._db)
