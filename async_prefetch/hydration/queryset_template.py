"""Per-parent querysets made from a template, by generated code.

A relation kind's cached-queryset deriver (``relations``) says which parts of a related
manager's queryset depend on the parent (:class:`ParentParts`); :func:`queryset_factory`
makes the function that builds such a queryset for each of a level's parents from the
first parent's, with everything else shared or fresh as in the template.
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.sql import Query

from .. import _compat
from .unfiltered_query import UnfilteredQuery

_ATOMIC = (bool, int, str, type(None))

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
    much. The code is compiled once per template shape. Only attribute names go into the
    source, and a name that cannot be assigned there also gives ``None``; values stay in
    the function's namespace. Attributes are assigned one by one, as
    ``QuerySet.__init__`` assigns them: assigning ``__dict__`` would materialise a dict
    object that CPython's compact attribute storage otherwise avoids.
    """
    base = dict(template.__dict__)
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
    namespace: dict[str, Any] = {
        "_new": object.__new__,
        "_class": type(template),
        "_parent_class": parent_class,
        "_hints": hints,
        "_negate": deferred[0],
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
        if list(hints) == ["instance"]
        else "{**_hints, 'instance': parent}",
        "_query": "query",
        "_deferred_filter": f"(_negate, (), {{{', '.join(filters)}}})",
        "_known_related_objects": known,
        "_result_cache": "result",
        "_prefetch_done": "True",
    }
    query_lines = _unfiltered_query_lines(base["_query"], namespace)
    if query_lines is None:  # a clone of the template's query per parent
        namespace["_clone_query"] = base["_query"].clone
        query_lines = ["query = _clone_query()"]
    if _compat.HAS_FETCH_MODES:
        per_parent["_fetch_mode"] = "parent._state.fetch_mode"
    lines = []
    for index, (key, value) in enumerate(base.items()):
        if not assignable(key):
            return None
        if key in per_parent:
            expression = per_parent[key]
        elif isinstance(value, (*_ATOMIC, type)) or (isinstance(value, tuple) and not value):
            namespace[f"_shared_{index}"] = value  # immutable: shared by every parent
            expression = f"_shared_{index}"
        elif isinstance(value, (dict, list, set)) and not value:
            namespace[f"_fresh_{index}"] = type(value)
            expression = f"_fresh_{index}()"
        else:
            return None  # state shared by every parent that is not known to be immutable
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


def _unfiltered_query_lines(template: Any, namespace: dict[str, Any]) -> list[str] | None:
    """Source lines making ``query``, a query equal to ``template`` (an unfiltered manager
    query), with the values they use put in ``namespace``; ``None`` when that is not exact.

    The query is an :class:`UnfilteredQuery` (no containers until used) holding the model,
    ``alias_cols`` and ``template``'s other attributes, assigned as its ``__init__`` and
    then :meth:`UnfilteredQuery.materialise` would: possible when ``Query(model)`` plus
    those equals ``template`` (the default manager) and they are scalars.
    """
    model = template.model
    plain = vars(Query(model, alias_cols=template.alias_cols))
    own = vars(template)
    if not (own.keys() >= plain.keys() and all(own[key] == value for key, value in plain.items())):
        return None
    extra = [(key, value) for key, value in own.items() if key not in plain]
    if not all(isinstance(value, _ATOMIC) and assignable(key) for key, value in extra):
        return None
    namespace["_unfiltered"] = UnfilteredQuery
    namespace["_query_model"] = model
    namespace["_alias_cols"] = template.alias_cols
    lines = [
        "query = _new(_unfiltered)",
        "query.model = _query_model",
        "query.alias_cols = _alias_cols",
    ]
    for index, (key, value) in enumerate(extra):
        namespace[f"_query_{index}"] = value
        lines.append(f"query.{key} = _query_{index}")
    return lines
