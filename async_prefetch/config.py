"""The ``ASYNC_PREFETCH`` setting, read once per use with defaults filled in.

:func:`read_config` validates the setting and returns every problem found; the system
check (:mod:`.checks`) reports them when ``"async_prefetch"`` is installed, and
:func:`load_config` raises them as ``ImproperlyConfigured`` when the engine is used.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class PoolConfig:
    """Arguments for each alias's ``psycopg_pool.AsyncConnectionPool``."""

    min_size: int = 2
    max_size: int = 10
    timeout: float = 30.0
    max_idle: float = 300.0
    max_lifetime: float = 3600.0
    check: bool = False  # a round trip per checkout: off by default


_DEFAULT_CHUNK_SIZE = 5000


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine reads from settings."""

    pool: PoolConfig
    max_concurrency: int
    install: bool
    chunk_size: int | None = _DEFAULT_CHUNK_SIZE  # parent keys per query; None: one per level
    #: Read replicas by primary alias, as ``(alias, (replica, ...))`` pairs in settings order.
    replicas: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Seconds a replica may lag behind its primary before it is skipped; ``None``: unbounded.
    replica_max_lag: float | None = None
    #: Every queryset's instances auto-prefetch (:func:`async_prefetch.autoprefetch`).
    auto: bool = False
    #: Where a stage's queries go in one pipeline on one connection: ``"atomic"``
    #: (``PIPELINE`` unset: on the caller's connection inside ``atomic``), ``"always"``
    #: (``True``: also outside, on one pooled connection per call), ``"never"`` (``False``).
    pipeline: Literal["atomic", "always", "never"] = "atomic"
    #: Every call's queries see one snapshot (``consistent=True`` by default).
    consistent: bool = False

    def replicas_of(self, alias: str) -> tuple[str, ...]:
        """The aliases of ``alias``'s read replicas (``()``: none configured)."""
        for primary, replicas in self.replicas:
            if primary == alias:
                return replicas
        return ()


#: Check ids of the problems :func:`read_config` finds.
NOT_A_DICT = "async_prefetch.E001"
UNKNOWN_KEYS = "async_prefetch.E002"
REPEATED_KEY = "async_prefetch.E003"
WRONG_TYPE = "async_prefetch.E004"
OUT_OF_RANGE = "async_prefetch.E005"
UNKNOWN_DATABASE = "async_prefetch.E006"


@dataclass(frozen=True)
class ConfigError:
    """One thing wrong with ``settings.ASYNC_PREFETCH``, as the system check reports it."""

    id: str
    msg: str
    hint: str | None = None

    def __str__(self) -> str:
        """The form of ``manage.py check``'s output (without the object it names)."""
        hint = f"\n\tHINT: {self.hint}" if self.hint else ""
        return f"({self.id}) {self.msg}{hint}"


_POOL_KEYS = frozenset({"MIN_SIZE", "MAX_SIZE", "TIMEOUT", "MAX_IDLE", "MAX_LIFETIME", "CHECK"})
_TOP_KEYS = frozenset(
    {
        "POOL",
        "MAX_CONCURRENCY",
        "INSTALL",
        "CHUNK_SIZE",
        "REPLICAS",
        "REPLICA_MAX_LAG",
        "AUTO",
        "PIPELINE",
        "CONSISTENT",
    }
)


