"""Build model instances from fetched rows exactly as Django's ``ModelIterable`` does."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from weakref import ref as weak_ref

from django.db.models import Model
from django.db.models.base import ModelState
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init

from .. import _compat
from .._compat import HAS_FETCH_MODES
from ..access.modes import ModelStateWithMode, Peers
from ..sql.compiler import CompiledQuery
from .queryset_template import assignable, compiled_source

Rows = Sequence[Sequence[Any]]
RowBuilder = Callable[[Rows], list[Model]]


@dataclass(eq=False)
class RowLink:
    """A reverse cache to write while the rows are built, as a reverse foreign key's
    ``link_back`` writes it afterwards: each new instance's fields cache holds, under
    ``cache_name``, ``parents[value]`` where ``value`` is its loaded ``attname`` (the
    foreign key's column). :func:`row_builder` sets ``applied`` when its builder writes
    them (the plain path, with the column loaded); otherwise they are left to
    ``link_back``."""

    attname: str
    cache_name: str
    parents: dict[Any, Model]
    applied: bool = False


def row_builder(
    compiled: CompiledQuery, *, peers_per_batch: bool = False, link: RowLink | None = None
) -> RowBuilder:
    """A function turning successive batches of raw rows for ``compiled`` into model
    instances, exactly as Django's ``ModelIterable`` does over the whole result.

    Applies field converters, select_related populators, annotations and extra
    selects, known related objects and fetch modes and peers (shared by every batch,
    or, with ``peers_per_batch``, the instances of each batch: a stream's chunks), in
    ``ModelIterable.__iter__``'s order. Only reads existing instances (known related
    objects); the instances it returns are new. With ``link``, see :class:`RowLink`.
    """
    assert compiled.sql is not None
    queryset = compiled.queryset
    compiler = compiled.compiler
    db = compiled.alias
    fetch_mode = _compat.queryset_fetch_mode(queryset)
    select, klass_info, annotation_col_map = (
        compiler.select,
        compiler.klass_info,
        compiler.annotation_col_map,
    )
    assert klass_info is not None
    model_cls = klass_info["model"]
    select_fields = klass_info["select_fields"]
    start, end = select_fields[0], select_fields[-1] + 1
    init_list = [f[0].target.attname for f in select[start:end]]
    path = fast_path(model_cls, init_list, fetch_mode)
    from_db = fast_from_db(path) if path else _compat.from_db_for(model_cls, fetch_mode)
    populators = _compat.related_populators(klass_info, select, db, fetch_mode)
    known_related = []
    for field, related_objs in queryset._known_related_objects.items():  # type: ignore[attr-defined]
        attnames = [
            field.attname
            if from_field == "self"
            else queryset.model._meta.get_field(from_field).attname
            for from_field in field.from_fields
        ]
        known_related.append((field, related_objs, attnames, operator.attrgetter(*attnames)))
    check_deferred = _compat.HAS_FETCH_MODES
    track_peers = _compat.tracks_peers(fetch_mode)
    new_peers: Callable[[], Any] = list if _compat.HAS_FETCH_MODES else Peers  # 5.2: see Peers
    peers = new_peers()
    col_count = compiler.col_count if compiler.has_extra_select else None

    plain = not (track_peers or populators or annotation_col_map or known_related)
    whole_row = start == 0 and end == len(select) and col_count is None
    build_many = annotated = None
    if plain and path:
        if link is not None:
            build_many = fast_batch_from_db(path, init_list, link)
            link.applied = build_many is not None
        if build_many is None:
            build_many = fast_batch_from_db(path, init_list)
    elif path and annotation_col_map and not (track_peers or populators or known_related):
        # Fields, then annotations (a many-to-many's source key among them): one loop.
        annotated = fast_batch_from_db(
            path, init_list, annotations=list(annotation_col_map.items()), fields=(start, end)
        )

    convert = _compat.rows_converter(compiler)

    def build(rows: Rows) -> list[Model]:
        batch: Any = rows
        if col_count is not None:  # trim ordering-only columns, a row at a time as Django
            batch = (row[:col_count] for row in rows)
        if plain:  # nothing but the model's own fields
            rows_out = convert(batch)
            if build_many is not None:
                own = rows_out if whole_row else (row[start:end] for row in rows_out)
                return build_many(db, own)
            if whole_row:
                return [from_db(db, init_list, row) for row in rows_out]
            return [from_db(db, init_list, row[start:end]) for row in rows_out]
        if annotated is not None:
            return annotated(db, convert(batch))
        nonlocal peers
        if peers_per_batch and track_peers:
            peers = new_peers()
        instances: list[Model] = []
        peers_before = len(peers)
        try:
            for row in convert(batch):
                obj = from_db(db, init_list, row[start:end])
                if track_peers:
                    peers.append(weak_ref(obj))
                    obj._state.peers = peers
                for populator in populators:
                    populator.populate(row, obj)
                if annotation_col_map:
                    for attr_name, col_pos in annotation_col_map.items():
                        setattr(obj, attr_name, row[col_pos])
                for field, rel_objs, attnames, rel_getter in known_related:
                    if field.is_cached(obj):
                        continue
                    if check_deferred and any(attname not in obj.__dict__ for attname in attnames):
                        continue
                    try:
                        rel_obj = rel_objs[rel_getter(obj)]
                    except KeyError:
                        continue
                    setattr(obj, field.name, rel_obj)
                instances.append(obj)
        except BaseException:
            del peers[peers_before:]  # a failed batch may be built again (worker thread)
            raise
        return instances

    return build


PLAIN_DESCRIPTORS = (DeferredAttribute, ForeignKeyDeferredAttribute)
"""Descriptors that read a loaded field straight from the instance's ``__dict__``."""


@dataclass(frozen=True)
class FastPath:
    """How :func:`fast_path` builds ``model``'s instances without ``Model.__init__``."""

    model: type[Model]
    fetch_mode: Any
    state_class: type[ModelState]
    #: A foreign key's descriptor stores into ``__dict__`` (materialising it, as Django's
    #: ``__init__`` does through that descriptor): the fields go there directly.
    #: Otherwise they are set one by one, so that the instance keeps CPython's compact
    #: attribute storage (no ``__dict__`` object), as Django's does.
    fills_dict: bool


def fast_path(model: type[Model], init_list: list[str], fetch_mode: Any) -> FastPath | None:
    """How to build ``model.from_db``'s instance while skipping ``Model.__init__``, when
    that is exact; otherwise ``None``.

    ``from_db`` calls ``__init__``, which sends ``pre_init``/``post_init`` and sets each
    loaded field with ``setattr``. When the model overrides neither, nobody listens to
    those signals for it and every loaded field's descriptor is Django's plain one (no
    ``__set__`` side effects on a fresh instance), the result is an instance whose
    ``__dict__`` holds ``_state`` (``adding=False``, ``db``, 6.1's fetch mode) and the
    loaded values, in field order: that is built directly.
    """
    descriptors = {type(getattr(model, attname, None)) for attname in init_list}
    if (
        model.from_db.__func__ is not Model.from_db.__func__  # type: ignore[attr-defined]
        or model.__init__ is not Model.__init__
        or pre_init.has_listeners(model)
        or post_init.has_listeners(model)
        or not descriptors.issubset(PLAIN_DESCRIPTORS)
    ):
        return None
    # Django 5.2 has no fetch modes: the engine's go in slots (see ModelStateWithMode).
    with_mode = fetch_mode is not None and not HAS_FETCH_MODES
    return FastPath(
        model,
        fetch_mode,
        ModelStateWithMode if with_mode else ModelState,
        fills_dict=descriptors != {DeferredAttribute},
    )


def fast_from_db(path: FastPath) -> Callable[[str, list[str], Sequence[Any]], Model]:
    """An equivalent of ``path.model.from_db`` (see :func:`fast_path`)."""
    new_instance, model, state_class = object.__new__, path.model, path.state_class
    fetch_mode = path.fetch_mode

    def new_state(db: str) -> ModelState:
        state = state_class()
        state.adding = False
        state.db = db
        if fetch_mode is not None:
            state.fetch_mode = fetch_mode
        return state

    if path.fills_dict:

        def build_dict(db: str, field_names: list[str], values: Sequence[Any]) -> Model:
            obj = new_instance(model)
            attrs = obj.__dict__
            attrs["_state"] = new_state(db)
            attrs.update(zip(field_names, values, strict=True))
            return obj

        return build_dict

    def build(db: str, field_names: list[str], values: Sequence[Any]) -> Model:
        obj = new_instance(model)
        obj._state = new_state(db)
        for name, value in zip(field_names, values, strict=True):
            setattr(obj, name, value)
        return obj

    return build


def fast_batch_from_db(
    path: FastPath,
    init_list: list[str],
    link: RowLink | None = None,
    annotations: Sequence[tuple[str, int]] = (),
    fields: tuple[int, int] | None = None,
) -> Callable[[str, Iterable[Sequence[Any]]], list[Model]] | None:
    """``[fast_from_db(path)(db, init_list, row) for row in rows]`` as one generated loop
    (no call per row); ``None`` for no fields, or a name it cannot assign.

    Same instances, attributes assigned in the same order: ``_state`` first, then the
    loaded fields (see :attr:`FastPath.fills_dict`). With ``link``, each instance's state
    then gets its fields cache holding its parent (:class:`RowLink`; a key with no parent
    raises ``KeyError``, as Django's builder), or ``None`` when the rows do not hold its
    ``attname`` (a foreign key's column, so a model whose fields fill ``__dict__``).

    With ``fields``, ``(start, end)``, each row is a whole ``SELECT`` row and the fields
    are ``row[start:end]``; ``annotations``, ``(name, position)`` pairs, are then set on
    the instance from the row as ``ModelIterable`` sets them (``setattr``, in order).
    """
    if not init_list or (
        link is not None
        and (not path.fills_dict or link.attname not in init_list or fields is not None)
    ):
        return None
    if not all(assignable(name) for name, _ in annotations):
        return None
    own = "row" if fields is None else f"row[{fields[0]}:{fields[1]}]"
    namespace: dict[str, Any] = {
        "_new": object.__new__,
        "_model": path.model,
        "_state_class": path.state_class,
        "_fetch_mode": path.fetch_mode,
    }
    if path.fills_dict:
        for index, name in enumerate(init_list):
            namespace[f"_name_{index}"] = name
        targets = ", ".join(f"attrs[_name_{index}]" for index in range(len(init_list)))
        assign = ["attrs = obj.__dict__", "attrs['_state'] = state", f"{targets}, = {own}"]
    elif all(map(assignable, init_list)):
        targets = ", ".join(f"obj.{name}" for name in init_list)
        assign = ["obj._state = state", f"{targets}, = {own}"]
    else:
        return None
    assign += [f"obj.{name} = row[{position}]" for name, position in annotations]
    linking = []
    if link is not None:
        namespace["_cache_name"], namespace["_parents"] = link.cache_name, link.parents
        key = init_list.index(link.attname)
        linking = [f"state.fields_cache = {{_cache_name: _parents[row[{key}]]}}"]
    lines = [
        "obj = _new(_model)",
        "state = _state_class()",
        "state.adding = False",
        "state.db = db",
        *(["state.fetch_mode = _fetch_mode"] if path.fetch_mode is not None else []),
        *assign,
        *linking,
        "append(obj)",
    ]
    source = (
        "def build_many(db, rows):\n"
        "    made = []\n"
        "    append = made.append\n"
        "    for row in rows:\n"
        + "".join(f"        {line}\n" for line in lines)
        + "    return made\n"
    )
    exec(compiled_source(source, "<async_prefetch.rows>"), namespace)
    build_many: Callable[[str, Iterable[Sequence[Any]]], list[Model]] = namespace["build_many"]
    return build_many
