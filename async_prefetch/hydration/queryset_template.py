"""Per-parent querysets made from a template, by generated code.

A relation kind's cached-queryset deriver (``relations``) says which parts of a related
manager's queryset depend on the parent (:class:`ParentParts`); :func:`queryset_factory`
makes the function that builds such a queryset for each of a level's parents from the
first parent's, with everything else shared or fresh as in the template.
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import CodeType
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.sql import Query

from .. import _compat
from .unfiltered_query import UnfilteredQuery

_ATOMIC = (bool, int, str, type(None))

Scalars = tuple[tuple[str, type, Any], ...]
"""``(name, type, value)`` of scalar values (the type kept: ``1 == True``)."""
QueryShape = tuple[type[Model], bool, Scalars]
"""An unfiltered manager query: ``(model, alias_cols, extra scalar attributes)``."""

Fallback = Callable[[Model, Any], Any]
"""``fallback(parent, result_cache)``: that parent's queryset made another way."""
QuerysetsFactory = Callable[[list[Model], list[Any], Fallback], list[Any]]
"""``make(parents, result_caches, fallback)``: one prefetched queryset per parent."""


@dataclass(frozen=True)
class ParentParts:
    """What a related manager's queryset takes from its parent, besides the parent itself
    (routing hint, fetch mode).

    ``reads``: the parent's attribute names read, in order (a ``None`` value sends the
    parent to the fallback); ``filters``: the deferred filter's keyword arguments, each
    the index of its value in ``reads`` or ``-1`` for the parent; ``known_field``: with a
    field, the known related objects ``{known_field: {reads[0]: parent}}``, else ``{}``.
    """

    reads: tuple[str, ...]
    filters: tuple[tuple[str, int], ...]
    known_field: Any = None


def queryset_factory(
    template: QuerySet[Any], parent_class: type[Model], parts: ParentParts
) -> QuerysetsFactory | None:
    """A function making, for each of a list of parents and its result cache, a
    prefetched queryset (``_result_cache`` set, ``_prefetch_done``) holding
    ``template``'s state with the parent-dependent parts replaced: routing hint,
    deferred filter, known related objects, a fresh unfiltered query, fresh empty
    containers and (Django 6.1) the parent's fetch mode. A parent that is not exactly a
    ``parent_class`` or has a ``None`` among ``parts.reads`` gets ``fallback(parent,
    result_cache)`` instead, in its turn. ``None`` when the template holds state this
    cannot reproduce.

    The function is generated for the template, one assignment per attribute in the
    template's order (as ``dataclasses`` generates ``__init__``), inside one loop over
    the parents: a loop of ``setattr`` calls, or a call per parent, costs about twice as
    much. Only attribute names go into the source, and a name that cannot be assigned
    there also gives ``None``; values stay in the function's namespace. Attributes are
    assigned one by one, as ``QuerySet.__init__`` assigns them: assigning ``__dict__``
    would materialise a dict object that CPython's compact attribute storage otherwise
    avoids.

    The function depends only on the template's :func:`shape` (its class, attribute
    names in order, scalar values with their types, the query's) and not on the
    template object: when the query is an unfiltered manager query, one function is
    made per shape and returned again for every template of that shape (the same
    object: callers may key what they learn about it on it). Other queries are cloned
    from the template's, and such a function is made each time, as for a template
    holding a scalar that does not hash.
    """
    found = shape(template, parent_class, parts)
    if found is None:
        return None
    if found.query is None:
        # The query as held (``template.query`` would apply the deferred filter).
        return _generate(found, template.__dict__["_query"].clone)
    try:
        hash(found)
    except TypeError:  # a scalar of a class that does not hash: made for this call only
        return _generate(found, None)
    return _generate_for_shape(found)


