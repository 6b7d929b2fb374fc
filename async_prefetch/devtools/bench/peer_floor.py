"""The peers bench's ``floor`` side: the cheapest path to the state Django's
``prefetch_related`` leaves on a fan-out (a root and reverse foreign keys), on the same rows.

:func:`fanout_floor` prepares, outside the timed region, what does not depend on the rows:
each query's SQL (Django's own compiled ``SELECT`` of the root and of each child model's
default manager, the child's filter written as ``"fk" = ANY(%s)``) and one generated
function per model and per relation (straight-line assignments inside one loop, the way
the engine's hydration generates them). :meth:`FanoutFloor.run`, the timed part, runs on
the engine's loop thread and pool (``bridge.run_async``), as the engine does:

1. the root query on one pooled connection; each parent built from its row;
2. every relation's query at once, each on its own pooled connection (``asyncio.gather``),
   the parents' keys sent as one array parameter (server-side binding: psycopg dumps the
   array in C, where Django's client-side binding quotes it in Python);
3. as each relation's rows arrive: each child built from its row, its ``parent`` cached
   in its fields cache, grouped per parent, and per parent a queryset of the related
   manager's class put into ``_prefetched_objects_cache`` with its result cache set.

What it builds is what Django code observes after ``prefetch_related`` (checked against
Django's objects by :func:`check_same_state` on the bench's warm-up run):

* a parent: ``Model.from_db``'s instance (``_state`` with ``adding=False`` and ``db``,
  the loaded fields, in field order) and ``_prefetched_objects_cache``;
* a child: the same, its ``_state.fields_cache`` holding the parent (Django's reverse
  link), its fields in its ``__dict__`` (where the foreign key's descriptor keeps them);
* per parent and relation: an instance of the related manager's queryset class holding
  the template's state (``getattr(parent, name).get_queryset()``) with the parent's parts
  (routing hint, deferred relation filter, known related object), ``_result_cache`` the
  parent's children and ``_prefetch_done`` set; its query an
  :class:`~async_prefetch.hydration.unfiltered_query.UnfilteredQuery` (the engine's
  ``Query(model)`` that makes its containers on first use: reading ``qs.query`` applies the
  deferred filter to it, as to Django's). Nothing is shared between querysets but
  immutable values.

No planning, no journal, no fetch modes, no checks per call: a lower bound for any engine
that leaves Django's state, not an equivalent of ``aprefetch``. Fan-outs only (the
``chain`` workload's many-to-many has no floor here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import Model, QuerySet
from django.db.models.base import ModelState
from django.db.models.fields.related_descriptors import (
    ForeignKeyDeferredAttribute,
    ReverseManyToOneDescriptor,
)
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init
from django.db.models.sql import Query

from async_prefetch._compat import HAS_FETCH_MODES
from async_prefetch.hydration.unfiltered_query import UnfilteredQuery

Rows = list[tuple[Any, ...]]


class FloorUnavailableError(RuntimeError):
    """The workload is not a plain fan-out the floor can build exactly."""


@dataclass(frozen=True)
class FloorRelation:
    """One reverse foreign key: its query and the function that fills the parents' caches
    from its rows (``fill(rows, parents, parents_by_key)``)."""

    name: str
    sql: str
    fill: Callable[[Rows, list[Model], dict[Any, Model]], None]


@dataclass(frozen=True)
class FanoutFloor:
    """What :func:`fanout_floor` prepared for one workload on one alias."""

    alias: str
    root_sql: str
    root_params: tuple[Any, ...]
    build_parents: Callable[[Rows], tuple[list[Model], dict[Any, Model]]]
    relations: tuple[FloorRelation, ...]

    async def run(self) -> list[Model]:
        """Fetch and build (see the module docstring); on the engine's loop thread."""
        import psycopg

        from async_prefetch.execution.pools import get_pool

        pool = await get_pool(self.alias)
        async with pool.connection() as conn:
            cursor = psycopg.AsyncCursor(conn)
            await cursor.execute(self.root_sql, self.root_params)
            rows: Rows = await cursor.fetchall()
        parents, by_key = self.build_parents(rows)
        del rows
        keys = [list(by_key)]

        async def relation(relation: FloorRelation) -> None:
            async with pool.connection() as conn:
                cursor = psycopg.AsyncCursor(conn)
                await cursor.execute(relation.sql, keys)
                rows: Rows = await cursor.fetchall()
            relation.fill(rows, parents, by_key)

        await asyncio.gather(*(relation(r) for r in self.relations))
        return parents


