"""``= ANY(%s)``: one array parameter instead of ``IN (%s, %s, ...)`` on PostgreSQL.

psycopg's client-side binding renders an ``IN`` list parameter by parameter (54 ms for
20,000 ids on the development machine, 16 ms as one array) and the server sees a new
statement shape for every list length; one array keeps the shape constant. The engine's
builders let Django add its own ``__in`` filter and then swap that condition for
:class:`AnyOf` (:func:`any_instead_of_in`); the forward foreign key builder, where Django
uses a one-column tuple ``IN``, builds an ``AnyOf`` itself. No lookup is registered on
Django's fields. On other backends, and for subqueries or expressions, ``AnyOf`` renders
exactly as ``IN``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db.models.expressions import ColPairs
from django.db.models.fields import AutoFieldMixin, Field, IntegerField
from django.db.models.fields.related_lookups import RelatedIn
from django.db.models.lookups import In
from django.db.models.sql.where import AND
from django.utils.datastructures import OrderedSet


class AnyOf(In):
    """``field = ANY(%s)`` with the distinct non-null values as one list parameter.

    PostgreSQL plans Django's ``IN`` list as ``= ANY`` of an array of the column's type
    (``IN (1, 2)`` on an integer column is ``= ANY('{1,2}'::integer[])``), and a list of one
    value as ``= value``. So the statement is planned as Django's is, with the rows of an
    unordered queryset in the same order: one value keeps Django's ``IN``, and an array of
    integers, which psycopg types by magnitude (``int2[]`` for small ones), is cast to the
    column's integer type when every value fits it.
    """

    def process_rhs(self, compiler: Any, connection: Any) -> tuple[str, Any]:
        array = array_parameter(self, self.rhs, connection)
        if array is None:
            return super().process_rhs(compiler, connection)
        params, cast = array
        return _ArraySQL(f"(%s{cast})"), [params]

    def get_rhs_op(self, connection: Any, rhs: str) -> str:
        if isinstance(rhs, _ArraySQL):
            return f"= ANY{rhs}"
        return super().get_rhs_op(connection, rhs)


def array_parameter(lookup: In, rhs: Any, connection: Any) -> tuple[list[Any], str] | None:
    """The one array parameter :class:`AnyOf` sends for ``rhs`` (its prepared values) and
    the SQL cast after it (``::integer[]`` or nothing); ``None`` where Django's ``IN``
    list is rendered instead (another backend, one distinct value, an expression).
    Raises ``EmptyResultSet`` when no value is left once ``None`` is dropped, as
    Django's ``IN`` does."""
    bound = condition_parameters(lookup, rhs, connection)
    if bound is None or bound[1] == ONE_KEY:
        return None
    (array,), cast = bound
    return array, cast


#: :func:`condition_parameters`' form of one distinct key: Django's ``IN (%s)``.
ONE_KEY = "IN (%s)"


def condition_parameters(
    lookup: In, rhs: Any, connection: Any
) -> tuple[tuple[Any, ...], str] | None:
    """The parameters :class:`AnyOf` sends for ``rhs`` (its prepared values) and the form
    of its SQL: the array and its cast (:func:`array_parameter`), or, for one distinct
    value besides ``None``, that value as the field prepares it for the database and
    :data:`ONE_KEY` (Django's ``IN (%s)``); ``None`` where Django renders the condition
    (another backend, an expression). Raises ``EmptyResultSet`` as Django's ``IN``."""
    values = _distinct_values(lookup, rhs, connection)
    if values is None:
        return None
    params = _db_values(lookup, values, connection)
    if params is None:
        return None
    if len(params) == 1:
        return tuple(params), ONE_KEY
    return (params,), _integer_array_cast(lookup.lhs.output_field, params, connection)


def _distinct_values(lookup: In, rhs: Any, connection: Any) -> OrderedSet[Any] | None:
    """``rhs``'s distinct values without ``None``, as ``In.process_rhs()`` takes them;
    ``None`` where :class:`AnyOf` leaves the rendering to Django (another backend, an
    expression, a transform on the values)."""
    if connection.vendor != "postgresql" or not lookup.rhs_is_direct_value():
        return None
    try:
        values = OrderedSet(rhs)
    except TypeError:  # unhashable values: Django's IN list
        return None
    values.discard(None)
    if not values:
        raise EmptyResultSet
    if lookup.bilateral_transforms or not _plain(values):
        return None
    return values