@dataclass(frozen=True)
class Shape:
    """Everything the function :func:`queryset_factory` makes depends on, hashable.

    ``attributes``: per template attribute, in order, ``(name, how, type, value)``:
    ``how`` is ``"parent"`` (the parent's part), ``"shared"`` (an immutable value every
    parent shares; with its type, as ``1 == True``) or ``"fresh"`` (an empty container
    of that type). ``hints``: ``None`` when the routing hints are ``{"instance": ...}``
    alone, else every hint in order as ``(key, type, value)``, the instance's value
    ``None``. ``query``: ``(model, alias_cols, extra)`` of an unfiltered manager query,
    ``extra`` its scalar attributes beyond ``Query(model)``'s, or ``None`` for a query
    cloned per parent.
    """

    template_class: type
    parent_class: type[Model]
    parts: ParentParts
    hints: Scalars | None
    negate: bool
    attributes: tuple[tuple[str, str, type, Any], ...]
    query: QueryShape | None
    fetch_modes: bool


def shape(template: QuerySet[Any], parent_class: type[Model], parts: ParentParts) -> Shape | None:
    """``template``'s :class:`Shape`, or ``None`` when it holds state
    :func:`queryset_factory` cannot reproduce."""
    base = template.__dict__
    hints = base.get("_hints")
    deferred = base.get("_deferred_filter")
    if (
        not isinstance(hints, dict)
        or not isinstance(deferred, tuple)
        or deferred[1]
        or base.get("_result_cache", ()) is not None
        or base.get("_prefetch_done", ()) is not False
        or not all(map(assignable, parts.reads))
    ):
        return None
    # The parent's own hint is replaced; its place in the dict is kept.
    all_hints = _scalars((key, None if key == "instance" else v) for key, v in hints.items())
    if all_hints is None:
        return None
    per_parent = _PER_PARENT if _compat.HAS_FETCH_MODES else _PER_PARENT - {"_fetch_mode"}
    attributes: list[tuple[str, str, type, Any]] = []
    for key, value in base.items():
        if not assignable(key):
            return None
        if key in per_parent:
            attributes.append((key, "parent", type(None), None))
        elif isinstance(value, (*_ATOMIC, type)) or (isinstance(value, tuple) and not value):
            attributes.append((key, "shared", type(value), value))
        elif isinstance(value, (dict, list, set)) and not value:
            attributes.append((key, "fresh", type(value), None))
        else:
            return None  # state shared by every parent that is not known to be immutable
    return Shape(
        type(template),
        parent_class,
        parts,
        all_hints if list(hints) != ["instance"] else None,
        deferred[0],
        tuple(attributes),
        _unfiltered_query(base["_query"]),
        _compat.HAS_FETCH_MODES,
    )


_PER_PARENT = frozenset(
    {
        "_hints",
        "_query",
        "_deferred_filter",
        "_known_related_objects",
        "_result_cache",
        "_prefetch_done",
        "_fetch_mode",
    }
)


def _scalars(items: Iterable[tuple[str, Any]]) -> Scalars | None:
    """``items`` as ``(key, type, value)``, or ``None`` unless every value is a scalar."""
    found = tuple((key, type(value), value) for key, value in items)
    if not all(isinstance(value, _ATOMIC) for _, _, value in found):
        return None
    return found


def _unfiltered_query(query: Any) -> QueryShape | None:
    """``(model, alias_cols, extra)`` when ``query`` equals ``Query(model, alias_cols)``
    plus ``extra``, scalar attributes that can be assigned (the default manager's query);
    else ``None``."""
    model = query.model
    plain = vars(Query(model, alias_cols=query.alias_cols))
    own = vars(query)
    if not (own.keys() >= plain.keys() and all(own[key] == value for key, value in plain.items())):
        return None
    extra = _scalars((key, value) for key, value in own.items() if key not in plain)
    if extra is None or not all(assignable(key) for key, _, _ in extra):
        return None
    return model, query.alias_cols, extra


@functools.lru_cache(maxsize=256)
def _generate_for_shape(found: Shape) -> QuerysetsFactory:
    return _generate(found, None)