def fanout_floor(root: QuerySet[Any], names: Sequence[str], alias: str) -> FanoutFloor:
    """The floor of ``prefetch_related(*names)`` on ``root`` (every name a reverse foreign
    key of the root's model), on ``alias``. Reads one parent (to take Django's related
    manager queryset as the template). Raises :class:`FloorUnavailableError` for what it
    cannot build exactly."""
    root = root.using(alias)
    parent_model = root.model
    root_sql, root_params, parent_fields = _compiled(root, alias)
    first = root.first()
    if first is None:
        raise FloorUnavailableError("no parents")
    parent_pk = parent_model._meta.pk
    assert parent_pk is not None
    relations = []
    for name in names:
        descriptor = getattr(parent_model, name, None)
        if type(descriptor) is not ReverseManyToOneDescriptor:
            raise FloorUnavailableError(f"{name}: not a reverse foreign key")
        field = descriptor.field
        if field.target_field is not parent_pk or len(field.foreign_related_fields) != 1:
            raise FloorUnavailableError(f"{name}: not a foreign key to the primary key")
        child_model = field.model
        children = child_model._default_manager.db_manager(alias).all()
        child_sql, params, child_fields = _compiled(children, alias)
        head, order_by = child_sql.split(" ORDER BY ")
        if params or " WHERE " in head:
            raise FloorUnavailableError(f"{name}: the default manager filters")
        quote = connections[alias].ops.quote_name
        column = f"{quote(child_model._meta.db_table)}.{quote(field.column)}"
        sql = f"{head} WHERE {column} = ANY(%s) ORDER BY {order_by}"
        template = getattr(first, name).get_queryset()
        fill = _relation_filler(
            child_model, child_fields, alias, field, name, template, first, parent_pk.attname
        )
        relations.append(FloorRelation(name, sql, fill))
    return FanoutFloor(
        alias,
        root_sql,
        tuple(root_params),
        _parents_builder(parent_model, parent_fields, alias, parent_pk.attname, names),
        tuple(relations),
    )


def _compiled(queryset: QuerySet[Any], alias: str) -> tuple[str, tuple[Any, ...], list[str]]:
    """``queryset``'s SQL and parameters and the attnames of its columns, which must be
    exactly its model's concrete fields with no converter."""
    compiler = queryset.query.get_compiler(alias)
    sql, params = compiler.as_sql()
    assert compiler.klass_info is not None
    fields = [column.target.attname for column, _, _ in compiler.select]
    concrete = [f.attname for f in queryset.model._meta.concrete_fields]
    if fields != concrete or compiler.get_converters([c for c, _, _ in compiler.select]):
        raise FloorUnavailableError(f"{queryset.model.__name__}: not a plain model query")
    return sql, tuple(params), fields