class _Reader:
    """Reads a setting's values, recording a :class:`ConfigError` for each bad one.

    A bad value reads as its default, so that reading goes on and finds every problem;
    a config read with errors is never used.
    """

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def error(self, id: str, msg: str, hint: str | None = None) -> None:
        self.errors.append(ConfigError(id, msg, hint))

    def section(self, value: object, where: str, allowed: frozenset[str]) -> dict[str, Any]:
        """``value``'s items under upper-cased keys; ``{}`` when it is not a dict."""
        if not isinstance(value, Mapping):
            self.error(NOT_A_DICT, f"{where} must be a dict, not {type(value).__name__}.")
            return {}
        spellings: dict[str, list[Any]] = {}
        for key in value:
            spellings.setdefault(str(key).upper(), []).append(key)
        unknown = [key for name, keys in spellings.items() if name not in allowed for key in keys]
        if unknown:
            hint = _unknown_keys_hint(unknown, allowed)
            self.error(UNKNOWN_KEYS, f"{where} has unknown keys {unknown}.", hint)
        for name, keys in spellings.items():
            if len(keys) > 1 and name in allowed:
                self.error(
                    REPEATED_KEY,
                    f"{where} sets {name!r} more than once: {keys}.",
                    "Keys are case-insensitive: keep one of them.",
                )
        return {str(key).upper(): item for key, item in value.items()}

    def integer(
        self,
        section: dict[str, Any],
        key: str,
        where: str,
        default: int,
        minimum: int,
        *,
        or_none: bool = False,
    ) -> int:
        """An ``int`` (not a ``bool``) of at least ``minimum``; ``or_none``: the caller
        also accepts ``None`` (and has handled it), the messages say so."""
        value = section.get(key, default)
        name = f"{where}[{key!r}]"
        alternative = " or None" if or_none else ""
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(
                WRONG_TYPE, f"{name} must be an integer{alternative}, not {_described(value)}."
            )
            return default
        if value < minimum:
            self.error(
                OUT_OF_RANGE, f"{name} must be at least {minimum}{alternative}, not {value}."
            )
            return default
        return value

    @overload
    def seconds(self, section: dict[str, Any], key: str, where: str, default: float) -> float: ...
    @overload
    def seconds(
        self, section: dict[str, Any], key: str, where: str, default: None
    ) -> float | None: ...
    def seconds(
        self, section: dict[str, Any], key: str, where: str, default: float | None
    ) -> float | None:
        """A number (not a ``bool``) of seconds above 0, as a ``float``; with a ``None``
        default, also ``None`` (absent or given)."""
        value = section.get(key, default)
        if value is None and default is None:
            return None
        name = f"{where}[{key!r}]"
        or_none = " or None" if default is None else ""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(
                WRONG_TYPE, f"{name} must be a number of seconds{or_none}, not {_described(value)}."
            )
            return default
        if not value > 0:  # NaN too
            self.error(OUT_OF_RANGE, f"{name} must be more than 0 seconds{or_none}, not {value}.")
            return default
        return float(value)

    def boolean(self, section: dict[str, Any], key: str, where: str, default: bool) -> bool:
        """``True`` or ``False``, nothing merely truthy."""
        value = section.get(key, default)
        if not isinstance(value, bool):
            self.error(
                WRONG_TYPE, f"{where}[{key!r}] must be True or False, not {_described(value)}."
            )
            return default
        return value

    def pipeline(
        self, section: dict[str, Any], key: str, where: str
    ) -> Literal["atomic", "always", "never"]:
        """``"atomic"`` (the default), ``True`` (``"always"``) or ``False`` (``"never"``)."""
        value = section.get(key, "atomic")
        if value is True:
            return "always"
        if value is False:
            return "never"
        if value != "atomic":
            self.error(
                WRONG_TYPE,
                f"{where}[{key!r}] must be True, False or 'atomic', not {_described(value)}.",
            )
        return "atomic"

    def replicas(self, value: object, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``{alias: [replica, ...]}``: aliases of ``settings.DATABASES``, each list a
        non-empty list or tuple of distinct aliases; ``()`` when anything is wrong."""
        if not isinstance(value, Mapping):
            self.error(NOT_A_DICT, f"{where} must be a dict, not {type(value).__name__}.")
            return ()
        databases = getattr(settings, "DATABASES", {})
        known = f"Aliases in DATABASES: {', '.join(map(repr, databases))}."
        errors_before = len(self.errors)
        result: list[tuple[str, tuple[str, ...]]] = []
        for alias, replicas in value.items():
            name = f"{where}[{alias!r}]"
            if not isinstance(alias, str) or alias not in databases:
                self.error(UNKNOWN_DATABASE, f"{where} names unknown database {alias!r}.", known)
            if not isinstance(replicas, list | tuple) or not replicas:
                self.error(
                    WRONG_TYPE,
                    f"{name} must be a non-empty list of database aliases, "
                    f"not {_described(replicas)}.",
                )
                continue
            for replica in replicas:
                if not isinstance(replica, str) or replica not in databases:
                    self.error(
                        UNKNOWN_DATABASE, f"{name} names unknown database {replica!r}.", known
                    )
            repeated = sorted({str(r) for r in replicas if list(replicas).count(r) > 1})
            if repeated:
                self.error(OUT_OF_RANGE, f"{name} lists {repeated} more than once.")
            result.append((str(alias), tuple(map(str, replicas))))
        return tuple(result) if len(self.errors) == errors_before else ()


def _described(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _unknown_keys_hint(unknown: list[Any], allowed: frozenset[str]) -> str:
    """'Did you mean ...?' for each unknown key close to an allowed one, then the keys."""
    choices = sorted(allowed)
    suggestions = []
    for key in unknown:
        close = difflib.get_close_matches(str(key).upper(), choices, n=1)
        if close:
            instead = f" instead of {key!r}" if len(unknown) > 1 else ""
            suggestions.append(f"Did you mean {close[0]!r}{instead}?")
    known = f"Known keys: {', '.join(map(repr, choices))}."
    return " ".join([*suggestions, known])


def read_config() -> tuple[EngineConfig | None, list[ConfigError]]:
    """``settings.ASYNC_PREFETCH`` as an :class:`EngineConfig` with defaults filled in,
    and every problem found in it; the config is ``None`` when there is a problem.

    Keys are case-insensitive: ``{"POOL": {"min_size": 2, "max_size": 10, "timeout": 30,
    "max_idle": 300, "max_lifetime": 3600, "check": False}, "MAX_CONCURRENCY": 10,
    "INSTALL": False, "CHUNK_SIZE": 5000, "REPLICAS": {}, "REPLICA_MAX_LAG": None,
    "AUTO": False, "PIPELINE": "atomic", "CONSISTENT": False}``.
    Sizes and ``MAX_CONCURRENCY`` are integers, times positive numbers of seconds,
    ``CHECK``, ``INSTALL`` and ``AUTO`` booleans, ``CHUNK_SIZE`` a positive integer or ``None``;
    ``MAX_CONCURRENCY`` defaults to ``MAX_SIZE``. ``REPLICAS`` maps an alias of
    ``DATABASES`` to a list of aliases of its read replicas, ``REPLICA_MAX_LAG`` is a
    positive number of seconds or ``None`` (replicas' lag not bounded). ``PIPELINE`` is
    ``"atomic"``, ``True`` or ``False``, ``CONSISTENT`` a boolean.
    """
    read = _Reader()
    top = "ASYNC_PREFETCH"
    raw = read.section(getattr(settings, top, {}), top, _TOP_KEYS)
    where = f"{top}['POOL']"
    pool_raw = read.section(raw.get("POOL", {}), where, _POOL_KEYS)
    defaults = PoolConfig()
    errors_before_sizes = len(read.errors)
    min_size = read.integer(pool_raw, "MIN_SIZE", where, defaults.min_size, minimum=0)
    max_size = read.integer(pool_raw, "MAX_SIZE", where, defaults.max_size, minimum=1)
    if len(read.errors) == errors_before_sizes and min_size > max_size:
        read.error(
            OUT_OF_RANGE,
            f"{where} needs MIN_SIZE <= MAX_SIZE, not MIN_SIZE={min_size} and MAX_SIZE={max_size}.",
        )
    pool = PoolConfig(
        min_size=min_size,
        max_size=max_size,
        timeout=read.seconds(pool_raw, "TIMEOUT", where, defaults.timeout),
        max_idle=read.seconds(pool_raw, "MAX_IDLE", where, defaults.max_idle),
        max_lifetime=read.seconds(pool_raw, "MAX_LIFETIME", where, defaults.max_lifetime),
        check=read.boolean(pool_raw, "CHECK", where, defaults.check),
    )
    chunk_size: int | None = None
    if raw.get("CHUNK_SIZE", _DEFAULT_CHUNK_SIZE) is not None:
        chunk_size = read.integer(
            raw, "CHUNK_SIZE", top, _DEFAULT_CHUNK_SIZE, minimum=1, or_none=True
        )
    config = EngineConfig(
        pool=pool,
        max_concurrency=read.integer(raw, "MAX_CONCURRENCY", top, max_size, minimum=1),
        install=read.boolean(raw, "INSTALL", top, default=False),
        chunk_size=chunk_size,
        replicas=read.replicas(raw.get("REPLICAS", {}), f"{top}['REPLICAS']"),
        replica_max_lag=read.seconds(raw, "REPLICA_MAX_LAG", top, None),
        auto=read.boolean(raw, "AUTO", top, default=False),
        pipeline=read.pipeline(raw, "PIPELINE", top),
        consistent=read.boolean(raw, "CONSISTENT", top, default=False),
    )
    if read.errors:
        return None, read.errors
    return config, []


#: The last valid setting :func:`load_config` read (a copy) and its config.
_loaded: tuple[Any, EngineConfig] | None = None


def load_config() -> EngineConfig:
    """:func:`read_config`'s config; ``ImproperlyConfigured`` listing its errors, in the
    form ``manage.py check`` prints them, when there are any.

    Read again only when ``settings.ASYNC_PREFETCH`` differs from (is not equal to) the
    setting of the last config returned: ``override_settings`` and changes made to the
    setting in place both take effect on the next call."""
    global _loaded
    raw = getattr(settings, "ASYNC_PREFETCH", {})
    loaded = _loaded
    if loaded is not None and type(raw) is type(loaded[0]) and raw == loaded[0]:
        return loaded[1]
    config, errors = read_config()
    if config is None:
        raise ImproperlyConfigured("\n".join(map(str, errors)))
    try:
        _loaded = (copy.deepcopy(raw), config)
    except Exception:  # a value that cannot be copied: read it every time
        _loaded = None
    return config
