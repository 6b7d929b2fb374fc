"""Relation kinds: one module each, found through one registry keyed by descriptor type.

A kind knows, for its descriptor class, how to build the unevaluated prefetch query
(``build``), which model it leads to (``related_model``) and, for to-many kinds, how to
derive each parent's cached queryset from a template (``derive_cached_querysets``).
A descriptor whose exact class has no kind with a builder (generic relations, third-party
descriptors, subclasses of Django's) is delegated to Django's own
``get_prefetch_querysets()`` (:mod:`.delegated`). Generic relations are a kind like the
others, registered only once ``django.contrib.contenttypes.fields`` has been imported (a
project without contenttypes has no such descriptor).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ForwardOneToOneDescriptor,
    ManyToManyDescriptor,
    ReverseManyToOneDescriptor,
    ReverseOneToOneDescriptor,
)

from ..hydration.queryset_template import QuerysetsFactory
from . import forward, many_to_many, reverse_many_to_one, reverse_one_to_one
from .base import RelationQuery, take_additional_lookups

__all__ = ["RelationKind", "RelationQuery", "build_relation_query", "kind_of", "related_model_of"]

Builder = Callable[..., RelationQuery]
Deriver = Callable[[Any, Any, QuerySet[Any], type[Model]], QuerysetsFactory | None]


@dataclass(frozen=True)
class RelationKind:
    """What the engine knows about one kind of relation descriptor."""

    name: str
    #: ``build(descriptor, prefetcher, parents, querysets)``; ``None``: Django's builder.
    build: Builder | None
    #: The model the relation leads to, ``None`` when not static (a generic foreign key).
    related_model: Callable[[Any], type[Model] | None]
    #: ``derive(descriptor, manager, template, parent_class)`` -> the cached querysets'
    #: maker (:func:`..hydration.queryset_template.queryset_factory`) or ``None``.
    derive_cached_querysets: Deriver | None = None
    #: ``build(..., reuse_statement=True)`` may return a kept statement
    #: (:mod:`..sql.statements`) with the queryset left unfiltered.
    reuses_statements: bool = False


def _forward_builder(
    descriptor: Any, prefetcher: Any, parents: Any, querysets: Any, **options: Any
) -> Any:
    return forward.build(descriptor, parents, querysets, **options)


def _reverse_one_to_one_builder(descriptor: Any, prefetcher: Any, parents: Any, qs: Any) -> Any:
    return reverse_one_to_one.build(descriptor, parents, qs)


def _manager_builder(build: Callable[..., RelationQuery]) -> Builder:
    def build_with_manager(
        descriptor: Any, prefetcher: Any, parents: Any, qs: Any, **options: Any
    ) -> Any:
        return build(prefetcher, parents, qs, **options)  # the prefetcher: the related manager

    return build_with_manager


_FORWARD = RelationKind(
    "forward", _forward_builder, lambda d: d.field.remote_field.model, reuses_statements=True
)
_KINDS: dict[type[Any], RelationKind] = {
    ForwardManyToOneDescriptor: _FORWARD,
    ForwardOneToOneDescriptor: _FORWARD,
    ReverseOneToOneDescriptor: RelationKind(
        "reverse one-to-one", _reverse_one_to_one_builder, lambda d: d.related.related_model
    ),
    ReverseManyToOneDescriptor: RelationKind(
        "reverse foreign key",
        _manager_builder(reverse_many_to_one.build),
        lambda d: d.rel.related_model,
        reverse_many_to_one.derive_cached_querysets,
        reuses_statements=True,
    ),
    ManyToManyDescriptor: RelationKind(
        "many-to-many",
        _manager_builder(many_to_many.build),
        lambda d: d.rel.related_model if d.reverse else d.rel.model,
        many_to_many.derive_cached_querysets,
        reuses_statements=True,
    ),
}
# For isinstance() checks, most specific first: subclasses (third-party descriptors,
# ManyToManyDescriptor under ReverseManyToOneDescriptor) lead where their base leads.
_BY_ANCESTRY: list[tuple[type[Any], RelationKind]] = [
    (ManyToManyDescriptor, _KINDS[ManyToManyDescriptor]),
    (ReverseManyToOneDescriptor, _KINDS[ReverseManyToOneDescriptor]),
    (ForwardManyToOneDescriptor, _FORWARD),
    (ReverseOneToOneDescriptor, _KINDS[ReverseOneToOneDescriptor]),
]
_generic_registered = False


def _register_generic() -> None:
    """Register the generic kinds once contenttypes' fields module exists."""
    global _generic_registered
    if _generic_registered or "django.contrib.contenttypes.fields" not in sys.modules:
        return
    from . import generic

    for descriptor_class, kind in generic.KINDS.items():
        _KINDS[descriptor_class] = kind
    # Ahead of their bases: ReverseGenericManyToOneDescriptor is a ReverseManyToOneDescriptor.
    _BY_ANCESTRY[:0] = list(generic.KINDS.items())
    _generic_registered = True


def kind_of(descriptor: Any) -> RelationKind | None:
    """The kind registered for exactly ``descriptor``'s class, or ``None``."""
    _register_generic()
    return _KINDS.get(type(descriptor))


def _kind_by_ancestry(descriptor: Any) -> RelationKind | None:
    _register_generic()
    for descriptor_class, kind in _BY_ANCESTRY:
        if isinstance(descriptor, descriptor_class):
            return kind
    return None


def is_relation(descriptor: Any) -> bool:
    """Whether ``descriptor`` is a relation descriptor (of any kind, subclasses included)."""
    return _kind_by_ancestry(descriptor) is not None


def related_model_of(descriptor: Any) -> type[Model] | None:
    """The model a relation descriptor leads to; ``None`` for anything else (or generic)."""
    kind = _kind_by_ancestry(descriptor)
    return None if kind is None else kind.related_model(descriptor)


def build_relation_query(
    descriptor: Any,
    prefetcher: Any,
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
    *,
    reuse_statement: bool = False,
) -> RelationQuery | None:
    """Build the unevaluated prefetch query for ``instances``, or ``None`` to delegate.

    ``descriptor`` is the class attribute and ``prefetcher`` the object with
    ``get_prefetch_querysets()``, as returned by Django's ``get_prefetcher()``. Only the
    exact classes registered have builders: subclasses (``GenericRelation``'s descriptor,
    third-party descriptors) keep Django's own implementation.

    With ``reuse_statement``, a kind that keeps compiled statements across calls may
    return one (``RelationQuery.statement``), its ``queryset`` then left unfiltered: the
    query is to be run through :meth:`RelationQuery.compile`, never by evaluating
    ``queryset``. Without it, ``queryset`` is always the filtered one.
    """
    kind = kind_of(descriptor)
    if kind is None or kind.build is None:
        return None
    if reuse_statement and kind.reuses_statements:
        query = kind.build(descriptor, prefetcher, instances, querysets, reuse_statement=True)
    else:
        query = kind.build(descriptor, prefetcher, instances, querysets)
    query.additional_lookups = take_additional_lookups(query.queryset)
    if query.additional_lookups:
        # Django's builder evaluates the queryset, these lookups included, before it
        # writes the reverse caches: not while the rows are built.
        query.row_link = None
    return query