def _instance_lines(
    model: type[Model], fields: list[str], namespace: dict[str, Any], link: str | None = None
) -> list[str]:
    """Lines building ``obj`` from ``row`` as ``Model.from_db`` does (``Model.__init__``
    skipped: the model must not override it nor have signal receivers, which the bench's
    models do not), ``state`` its state; with ``link``, its fields cache holds ``parent``
    under that name. A model with a foreign key gets its fields cache first, as Django's
    (``Model.__init__`` sets the key through a descriptor that reads the cache)."""
    descriptors = {type(model.__dict__.get(name)) for name in fields}
    if (
        model.__init__ is not Model.__init__
        or model.from_db.__func__ is not Model.from_db.__func__  # type: ignore[attr-defined]
        or pre_init.has_listeners(model)
        or post_init.has_listeners(model)
        or not descriptors <= {DeferredAttribute, ForeignKeyDeferredAttribute}
    ):
        raise FloorUnavailableError(f"{model.__name__}: not a plain model")
    lines = ["obj = _new(_model)", "state = _State()"]
    if link is not None:
        lines.append("state.fields_cache = {_link: parent}")
    elif descriptors != {DeferredAttribute}:
        lines.append("state.fields_cache = {}")
    lines += ["state.adding = False", "state.db = _db"]
    if HAS_FETCH_MODES:  # Django 6.1: from_db() sets the queryset's mode (the bench's: FETCH_ONE)
        from django.db.models.fetch_modes import FETCH_ONE  # type: ignore[import-not-found,unused-ignore]

        namespace["_fetch_mode"] = FETCH_ONE
        lines.append("state.fetch_mode = _fetch_mode")
    if descriptors == {DeferredAttribute}:  # plain attributes: CPython's compact storage
        targets = ", ".join(f"obj.{name}" for name in fields)
        return [*lines, "obj._state = state", f"{targets}, = row"]
    # A foreign key's descriptor keeps its value in __dict__ (as Model.__init__ does).
    for index, name in enumerate(fields):
        namespace[f"_name_{index}"] = name
    targets = ", ".join(f"attrs[_name_{index}]" for index in range(len(fields)))
    return [*lines, "attrs = obj.__dict__", "attrs['_state'] = state", f"{targets}, = row"]


def _generated(source: str, namespace: dict[str, Any], name: str) -> Any:
    exec(compile(source, f"<peer_floor.{name}>", "exec"), namespace)
    return namespace[name]


def _parents_builder(
    model: type[Model], fields: list[str], alias: str, pk: str, names: Sequence[str]
) -> Callable[[Rows], tuple[list[Model], dict[Any, Model]]]:
    """The generated ``build_parents(rows)``: the parents and the parents by key. Each
    parent's prefetch cache starts with its relations' keys in lookup order (Django's
    order; the relations arrive in any order), each replaced by its queryset."""
    namespace: dict[str, Any] = {
        "_cache": dict.fromkeys(names).copy,
        "_new": object.__new__,
        "_model": model,
        "_State": ModelState,
        "_db": alias,
    }
    lines = [
        *_instance_lines(model, fields, namespace),
        "obj._prefetched_objects_cache = _cache()",
        "append(obj)",
        f"by_key[obj.{pk}] = obj",
    ]
    source = (
        "def build_parents(rows):\n"
        "    made = []\n"
        "    append = made.append\n"
        "    by_key = {}\n"
        "    for row in rows:\n"
        + "".join(f"        {line}\n" for line in lines)
        + "    return made, by_key\n"
    )
    return _generated(source, namespace, "build_parents")  # type: ignore[no-any-return]


_ATOMIC = (bool, int, str, type(None), type)


