"""Django's errors for bad prefetch lookups, with Django's messages, for the planner and
the scheduler to raise where Django would."""

from __future__ import annotations

from django.db.models import Model


def cannot_find(attr: str, model_name: str, prefetch_through: str) -> AttributeError:
    """Django's error for a lookup step that names no attribute."""
    return AttributeError(
        f"Cannot find '{attr}' on {model_name} object, '{prefetch_through}' is an invalid "
        "parameter to prefetch_related()"
    )


def not_prefetchable(prefetch_through: str) -> ValueError:
    """Django's error for a lookup whose last step is not a relation."""
    return ValueError(
        f"'{prefetch_through}' does not resolve to an item that supports prefetching - this "
        "is an invalid parameter to prefetch_related()."
    )


def already_seen(prefetch_to: str) -> ValueError:
    """Django's error for a ``Prefetch`` queryset given for a path already prefetched."""
    return ValueError(
        f"'{prefetch_to}' lookup was already seen with a different queryset. You may need "
        "to adjust the ordering of your lookups."
    )


def to_attr_conflict(to_attr: str, model: type[Model]) -> ValueError:
    """Django's error for a ``to_attr`` that names a model field."""
    return ValueError(f"to_attr={to_attr} conflicts with a field on the {model.__name__} model.")