def _db_values(lookup: In, values: Iterable[Any], connection: Any) -> list[Any] | None:
    """``values`` prepared for the database as ``FieldGetDbPrepValueMixin.
    get_db_prep_lookup()`` prepares them, without the per-value expression plumbing of
    ``batch_process_rhs()`` (none of them is one); ``None`` when the field returned
    something Django would compile as an expression."""
    output_field = lookup.lhs.output_field
    field = getattr(output_field, "target_field", None)
    prepare = getattr(field, "get_db_prep_value", None) or output_field.get_db_prep_value
    if getattr(prepare, "__func__", None) in _PREPARED_AS_IS:
        return list(values)
    params = [prepare(value, connection, prepared=True) for value in values]
    return params if _plain(params) else None


class _ArraySQL(str):
    """``AnyOf.process_rhs()``'s SQL for the one array parameter (``get_rhs_op()`` makes it
    ``= ANY``), told apart from Django's ``IN`` list of one value, also ``(%s)``."""

    __slots__ = ()


# PostgreSQL's integer column types and the values each holds.
_INTEGER_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}


def _integer_array_cast(field: Any, params: list[Any], connection: Any) -> str:
    """``::integer[]`` (the column's integer type) for an array of ``int`` that fits it, as
    PostgreSQL types Django's ``IN`` list; otherwise nothing."""
    db_type = field.db_type(connection)
    bounds = _INTEGER_RANGES.get(db_type)
    if bounds is None or not all(type(param) is int for param in params):
        return ""
    low, high = bounds
    if not low <= min(params) <= max(params) <= high:
        return ""  # Django's IN compares such a key without error (and matches nothing)
    return f"::{db_type}[]"


def _plain(values: Iterable[Any], *, sequences: bool = True) -> bool:
    """True when no value can be an expression to Django (which asks each value
    ``hasattr(value, "resolve_expression")`` or ``"as_sql"``), decided once per type:
    instances without a ``__dict__`` or a ``__getattr__`` have only their class's
    attributes. With ``sequences=False``, lists and tuples are not plain either."""
    return not any(
        kind.__dictoffset__
        or hasattr(kind, "__getattr__")
        or hasattr(kind, "resolve_expression")
        or hasattr(kind, "as_sql")
        or (not sequences and issubclass(kind, (list, tuple)))
        for kind in set(map(type, values))
    )


def plain_values(values: list[Any]) -> bool:
    """True when no value is an expression or a sequence: a query's ``__in`` filter
    then prepares each value on its own (``resolve_lookup_value`` and
    ``get_prep_lookup`` leave no value depending on another)."""
    return _plain(values, sequences=False)


def any_instead_of_in(query: Any, values: list[Any] | None = None) -> bool:
    """Turn the ``IN`` list a builder just added to ``query`` (its last condition) into ``AnyOf``.

    Only a plain single-column ``IN`` of direct values at the top level of an ``AND``
    where clause is changed; anything else (subqueries, multi-column relations, the
    window filter of sliced querysets, a field's own ``in`` lookup) is left as Django
    built it. With ``values`` (:func:`plain_values`), the condition's values are
    replaced by ``values`` prepared as its lookup prepares its own: the builder added
    it for one of them, which is as exact and avoids Django's per-value plumbing.
    Returns whether the condition was changed.
    """
    where = query.where
    if where.connector != AND or where.negated or not where.children:
        return False
    last = where.children[-1]
    if type(last) not in (In, RelatedIn) or isinstance(last.lhs, ColPairs):
        return False
    if not last.rhs_is_direct_value():
        return False
    # Django prepared the values already, as In (AnyOf's base) would: take the
    # lookup's state as it is rather than preparing every value a second time.
    any_of = object.__new__(AnyOf)
    any_of.__dict__.update(vars(last))
    if values is not None:
        if type(last) is not In or not isinstance(last.rhs, list) or len(last.rhs) != 1:
            return False
        any_of.rhs = prepared(any_of, values)
    where.children[-1] = any_of
    return True


def prepared(lookup: In, values: list[Any]) -> list[Any]:
    """What ``lookup.get_prep_lookup()`` returns for plain ``values`` (no expressions)."""
    output_field = getattr(lookup.lhs, "output_field", None)
    prepare = getattr(output_field, "get_prep_value", None)
    if not lookup.prepare_rhs or prepare is None:
        return list(values)
    if getattr(prepare, "__func__", None) is IntegerField.get_prep_value and all(
        type(value) is int for value in values
    ):
        return list(values)  # int(value) for an int
    return [prepare(value) for value in values]


_PREPARED_AS_IS = frozenset({Field.get_db_prep_value, AutoFieldMixin.get_db_prep_value})
"""``get_db_prep_value`` implementations that return a prepared value unchanged."""