def _relation_filler(
    model: type[Model],
    fields: list[str],
    alias: str,
    field: Any,
    name: str,
    template: QuerySet[Any],
    parent: Model,
    parent_pk: str,
) -> Callable[[Rows, list[Model], dict[Any, Model]], None]:
    """The generated ``fill(rows, parents, by_key)`` of one relation; ``template`` is
    ``getattr(parent, name).get_queryset()`` (Django's, unevaluated)."""
    state = dict(template.__dict__)
    key = getattr(parent, parent_pk)
    expected = {
        "_hints": {"instance": parent},
        "_deferred_filter": (False, (), {field.name: parent}),
        "_known_related_objects": {field: {key: parent}},
        "_result_cache": None,
        "_prefetch_done": False,
    }
    wrong = [k for k, value in expected.items() if state.get(k, ...) != value]
    query: Any = state.get("_query")
    alias_cols = getattr(query, "alias_cols", True)
    if type(query) is not Query or _query_state(query) != _query_state(
        Query(model, alias_cols=alias_cols)
    ):
        wrong.append("_query")
    if wrong:
        raise FloorUnavailableError(f"{name}: unexpected queryset state {wrong}")
    namespace: dict[str, Any] = {
        "_new": object.__new__,
        "_model": model,
        "_State": ModelState,
        "_db": alias,
        "_link": field.name,
        "_field": field,
        "_name": name,
        "_class": type(template),
        "_unfiltered": UnfilteredQuery,
        "_alias_cols": alias_cols,
    }
    query_lines = [
        "query = _new(_unfiltered)",
        "query.model = _model",
        "query.alias_cols = _alias_cols",
    ]
    per_parent = {
        "_hints": "{'instance': parent}",
        "_query": "query",
        "_deferred_filter": "(False, (), {_link: parent})",
        "_known_related_objects": "{_field: {key: parent}}",
        "_result_cache": "result",
        "_prefetch_done": "True",
        "_fetch_mode": "parent._state.fetch_mode",  # Django 6.1
    }
    assignments = []
    for index, (attribute, value) in enumerate(state.items()):
        if attribute in per_parent:
            expression = per_parent[attribute]
        elif isinstance(value, _ATOMIC) or value == ():
            namespace[f"_shared_{index}"] = value
            expression = f"_shared_{index}"
        else:
            raise FloorUnavailableError(f"{name}: queryset attribute {attribute} = {value!r}")
        assignments.append(f"queryset.{attribute} = {expression}")
    fk_at = fields.index(field.attname)
    child = [
        f"key = row[{fk_at}]",
        "parent = by_key[key]",
        *_instance_lines(model, fields, namespace, link=field.name),
        "group = groups.get(key)",
        "if group is None:",
        "    groups[key] = [obj]",
        "else:",
        "    group.append(obj)",
    ]
    per_queryset = [
        f"key = parent.{parent_pk}",
        "result = groups.get(key)",
        "if result is None:",
        "    result = []",
        *query_lines,
        "queryset = _new(_class)",
        *assignments,
        "parent._prefetched_objects_cache[_name] = queryset",
    ]
    source = (
        "def fill(rows, parents, by_key):\n"
        "    groups = {}\n"
        "    for row in rows:\n"
        + "".join(f"        {line}\n" for line in child)
        + "    for parent in parents:\n"
        + "".join(f"        {line}\n" for line in per_queryset)
    )
    return _generated(source, namespace, "fill")  # type: ignore[no-any-return]


# -- the check (untimed) ---------------------------------------------------------------------


def check_same_state(floor: Sequence[Model], django: Sequence[Model], names: Sequence[str]) -> str:
    """Where the floor's parents first differ from Django's ``prefetch_related``'s in what
    Django code observes (``""``: nowhere): each parent's and child's attributes in order,
    their states, each child's cached parent (the floor's own parent), each cached
    queryset's type, attributes in order and values (its query compared as the SQL
    ``qs.query`` gives, which applies the deferred filter to both)."""
    if len(floor) != len(django):
        return f"{len(floor)} parents, Django {len(django)}"
    for index, (ours, theirs) in enumerate(zip(floor, django, strict=True)):
        where = f"parent #{index}"
        problem = _same_instance(ours, theirs, skip=frozenset({"_prefetched_objects_cache"}))
        if problem:
            return f"{where}: {problem}"
        ours_cache = ours._prefetched_objects_cache  # type: ignore[attr-defined]
        theirs_cache = theirs._prefetched_objects_cache  # type: ignore[attr-defined]
        if list(ours_cache) != list(theirs_cache) or list(ours_cache) != list(names):
            return f"{where}: prefetch cache keys {list(ours_cache)}, Django {list(theirs_cache)}"
        for name in names:
            problem = _same_queryset(ours_cache[name], theirs_cache[name], ours, theirs)
            if problem:
                return f"{where}.{name}: {problem}"
    return ""