def _generate(found: Shape, clone_query: Callable[[], Query] | None) -> QuerysetsFactory:
    """The function for ``found``: one loop over the parents, a line per attribute;
    ``clone_query`` makes each parent's query unless ``found.query`` says how."""
    parts = found.parts
    namespace: dict[str, Any] = {
        "_new": object.__new__,
        "_class": found.template_class,
        "_parent_class": found.parent_class,
        "_hints": {key: value for key, _, value in found.hints or ()},
        "_negate": found.negate,
        "_known_field": parts.known_field,
    }
    filters = []
    for index, (key, read) in enumerate(parts.filters):
        namespace[f"_filter_{index}"] = key
        filters.append(f"_filter_{index}: {'parent' if read < 0 else f'value_{read}'}")
    known = "{_known_field: {value_0: parent}}" if parts.known_field is not None else "{}"
    # What each attribute gets: the parent's part, a fresh container or the shared value.
    per_parent = {
        "_hints": "{'instance': parent}"
        if found.hints is None
        else "{**_hints, 'instance': parent}",
        "_query": "query",
        "_deferred_filter": f"(_negate, (), {{{', '.join(filters)}}})",
        "_known_related_objects": known,
        "_result_cache": "result",
        "_prefetch_done": "True",
    }
    if found.fetch_modes:
        per_parent["_fetch_mode"] = "parent._state.fetch_mode"
    if found.query is None:
        assert clone_query is not None
        namespace["_clone_query"] = clone_query
        query_lines = ["query = _clone_query()"]
    else:
        query_lines = _query_lines(found.query, namespace)
    lines = []
    for index, (key, how, kind, value) in enumerate(found.attributes):
        if how == "parent":
            expression = per_parent[key]
        elif how == "fresh":
            namespace[f"_fresh_{index}"] = kind
            expression = f"_fresh_{index}()"
        else:
            namespace[f"_shared_{index}"] = value
            expression = f"_shared_{index}"
        lines.append(f"queryset.{key} = {expression}")
    reads = []
    for index, attname in enumerate(parts.reads):
        reads += [
            f"value_{index} = parent.{attname}",
            f"if value_{index} is None:",
            "    append(fallback(parent, result))",
            "    continue",
        ]
    body = [*reads, *query_lines, "queryset = _new(_class)", *lines, "append(queryset)"]
    source = (
        "def new_querysets(parents, results, fallback):\n"
        "    made = []\n"
        "    append = made.append\n"
        "    for parent, result in zip(parents, results, strict=True):\n"
        "        if type(parent) is not _parent_class:\n"
        "            append(fallback(parent, result))\n"
        "            continue\n"
        + "".join(f"        {line}\n" for line in body)
        + "    return made\n"
    )
    exec(compiled_source(source), namespace)  # identifiers and names bound in namespace only
    new_querysets: QuerysetsFactory = namespace["new_querysets"]
    return new_querysets


def assignable(name: str) -> bool:
    """Whether ``queryset.<name> = ...`` is valid source that assigns ``name`` itself
    (not a keyword, no NFKC-normalised non-ASCII identifier)."""
    return (
        name.isascii()
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and name != "__debug__"
    )


@functools.lru_cache(maxsize=128)
def compiled_source(source: str, filename: str = "<async_prefetch.cached_querysets>") -> CodeType:
    """``source`` compiled once: a level's template usually has the shape of the last."""
    return compile(source, filename, "exec")


def _query_lines(query: QueryShape, namespace: dict[str, Any]) -> list[str]:
    """Source lines making ``query``, an :class:`UnfilteredQuery` (no containers until
    used) holding the model, ``alias_cols`` and the extra attributes, assigned as its
    ``__init__`` and then :meth:`UnfilteredQuery.materialise` would; the values they use
    put in ``namespace``."""
    model, alias_cols, extra = query
    namespace["_unfiltered"] = UnfilteredQuery
    namespace["_query_model"] = model
    namespace["_alias_cols"] = alias_cols
    lines = [
        "query = _new(_unfiltered)",
        "query.model = _query_model",
        "query.alias_cols = _alias_cols",
    ]
    for index, (key, _, value) in enumerate(extra):
        namespace[f"_query_{index}"] = value
        lines.append(f"query.{key} = _query_{index}")
    return lines
