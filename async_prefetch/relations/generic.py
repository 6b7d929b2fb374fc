"""Generic relations (``django.contrib.contenttypes``): ``GenericRelation`` and
``GenericForeignKey``. Both are delegated to Django's own builder (a generic foreign key
runs one query per content type there); imported only by the registry, once
``contenttypes.fields`` has been imported by the project."""

from __future__ import annotations

from typing import Any

from django.contrib.contenttypes.fields import (
    GenericForeignKey,
    ReverseGenericManyToOneDescriptor,
)

from . import RelationKind

KINDS: dict[type[Any], RelationKind] = {
    ReverseGenericManyToOneDescriptor: RelationKind(
        "generic relation", None, lambda d: d.field.related_model
    ),
    GenericForeignKey: RelationKind("generic foreign key", None, lambda d: None),
}
