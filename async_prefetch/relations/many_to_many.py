"""Many-to-many, both directions (``book.authors``, ``author.books``): builder, match
keys and cached-queryset deriver."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from django.db import connections
from django.db.models import Field, ForeignKey, IntegerField, Model, QuerySet
from django.db.models.fields import AutoFieldMixin

from ..hydration.queryset_template import ParentParts, QuerysetsFactory, queryset_factory
from .base import KeyFunc, RelationQuery, ValueKey, scalar_key
from .parents import filter_by_parents, kept_statement, manager_queryset

# Integer fields' get_db_prep_value: Field's, or AutoField's (PostgreSQL keeps the value).
_INTEGER_DB_PREP = (Field.get_db_prep_value, AutoFieldMixin.get_db_prep_value)


def build(
    manager: Any,
    instances: list[Model],
    querysets: Sequence[QuerySet[Any]] | None,
    *,
    reuse_statement: bool = False,
) -> RelationQuery:
    """Many-to-many, both directions: ``ManyRelatedManager.get_prefetch_querysets()``
    (which does not evaluate), with the parents filtered on their key values, as one
    ``= ANY`` array."""
    queryset = manager_queryset(manager, instances, querysets)
    fk = manager.through._meta.get_field(manager.source_field_name)
    path, targets = manager.query_field_name, fk.foreign_related_fields

    def select_join_column(queryset: Any) -> Any:
        """The join table's column naming each row's parent, selected as Django does."""
        quote = connections[queryset.db].ops.quote_name
        join_table = quote(fk.model._meta.db_table)
        return queryset.extra(
            select={
                f"_prefetch_related_val_{f.attname}": f"{join_table}.{quote(f.column)}"
                for f in fk.local_related_fields
            }
        )

    key, statement = (
        kept_statement(
            "many_to_many",
            fk,
            manager,
            querysets,
            queryset,
            path,
            targets,
            instances,
            finish=select_join_column,
        )
        if reuse_statement
        else (None, None)
    )
    if statement is None:
        queryset = select_join_column(filter_by_parents(queryset, path, targets, instances))
    connection = connections[queryset.db]

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
        statement_key=key,
        statement=statement,
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
    parent_key = scalar_key(parent_model, [target], instance_attr, ints_only=True)
    if parent_key is None:
        return keys
    related_name = f"_prefetch_related_val_{local.attname}"
    return ValueKey(rel_qs.model, related_name, rel_obj_attr, ints_only=True), parent_key


def derive_cached_querysets(
    descriptor: Any, manager: Any, template: QuerySet[Any], parent_class: type[Model]
) -> QuerysetsFactory | None:
    """Many-to-many: ``ManyRelatedManager._apply_rel_filters`` with the parent swapped.
    A null key (Django's manager raises) takes Django's path."""
    if template.__dict__.get("_known_related_objects") != {}:
        return None
    related_fields = manager.source_field.related_fields
    parts = ParentParts(
        tuple(rh_field.attname for _, rh_field in related_fields),
        tuple(
            (f"{manager.query_field_name}__{rh_field.name}", index)
            for index, (_, rh_field) in enumerate(related_fields)
        ),
    )
    return queryset_factory(template, parent_class, parts)