def _same_instance(ours: Model, theirs: Model, skip: frozenset[str] = frozenset()) -> str:
    if type(ours) is not type(theirs):
        return f"type {type(ours).__name__}, Django {type(theirs).__name__}"
    mine = {k: v for k, v in vars(ours).items() if k != "_state" and k not in skip}
    django = {k: v for k, v in vars(theirs).items() if k != "_state" and k not in skip}
    if list(vars(ours)) != list(vars(theirs)) or mine != django:
        return f"attributes {vars(ours)!r:.300}, Django {vars(theirs)!r:.300}"
    state, django_state = dict(vars(ours._state)), dict(vars(theirs._state))
    cache, django_cache = state.pop("fields_cache", {}), django_state.pop("fields_cache", {})
    if type(ours._state) is not type(theirs._state) or list(vars(ours._state)) != list(
        vars(theirs._state)
    ):
        return f"state {vars(ours._state)!r}, Django {vars(theirs._state)!r}"
    if state != django_state or list(cache) != list(django_cache):
        return f"state {vars(ours._state)!r}, Django {vars(theirs._state)!r}"
    return ""


def _same_queryset(ours: Any, theirs: Any, parent: Model, django_parent: Model) -> str:
    if type(ours) is not type(theirs) or list(vars(ours)) != list(vars(theirs)):
        return f"queryset {type(ours).__name__} {list(vars(ours))}, Django {list(vars(theirs))}"
    for attribute, value in vars(ours).items():
        django = vars(theirs)[attribute]
        if attribute == "_result_cache":
            if len(value) != len(django):
                return f"{len(value)} children, Django {len(django)}"
            for child, django_child in zip(value, django, strict=True):
                problem = _same_instance(child, django_child)
                if problem:
                    return f"child {child.pk}: {problem}"
                for link, cached in child._state.fields_cache.items():
                    if cached is not parent or django_child._state.fields_cache[link] is not (
                        django_parent
                    ):
                        return f"child {child.pk}: {link} is not its parent"
        elif attribute == "_query":
            query = value.materialise() if isinstance(value, UnfilteredQuery) else value
            if type(query) is not type(django) or _query_state(query) != _query_state(django):
                return "the unfiltered query differs"
        elif _swap(value, parent, django_parent) != django:
            return f"{attribute} {value!r:.200}, Django {django!r:.200}"
    ours_sql = str(ours.query)  # applies the deferred filter on both
    theirs_sql = str(theirs.query)
    if ours_sql != theirs_sql:
        return f"query {ours_sql}, Django {theirs_sql}"
    return ""


def _query_state(query: Query) -> dict[str, Any]:
    """``vars(query)`` without what equals its class's default: Django 5.2's chained query
    holds ``filter_is_sticky = False`` and ``_annotation_select_cache = None`` as its own
    attributes, a fresh one (and Django 6.1's) reads them from the class: no difference to
    any reader."""
    default = object()
    return {
        key: value
        for key, value in vars(query).items()
        if not (isinstance(value, _ATOMIC) and getattr(Query, key, default) == value)
    }


def _swap(value: Any, parent: Model, django_parent: Model) -> Any:
    """``value`` with the floor's parent replaced by Django's (for comparing)."""
    if value is parent:
        return django_parent
    if isinstance(value, dict):
        return {
            _swap(k, parent, django_parent): _swap(v, parent, django_parent)
            for k, v in value.items()
        }
    if isinstance(value, tuple):
        return tuple(_swap(v, parent, django_parent) for v in value)
    return value
