"""Per-parent querysets made from a template, by generated code.

A relation kind's cached-queryset deriver (``relations``) knows which parts of a related
manager's queryset depend on the parent; :func:`queryset_factory` makes the function that
builds such a queryset for each parent from the first parent's, with everything else
shared or fresh as in the template.
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Callable
from types import CodeType
from typing import Any

from django.db.models import Model, QuerySet
from django.db.models.sql import Query

from .. import _compat
from .unfiltered_query import UnfilteredQuery

_ATOMIC = (bool, int, str, type(None))


def queryset_factory(
    template: QuerySet[Any],
) -> Callable[[Model, dict[str, Any], dict[Any, Any]], QuerySet[Any]] | None:
    """A function making, for a parent, its relation filter and known related objects,
    a queryset holding ``template``'s state with the parent-dependent parts replaced:
    routing hint, deferred filter, known related objects, a fresh unfiltered query,
    fresh empty containers and (Django 6.1) the parent's fetch mode. ``None`` when the
    template holds state this cannot reproduce.

    The function is generated for the template, one assignment per attribute in the
    template's order (as ``dataclasses`` generates ``__init__``): it runs once per
    parent and relation, where a loop of ``setattr`` calls costs about twice as much
    (0.91 against 0.48 us per parent, isolated); compiling it costs 67.5 us, so the
    code is compiled once per template shape (10.3 us per template then). Only
    attribute names go into the source, and a name that cannot be assigned there also
    gives ``None``; values stay in the function's namespace. Attributes are assigned
    one by one, as ``QuerySet.__init__`` assigns them: assigning ``__dict__`` would
    materialise a dict object that CPython's compact attribute storage otherwise avoids.
    """
    base = dict(template.__dict__)
    hints = base.get("_hints")
    deferred = base.get("_deferred_filter")
    if not isinstance(hints, dict) or not isinstance(deferred, tuple) or deferred[1]:
        return None
    namespace: dict[str, Any] = {
        "_new": object.__new__,
        "_class": type(template),
        "_hints": hints,
        "_negate": deferred[0],
    }
    # What each attribute gets: the parent's part, a fresh container or the shared value.
    per_parent = {
        "_hints": "{**_hints, 'instance': parent}",
        "_query": "query",
        "_deferred_filter": "(_negate, (), core_filters)",
        "_known_related_objects": "known_related",
    }
    query_lines = _unfiltered_query_lines(base["_query"], namespace)
    if query_lines is None:  # a clone of the template's query per parent
        namespace["_clone_query"] = base["_query"].clone
        query_lines = ["    query = _clone_query()\n"]
    if _compat.HAS_FETCH_MODES:
        per_parent["_fetch_mode"] = "parent._state.fetch_mode"
    lines = []
    for index, (key, value) in enumerate(base.items()):
        if not _assignable(key):
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
        lines.append(f"    queryset.{key} = {expression}\n")
    source = (
        "def new_queryset(parent, core_filters, known_related):\n"
        f"{''.join(query_lines)}"
        "    queryset = _new(_class)\n"
        f"{''.join(lines)}"
        "    return queryset\n"
    )
    exec(_compiled(source), namespace)  # identifiers and names bound in namespace only
    new_queryset: Callable[[Model, dict[str, Any], dict[Any, Any]], QuerySet[Any]] = namespace[
        "new_queryset"
    ]
    return new_queryset


def _assignable(name: str) -> bool:
    """Whether ``queryset.<name> = ...`` is valid source that assigns ``name`` itself
    (not a keyword, no NFKC-normalised non-ASCII identifier)."""
    return (
        name.isascii()
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and name != "__debug__"
    )


@functools.lru_cache(maxsize=64)
def _compiled(source: str) -> CodeType:
    """``source`` compiled once: a level's template usually has the shape of the last."""
    return compile(source, "<async_prefetch.cached_querysets>", "exec")


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
    if not all(isinstance(value, _ATOMIC) and _assignable(key) for key, value in extra):
        return None
    namespace["_unfiltered"] = UnfilteredQuery
    namespace["_query_model"] = model
    namespace["_alias_cols"] = template.alias_cols
    lines = [
        "    query = _new(_unfiltered)\n",
        "    query.model = _query_model\n",
        "    query.alias_cols = _alias_cols\n",
    ]
    for index, (key, value) in enumerate(extra):
        namespace[f"_query_{index}"] = value
        lines.append(f"    query.{key} = _query_{index}\n")
    return lines
